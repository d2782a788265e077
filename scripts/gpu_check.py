"""A few minutes on one GPU: do charlm's CUDA paths train, resume, evaluate, generate and keep up?

Not part of the test suite (CI has no GPU). Run it on a CUDA machine and keep its output:

    python scripts/gpu_check.py corpora/timemachine.txt                  # cuda, ~3-5 minutes
    python scripts/gpu_check.py corpora/timemachine.txt --device cpu --quick   # the script's own smoke run

A GPU machine without internet access needs the corpus file beside the code (charlm cannot
download it there): copy it into corpora/ first, which git ignores, and ship it with the tree.

What it does, each part printing its figures:

1. the machine: torch, CUDA, the GPU, bf16 support;
2. training on the GPU in fp32, bf16 and fp16 (what the GPU supports), each also stopped half way and
   resumed: the largest weight difference between the resumed and the whole run (cuDNN's and
   atomics' reductions need not repeat bit for bit on a GPU, so this is a figure, not a pass);
3. the fp32 checkpoint written on the GPU loaded on the CPU (weights and trainer state), and the
   held-out loss of the same weights on both devices;
4. greedy generation of the same checkpoint on the GPU and on the CPU: identical, or where the
   texts first differ;
5. the paths no CPU test reaches: ``--precision auto``'s choice (native bf16 only: torch's own check
   counts emulated bf16 on a V100 or T4), dynamic evaluation (a backward pass through cuDNN's RNN,
   which cuDNN allows only in training mode) against the CPU's figure, and ``charlm serve``'s scoring
   path (``echo`` + ``logprobs``: the prompt's log-probabilities gathered beside the logits) against the
   CPU's;
6. speed: tokens/s of `charlm.train` with the LSTM 2 x 512, embedding 64, batch 128 x 100 (Adam,
   clip 1, dropout 0.5) against a bare cuDNN loop (the same model written plainly, the same
   batches from pinned memory, no per-step sync), alternating, in this one process; fp32, and bf16
   where supported. Goal: charlm >= 0.9x the bare loop.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loops import ExpertModel  # noqa: E402  (the bare model, written plainly)

import charlm  # noqa: E402
from charlm.config import SampleConfig  # noqa: E402
from charlm.data import load_split, sequential_batches  # noqa: E402
from charlm.device import _cuda_bf16, autocast, resolve_device, resolve_precision  # noqa: E402
from charlm.evaluation import evaluate_dynamic  # noqa: E402

SPEED = dict(cell="lstm", hidden_size=512, num_layers=2, embedding_dim=64, dropout=0.5, batch_size=128,
             num_steps=100, optimizer="adam", lr=3e-3, clip=1.0)
WARMUP = 10


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def precisions(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["fp32", "bf16"] if device.type == "cpu" else ["fp32"]
    return ["fp32"] + (["bf16"] if _cuda_bf16() else []) + ["fp16"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_and_resume(corpus: str, device: str, precision: str, steps: int, work: Path, small: dict) -> dict:
    def cfg(out, max_steps):
        return charlm.TrainConfig(corpus=corpus, out=str(work / out), device=device, precision=precision,
                                  max_steps=max_steps, eval_every=max(1, steps // 4), time_limit=None,
                                  patience=None, lr_schedule="plateau", **small)  # (split by --max-steps: no plan)

    t0 = time.perf_counter()
    whole = charlm.train(cfg(f"{precision}-whole", steps), overwrite=True)
    seconds = time.perf_counter() - t0
    charlm.train(cfg(f"{precision}-parts", steps // 2), overwrite=True)
    charlm.train(cfg(f"{precision}-parts", steps), resume=True)
    a = charlm.load_checkpoint(work / f"{precision}-whole" / "last").model.state_dict()
    b = charlm.load_checkpoint(work / f"{precision}-parts" / "last").model.state_dict()
    print(f"{precision}: {whole.steps} steps in {seconds:.1f}s, best held-out {whole.best.bits_per_char:.4f} "
          f"bits/char; {steps // 2} + {steps - steps // 2} resumed vs {steps} whole: largest weight difference "
          f"{max_diff(a, b):.3g}", flush=True)
    return {"result": whole, "out": work / f"{precision}-whole"}


def epochs_of_batches(train_ids):
    """``(first of an epoch?, X, Y)``, epoch after epoch (a small corpus has few batches of 128 x 100)."""
    epoch = 0
    while True:
        for k, (X, Y) in enumerate(sequential_batches(train_ids, SPEED["batch_size"], SPEED["num_steps"], seed=0,
                                                      epoch=epoch)):
            yield k == 0, X, Y
        epoch += 1


def bare_loop(model, train_ids, device, precision, steps) -> float:
    """The plain loop: the same batches, pinned and copied without waiting; tokens/s after a warm-up."""
    opt = torch.optim.Adam(model.parameters(), lr=SPEED["lr"], foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_sum, t0, state = torch.zeros((), device=device), None, None
    for step, (new_epoch, X, Y) in enumerate(epochs_of_batches(train_ids)):
        if step == WARMUP:
            sync(device)
            t0 = time.perf_counter()
        if step == WARMUP + steps:
            break
        if device.type == "cuda":
            X, Y = X.pin_memory(), Y.pin_memory()
        X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
        state = None if new_epoch else tuple(s.detach() for s in state)  # as charlm: a zero state each epoch
        with autocast(precision, device):
            logits, state = model(X, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), SPEED["clip"], foreach=True)
        scaler.step(opt)
        scaler.update()
        loss_sum += loss.detach()
    sync(device)
    return steps * SPEED["batch_size"] * SPEED["num_steps"] / (time.perf_counter() - t0)


def charlm_speed(corpus, device, precision, steps, work) -> float:
    ticks = {}

    def callback(event, info):
        if event == "step":
            ticks[info["step"]] = time.perf_counter()

    cfg = charlm.TrainConfig(corpus=corpus, out=str(work / f"speed-{precision}"), device=str(device),
                             precision=precision, max_steps=WARMUP + steps, eval_every=10**9, time_limit=None,
                             patience=None, sampling="sequential", **SPEED)
    charlm.train(cfg, overwrite=True, callback=callback)
    first = min(s for s in ticks if s >= WARMUP)
    last = max(ticks)
    return (last - first) * SPEED["batch_size"] * SPEED["num_steps"] / (ticks[last] - ticks[first])


def score_prompt(model, vocab, prompt: str) -> list[float]:
    """The log-probabilities ``charlm serve`` answers for ``prompt`` under ``echo`` + ``logprobs`` (its engine, no HTTP)."""
    from charlm.serve.engine import Engine, Request

    events, done = [], threading.Event()

    def deliver(event):
        events.append(event)
        if event[0] in ("done", "error"):
            done.set()

    engine = Engine(model, vocab, slots=2)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    engine.submit(Request(vocab.encode(prompt), SampleConfig(length=0), deliver, logprobs=2, prompt_logprobs=True))
    done.wait(120)
    engine.stop()
    thread.join(10)
    errors = [e[1] for e in events if e[0] == "error"]
    if errors or not done.is_set():
        raise SystemExit(f"the scoring path failed on {next(model.parameters()).device}: {errors or 'no answer'}")
    return [lp for e in events if e[0] == "prompt" for _, lp, _ in e[1] if lp is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300, help="training steps of each run in part 2")
    ap.add_argument("--speed-steps", type=int, default=100,
                    help="timed steps of each speed run in part 5 (a multiple of 10: charlm reports every 10)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating speed runs of each loop")
    ap.add_argument("--quick", action="store_true", help="tiny runs: checks that the script itself works")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.speed_steps < 10 or args.speed_steps % 10:
        ap.error("--speed-steps must be a positive multiple of 10")
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="charlm-gpu-check-"))
    small = {}  # part 2 trains the default model
    if args.quick:
        small = dict(hidden_size=32, embedding_dim=8, batch_size=8, num_steps=16)
        args.steps, args.speed_steps, args.repeats = 20, 20, 1
        SPEED.update(hidden_size=32, batch_size=8, num_steps=16)

    section("machine")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"device {device}" + (f" = {torch.cuda.get_device_name(device)}, bf16 "
                                f"{'yes' if _cuda_bf16() else 'no'}" if device.type == "cuda" else ""))

    section(f"training on {device}, {args.steps} steps, stopped half way and resumed")
    runs = {p: train_and_resume(args.corpus, str(device), p, args.steps, work, small) for p in precisions(device)}

    section("a checkpoint written on the device, loaded on the CPU")
    out = runs["fp32"]["out"]
    on_cpu = charlm.load_checkpoint(out / "best", device="cpu", with_trainer_state=True)
    devices = {t.device.type for t in on_cpu.model.state_dict().values()}
    moments = [t for s in on_cpu.trainer_state["optimizer"]["state"].values() for t in s.values() if t.dim()]
    print(f"weights on {devices}, optimizer state on {sorted({t.device.type for t in moments})}")
    on_dev = charlm.load_checkpoint(out / "best", device=device)
    data = load_split(args.corpus, on_cpu.preprocess, on_cpu.val_fraction, None, on_cpu.min_count)
    cpu_val = charlm.evaluate(on_cpu.model, data.val_ids, device=torch.device("cpu"))
    dev_val = charlm.evaluate(on_dev.model, data.val_ids, device=device)
    print(f"held-out loss: {dev_val.loss:.6f} on {device}, {cpu_val.loss:.6f} on the CPU "
          f"(difference {abs(dev_val.loss - cpu_val.loss):.2e} nats/char over {cpu_val.tokens:,} characters)")

    section("greedy generation: the same checkpoint on the device and on the CPU")
    prefix, length = "The ", 2000
    t0 = time.perf_counter()
    text_dev = charlm.generate(on_dev.model, on_dev.vocab, prefix, length=length)
    dev_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_cpu = charlm.generate(on_cpu.model, on_cpu.vocab, prefix, length=length)
    cpu_s = time.perf_counter() - t0
    first = next((i for i, (a, b) in enumerate(zip(text_dev, text_cpu)) if a != b), None)
    print(f"{length} characters: {length / dev_s:,.0f} chars/s on {device}, {length / cpu_s:,.0f} on the CPU; "
          + ("identical" if first is None else f"first difference at character {first - len(prefix)}: "
             f"{text_dev[max(0, first - 30):first + 10]!r} vs {text_cpu[max(0, first - 30):first + 10]!r}"))
    print(f"{text_dev[:160]!r}")

    section("--precision auto, dynamic evaluation and the server's scoring path, on the device and on the CPU")
    auto = resolve_precision("auto", device, on_dev.config)
    print(f"--precision auto -> {auto}" + (f" (native bf16: {_cuda_bf16()}; torch's check with emulation: "
                                            f"{torch.cuda.is_bf16_supported()})" if device.type == "cuda" else ""))
    tail = data.val_ids[:3000]
    dyn = {d: evaluate_dynamic(m.model, tail, device=torch.device(d)) for d, m in ((str(device), on_dev),
                                                                                  ("cpu", on_cpu))}
    print(f"dynamic evaluation of {dyn['cpu'].tokens:,} held-out characters: {dyn[str(device)].bits_per_char:.5f} "
          f"bits/char on {device}, {dyn['cpu'].bits_per_char:.5f} on the CPU")
    prompt = on_cpu.vocab.decode(data.val_ids[:200])
    scored = {d: score_prompt(m.model, m.vocab, prompt) for d, m in ((str(device), on_dev), ("cpu", on_cpu))}
    worst = max(abs(a - b) for a, b in zip(scored[str(device)], scored["cpu"]))
    print(f"the server's echo + logprobs of a {len(prompt)}-character prompt: {len(scored['cpu'])} log-probabilities, "
          f"largest difference between the devices {worst:.2e}")

    section(f"speed: LSTM 2 x {SPEED['hidden_size']}, embedding 64, batch {SPEED['batch_size']} x "
            f"{SPEED['num_steps']}, {args.speed_steps} timed steps, median of {args.repeats} alternating runs")
    ratios_ok = True
    for precision in [p for p in precisions(device) if p != "fp16"]:
        bare, ours = [], []
        for _ in range(args.repeats):
            torch.manual_seed(0)
            model = ExpertModel(len(data.vocab), 64, SPEED["hidden_size"], 2, SPEED["dropout"]).to(device)
            bare.append(bare_loop(model, data.train_ids, device, precision, args.speed_steps))
            del model
            ours.append(charlm_speed(args.corpus, device, precision, args.speed_steps, work))
        b, o = statistics.median(bare), statistics.median(ours)
        ratios_ok &= o >= 0.9 * b
        print(f"{precision}: bare loop {b:,.0f} tokens/s, charlm train {o:,.0f} tokens/s: {o / b:.2f}x (goal >= 0.9x)")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB")
    print(f"\nrun directories in {work}")
    return 0 if ratios_ok and all(math.isfinite(r["result"].best.loss) for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
