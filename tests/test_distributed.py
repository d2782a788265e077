"""Training under torchrun: 2 gloo processes on loopback, one thread each, explicit timeouts."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_marked

from charlm import checkpoint as ck

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# gloo on the loopback interface only, one thread per process
ENV = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")


@pytest.fixture(autouse=True)
def _temp_dir_of_its_own(tmp_path, monkeypatch):
    """torchrun's agent leaves a torchelastic_* folder in the temporary directory: this test's, not /tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))


@pytest.fixture
def corpus(write_corpus):
    return write_corpus(40, "c.txt")  # ~8 KB


def train_args(corpus, out, **kw):
    # no random masks (dropout, weight drop), so that 2 processes compute what 1 does
    options = {"cell": "gru", "hidden-size": 16, "embedding-dim": 8, "dropout": 0, "weight-drop": 0, "dropout-input": 0,
               "dropout-hidden": 0, "dropout-output": 0, "batch-size": 8, "num-steps": 10, "eval-every": 10,
               "time-limit": 0, "patience": 0, "dist-timeout": 60, "lr-schedule": "plateau", **kw}
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


def metrics(out) -> list[dict]:
    """metrics.csv's rows without the clock's columns (elapsed time, tokens per second)."""
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("elapsed_s", "tokens_per_s")} for row in csv.DictReader(f)]


def assert_rows_close(a: list[dict], b: list[dict], rel=1e-4):
    """The same steps and every other column within ``rel`` (2 processes sum gradients in another order)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert float(x[k]) == pytest.approx(float(y[k]), rel=rel, abs=1e-6), (x["step"], k, x[k], y[k])


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
    two_rows, one_rows = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in two_rows] == ["10", "20", "30"]  # written once, by rank 0
    assert_rows_close(two_rows, one_rows)  # training loss, gradient norm, lr and the held-out figures


@pytest.mark.slow
def test_resume_exact_with_the_same_number_of_processes_and_warned_with_another(corpus, tmp_path):
    # per-rank dropout streams; periodic evaluations of the tail's first 300 characters (of 752), so the
    # resume loads best/ for the final whole-tail figure (the path that once shifted the dropout masks)
    kw = {"dropout": 0.3, "sampling": "sequential", "cell": "lstm", "num-layers": 2, "eval-chars": 300}
    whole = run(train_args(corpus, tmp_path / "whole", **kw, **{"max-steps": 40}), nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "on all 752 held-out characters" in whole.stdout  # said only when periodic ones read a part
    part = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 20}), nproc=2)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 40, "resume": True}), nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert metrics(tmp_path / "parts") == metrics(tmp_path / "whole")  # every column but the clock's, exactly
    for name in ("last", "best"):
        a, b = weights(tmp_path / "parts", name), weights(tmp_path / "whole", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 50, "resume": True}))  # one process
    assert other.returncode == 0, other.stderr[-3000:]
    assert "Warning: resuming a run saved by 2 process(es) with 1" in other.stderr
    assert "50 steps" in other.stdout


@pytest.mark.slow
def test_a_two_process_resume_after_an_off_schedule_stop_equals_a_straight_run(corpus, tmp_path):
    """Stopped at step 25 (between the evaluations of steps 20 and 30: the final evaluation saves last/ and,
    when it improves, best/ too, each with the training figures' running sums), then resumed: every column
    of metrics.csv but the clock's as the straight run's. Saving once summed the ranks' sums again in place,
    so the row after the resume read 2x (or 4x) the training loss."""
    kw = {"dropout": 0.2, "sampling": "sequential", "cell": "gru"}
    whole = run(train_args(corpus, tmp_path / "whole", **kw, **{"max-steps": 40}), nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 25}), nproc=2)
    assert part.returncode == 0, part.stderr[-3000:]
    parts = metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == ["10", "20", "25"]
    rest = run(train_args(corpus, tmp_path / "parts", **kw, **{"max-steps": 40, "resume": True}), nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    resumed, straight = metrics(tmp_path / "parts"), metrics(tmp_path / "whole")
    assert [r["step"] for r in resumed] == ["10", "20", "25", "30", "40"]
    straight_by_step = {r["step"]: r for r in straight}
    for row in resumed:
        if row["step"] != "25":  # (the straight run has no row at step 25)
            assert row == straight_by_step[row["step"]], row["step"]  # column by column, exactly


@pytest.mark.slow
def test_batch_that_does_not_split_is_one_line_naming_both_numbers(corpus, tmp_path):
    r = run(train_args(corpus, tmp_path / "r", **{"batch-size": 5, "max-steps": 5}), nproc=2)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert ours == ["Error: --batch-size 5 does not split evenly over 2 processes; use a multiple of 2"]
    assert not (tmp_path / "r").exists()


# runs the charlm program as torchrun's worker and appends "RANK EXIT_STATUS" to $PROBE_FILE as it exits
PROBE = """
import os
from charlm.cli import run
code = 0
try:
    run()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    raise
finally:
    with open(os.environ["PROBE_FILE"], "a") as f:
        f.write(f"{os.environ['RANK']} {code}\\n")
"""


@contextlib.contextmanager
def launched(corpus, out, tmp_path, **options):
    """An endless 2-process run in the background, in its own session, once it has saved its first
    checkpoint; whatever is left of it is killed and reaped at the end: torchrun and each worker (torchrun
    starts every worker in a session of its own, which a signal to torchrun's group does not reach, and a
    worker stopped with SIGSTOP outlives torchrun), found by a mark in their environment."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    args = train_args(corpus, out, **{"max-steps": 10**6, "eval-every": 5, **options})
    mark = str(tmp_path)
    p = subprocess.Popen(TORCHRUN + ["--nproc-per-node", "2", str(probe)] + args[2:],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, **ENV, "PROBE_FILE": str(tmp_path / "exit-status"), "CHARLM_LAUNCH": mark})
    try:
        deadline = time.time() + 120
        while not (out / "last" / "manifest.json").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert (out / "last" / "manifest.json").exists(), "the run never reached its first checkpoint"
        yield p
    finally:
        kill_marked("CHARLM_LAUNCH", mark)
        p.wait(timeout=30)
        _wait_unlocked(out)


