"""charlm tune: the search space and its syntax, pruning, the command line that reproduces the best trial, resuming
after SIGINT and SIGKILL of a real ``charlm tune`` process, two workers sharing one study through a real PostgreSQL
server, and every bad input as one line that leaves everything as it was.

Trials here are a few steps of a tiny model on a few KB of text (a second or two each).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import stop_process

optuna = pytest.importorskip("optuna", reason="charlm tune needs the tune extra (pip install 'charlm-rnn[tune]')")

from charlm.cli import main  # noqa: E402
from charlm.config import MOGRIFIER_FIELDS, TrainConfig  # noqa: E402
from charlm.data import min_tokens  # noqa: E402
from charlm.errors import ConfigError, StopTraining  # noqa: E402
from charlm.training import train  # noqa: E402
from charlm.tune import (Dim, TuneConfig, default_space, parse_space, sized_space, train_command,  # noqa: E402
                         tune)

SPACE = ("hidden_size=16:48", "num_layers=1", "embedding_dim=16")  # tiny models: a trial is a second or two
# Debian's postgresql (15 on bookworm): its newest server's programs, or CHARLM_PG_BIN
PG_BIN = Path(os.environ.get("CHARLM_PG_BIN") or max(Path("/usr/lib/postgresql").glob("*/bin"),
                                                     key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                                                     default=Path("/usr/lib/postgresql/15/bin")))


def tree(path: Path) -> dict:
    """Every file under ``path`` with a digest of its bytes (what "nothing touched" compares)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def study_of(out: Path, name: str):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))


def by_state(study) -> dict:
    counts = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# -- the space ----------------------------------------------------------------------------------------------------
def test_default_space_is_sized_from_the_corpus_and_the_trial_budget():
    small, large = default_space(30_000, 10**9), default_space(20_000_000, 10**9)
    assert small["hidden_size"].high < large["hidden_size"].high
    assert small["hidden_size"].low < large["hidden_size"].low
    for train_chars in (1_000, 2_160, 30_000, 160_000, 1_000_000, 20_000_000):
        space = default_space(train_chars, 10**9)
        b, t = space["batch_size"].high, space["num_steps"].high
        assert min_tokens(b, t) <= train_chars  # the largest batch shape fits the text, many times over
        assert 16 <= space["hidden_size"].low <= space["hidden_size"].high <= 1024
    # a budget that reads less than the corpus bounds the model: what a trial learns from is what it reads
    assert default_space(20_000_000, 200_000)["hidden_size"].high < large["hidden_size"].high
    # small texts over-fit: regularisation searched wider
    assert small["weight_drop"].high > large["weight_drop"].high
    tm = default_space(160_000, 10**9)  # The Time Machine: charlm train's defaults lie inside
    assert tm["hidden_size"].low <= 320 <= tm["hidden_size"].high
    assert tm["batch_size"].low <= 32 <= tm["batch_size"].high


def test_space_syntax_ranges_choices_fixed_values():
    dims = parse_space(["hidden-size=64:512:log", "cell=lstm,gru", "lr=0.003", "dropout_output=0:0.4",
                        "num_layers=2:2"])
    assert dims["hidden_size"] == Dim("hidden_size", 64, 512, log=True)
    assert dims["cell"].choices == ("lstm", "gru") and not dims["cell"].fixed
    assert dims["lr"].fixed and dims["lr"].value == 0.003
    assert dims["dropout_output"] == Dim("dropout_output", 0.0, 0.4)
    assert dims["num_layers"].fixed and dims["num_layers"].value == 2
    space = sized_space(2_160, 20, None, dims)
    assert space["hidden_size"].low == 64 and space["lr"].fixed
    assert [d.describe() for d in dims.values()][:2] == ["hidden_size=64:512:log", "cell=lstm,gru"]


