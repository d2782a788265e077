// charlm's web export: the one-step ONNX model run by onnxruntime-web (WebAssembly), one character at a time.
"use strict";
const $ = (id) => document.getElementById(id);
let session = null, meta = null, itos = [], stoi = new Map(), stopping = false, running = false;

async function load() {
  ort.env.wasm.numThreads = 1;  // no SharedArrayBuffer needed: any static file server will do
  ort.env.wasm.wasmPaths = new URL("./", location.href).href;  // the runtime's files lie beside this page
  meta = await (await fetch("charlm.json")).json();
  const tokenizer = await (await fetch("model.tokenizer.json")).json();
  for (const [token, id] of Object.entries(tokenizer.model.vocab)) { itos[id] = token; stoi.set(token, id); }
  session = await ort.InferenceSession.create("model.onnx", {executionProviders: ["wasm"]});
  const held = meta.held_out_bits_per_char;
  $("card").textContent = `${meta.num_layers} × ${meta.cell.toUpperCase()} ${meta.hidden_size}` +
    `${meta.embedding_dim ? ", embedding " + meta.embedding_dim : ", one-hot"} · ${meta.vocab_size} characters` +
    ` (${meta.preprocess})` + (meta.quantization ? ` · ${meta.quantization} weights` : "") +
    (held ? ` · held out ${held.toFixed(3)} bits/char` : "") +
    ` · charlm ${meta.charlm_version}, onnxruntime-web ${meta.onnxruntime_web}`;
  $("length").max = 5000;
  $("top-k").max = Math.min(100, meta.vocab_size - 1);
  $("generate").disabled = false;
  refresh();
}

function refresh() {
  for (const id of ["temperature", "top-k", "top-p", "length"]) $(id + "-val").textContent = $(id).value;
}

function showError(message) { const e = $("error"); e.textContent = message; e.style.display = message ? "block" : "none"; }

function zeros(n) { return new Float32Array(n); }

function paired() {  // whether the state is (h, c), as the LSTM's and the mogrifier's: the graph takes a "c"
  return meta.inputs ? meta.inputs.includes("c") : meta.cell === "lstm";
}

async function step(id, state) {  // one character in, the next prediction and the new state out
  const L = meta.num_layers, H = meta.hidden_size;
  const feeds = {ids: new ort.Tensor("int64", BigInt64Array.from([BigInt(id)]), [1]),
                 h: new ort.Tensor("float32", state.h, [L, 1, H])};
  if (paired()) feeds.c = new ort.Tensor("float32", state.c, [L, 1, H]);
  const out = await session.run(feeds);
  return {logits: out.logits.data, state: {h: out.h_out.data, c: paired() ? out.c_out.data : null}};
}

function mulberry32(seed) {  // the page's seeded uniform generator
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function pick(logits, temperature, topK, topP, rand) {
  // <unk> (id 0) is never emitted, as in charlm generate
  const V = logits.length;
  let best = 1;
  for (let i = 2; i < V; i++) if (logits[i] > logits[best]) best = i;
  if (temperature === 0) return best;
  const z = new Float64Array(V);
  for (let i = 0; i < V; i++) z[i] = i === 0 ? -Infinity : logits[i] / temperature;
  const order = [...z.keys()].sort((a, b) => z[b] - z[a]);
  if (topK > 0 && topK < V) { const kth = z[order[topK - 1]]; for (let i = 0; i < V; i++) if (z[i] < kth) z[i] = -Infinity; }
  const top = z[order[0]];
  let total = 0;
  const p = new Float64Array(V);
  for (let i = 0; i < V; i++) { p[i] = Math.exp(z[i] - top); total += p[i]; }
  if (topP < 1) {
    let before = 0;
    for (const i of order) { const mass = p[i] / total; if (before >= topP) p[i] = 0; before += mass; }
  }
  let sum = 0;
  for (let i = 0; i < V; i++) sum += p[i];
  const u = rand() * sum;
  let acc = 0;
  for (let i = 0; i < V; i++) { acc += p[i]; if (u < acc) return i; }
  return best;
}

async function generate() {
  if (running) return;
  showError("");
  const prompt = $("prompt").value;
  const unknown = [...new Set([...prompt].filter((ch) => !stoi.has(ch)))];
  if (unknown.length) { showError(`Not in the model's vocabulary: ${unknown.map((c) => JSON.stringify(c)).join(" ")}`); return; }
  const temperature = Number($("temperature").value), topK = Number($("top-k").value), topP = Number($("top-p").value);
  const length = Number($("length").value), rand = mulberry32(Number($("seed").value));
  const stopAt = $("stop-at").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  const out = $("output");
  out.textContent = "";
  const promptSpan = document.createElement("span"), textSpan = document.createElement("span");
  promptSpan.className = "prompt";
  promptSpan.textContent = prompt;
  out.append(promptSpan, textSpan);
  running = true; stopping = false;
  $("generate").disabled = true; $("stop").disabled = false;
  const L = meta.num_layers, H = meta.hidden_size;
  let state = {h: zeros(L * H), c: paired() ? zeros(L * H) : null};
  let logits = Float32Array.from(meta.zero_state_logits);
  const t0 = performance.now();
  let text = "", reason = "length";
  try {
    for (const ch of prompt) ({logits, state} = await step(stoi.get(ch), state));
    for (let t = 0; t < length; t++) {
      if (stopping) { reason = "stopped"; break; }
      const id = pick(logits, temperature, topK, topP, rand);
      text += itos[id];
      if (stopAt && text.endsWith(stopAt)) { text = text.slice(0, -stopAt.length); reason = "stop"; break; }
      if (t % 16 === 15 || t + 1 === length) textSpan.textContent = text;
      if (t + 1 < length) ({logits, state} = await step(id, state));
    }
    textSpan.textContent = text;
    const s = (performance.now() - t0) / 1000;
    $("stats").textContent = `${text.length.toLocaleString()} characters in ${s.toFixed(2)} s · ` +
      `${Math.round(text.length / Math.max(s, 1e-6)).toLocaleString()} chars/s · ${reason}`;
  } catch (e) {
    showError(String(e));
  } finally {
    running = false;
    $("generate").disabled = false; $("stop").disabled = true;
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => { stopping = true; });
for (const el of document.querySelectorAll("input")) el.addEventListener("input", refresh);
document.addEventListener("keydown", (e) => { if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); generate(); } });
load().catch((e) => showError("cannot load the model: " + e));