def _wait_unlocked(out, timeout=30.0):
    """Until the run folder's lock is free: a killed worker drops it only when the kernel has closed its files,
    which may be a moment after the process is no longer seen (a resume started at once found it held)."""
    from charlm.outputs import FolderLock, LockedError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return FolderLock(out).check_free()
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def assert_resumes(corpus, out, steps=5):
    """The run in ``out`` continues from its last/ for ``steps`` more steps under 2 processes."""
    step = ck.load_checkpoint(out / "last", with_trainer_state=True).trainer_state["step"]
    resumed = run(train_args(corpus, out, **{"max-steps": step + steps, "resume": True}), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{step + steps:,} steps" in resumed.stdout


def workers(launcher_pid) -> dict[int, int]:
    """RANK -> pid of each worker torchrun started."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid:
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = next(int(e[5:]) for e in environ if e.startswith(b"RANK="))
                found[rank] = int(stat.parent.name)
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return found


def exit_statuses(tmp_path) -> dict[int, int]:
    lines = (tmp_path / "exit-status").read_text().split()
    return {int(r): int(c) for r, c in zip(lines[::2], lines[1::2])}


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_saves(corpus, tmp_path):
    out = tmp_path / "r"
    with launched(corpus, out, tmp_path) as p:
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    assert exit_statuses(tmp_path) == {0: 130, 1: 130}  # every rank exits as one interrupted process does
    assert stderr.count("Resume with:") == 1, stderr[-3000:]
    saved = ck.load_checkpoint(out / "last", with_trainer_state=True).trainer_state
    assert f"stopped at step {saved['step']}" in stderr  # the step every rank stopped at is the saved one
    assert_resumes(corpus, out)


@pytest.mark.slow
def test_a_worker_that_stops_answering_stops_the_others_within_dist_timeout(corpus, tmp_path):
    out = tmp_path / "r"
    lines = []
    with launched(corpus, out, tmp_path, **{"dist-timeout": 4}) as p:
        reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in p.stderr), daemon=True)
        reader.start()
        ranks = workers(p.pid)
        assert sorted(ranks) == [0, 1]
        stopped = time.time()
        os.kill(ranks[1], signal.SIGSTOP)  # alive, but silent: only the timeout can end the wait
        deadline = stopped + 60
        while time.time() < deadline and not any("Error: rank 0" in line for _, line in lines):
            time.sleep(0.1)
        said = [(t, line.strip()) for t, line in lines if line.startswith("Error:")]
        status = tmp_path / "exit-status"  # rank 0 records its exit status after printing its line
        while time.time() < deadline and said and not (status.exists() and status.read_text().strip()):
            time.sleep(0.1)
        kill_marked("CHARLM_LAUNCH", str(tmp_path))  # the stopped worker too
        reader.join(timeout=10)
    assert said, "rank 0 did not give up: " + "".join(line for _, line in lines)[-3000:]
    t, line = said[0]
    assert line.startswith("Error: rank 0 lost the other processes after step ")
    assert "did not answer within --dist-timeout 4s" in line and line.endswith(f"resume from {out / 'last'} with --resume")
    assert 3.5 <= t - stopped < 4 + 30  # the timeout set, not torch's default of 30 minutes
    assert exit_statuses(tmp_path) == {0: 1}


@pytest.mark.slow
def test_a_worker_that_dies_ends_the_run_and_it_resumes(corpus, tmp_path):
    out = tmp_path / "r"
    with launched(corpus, out, tmp_path) as p:
        os.kill(workers(p.pid)[1], signal.SIGKILL)
        _, stderr = p.communicate(timeout=90)  # torchrun notices, stops rank 0 and reports
    assert p.returncode != 0
    assert "Signal 9 (SIGKILL) received by PID" in stderr  # torchrun's report names the dead worker
    assert_resumes(corpus, out)