def test_space_mistakes_one_line_each():
    bad = ["lr=abc", "hidden_size=64:16", "foo=1", "cell=xyz", "lr=1:2:lin", "dropout_output=0.5:1.5",
           "embedding_dim=0:64:log", "hidden_size=1.5", "cell=lstm:gru", "novalue", "num_layers=2", "num_layers=3"]
    with pytest.raises(ConfigError) as err:
        parse_space(bad)
    lines = str(err.value).splitlines()
    assert len(lines) == len(bad) - 1  # every mistake, one line each (num_layers=2 alone is fine)
    assert all(line.startswith("--space ") for line in lines)
    assert "unknown name 'foo'" in lines[2] and "choose one of" in lines[3] and "given twice" in lines[-1]
    result = invoke("tune", "x.txt", "--trials", 1, "--space", "lr=abc", "--space", "cell=xyz")
    assert result.exit_code == 2 and result.output.count("--space ") == 2


def test_train_command_names_every_option_and_reads_back_exactly():
    train_params = {o for p in main.commands["train"].params for o in getattr(p, "opts", [])}
    cfg = TrainConfig(corpus="c.txt", out="o", preprocess="lower", min_count=2, cell="gru",
                      impl="scratch", hidden_size=33, num_layers=3, embedding_dim=0, dropout=0.1, weight_drop=0.1,
                      dropout_input=0.2, dropout_hidden=0.3, dropout_output=0.4, batch_size=7, num_steps=9,
                      sampling="random", val_fraction=0.2, eval_chars=500, optimizer="sgd", lr=0.1234567890123,
                      clip=0.5, weight_decay=1e-5, lr_decay=0.9, lr_schedule="cosine", epochs=3, max_steps=77,
                      time_limit=None, eval_every=7, patience=None, seed=5, device="cpu", dist_backend="gloo",
                      dist_timeout=30.0, precision="bf16", average="ema", average_decay=0.99)
    words = shlex.split(train_command(cfg))
    assert {w for w in words if w.startswith("--")} <= train_params
    ctx = main.commands["train"].make_context("train", words[2:])
    assert ctx.params["lr"] == cfg.lr and ctx.params["weight_decay"] == cfg.weight_decay  # floats read back exactly
    assert (ctx.params["average"], ctx.params["average_decay"]) == ("ema", 0.99)
    assert ctx.params["time_limit"] == 0 and ctx.params["patience"] == 0  # charlm train's "none"
    named = {w[2:].replace("-", "_") for w in words if w.startswith("--")}
    # every field is named (but those a search never sets: --d2l's, and the fine-tuning ones)
    # (and the mogrifier's, for a GRU: a mogrifier's below)
    assert named == {f for f in cfg.to_dict()
                     if f not in ("corpus", "d2l", "max_chars", "init_from", "new_chars", *MOGRIFIER_FIELDS)}
    mog = dataclasses.replace(cfg, cell="mogrifier", mogrify_rounds=3, mogrify_rank=2)
    ctx = main.commands["train"].make_context("train", shlex.split(train_command(mog))[2:])
    assert (ctx.params["cell"], ctx.params["mogrify_rounds"], ctx.params["mogrify_rank"]) == ("mogrifier", 3, 2)
    with pytest.raises(ConfigError):  # (--d2l's max_chars has no option of its own: refused, not dropped)
        train_command(TrainConfig(corpus="c.txt", max_chars=10))


