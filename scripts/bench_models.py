"""Forward + backward speed of RNNLM, torch kernels against charlm's scratch cells (for the Mogrifier LSTM,
which torch lacks: charlm's fast form, impl "torch", against its scratch form).

Prints a markdown table: cell x impl x input (one-hot / embedding), tokens per second for one
forward and backward pass over a (B, T) batch, and parameters. Both impls are timed in the same
process, interleaved, so the ratio is fair on a noisy machine.

    python scripts/bench_models.py                 # hidden 256, batch 32 x 35, vocabulary 28
    python scripts/bench_models.py --repeats 3 --threads 2
    python scripts/bench_models.py --cells lstm mogrifier
"""

from __future__ import annotations

import argparse
import time

import torch

from charlm import RNNLM


def step_time(model, X, Y, repeats):
    """Median seconds of forward + loss + backward over `repeats` timed runs (after warm-up)."""
    V = model.config.vocab_size
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        logits, _ = model(X)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), Y.reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> list[dict]:
    """Print the table; return its rows (cell, input, impl, tokens_per_s)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-steps", type=int, default=35)
    ap.add_argument("--vocab-size", type=int, default=28)
    ap.add_argument("--embedding-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm", "mogrifier"], help="the cells to time")
    args = ap.parse_args(argv)
    rows = []
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, V = args.batch_size, args.num_steps, args.vocab_size
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (B, T), generator=g)
    Y = torch.randint(0, V, (B, T), generator=g)
    print(f"hidden {args.hidden_size}, batch {B} x {T}, vocabulary {V}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| cell | input | impl | tokens/s (fwd+bwd) | scratch / torch | parameters |")
    print("|---|---|---|---:|---:|---:|")
    for cell in args.cells:
        for emb in (0, args.embedding_dim):
            models = {}
            for impl in ("torch", "scratch"):
                torch.manual_seed(0)
                models[impl] = RNNLM(V, cell=cell, hidden_size=args.hidden_size, embedding_dim=emb, impl=impl)
            best = {impl: float("inf") for impl in models}
            for _ in range(3):  # interleave the two impls so machine noise hits both alike
                for impl, m in models.items():
                    best[impl] = min(best[impl], step_time(m, X, Y, args.repeats))
            if cell in ("lstm", "mogrifier"):
                # On CPU torch runs the LSTM (not the RNN or GRU) through oneDNN's fused kernel, and the
                # mogrifier's fast form its products through oneDNN's matrix product; timing them with oneDNN
                # off shows what the same work costs without it.
                with torch.backends.mkldnn.flags(enabled=False):
                    t = min(step_time(models["torch"], X, Y, args.repeats) for _ in range(3))
                label = "one-hot" if emb == 0 else f"embedding {emb}"
                rows.append({"cell": cell, "input": label, "impl": "torch, oneDNN off", "tokens_per_s": B * T / t})
                print(f"| {cell} | {label} | torch, oneDNN off | {B * T / t:,.0f} | "
                      f"{t / best['scratch']:.2f} | {models['torch'].num_parameters():,} |")
            for impl in ("torch", "scratch"):
                ratio = f"{best['torch'] / best['scratch']:.2f}" if impl == "scratch" else ""
                label = "one-hot" if emb == 0 else f"embedding {emb}"
                rows.append({"cell": cell, "input": label, "impl": impl, "tokens_per_s": B * T / best[impl]})
                print(f"| {cell} | {label} | {impl} | {B * T / best[impl]:,.0f} | {ratio} | "
                      f"{models[impl].num_parameters():,} |")
    return rows


if __name__ == "__main__":
    main()
