"""Compare RNN, GRU and LSTM, torch kernels and charlm's scratch cells, one-hot and embedded inputs,
under the same time budget on the Time Machine (d2l's `letters` text, last 10% held out).

Prints a markdown table of held-out perplexity, bits per char, training tokens/s and parameters.

    python scripts/compare_cells.py                    # 60 s per model, hidden 256
    python scripts/compare_cells.py --quick            # under a minute in all (CI)
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from charlm import TrainConfig, load_checkpoint, train
from charlm.corpus import ensure_corpus


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="corpora/timemachine.txt")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of training per model")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--embedding-dim", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="hidden 32, 2 s per model: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.hidden_size, args.embedding_dim = 2.0, 32, 16
    corpus = ensure_corpus(args.corpus, progress=False)
    print(f"{corpus}, letters, {args.budget:g} s of training each, hidden {args.hidden_size}, "
          f"Adam, batch 32 x 64, sequential\n")
    print("| cell | impl | input | held-out perplexity | bits/char | tokens/s | parameters |")
    print("|---|---|---|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in ("rnn", "gru", "lstm"):
            for impl in ("torch", "scratch"):
                for emb in (0, args.embedding_dim):
                    out = Path(tmp) / f"{cell}-{impl}-{emb}"
                    cfg = TrainConfig(corpus=str(corpus), out=str(out), preprocess="letters", cell=cell, impl=impl,
                                      hidden_size=args.hidden_size, num_layers=1, embedding_dim=emb, dropout=0.0,
                                      time_limit=args.budget, patience=None, eval_every=50, epochs=1000)
                    result = train(cfg)
                    with open(out / "metrics.csv", newline="") as f:
                        speeds = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]]
                    params = load_checkpoint(out).model.num_parameters()
                    label = "one-hot" if emb == 0 else f"embedding {emb}"
                    row = (cell, impl, label, result.best.perplexity, result.best.bits_per_char,
                           sum(speeds) / len(speeds) if speeds else float("nan"), params)
                    rows.append(row)
                    print(f"| {cell} | {impl} | {label} | {row[3]:.2f} | {row[4]:.3f} | {row[5]:,.0f} | {params:,} |",
                          flush=True)
    return rows


if __name__ == "__main__":
    main()