# -- StopTraining: how a callback ends a run ------------------------------------------------------------------------
@pytest.mark.parametrize("event", ["eval", "step"])
def test_a_callback_stops_a_run_saved_as_after_a_signal(corpus, tmp_path, event):
    def stop(e, info):
        if e == event and info["step"] == 10:
            raise StopTraining(f"stopped by the test at {e}")

    cfg = TrainConfig(corpus=str(corpus), out=str(tmp_path / "r"), hidden_size=16, num_layers=1, embedding_dim=8,
                      batch_size=4, num_steps=16, max_steps=40, eval_every=5, time_limit=None)
    result = train(cfg, callback=stop)
    assert result.steps == 10 and result.stop_reason == f"stopped by the test at {event}"
    with open(tmp_path / "r" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [5, 10]  # evaluated once at step 10, not twice
    saved = json.loads((tmp_path / "r" / "last" / "config.json").read_text())
    assert saved["progress"]["step"] == 10


# -- a search -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tune_prunes_writes_results_and_its_command_reproduces_the_best_trial_to_the_bit(corpus, tmp_path):
    out = tmp_path / "tune"
    seen = []
    result = tune(TuneConfig(corpus=str(corpus), out=str(out), trials=5, trial_steps=20, pruner="halving",
                             space=SPACE + ("lr=0.0005:0.05:log",)), callback=lambda e, i: seen.append(e))
    study = study_of(out, corpus.stem)
    states = by_state(study)
    assert states.get("PRUNED", 0) >= 1 and states.get("COMPLETE", 0) >= 1  # successive halving stopped some early
    assert states["PRUNED"] + states["COMPLETE"] == 5 == result.complete + result.pruned
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(len(t.intermediate_values) < 10 for t in pruned)  # stopped before their budget's end
    assert all("pruned by Optuna" in t.user_attrs["stop_reason"] for t in pruned)
    assert {"search-start", "trial-start", "trial-eval", "trial-end"} <= set(seen)
    # the results
    for name in ("trials.csv", "best.json", "best-command.txt", "history.png", "importances.png", ".charlm"):
        assert (out / name).is_file(), name
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == list(range(5)) and {r["state"] for r in rows} == {"complete", "pruned"}
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == study.best_trial.number == result.best_number
    assert best["value"] == study.best_value == result.best_value
    assert (out / "best-command.txt").read_text().strip() == result.command == best["command"]
    assert Path(best["run"]) == (out / "trials" / f"{best['trial']:04d}").resolve()
    # the command, run by charlm train in a process of its own, gives the best trial's figure to the bit
    words = shlex.split(result.command)
    words[words.index("--out") + 1] = str(tmp_path / "again")
    run = subprocess.run([sys.executable, "-m", "charlm", *words[1:], "--quiet"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert run.returncode == 0, run.stderr
    again = json.loads((tmp_path / "again" / "best" / "config.json").read_text())["progress"]["best_val_loss"]
    trial = json.loads((Path(best["run"]) / "best" / "config.json").read_text())["progress"]["best_val_loss"]
    assert again == trial and again / math.log(2) == best["value"]


def test_tune_by_time_with_a_final_run(corpus, tmp_path):
    out = tmp_path / "tune"
    result = tune(TuneConfig(corpus=str(corpus), out=str(out), trials=2, trial_time=1.5, final_time=2.0,
                             pruner="none", space=SPACE))
    assert result.complete == 2 and result.final is not None
    assert (out / "final" / "best" / "manifest.json").is_file()
    command = (out / "final-command.txt").read_text().strip()
    assert "--time-limit 2.0" in command and "--max-steps" not in command
    assert result.final_config.time_limit == 2.0 and result.final_config.hidden_size == result.best_params.get(
        "hidden_size", result.final_config.hidden_size)
    # a trial by time is cut by its own --time-limit: its command says so
    assert "--time-limit 1.5" in result.command


def test_settings_that_cannot_train_are_pruned_and_three_in_a_row_stop_the_search(corpus, tmp_path):
    out = tmp_path / "t"
    result = invoke("tune", corpus, "--out", out, "--trials", 5, "--trial-steps", 4, "--quiet", "--space", "lr=10",
                    "--space", "weight_decay=0.5", *[a for s in SPACE for a in ("--space", s)])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert "3 trials in a row failed; the last: --lr 10 with --weight-decay 0.5" in result.output
    trials = study_of(out, corpus.stem).trials
    assert [t.state.name for t in trials] == ["PRUNED"] * 3 and all("error" in t.user_attrs for t in trials)
    with open(out / "trials.csv") as f:
        assert all("their product must be under 1" in row["note"] for row in csv.DictReader(f))


def _start(corpus, out, *extra, tmp_path):
    args = [sys.executable, "-m", "charlm", "tune", str(corpus), "--out", str(out), "--trial-steps", "30",
            "--pruner", "none", "--quiet", *[a for s in SPACE for a in ("--space", s)], *extra]
    log = open(tmp_path / f"{out.name}.log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MPLBACKEND": "Agg"}, start_new_session=True), log


def _wait_for_trial(out: Path, number: int, p: subprocess.Popen, timeout: float = 240) -> None:
    """Until trial ``number`` has evaluated at least once (its metrics.csv has a row)."""
    metrics = out / "trials" / f"{number:04d}" / "metrics.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            return
        assert p.poll() is None, f"charlm tune ended early ({p.returncode})"
        time.sleep(0.05)
    pytest.fail(f"trial {number} did not start in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_a_stopped_search_resumes_and_loses_only_the_running_trial(corpus, tmp_path, sig):
    out = tmp_path / "tune"
    p, log = _start(corpus, out, "--trials", "4", tmp_path=tmp_path)
    try:
        _wait_for_trial(out, 1, p)
        p.send_signal(getattr(signal, sig))
        p.wait(timeout=120)
    finally:
        stop_process(p)
        log.close()
    output = (tmp_path / "tune.log").read_text()
    before = study_of(out, corpus.stem)
    finished = {t.number: t.value for t in before.trials if t.state.name == "COMPLETE"}
    running = [t for t in before.trials if t.state.name in ("RUNNING", "FAIL")]
    assert len(running) == 1 and finished  # the trial that was running, and those done before it
    if sig == "SIGINT":  # stopped cleanly: failed by Optuna, run again by the next --resume; one line says how
        assert p.returncode == 130, output
        assert running[0].state.name == "FAIL"
        assert "Interrupted: SIGINT during trial" in output and "Resume with: charlm tune" in output
        assert "Traceback" not in output
    else:  # killed: left RUNNING in the journal
        assert p.returncode == -signal.SIGKILL and running[0].state.name == "RUNNING"
    lost = running[0]
    result = invoke("tune", corpus, "--out", out, "--trials", 4, "--resume")
    assert result.exit_code == 0, result.output
    after = study_of(out, corpus.stem)
    states = by_state(after)
    assert states == {"COMPLETE": 4, "FAIL": 1}  # the trials asked, and the one that was stopped
    assert {t.number: t.value for t in after.trials if t.number in finished} == finished  # nothing done was lost
    retry = [t for t in after.trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retry) == 1 and retry[0].params == lost.params and retry[0].state.name == "COMPLETE"
    assert retry[0].number > lost.number
    if sig == "SIGKILL":
        assert f"trial(s) {lost.number} stopped by a kill run again" in result.output
    # nothing is left to do: a second resume runs no trial and rewrites the results
    again = invoke("tune", corpus, "--out", out, "--trials", 4, "--resume")
    assert again.exit_code == 0 and len(study_of(out, corpus.stem).trials) == 5


# -- two workers on a real PostgreSQL server -----------------------------------------------------------------------
def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the PostgreSQL tests cannot run in CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own (initdb and pg_ctl in a temporary folder, a free loopback port, a password),
    stopped and deleted at the end whatever happens; its URL. initdb refuses root: as root the server runs as the
    ``postgres`` user (runuser)."""
    if not (PG_BIN / "initdb").is_file():
        _unavailable(f"PostgreSQL is not installed ({PG_BIN}/initdb): apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (the tune extra installs it)")
    as_user = []
    if os.getuid() == 0:
        if not shutil.which("runuser"):
            _unavailable("as root, initdb needs runuser to run as the postgres user")
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("as root, initdb needs the postgres user (Debian's postgresql package makes it)")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="charlm-pg-"))  # not under pytest's tmp folder: the postgres user must reach it
    password, port = "charlm-test-" + os.urandom(4).hex(), _free_port()
    (base / "pw").write_text(password + "\n")
    if as_user:
        for path in (base, base / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data = base / "data"
    started = False
    try:
        init = subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-U", "charlm", "--pwfile",
                               str(base / "pw"), "--auth=scram-sha-256", "-E", "UTF8"], capture_output=True, text=True,
                              timeout=120)
        assert init.returncode == 0, init.stderr
        start = subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"),
                                "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {base}", "-w", "-t", "60",
                                "start"], capture_output=True, text=True, timeout=120)
        started = True
        assert start.returncode == 0, start.stdout + start.stderr + (base / "server.log").read_text()
        yield f"postgresql+psycopg://charlm:{password}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_through_postgresql(corpus, tmp_path, postgres):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--trials", "8", "--pruner", "halving", "--storage", postgres, "--study", "shared")
    workers = [_start(corpus, out, *common, tmp_path=tmp_path) for out in (a, b)]
    try:
        for p, _ in workers:
            p.wait(timeout=600)
    finally:
        for p, log in workers:
            stop_process(p)
            log.close()
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("a", "b")]
    assert [p.returncode for p, _ in workers] == [0, 0], logs
    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = study.get_trials(deepcopy=False)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    ran = {name: sorted(int(p.name) for p in (out / "trials").iterdir()) for name, out in (("a", a), ("b", b))}
    assert ran["a"] and ran["b"]  # both worked on it ...
    assert not set(ran["a"]) & set(ran["b"])  # ... no trial ran twice ...
    assert sorted(ran["a"] + ran["b"]) == [t.number for t in trials]  # ... and the count adds up:
    assert 8 <= len(trials) <= 9  # the trials asked (the other worker may have had one running at the end)
    for t in trials:  # each trial's run is in the folder of the worker that ran it
        assert Path(t.user_attrs["run"]).parent.parent == (a if t.number in ran["a"] else b).resolve()
    # the best is the best of both: each worker's results, rewritten by a resume once the study is complete
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    for out in (a, b):
        result = invoke("tune", corpus, "--out", out, "--trials", 8, "--storage", postgres, "--study", "shared",
                        "--resume")
        assert result.exit_code == 0, result.output
        written = json.loads((out / "best.json").read_text())
        assert (written["trial"], written["value"]) == (best.number, best.value)
    assert len(study.get_trials(deepcopy=False)) == len(trials)  # (nothing was left to run)


def test_database_bad_credentials_and_missing_database_one_line(corpus, tmp_path, postgres):
    for url, message in [(postgres.replace(":charlm-test-", ":wrong-"), "password authentication failed"),
                         (postgres.rsplit("/", 1)[0] + "/nodb", 'database "nodb" does not exist')]:
        t0 = time.monotonic()
        result = invoke("tune", corpus, "--out", tmp_path / "t", "--trials", 1, "--storage", url)
        assert result.exit_code == 1 and message in result.output and len(result.output.splitlines()) == 1
        assert "wrong-" not in result.output  # the password is not shown
        assert time.monotonic() - t0 < 30 and not (tmp_path / "t").exists()


# -- bad input: one line, nothing touched --------------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("postgres://u:p@127.0.0.1:5432/db", "no database 'postgres' is known"),
    ("not a url", "is not a database URL"),
    ("postgresql+psycopg://u:secret@127.0.0.1:{port}/db", "Connection refused"),
    ("mysql+nosuchdriver://u:p@127.0.0.1/db", "no database 'mysql+nosuchdriver' is known"),
    ("sqlite:////no/such/folder/x.db", "unable to open database file"),
])
def test_bad_storage_url_one_line_quickly(corpus, tmp_path, url, message):
    url = url.replace("{port}", str(_free_port()))
    t0 = time.monotonic()
    result = invoke("tune", corpus, "--out", tmp_path / "t", "--trials", 1, "--storage", url)
    assert result.exit_code == 1, result.output
    assert len(result.output.splitlines()) == 1 and message in result.output, result.output
    assert "secret" not in result.output
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "t").exists()


def test_bad_inputs_one_line_nothing_touched(corpus, write_corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    small = write_corpus(3, name="small.txt")  # about 600 characters
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    done = tmp_path / "done"
    assert invoke("tune", corpus, "--out", done, "--trials", 1, "--trial-steps", 4, *[a for s in SPACE for a in
                                                                                       ("--space", s)]).exit_code == 0
    cases = [
        ((empty, "--trials", 1), 1, "is empty"),
        ((small, "--trials", 1), 1, "charlm tune needs at least 1,000"),
        ((corpus, "--time-budget", 5, "--trial-time", 10), 2, "is shorter than one trial"),
        ((corpus, "--time-budget", 5, "--final-time", 6), 2, "leaves no time to search"),
        ((corpus,), 2, "give --trials N, --time-budget SECONDS or both"),
        ((corpus, "--trials", 1, "--trial-steps", 5, "--trial-time", 5), 2, "exclude each other"),
        ((corpus, "--trials", 1, "--out", mine), 1, "is not empty and is not a charlm tune folder"),
        ((corpus, "--trials", 1, "--out", done), 1, "already holds a search; pass --resume"),
        ((corpus, "--trials", 1, "--out", tmp_path / "none", "--resume"), 1, "nothing to resume"),
        ((corpus, "--trials", 1, "--out", done, "--resume", "--overwrite"), 1, "contradict each other"),
        ((corpus, "--trials", 1, "--out", done, "--resume", "--trial-steps", 9), 1,
         "was started with --trial-steps 4, not 9"),
        ((corpus, "--trials", 1, "--out", done, "--resume", "--space", "hidden_size=99"), 1,
         "searches another space"),
        ((corpus, "--trials", 1, "--out", tmp_path / "x", "--space", "batch_size=512", "--space", "num_steps=64"), 1,
         "which need"),
        ((corpus, "--trials", 1, "--out", tmp_path / "x", "--storage", "sqlite:///x.db", "--overwrite"), 1,
         "--overwrite with --storage"),
        ((corpus, "--trials", 1, "--out", done / "trials" / "0000"), 1, "is not a charlm tune folder"),
    ]
    before = tree(tmp_path)
    for args, code, message in cases:
        result = invoke("tune", *args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
        if code == 1:
            assert len(result.output.splitlines()) == 1, result.output
        assert tree(tmp_path) == before, args


def test_a_folder_in_use_is_refused(corpus, tmp_path):
    from charlm.outputs import FolderLock

    out = tmp_path / "t"
    assert invoke("tune", corpus, "--out", out, "--trials", 1, "--trial-steps", 4,
                  *[a for s in SPACE for a in ("--space", s)]).exit_code == 0
    holder = FolderLock(out).acquire()  # another process holds it (a lock is per open file: this one counts)
    try:
        before = tree(out)
        result = invoke("tune", corpus, "--out", out, "--trials", 2, "--resume")
        assert result.exit_code == 1 and "is being written by process" in result.output
        assert tree(out) == before
    finally:
        holder.release()


def test_missing_optuna_is_one_line_naming_the_extra(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # (import optuna now fails as if it were not installed)
    result = invoke("tune", corpus, "--out", tmp_path / "t", "--trials", 1)
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: charlm tune needs the tune extra (optuna is missing): pip install 'charlm-rnn[tune]'")
    assert not (tmp_path / "t").exists()
    with pytest.raises(Exception, match="needs the tune extra"):
        tune(TuneConfig(corpus=str(corpus), out=str(tmp_path / "t"), trials=1))


def test_show_space_writes_nothing(corpus, tmp_path):
    before = tree(tmp_path)
    result = invoke("tune", corpus, "--show-space", "--trial-steps", 50, "--space", "cell=gru")
    assert result.exit_code == 0 and "--space cell=gru  (fixed)" in result.output and "hidden_size=" in result.output
    assert tree(tmp_path) == before


def test_overwrite_starts_over_and_keeps_nothing_of_the_earlier_search(corpus, tmp_path):
    out = tmp_path / "t"
    args = ("tune", corpus, "--out", out, "--trials", 1, "--trial-steps", 4, *[a for s in SPACE for a in
                                                                               ("--space", s)])
    assert invoke(*args).exit_code == 0
    (out / "trials" / "0000" / "notes.txt").write_text("mine")  # a user's file inside a trial's run
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 1 and "notes.txt" in result.output  # refused, untouched
    (out / "trials" / "0000" / "notes.txt").unlink()
    assert invoke(*args, "--trials", 2, "--overwrite").exit_code == 0
    assert len(study_of(out, corpus.stem).trials) == 2 and sorted(p.name for p in (out / "trials").iterdir()) == [
        "0000", "0001"]

