"""Generation speed: charlm's sampler against the d2l-style loop, and against the matmul peak.

For each cell (one-hot input, hidden 256, vocabulary 28, random weights: speed does not depend
on what the model learnt), and for each trained model given with ``--checkpoint``, it prints
characters per second for

- the d2l way (``predict_ch8``: one ``model.forward`` call per character, batch of one, ``.item()``),
  twice: as the book writes it, with autograd recording (each step's graph hangs on the state, so
  it slows as the text grows; measured over ``--length`` characters), and under ``torch.no_grad``,
  the stronger baseline the ratios are taken against;
- charlm greedy, charlm temperature sampling (0.8), one sample;
- charlm batched sampling (``--num-samples``, temperature 0.8), characters of all samples per second;

and, for the batched case, the arithmetic limit: the fp32 matmul peak measured in the same run
divided by the FLOPs one character costs. With ``--process`` it also times whole
``charlm generate --length 200000`` processes (start-up included) on each model's checkpoint.

With ``--onnx`` it exports each model (``charlm export``, both exporters: TorchScript-based and
``dynamo``, and the dynamo export with ``--quantize int8``) and compares onnxruntime with the
PyTorch path: single-stream greedy characters/s as whole ``charlm generate`` processes (PyTorch,
the faster fp32 export, the int8 export), interleaved, median of ``--repeats``, and in-process; and
batched sampling (``--onnx-batch`` samples, T 0.8).

    python scripts/bench_generate.py
    python scripts/bench_generate.py --cells gru --process
    python scripts/bench_generate.py --cells "" --checkpoint checkpoints/timemachine
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from charlm import RNNLM, Vocab, generate, load_checkpoint, save_checkpoint
from charlm.config import GATES


def d2l_predict(model, vocab, prefix, num_preds, grad=False):
    """The d2l book's predict_ch8: one forward call of the whole model per character."""
    state = model.init_state(1)
    outputs = [vocab.stoi[prefix[0]]]
    get_input = lambda: torch.tensor([outputs[-1]]).reshape(1, 1)  # noqa: E731
    with torch.set_grad_enabled(grad):
        for y in prefix[1:]:
            _, state = model(get_input(), state)
            outputs.append(vocab.stoi[y])
        for _ in range(num_preds):
            y, state = model(get_input(), state)
            outputs.append(int(y.argmax(dim=2).reshape(1)))
    return vocab.decode(outputs)


def rate(fn, chars):
    t0 = time.perf_counter()
    fn()
    return chars / (time.perf_counter() - t0)


def matmul_peak(n=1024, repeats=20):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def flops_per_char(model) -> int:
    """Multiply-adds x 2 of one character: every layer's input and recurrent matmuls, then the head.

    A one-hot input counts as a (V x G*H) matmul, as the issue's figure for the d2l model does.
    """
    cfg = model.config
    G, H = GATES[cfg.cell], cfg.hidden_size
    layers = sum(2 * G * H * ((cfg.input_size if k == 0 else H) + H) for k in range(cfg.num_layers))
    return layers + 2 * H * cfg.vocab_size


