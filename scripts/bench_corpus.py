"""Corpora of any size: preparation speed, memory, cache hits, token-file training speed, evaluation share.

Makes a synthetic UTF-8 corpus of about --size-mb megabytes (Tiny Shakespeare with multi-byte
characters spread through it: 'café — 时间 🙂' every ~4 KB), nothing of which is committed, then:

- ``charlm prepare BIG`` for every preprocessing mode, as whole processes: MB/s and peak resident
  memory (VmHWM), against a process that only imports torch;
- a cache hit: the whole ``charlm prepare`` process again;
- the 56 MB file (Tiny Shakespeare x 50 plus one line of 'café — 时间 🙂') through ``load_corpus``;
- ``charlm train BIG --max-steps 300`` as a process: peak memory, resident memory at steps 50 and
  300, and the share of its time spent on held-out evaluation;
- training tokens/s from the token file against in-memory arrays on the Time Machine (same
  process, interleaved), and the evaluation share of a Tiny Shakespeare run.

    python scripts/bench_corpus.py --workdir /tmp/charlm-bench            # ~1 GB, several minutes
    python scripts/bench_corpus.py --workdir /tmp/b --size-mb 20 --quick   # the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from charlm.config import SIZE_MID_READS
from charlm.corpus import ensure_corpus

MIXED_LINE = "café — 时间 🙂\n"
PARTS = ("prepare", "load_corpus", "train_big", "token_file", "eval_share")

_CHILD = r"""
import atexit, json, sys
def _memory():
    fields = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmHWM', 'VmRSS')):
            key, value = line.split(':')
            fields[key] = int(value.split()[0]) / 1024
    print('MEMORY ' + json.dumps(fields), file=sys.stderr)
atexit.register(_memory)
"""


def _child(code: str, env=None, timeout=3600) -> tuple[float, dict, str]:
    """Run python code as a process: (seconds, {"VmHWM": MB, "VmRSS": MB}, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD + code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {p.stderr[-2000:]}")
    memory = json.loads(next(line for line in p.stderr.splitlines() if line.startswith("MEMORY "))[7:])
    return seconds, memory, p.stdout


def _cli(args: list[str], env=None) -> tuple[float, dict, str]:
    return _child(f"import sys; sys.argv = ['charlm'] + {args!r}; from charlm.cli import main; main()", env)


def make_corpus(path: Path, size_mb: float, shakespeare: Path) -> Path:
    """Tiny Shakespeare with MIXED_LINE's characters every ~4 KB, repeated to ``size_mb``."""
    base = shakespeare.read_text(encoding="utf-8")
    pieces = [base[i:i + 4096] + MIXED_LINE for i in range(0, len(base), 4096)]
    block = "".join(pieces).encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(max(1, round(size_mb * 1e6 / len(block)))):
            f.write(block)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="where the synthetic corpora and the token cache go")
    ap.add_argument("--size-mb", type=float, default=1000, help="size of the synthetic corpus")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-time-limit", type=float, default=180,
                    help="--time-limit of the big training run (its final whole-tail evaluation fits in it)")
    ap.add_argument("--quick", action="store_true", help="small models and few steps: a smoke run")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run these parts only")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {"CHARLM_CACHE_DIR": str(work / "cache")}
    shakespeare = ensure_corpus(work / "tinyshakespeare.txt", progress=False)
    timemachine = ensure_corpus(work / "timemachine.txt", progress=False)
    big = work / "big.txt"
    if not big.exists() or abs(big.stat().st_size / 1e6 - args.size_mb) > 0.2 * args.size_mb:
        make_corpus(big, args.size_mb, shakespeare)
    size_mb = big.stat().st_size / 1e6
    results = {"size_mb": round(size_mb, 1)}
    print(f"synthetic corpus: {size_mb:,.1f} MB ({big})\n")

    _, torch_memory, _ = _child("import torch")
    results["import_torch_peak_mb"] = round(torch_memory["VmHWM"])
    print(f"baseline process (import torch): peak {torch_memory['VmHWM']:,.0f} MB\n")
    if "prepare" in args.only:
        results["prepare"] = bench_prepare(big, size_mb, work, env)
    if "load_corpus" in args.only:
        results["load_corpus_56mb"] = bench_load_corpus(shakespeare, work)
    if "train_big" in args.only:
        results["train_big"] = train_big(big, work, env, args)
    if "token_file" in args.only:
        results["token_file_vs_memory"] = token_file_vs_memory(timemachine, work, env, args.quick)
    if "eval_share" in args.only:
        results["eval_share_shakespeare"] = eval_share(shakespeare, work, env, args.quick)
    return results


