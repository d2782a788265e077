"""Whole-process speed of `charlm train` against the reference loops of scripts/reference_loops.py.

Two configurations, each run as separate processes, interleaved and repeated so that a noisy
machine hits both alike (the median of the repeats is reported):

- d2l: one-hot GRU 256, batch 32 x 35, SGD lr 1, clip 1, 3 epochs of the corpus, against the
  book's loop (per-step ``.item()``, hand-written clipping);
- expert: 2-layer LSTM 512 with a 64-wide embedding and dropout 0.5, batch 128 x 100, Adam
  3e-3, against a bare loop with fused clipping and a foreach optimizer and no per-step sync.

`charlm train` runs twice per repeat, with its progress bar and with ``--quiet``, and its summary
line gives the seconds it spent on held-out evaluation and on saving checkpoints, so the table
names the cost of everything charlm adds.

    python scripts/bench_train.py corpora/timemachine.txt
    python scripts/bench_train.py corpora/timemachine.txt --quick    # a smoke run for CI
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference_loops.py"

CONFIGS = {
    "d2l": dict(charlm=["--cell", "gru", "--embedding-dim", "0", "--hidden-size", "256", "--num-layers", "1",
                        "--dropout", "0", "--batch-size", "32", "--num-steps", "35", "--optimizer", "sgd",
                        "--lr", "1", "--clip", "1", "--epochs", "3"],
                reference=["d2l", "--hidden-size", "256", "--batch-size", "32", "--num-steps", "35", "--lr", "1",
                           "--clip", "1", "--epochs", "3"]),
    "expert": dict(charlm=["--cell", "lstm", "--embedding-dim", "64", "--hidden-size", "512", "--num-layers", "2",
                           "--dropout", "0.5", "--batch-size", "128", "--num-steps", "100", "--optimizer", "adam",
                           "--lr", "3e-3", "--clip", "1", "--max-steps", "{steps}"],
                   reference=["expert", "--hidden-size", "512", "--num-layers", "2", "--embedding-dim", "64",
                              "--dropout", "0.5", "--batch-size", "128", "--num-steps", "100", "--lr", "3e-3",
                              "--clip", "1", "--max-steps", "{steps}"]),
}
QUICK = ["--hidden-size", "32", "--max-steps", "3"]  # appended in --quick mode: later options win


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout + proc.stderr


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--expert-steps", type=int, default=30, help="training steps of the expert configuration")
    ap.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="tiny models, 3 steps, 1 repeat: checks the script runs")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            spec = CONFIGS[name]
            charlm_opts, (loop, *ref_opts) = ([a.replace("{steps}", str(args.expert_steps)) for a in spec[k]]
                                              for k in ("charlm", "reference"))
            extra = QUICK if args.quick else []
            base = [sys.executable, "-m", "charlm", "train", args.corpus, *charlm_opts, *extra,
                    "--out", str(Path(tmp) / name), "--overwrite"]
            ref = [sys.executable, str(REFERENCE), loop, args.corpus, *ref_opts, *extra]
            runs = {"reference": [], "charlm": [], "charlm --quiet": [], "eval": [], "save": []}
            for _ in range(repeats):
                runs["reference"].append(timed(ref)[0])
                seconds, out = timed(base)
                runs["charlm"].append(seconds)
                seconds, out = timed(base + ["--quiet"])
                runs["charlm --quiet"].append(seconds)
                m = re.search(r"held-out evaluation ([\d.]+)s, saving ([\d.]+)s", out)
                runs["eval"].append(float(m.group(1)))
                runs["save"].append(float(m.group(2)))
            med = {k: statistics.median(v) for k, v in runs.items()}
            rows.append((name, med))
    print(f"whole processes, median of {repeats} interleaved repeat(s), seconds:\n")
    print("| configuration | reference loop | charlm train | charlm --quiet | reference / charlm "
          "| of charlm: held-out evaluation | saving | progress bar |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows:
        print(f"| {name} | {m['reference']:.2f} | {m['charlm']:.2f} | {m['charlm --quiet']:.2f} | "
              f"{m['reference'] / m['charlm']:.2f}x | {m['eval']:.2f} | {m['save']:.2f} | "
              f"{m['charlm'] - m['charlm --quiet']:+.2f} |")
    return rows


if __name__ == "__main__":
    main()
