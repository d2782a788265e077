"""Training-step and generation speed of cells side by side, at one model size (by default charlm train's).

Each cell is timed in the same process, interleaved with the others round by round, so that a busy machine
slows all of them alike; the table gives each one's best round and its time over the first cell's. A
training step is charlm train's: the default regularisers (weight drop, locked dropouts), cross entropy,
backward, clipping, Adam. Generation is charlm.generate on the inference stepper: one greedy sequence
(characters per second) and 32 sampled ones (characters per second over all of them).

A cell is written ``CELL`` or, for the mogrifier, ``mogrifier:ROUNDS`` or ``mogrifier:ROUNDS:RANK``.

    python scripts/bench_cells.py                          # lstm against mogrifier, 2 x 320, embedding 64
    python scripts/bench_cells.py --cells lstm gru mogrifier mogrifier:5:32 --threads 1
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/bench_cells.py   # as an AVX2 machine
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from charlm import RNNLM, Vocab, generate
from charlm.config import SIZE_MID_READS, TrainConfig

QUICK = dict(hidden_size=16, batch_size=4, num_steps=8, steps=2, length=20, repeats=1)


def parse_cell(spec: str) -> dict:
    """``lstm`` -> {"cell": "lstm"}; ``mogrifier:4:32`` -> the mogrifier with 4 rounds of rank 32."""
    cell, *rest = spec.split(":")
    options = {"cell": cell}
    if rest:
        options["mogrify_rounds"] = int(rest[0])
    if len(rest) > 1:
        options["mogrify_rank"] = int(rest[1])
    return options


def build(options: dict, args, vocab_size: int) -> tuple[RNNLM, torch.optim.Optimizer]:
    cfg = TrainConfig(corpus="-", hidden_size=args.hidden_size, num_layers=args.num_layers,
                      embedding_dim=args.embedding_dim, **options).model_config(vocab_size, 10**6)
    torch.manual_seed(0)
    model = RNNLM.from_config(cfg)
    return model, torch.optim.Adam(model.parameters(), lr=3e-3, foreach=True)


def train_steps(model, optimizer, X, steps: int) -> float:
    """Seconds per training step, as charlm train takes one (after one untimed step)."""
    model.train()
    V = model.config.vocab_size
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        logits, _ = model(X[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), X[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def chars_per_s(model, vocab, length: int, **options) -> float:
    n = options.get("num_samples", 1)
    generate(model, vocab, "", 5, **options)  # warm-up
    t0 = time.perf_counter()
    generate(model, vocab, "", length, **options)
    return n * length / (time.perf_counter() - t0)


def main(argv=None) -> list[dict]:
    """Print the table; return its rows (cell, step_s, step_ratio, greedy, greedy_ratio, batch, batch_ratio)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=["lstm", "mogrifier"])
    ap.add_argument("--hidden-size", type=int, default=SIZE_MID_READS["hidden_size"])
    ap.add_argument("--num-layers", type=int, default=SIZE_MID_READS["num_layers"])
    ap.add_argument("--embedding-dim", type=int, default=TrainConfig.embedding_dim)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--num-steps", type=int, default=TrainConfig.num_steps)
    ap.add_argument("--vocab-size", type=int, default=80, help="symbols, <unk> included")
    ap.add_argument("--steps", type=int, default=5, help="training steps timed per round")
    ap.add_argument("--length", type=int, default=2000, help="characters generated per timing")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the best of each cell's is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    V = args.vocab_size
    vocab = Vocab.from_text("".join(chr(0x100 + i) for i in range(V - 1)))
    X = torch.randint(1, V, (args.batch_size, args.num_steps + 1), generator=torch.Generator().manual_seed(0))
    models = {spec: build(parse_cell(spec), args, len(vocab)) for spec in args.cells}
    best = {spec: {"step_s": float("inf"), "greedy": 0.0, "batch": 0.0} for spec in args.cells}
    for _ in range(args.repeats):
        for spec, (model, optimizer) in models.items():
            b = best[spec]
            b["step_s"] = min(b["step_s"], train_steps(model, optimizer, X, args.steps))
            b["greedy"] = max(b["greedy"], chars_per_s(model, vocab, args.length))
            b["batch"] = max(b["batch"], chars_per_s(model, vocab, max(1, args.length // 8), temperature=1.0,
                                                     seed=0, num_samples=32))
    first = best[args.cells[0]]
    print(f"{args.num_layers} x {args.hidden_size}, embedding {args.embedding_dim}, batch {args.batch_size} x "
          f"{args.num_steps}, {V} symbols, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds\n")
    print("| cell | parameters | training step, ms | / first | greedy chars/s | / first | x32 sampled chars/s "
          "| / first |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for spec, (model, _) in models.items():
        b = best[spec]
        row = {"cell": spec, "parameters": model.num_parameters(), "step_s": b["step_s"],
               "step_ratio": b["step_s"] / first["step_s"], "greedy": b["greedy"],
               "greedy_ratio": b["greedy"] / first["greedy"], "batch": b["batch"],
               "batch_ratio": b["batch"] / first["batch"]}
        rows.append(row)
        print(f"| {spec} | {row['parameters']:,} | {1000 * row['step_s']:.0f} | {row['step_ratio']:.2f} | "
              f"{row['greedy']:,.0f} | {row['greedy_ratio']:.2f} | {row['batch']:,.0f} | {row['batch_ratio']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