def bench_prepare(big: Path, size_mb: float, work: Path, env: dict) -> dict:
    import shutil

    results = {}
    print("| preprocess | prepare MB/s | peak memory (VmHWM) | cache hit (whole process) |")
    print("|---|---:|---:|---:|")
    for mode in ("raw", "lower", "letters"):
        cache = work / "cache"
        for entry in cache.glob(f"{big.name}-{mode}-*"):  # measure a build, not a hit
            shutil.rmtree(entry)
        seconds, memory, out = _cli(["prepare", str(big), "--preprocess", mode, "--quiet"], env)
        hit_s, _, hit_out = _cli(["prepare", str(big), "--preprocess", mode, "--quiet"], env)
        assert "cached" in hit_out, hit_out
        results[f"prepare_{mode}"] = {"mb_per_s": round(size_mb / seconds, 1), "peak_mb": round(memory["VmHWM"]),
                                      "hit_s": round(hit_s, 2), "line": out.strip()}
        print(f"| {mode} | {size_mb / seconds:,.1f} | {memory['VmHWM']:,.0f} MB | {hit_s:.2f} s |")
    return results


def bench_load_corpus(shakespeare: Path, work: Path) -> dict:
    mixed = work / "shakespeare-x50-mixed.txt"
    with open(mixed, "w", encoding="utf-8") as f:
        f.write(shakespeare.read_text(encoding="utf-8") * 50 + MIXED_LINE)
    code = (f"import time; from charlm import load_corpus; t=time.perf_counter(); c=load_corpus({str(mixed)!r}); "
            f"print(time.perf_counter()-t)")
    _, memory, out = _child(code)
    mb = mixed.stat().st_size / 1e6
    print(f"\nload_corpus of {mb:.0f} MB with one mixed line: {mb / float(out):,.1f} MB/s (peak {memory['VmHWM']:,.0f} MB)")
    return {"mb_per_s": round(mb / float(out), 1), "peak_mb": round(memory["VmHWM"])}


