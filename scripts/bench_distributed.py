"""Training speed of one process against several under torchrun, on the CPUs of one machine.

Each layout trains the same run (`charlm.train`, the default 2 x LSTM 320 with a 64-wide embedding,
global batch 32 x 64, Adam, no held-out evaluation before the last step) for ``--steps``
steps, in separate processes, interleaved and repeated (the median of the repeats is reported):

- ``1x2``: one process with two threads (``OMP_NUM_THREADS=2``): the single-process default here;
- ``2x1``: two processes of one thread each under ``torchrun --standalone`` (gloo on loopback),
  each with half of the batch's rows;
- ``1x1``: one process, one thread: what one of the two processes would do with the whole batch.

Every process reports its tokens/s after a warm-up (all of the run's tokens, whichever rank
computed them), its peak resident memory (VmHWM), and, under torchrun, the time of an all-reduce of
a gradient-sized fp32 buffer measured alone before training (DDP starts these while the backward
pass still runs, so part of it overlaps; this is its whole cost).

    python scripts/bench_distributed.py corpora/timemachine.txt
    python scripts/bench_distributed.py corpora/timemachine.txt --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 20  # steps before the clock starts (allocator, thread pools, first evaluation of lazy paths)
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # processes x threads each
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    """One process of a layout: train, then (under torchrun) time an all-reduce; write a JSON report."""
    import torch

    import charlm
    from charlm.distributed import from_env
    from charlm.config import SIZE_MID_READS

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ticks = {}

    def callback(event, info):
        if event == "step":
            ticks[info["step"]] = time.perf_counter()

    cfg = charlm.TrainConfig(corpus=args.corpus, out=args.out, max_steps=args.steps, eval_every=args.steps,
                             time_limit=None, patience=None, dist_timeout=120,
                             **{**SIZE_MID_READS, **json.loads(args.options)})  # (the 2 x 320 the table names)
    dist = from_env()
    allreduce_ms = _allreduce_ms(cfg) if dist.enabled else None  # charlm.train then uses this process group
    result = charlm.train(cfg, overwrite=True, callback=callback)
    first, last = min(s for s in ticks if s >= WARMUP), max(ticks)
    tokens = (last - first) * cfg.batch_size * cfg.num_steps  # the global batch: all ranks' tokens
    report = {"tokens_per_s": tokens / (ticks[last] - ticks[first]), "steps": result.steps,
              "step_ms": 1000 * (ticks[last] - ticks[first]) / (last - first), "peak_rss_mb": _peak_rss_mb()}
    if allreduce_ms is not None:
        report["allreduce_ms"] = allreduce_ms
    Path(args.report, f"rank{dist.rank}.json").write_text(json.dumps(report))


def _allreduce_ms(cfg) -> float:
    """Joins the process group (gloo) and returns the median time of an all-reduce of one fp32 buffer
    as large as the model's gradients (DDP puts these small models' gradients in one or two buckets)."""
    import datetime

    import torch

    from charlm.models import RNNLM

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    size = RNNLM.from_config(cfg.model_config(128)).num_parameters()  # the vocabulary's size barely matters
    buf = torch.ones(size)
    times = []
    for _ in range(30):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        torch.distributed.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[5:])


def run_layout(name: str, corpus: str, steps: int, options: dict, workdir: Path) -> list[dict]:
    procs, threads = LAYOUTS[name]
    report = workdir / f"report-{name}"
    report.mkdir(parents=True, exist_ok=True)
    for old in report.glob("*.json"):
        old.unlink()
    args = [str(Path(__file__).resolve()), "--worker", corpus, "--steps", str(steps), "--out",
            str(workdir / f"run-{name}"), "--report", str(report), "--options", json.dumps(options)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **LOOPBACK}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] + args
           if procs > 1 else [sys.executable] + args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads((report / f"rank{r}.json").read_text()) for r in range(procs)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 30 steps, one repeat: a smoke run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    options = {"dropout": 0.0}
    steps, repeats = args.steps, args.repeats
    if args.quick:
        options.update(hidden_size=32, embedding_dim=8, num_steps=16)
        steps, repeats = WARMUP + 10, 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="charlm-bench-dist-"))
    runs = {name: [] for name in LAYOUTS}
    for _ in range(repeats):  # interleaved: a noisy machine hits every layout alike
        for name in LAYOUTS:
            runs[name].append(run_layout(name, args.corpus, steps, options, workdir))
    results = {}
    for name, reps in runs.items():
        results[name] = {
            "tokens_per_s": statistics.median(sum(r["tokens_per_s"] for r in rep) / len(rep) for rep in reps),
            "step_ms": statistics.median(statistics.mean(r["step_ms"] for r in rep) for rep in reps),
            "peak_rss_mb": [round(max(rep[k]["peak_rss_mb"] for rep in reps)) for k in range(len(reps[0]))],
            "allreduce_ms": (statistics.median(statistics.mean(r["allreduce_ms"] for r in rep) for rep in reps)
                             if "allreduce_ms" in reps[0][0] else None),
        }
    base = results["1x2"]["tokens_per_s"]
    print(f"{steps} steps ({WARMUP} of warm-up), median of {repeats}, options {options or 'default'}")
    print("| processes x threads | tokens/s | vs 1x2 | ms/step | all-reduce ms (share of a step) | peak RSS per rank, MB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        ar = "" if r["allreduce_ms"] is None else f"{r['allreduce_ms']:.2f} ({r['allreduce_ms'] / r['step_ms']:.1%})"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['step_ms']:.1f} | {ar} | "
              f"{', '.join(str(m) for m in r['peak_rss_mb'])} |")
    return results


if __name__ == "__main__":
    main()
