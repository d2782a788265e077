"""Evaluate several checkpoints on several files and print one table, the way a reader compares models.

Each file is read with each checkpoint's own preprocessing, exactly as ``charlm eval --errors skip``
reads it (the same function): characters outside a model's vocabulary are dropped and counted, and
the hidden state is carried across the whole file (see charlm.evaluation).

    python scripts/perplexity.py checkpoints/timemachine checkpoints/d2l --files held_out.txt other.txt
    python scripts/perplexity.py checkpoints/* --files a.txt --format csv
"""

from __future__ import annotations

import argparse
import csv
import sys

from charlm import CharlmError, evaluate, load_checkpoint
from charlm.evaluation import file_ids


def main(argv=None) -> list[dict]:
    """Print the table; return its rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="run or checkpoint directories")
    ap.add_argument("--files", nargs="+", required=True, help="UTF-8 text files")
    ap.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    args = ap.parse_args(argv)
    rows = []
    try:
        for path in args.checkpoints:
            ck = load_checkpoint(path)
            for f in args.files:
                ids, skipped = file_ids(f, ck.vocab, ck.preprocess, skip_unknown=True)
                r = evaluate(ck.model, ids)
                rows.append({"checkpoint": str(path), "file": f, "preprocess": ck.preprocess, "tokens": r.tokens,
                             "skipped": skipped, "loss": round(r.loss, 4), "bits_per_char": round(r.bits_per_char, 4),
                             "perplexity": round(r.perplexity, 3)})
    except CharlmError as exc:
        ap.exit(1, f"perplexity.py: error: {exc}\n")
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for r in rows:
            print("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()) + " |")
    return rows


if __name__ == "__main__":
    main()