def train_big(big: Path, work: Path, env: dict, args) -> dict:
    steps = args.train_steps
    early = max(10, min(50, steps // 20 * 10))  # the step whose resident memory is the reference
    # (the middle size of charlm train's rule, which its figures were measured with: 2 x 320)
    model = "hidden_size=32, embedding_dim=8, num_layers=1," if args.quick else "hidden_size=320, num_layers=2,"
    code = f"""
import json
from charlm import TrainConfig, train
rss = {{}}
def watch(event, info):
    if event == "step" and info["step"] in ({early}, {steps}):
        rss[info["step"]] = [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')][0]
r = train(TrainConfig(corpus={str(big)!r}, out={str(work / 'run-big')!r}, {model} max_steps={steps},
                      time_limit={args.train_time_limit}), overwrite=True, callback=watch)
print(json.dumps({{"rss": rss, "elapsed": r.elapsed_s, "eval_s": r.eval_s, "final_eval_s": r.final_eval_s,
                  "steps": r.steps,
                  "best_tokens": r.best.tokens, "val_chars": r.val_chars, "eval_chars": r.eval_chars,
                  "bpc": r.best.bits_per_char}}))
"""
    seconds, memory, out = _child(code, env)
    r = json.loads(out.strip().splitlines()[-1])
    rss = {int(k): v for k, v in r["rss"].items()}
    first, last = rss.get(early), rss.get(steps)
    periodic = r["eval_s"] - r["final_eval_s"]
    share = periodic / (r["elapsed"] - r["final_eval_s"])
    print(f"\ntrain on the big corpus, {r['steps']} steps: peak {memory['VmHWM']:,.0f} MB; resident at step {early} "
          f"{first:,.0f} MB, at step {steps} {last:,.0f} MB; periodic evaluations (on {r['eval_chars']:,} chars) "
          f"{periodic:.1f} s = {share:.1%} of the {r['elapsed'] - r['final_eval_s']:.1f} s before the final one; "
          f"the final one on {r['best_tokens']:,} of {r['val_chars']:,} held-out chars took {r['final_eval_s']:.1f} s; "
          f"process {seconds:.0f} s")
    return {"peak_mb": round(memory["VmHWM"]), "rss_early": first, "early_step": early, "rss_last": last, "eval_share": round(share, 4),
            **{k: r[k] for k in ("elapsed", "eval_s", "final_eval_s", "steps", "best_tokens", "val_chars",
                                 "eval_chars", "bpc")}}


def token_file_vs_memory(timemachine: Path, work: Path, env: dict, quick: bool) -> dict:
    steps = 20 if quick else 200
    code = f"""
import json, time
import numpy as np
from dataclasses import replace
from charlm import TrainConfig
from charlm.data import load_split
from charlm.device import resolve_device
from charlm.rundir import RunDir
from charlm.training import Trainer
cfg = TrainConfig(corpus={str(timemachine)!r}, max_steps={steps}, eval_every=10**9, time_limit=None, patience=None,
                  {"hidden_size=32, embedding_dim=8," if quick else ""})
files = load_split(cfg.corpus, cfg.preprocess, cfg.val_fraction)
arrays = replace(files, train_ids=files.train_ids.read(), val_ids=files.val_ids.read())
times = {{"token file": [], "in memory": []}}
for repeat in range(3):
    for name, data in (("token file", files), ("in memory", arrays)):
        run = RunDir({str(work / 'run-tm')!r} + name.replace(' ', '-') + str(repeat))
        run.create(overwrite=True)
        t = Trainer(cfg, data, run, resolve_device("cpu"), lambda e, i: None)
        t0 = time.perf_counter()
        t.run({{"signal": None}})
        times[name].append(time.perf_counter() - t0)
print(json.dumps({{k: sorted(v)[1] for k, v in times.items()}}))
"""
    _, _, out = _child(code, env)
    t = json.loads(out.strip().splitlines()[-1])
    tokens = steps * 32 * 64
    ratio = t["in memory"] / t["token file"]
    print(f"\nTime Machine, {steps} training steps (median of 3, interleaved): token file "
          f"{tokens / t['token file']:,.0f} tokens/s, in memory {tokens / t['in memory']:,.0f} tokens/s: "
          f"{ratio:.3f}x")
    return {"token_file_s": t["token file"], "in_memory_s": t["in memory"], "ratio": round(ratio, 3)}


def eval_share(shakespeare: Path, work: Path, env: dict, quick: bool) -> dict:
    limit = 20 if quick else 180
    args = ["train", str(shakespeare), "--out", str(work / "run-ts"), "--overwrite", "--quiet",
            "--time-limit", str(limit)] + (["--hidden-size", "32", "--embedding-dim", "8"] if quick else
                                           [f"--{k.replace('_', '-')}={v}" for k, v in SIZE_MID_READS.items()])
    # (the model measured: 2 x 320, regularised)
    seconds, _, out = _cli(args, env)
    line = out.strip().splitlines()[-1]
    elapsed = float(line.split(" in ")[1].split("s (")[0])
    evaluation = float(line.split("held-out evaluation ")[1].split("s")[0])
    print(f"\nTiny Shakespeare, --time-limit {limit}: process {seconds:.0f} s; {line}")
    print(f"evaluation share: {evaluation / elapsed:.1%}")
    return {"elapsed": elapsed, "eval_s": evaluation, "share": round(evaluation / elapsed, 4), "process_s": seconds,
            "summary": line}


if __name__ == "__main__":
    main()