def measure(label, model, vocab, checkpoint, args, peak):
    """One table row (and its whole-process row): the speeds of one model."""
    prefix = "".join(c for c in "time traveller " if c in vocab.stoi)
    n_d2l = max(2000, args.length // 10)
    d2l = rate(lambda: d2l_predict(model, vocab, prefix, n_d2l), n_d2l)
    written = rate(lambda: d2l_predict(model, vocab, prefix, args.length, grad=True), args.length)
    greedy = rate(lambda: generate(model, vocab, prefix, args.length), args.length)
    if generate(model, vocab, prefix, 300) != d2l_predict(model, vocab, prefix, 300):
        raise SystemExit(f"{label}: charlm's greedy text differs from the d2l loop's")
    sampled = rate(lambda: generate(model, vocab, prefix, args.length, temperature=0.8, seed=0), args.length)
    N, L = args.num_samples, args.batched_length
    batched = rate(lambda: generate(model, vocab, prefix, L, temperature=0.8, seed=0, num_samples=N), N * L)
    limit = peak / flops_per_char(model)
    print(f"| {label} | {written:,.0f} | {d2l:,.0f} | {greedy:,.0f} | {sampled:,.0f} | {greedy / d2l:.1f}x | "
          f"{batched:,.0f} | {limit:,.0f} | {batched / limit:.2f} |")
    row = {"cell": label, "d2l_as_written": written, "d2l_no_grad": d2l, "greedy": greedy, "sampling": sampled,
           "batched": batched, "limit": limit}
    if args.process:
        n = args.process_length
        cmd = [sys.executable, "-m", "charlm", "generate", prefix.strip(), "--checkpoint", str(checkpoint),
               "--length", str(n)]
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t0)
        row["process_s"] = wall = statistics.median(walls)
        print(f"|   | whole `charlm generate --length {n}` process, median of {args.repeats}: {wall:.2f} s = "
              f"{n / wall:,.0f} chars/s = {n / wall / d2l:.1f}x the d2l loop under no_grad, "
              f"{n / wall / written:.1f}x as written | | | | | | | |")
    return row


def onnx_rows(label, model, vocab, checkpoint, args) -> dict:
    """onnxruntime against the PyTorch path on one model (see the module's docstring)."""
    from charlm.export import OnnxModel, export_onnx

    prefix = "".join(c for c in "time traveller " if c in vocab.stoi)
    ck = load_checkpoint(checkpoint)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(ck, Path(tmp) / name / "model.onnx", dynamo=name == "dynamo")
                 for name in ("torchscript", "dynamo")}
        int8_path = export_onnx(ck, Path(tmp) / "int8" / "model.onnx", quantize="int8")
        engines = {name: OnnxModel(p) for name, p in paths.items()}
        n, N, L = args.length, args.onnx_batch, args.batched_length
        for name, engine in engines.items():
            text = "".join(c for (c,) in engine.iter_generate(prefix, 300))
            if prefix + text != generate(model, vocab, prefix, 300):
                raise SystemExit(f"{label}: the {name} ONNX model's greedy text differs from PyTorch's")
            out[f"{name}_greedy"] = rate(lambda: [None for _ in engine.iter_generate(prefix, n)], n)
        int8 = OnnxModel(int8_path)
        out["int8_greedy"] = rate(lambda: [None for _ in int8.iter_generate(prefix, n)], n)
        out["fp32_bytes"], out["int8_bytes"] = paths["dynamo"].stat().st_size, int8_path.stat().st_size
        out["torch_greedy"] = rate(lambda: generate(model, vocab, prefix, n), n)
        best = max(engines, key=lambda k: out[f"{k}_greedy"])
        out["onnx_batched"] = rate(lambda: [None for _ in engines[best].iter_generate(
            prefix, L, temperature=0.8, seed=0, num_samples=N)], N * L)
        out["torch_batched"] = rate(lambda: generate(model, vocab, prefix, L, temperature=0.8, seed=0,
                                                     num_samples=N), N * L)
        base = [sys.executable, "-m", "charlm", "generate", prefix.strip(), "--length", str(args.process_length)]
        commands = {"torch": base + ["--checkpoint", str(checkpoint)],
                    "onnx": base + ["--checkpoint", str(paths[best]), "--engine", "onnx"],
                    "int8": base + ["--checkpoint", str(int8_path), "--engine", "onnx"]}
        walls = {k: [] for k in commands}
        for _ in range(args.repeats):  # interleaved
            for k, cmd in commands.items():
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                walls[k].append(time.perf_counter() - t0)
        for k in commands:
            out[f"{k}_process"] = args.process_length / statistics.median(walls[k])
    print(f"| {label} | {out['torch_greedy']:,.0f} | {out['torchscript_greedy']:,.0f} | {out['dynamo_greedy']:,.0f} | "
          f"{out['int8_greedy']:,.0f} | {out['torch_process']:,.0f} | {out['onnx_process']:,.0f} ({best}) | "
          f"{out['int8_process']:,.0f} | {out['onnx_process'] / out['torch_process']:.2f}x | "
          f"{out['int8_process'] / out['onnx_process']:.2f}x | {out['int8_process'] / out['torch_process']:.2f}x | "
          f"{out['fp32_bytes'] / 1e6:.2f} / {out['int8_bytes'] / 1e6:.2f} MB | {out['torch_batched']:,.0f} | "
          f"{out['onnx_batched']:,.0f} |")
    return {"cell": label, "best_exporter": best, **out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="rnn,gru,lstm", help="random one-hot models to time ('' for none)")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="RUN",
                    help="also time this trained model (a run or checkpoint directory; repeatable)")
    ap.add_argument("--length", type=int, default=20_000, help="characters per single-sample measurement")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--batched-length", type=int, default=500)
    ap.add_argument("--process", action="store_true", help="also time whole `charlm generate` processes")
    ap.add_argument("--repeats", type=int, default=3, help="whole processes timed per model (the median is shown)")
    ap.add_argument("--process-length", type=int, default=200_000, help="characters each whole process generates")
    ap.add_argument("--onnx", action="store_true", help="only the onnxruntime comparison (needs the onnx extra)")
    ap.add_argument("--onnx-batch", type=int, default=64, help="samples of the batched onnxruntime comparison")
    args = ap.parse_args(argv)
    if args.onnx:
        return main_onnx(args)
    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")  # 28 symbols with <unk>, as d2l's letters
    peak = matmul_peak()
    print(f"random models: one-hot, hidden {args.hidden_size}, vocabulary {len(vocab)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s\n")
    print("| model | d2l as written | d2l, no_grad | greedy | sampling T=0.8 | greedy / d2l no_grad | batched x{} "
          "| arithmetic limit | batched / limit |".format(args.num_samples))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    return [measure(*model, args, peak) for model in models(args, vocab)]


