"""Training under torchrun: 2 gloo processes on loopback, one thread each, explicit timeouts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlm import checkpoint as ck

TEXT = ("the time traveller for so it will be convenient to speak of him was expounding a recondite "
        "matter to us his grey eyes shone and twinkled and his usually pale face was flushed and animated\n")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# gloo on the loopback interface only, one thread per process
ENV = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT * 40)  # ~8 KB
    return path


def train_args(corpus, out, **kw):
    options = {"cell": "gru", "hidden-size": 16, "embedding-dim": 8, "dropout": 0, "batch-size": 8, "num-steps": 10,
               "eval-every": 10, "time-limit": 0, "patience": 0, "dist-timeout": 60, **kw}
    args = ["-m", "charlm", "train", str(corpus), "--out", str(out), "--quiet"]
    for k, v in options.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args


def run(args, nproc=None, timeout=240, **popen):
    cmd = (TORCHRUN + ["--nproc-per-node", str(nproc)] + args[1:]) if nproc else [sys.executable] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV}, **popen)


def weights(out, name="last"):
    return ck.load_checkpoint(Path(out) / name).model.state_dict()


def assert_close(a, b, rtol=1e-4):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_two_processes_equal_one(corpus, tmp_path, cell, sampling):
    two = run(train_args(corpus, tmp_path / "two", cell=cell, sampling=sampling, **{"max-steps": 30}), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("30 steps") == 1  # rank 0 alone prints
    one = run(train_args(corpus, tmp_path / "one", cell=cell, sampling=sampling, **{"max-steps": 30}))
    assert one.returncode == 0, one.stderr[-3000:]
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    saved = ck.load_checkpoint(tmp_path / "two" / "last", with_trainer_state=True).trainer_state
    assert saved["world_size"] == 2
    if sampling == "sequential":  # the carried state was gathered whole: (2 layers, batch 8, hidden 16)
        assert tuple(saved["state"][0].shape) == (2, 8, 16)
    with open(tmp_path / "two" / "metrics.csv") as f, open(tmp_path / "one" / "metrics.csv") as g:
        two_rows, one_rows = f.read().splitlines(), g.read().splitlines()
    assert len(two_rows) == len(one_rows) == 4  # header + steps 10, 20, 30, written once


@pytest.mark.slow
def test_resume_exact_with_the_same_number_of_processes_and_warned_with_another(corpus, tmp_path):
    kw = {"dropout": 0.3, "sampling": "sequential", "cell": "lstm", "num-layers": 2}  # per-rank dropout streams
    whole = run(train_args(corpus, tmp_path / "whole", **kw, **{"max-steps": 40}), nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 20}), nproc=2)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 40, "resume": True}), nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert_close(weights(tmp_path / "parts"), weights(tmp_path / "whole"), rtol=1e-5)
    other = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 50, "resume": True}))  # one process
    assert other.returncode == 0, other.stderr[-3000:]
    assert "Warning: resuming a run saved by 2 process(es) with 1" in other.stderr
    assert "50 steps" in other.stdout


@pytest.mark.slow
def test_batch_that_does_not_split_is_one_line_naming_both_numbers(corpus, tmp_path):
    r = run(train_args(corpus, tmp_path / "r", **{"batch-size": 5, "max-steps": 5}), nproc=2)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert ours == ["Error: --batch-size 5 does not split evenly over 2 processes; use a multiple of 2"]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_saves(corpus, tmp_path):
    out = tmp_path / "r"
    args = train_args(corpus, out, **{"max-steps": 10**6, "eval-every": 5})
    p = subprocess.Popen(TORCHRUN + ["--nproc-per-node", "2"] + args[1:], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "last" / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "last" / "manifest.json").exists(), "the run never reached its first checkpoint"
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert stderr.count("Resume with:") == 1, stderr[-3000:]
    saved = ck.load_checkpoint(out / "last", with_trainer_state=True).trainer_state
    assert f"stopped at step {saved['step']}" in stderr  # the step every rank stopped at is the saved one
    resumed = run(train_args(corpus, out, **{"max-steps": saved["step"] + 5, "resume": True}), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{saved['step'] + 5:,} steps" in resumed.stdout
