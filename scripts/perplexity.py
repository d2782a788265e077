"""Evaluate several checkpoints on several files and print one table, the way a reader compares models.

Each file is read with each checkpoint's own preprocessing; the hidden state is carried across
the whole file (see charlm.evaluate). Characters outside a model's vocabulary are dropped and
counted.

    python scripts/perplexity.py checkpoints/timemachine checkpoints/d2l --files held_out.txt other.txt
    python scripts/perplexity.py checkpoints/* --files a.txt --format csv
"""

from __future__ import annotations

import argparse
import csv
import sys

from charlm import evaluate, load_checkpoint
from charlm.corpus import normalize, read_text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="run or checkpoint directories")
    ap.add_argument("--files", nargs="+", required=True, help="UTF-8 text files")
    ap.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    args = ap.parse_args()
    rows = []
    texts = {f: read_text(f) for f in args.files}
    for path in args.checkpoints:
        ck = load_checkpoint(path)
        preprocess = ck.meta.get("corpus", {}).get("preprocess", "raw")
        for f, raw in texts.items():
            ids = ck.vocab.encode(normalize(raw, preprocess), errors="replace")
            skipped = int((ids == 0).sum())
            r = evaluate(ck.model, ids[ids != 0])
            rows.append({"checkpoint": str(path), "file": f, "preprocess": preprocess, "tokens": r.tokens,
                         "skipped": skipped, "loss": round(r.loss, 4), "bits_per_char": round(r.bits_per_char, 4),
                         "perplexity": round(r.perplexity, 3)})
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for r in rows:
            print("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