def models(args, vocab):
    """(label, model, vocab, checkpoint path) of each random model (``--cells``), then each ``--checkpoint``."""
    with tempfile.TemporaryDirectory() as tmp:
        for cell in filter(None, args.cells.split(",")):
            torch.manual_seed(0)
            model = RNNLM(len(vocab), cell=cell, hidden_size=args.hidden_size, embedding_dim=0).eval()
            yield cell, model, vocab, save_checkpoint(Path(tmp) / cell, model, vocab, {})
    for path in args.checkpoint:
        ck = load_checkpoint(path)
        c = ck.model.config
        label = (f"{Path(path).name}: {c.num_layers} x {c.cell} {c.hidden_size}, "
                 + (f"embedding {c.embedding_dim}" if c.embedding_dim else "one-hot") + f", V={c.vocab_size}")
        yield label, ck.model.eval(), ck.vocab, path


def main_onnx(args):
    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")
    print(f"onnxruntime against PyTorch {torch.__version__} ({torch.get_num_threads()} threads); characters/s; "
          f"single stream greedy over {args.length:,} characters in-process, whole `charlm generate --length "
          f"{args.process_length:,}` processes interleaved (median of {args.repeats}); batched: "
          f"x{args.onnx_batch}, T 0.8, {args.batched_length} characters each\n")
    print("| model | PyTorch greedy | ONNX greedy (TorchScript exporter) | ONNX greedy (dynamo) | int8 greedy "
          "| PyTorch process | ONNX process | int8 process | ONNX / PyTorch process | int8 / ONNX process "
          "| int8 / PyTorch process | model file fp32 / int8 | PyTorch batched | ONNX batched |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    return [onnx_rows(*model, args) for model in models(args, vocab)]


if __name__ == "__main__":
    main()
