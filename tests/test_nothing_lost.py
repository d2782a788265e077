"""Issue 35, items 3 to 9: everything checked before the first write, one writer per run folder, run metadata
that travels, figures named for what they are, and the smaller holes. Each test is named after its item; the
path shapes of items 1 and 2 are tests/test_canaries.py's."""

import csv
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from charlm import checkpoint as ck
from charlm.cli import main
from charlm.config import TrainConfig
from charlm.errors import TrainError
from charlm.outputs import LOCK
from charlm.training import train

SMALL = ["--hidden-size", "16", "--embedding-dim", "4", "--batch-size", "4", "--num-steps", "10", "--time-limit", "0",
         "--quiet"]


def digest(root: Path) -> dict:
    """Every file and folder under ``root`` with its content hash (the lock file's holder line aside)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*")) if p.name != LOCK}


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def train_cli(corpus, out, *args):
    return CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), *SMALL, *map(str, args)])


@pytest.fixture
def run(corpus, tmp_path):
    """A finished tiny run (12 steps, evaluated every 4)."""
    out = tmp_path / "run"
    r = train_cli(corpus, out, "--max-steps", 12, "--eval-every", 4)
    assert r.exit_code == 0, r.output
    return out


# -- 3: everything checked before the first write ---------------------------------------------------------

@pytest.mark.parametrize("option", [["--hidden-size", "1000000000"], ["--embedding-dim", "2000000000"],
                                    ["--hidden-size", "3000000"], ["--lr", "10", "--weight-decay", "0.5"],
                                    ["--weight-decay", "1e300"], ["--embedding-dim", "100000000000"]])
def test_item3_overwrite_with_an_impossible_option_keeps_the_old_run(corpus, run, tmp_path, option):
    before = digest(tmp_path)
    result = train_cli(corpus, run, "--overwrite", "--max-steps", 2, *option)
    if option[1] == "100000000000":  # past what a tensor dimension holds: click's own range check (exit 2)
        assert "is not in the range 0<=x<=2147483647" in one_line_error(result, code=2)
    else:
        line = one_line_error(result)
        assert any(word in line for word in ("too large", "GiB", "under 1")), line
    assert digest(tmp_path) == before  # the old run whole: nothing was deleted before the options were known good


@pytest.mark.parametrize("option", [["--hidden-size", "1000000000"], ["--lr", "3", "--weight-decay", "0.5"]])
def test_item3_an_impossible_option_leaves_no_folder_that_blocks_the_out(corpus, tmp_path, option):
    out = tmp_path / "new"
    one_line_error(train_cli(corpus, out, "--max-steps", 2, *option))
    assert not out.exists()
    assert train_cli(corpus, out, "--max-steps", 2).exit_code == 0  # the same --out then works


def test_item3_a_folder_a_failed_start_left_with_only_its_marker_does_not_block(corpus, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".charlm").write_text('{"kind": "run"}\n')
    (out / LOCK).write_text("")
    assert train_cli(corpus, out, "--max-steps", 2).exit_code == 0


# -- 4: a resume with another schedule ------------------------------------------------------------------------

@pytest.mark.parametrize("change", [["--lr-schedule", "plateau"], ["--lr-schedule", "cosine"], ["--lr", "0.01"]])
def test_item4_a_resume_with_another_schedule_or_lr_is_refused(corpus, tmp_path, change):
    out = tmp_path / "r"
    assert train_cli(corpus, out, "--max-steps", 20, "--eval-every", 10).exit_code == 0
    before = digest(tmp_path)
    line = one_line_error(train_cli(corpus, out, "--resume", "--max-steps", 40, *change))
    assert ("lr-schedule: 'hold-decay' ->" in line or "lr: None -> 0.01" in line) and "resumes with" in line
    assert digest(tmp_path) == before


# -- 5: one writer per run folder -------------------------------------------------------------------------------

def test_item5_a_second_training_on_the_same_out_is_refused_naming_the_first(corpus, tmp_path):
    out = tmp_path / "r"
    holding, done = threading.Event(), threading.Event()

    def pause(event, info):  # the first run waits, its lock held, until the second has tried
        if event == "eval" and not holding.is_set():
            holding.set()
            done.wait(60)

    cfg = TrainConfig(corpus=str(corpus), out=str(out), hidden_size=16, embedding_dim=4, batch_size=4, num_steps=10,
                      max_steps=12, eval_every=4, time_limit=None)
    results = []
    first = threading.Thread(target=lambda: results.append(train(cfg, callback=pause)))
    first.start()
    try:
        assert holding.wait(60)
        rows_before = (out / "metrics.csv").read_text()
        for flags in ([], ["--overwrite"], ["--resume"]):
            line = one_line_error(train_cli(corpus, out, "--max-steps", 6, *flags))
            assert f"is being written by process {os.getpid()}" in line and "wait for it" in line, line
        assert (out / "metrics.csv").read_text() == rows_before
    finally:
        done.set()
        first.join(120)
    assert results and results[0].steps == 12
    with open(out / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 8, 12]  # the first run's rows only, in order


def test_item5_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, mirror):
    corpus = tmp_path / "tm.txt"
    corpus.write_bytes((mirror / "timemachine.txt").read_bytes())
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "charlm", "train", str(corpus), "--out", str(out), *SMALL,
                          "--max-steps", "100000", "--eval-every", "5"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last" / "manifest.json").is_file():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read().decode()
            time.sleep(0.1)
        assert json.loads((out / LOCK).read_text())["pid"] == p.pid
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    r = train_cli(corpus, out, "--resume", "--max-steps", 10)  # the dead process's lock is taken over
    assert r.exit_code == 0, r.output
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


# -- 6: a foreign file in last/ or best/, a resume that takes no step --------------------------------------------

@pytest.mark.parametrize("where", ["last", "best"])
def test_item6_a_foreign_file_in_a_checkpoint_is_refused_before_anything_is_written(corpus, run, tmp_path, where):
    (run / where / "notes.txt").write_text("mine")
    before = digest(tmp_path)
    line = one_line_error(train_cli(corpus, run, "--resume", "--max-steps", 16))
    assert f"{where}/notes.txt" in line and "move them out to resume" in line and "checkpoint" not in line
    assert digest(tmp_path) == before


def test_item6_a_resume_that_takes_no_step_writes_nothing(corpus, run, tmp_path):
    before = digest(run)
    r = train_cli(corpus, run, "--resume", "--max-steps", 12, "--eval-every", 4)
    assert r.exit_code == 0, r.output
    assert digest(run) == before  # no metrics row, last/ and best/ as they were


# -- 7: the corpus path travels --------------------------------------------------------------------------------

def test_item7_eval_of_a_run_from_another_folder_reads_its_corpus(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    run = tmp_path / "run"
    assert train_cli(corpus.name, run, "--max-steps", 4).exit_code == 0  # the corpus named relative to here
    expected = json.loads(CliRunner().invoke(main, ["eval", str(run), "--json"]).output)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / corpus.name).write_text("another file of the same name\n" * 20)  # a decoy
    monkeypatch.chdir(elsewhere)
    r = CliRunner().invoke(main, ["eval", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["loss"] == expected["loss"]
    assert ck.load_checkpoint(run).corpus_info["path"] == str(corpus.resolve())


def test_item7_a_project_moved_whole_still_finds_its_corpus(tmp_path, write_corpus, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    write_corpus(12, name="project/text.txt")
    assert train_cli("text.txt", "runs/a", "--max-steps", 4).exit_code == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "project").rename(tmp_path / "moved")
    r = CliRunner().invoke(main, ["eval", "moved/runs/a"])
    assert r.exit_code == 0 and "moved/text.txt" in r.output, r.output


# -- 8: figures named for what they are ----------------------------------------------------------------------------

def test_item8_info_and_exports_give_the_whole_held_out_figure_and_name_the_periodic_one(corpus, tmp_path):
    out = tmp_path / "r"
    assert train_cli(corpus, out, "--max-steps", 8, "--eval-every", 4, "--eval-chars", 60).exit_code == 0
    whole = json.loads(CliRunner().invoke(main, ["eval", str(out), "--json"]).output)
    info = CliRunner().invoke(main, ["info", str(out)]).output
    held = next(line for line in info.splitlines() if line.startswith("held-out:"))
    assert f"{whole['bits_per_char']:.4f} bits/char" in held and "the whole held-out text" in held
    periodic = next(line for line in info.splitlines() if line.startswith("best eval:"))
    assert "on the first 60 of" in periodic and "periodic" in periodic
    assert "best val" not in info
    progress = ck.load_checkpoint(out).progress
    assert progress["held_out"]["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    pytest.importorskip("onnx")
    from charlm.export.graph import metadata

    meta = metadata(ck.load_checkpoint(out), "")
    assert meta["held_out_bits_per_char"] == pytest.approx(whole["bits_per_char"], abs=1e-6)
    assert meta["held_out_chars"] == whole["tokens"]


# -- 9: the smaller holes ----------------------------------------------------------------------------------------------

def test_item9_a_huge_weight_decay_is_one_line_not_a_nan_figure(corpus, tmp_path):
    line = one_line_error(train_cli(corpus, tmp_path / "r", "--max-steps", 3, "--weight-decay", "1e300"))
    assert "--weight-decay" in line and "under 1" in line
    assert not (tmp_path / "r").exists()


def test_item9_a_held_out_loss_that_is_not_finite_stops_the_run_in_one_line(corpus, tmp_path, monkeypatch):
    from charlm import training
    from charlm.evaluation import EvalResult

    monkeypatch.setattr(training, "evaluate", lambda *a, **k: EvalResult(loss=float("nan"), tokens=10))
    with pytest.raises(TrainError, match="not finite at step 4: the weights diverged; no checkpoint was kept"):
        train(TrainConfig(corpus=str(corpus), out=str(tmp_path / "r"), hidden_size=8, embedding_dim=4, batch_size=4,
                          num_steps=10, max_steps=8, eval_every=4, time_limit=None))
    assert not (tmp_path / "r" / "best").exists()


@pytest.mark.parametrize("where", [".", ".."])
def test_item9_the_default_out_of_a_corpus_folder_is_named_after_it(tmp_path, write_corpus, monkeypatch, where):
    project = tmp_path / "texts" / "inner"
    project.mkdir(parents=True)
    write_corpus(12, name="texts/inner/a.txt")
    monkeypatch.chdir(project)
    r = CliRunner().invoke(main, ["train", where, *SMALL, "--max-steps", 2])
    assert r.exit_code == 0, r.output
    name = "inner" if where == "." else "texts"
    assert (project / "checkpoints" / name / "best" / "manifest.json").is_file()
    assert sorted(p.name for p in (project / "checkpoints").iterdir()) == [name]


@pytest.mark.parametrize("name", ["metrics.csv", "curve.png", "last"])
def test_item9_ownership_is_by_kind_a_folder_named_like_a_run_file_is_kept(corpus, run, tmp_path, name):
    import shutil

    target = run / name
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    if name == "last":
        target.write_text("a file of the user's named like charlm's checkpoint folder")
    else:
        target.mkdir()
        (target / "mine.txt").write_text("the user's")
    before = digest(tmp_path)
    line = one_line_error(train_cli(corpus, run, "--overwrite", "--max-steps", 2))
    assert name in line
    assert digest(tmp_path) == before


def test_item9_a_web_export_never_deletes_a_folder_named_like_its_model(tmp_path, run, monkeypatch):
    pytest.importorskip("onnxruntime")
    from charlm.export import web as webexport

    monkeypatch.setattr(webexport, "ort_web_files", lambda progress=True: {n: b"//" for n in webexport.ORT_WEB_FILES})
    site = tmp_path / "site"
    assert CliRunner().invoke(main, ["export", str(run), "--format", "web", "--out", str(site)]).exit_code == 0
    (site / "model.onnx").unlink()
    (site / "model.onnx").mkdir()
    (site / "model.onnx" / "notes.md").write_text("mine")
    before = digest(tmp_path)
    line = one_line_error(CliRunner().invoke(main, ["export", str(run), "--format", "web", "--out", str(site)]))
    assert "model.onnx/" in line
    assert digest(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_item9_checkpoints_are_created_with_the_umask_mode(corpus, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert train_cli(corpus, tmp_path / "r", "--max-steps", 4, "--eval-every", 2).exit_code == 0
    finally:
        os.umask(old)
    for name in ("last", "best"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o777 & ~umask, name


def test_item9_a_web_export_into_an_existing_empty_folder_keeps_its_mode(tmp_path, run, monkeypatch):
    pytest.importorskip("onnxruntime")
    from charlm.export import web as webexport

    monkeypatch.setattr(webexport, "ort_web_files", lambda progress=True: {n: b"//" for n in webexport.ORT_WEB_FILES})
    site = tmp_path / "site"
    site.mkdir()
    os.chmod(site, 0o750)
    assert CliRunner().invoke(main, ["export", str(run), "--format", "web", "--out", str(site)]).exit_code == 0
    assert stat.S_IMODE(site.stat().st_mode) == 0o750 and (site / "index.html").is_file()


def test_item9_a_run_that_diverged_to_a_finite_figure_is_one_line_naming_no_checkpoint(corpus, tmp_path):
    """--lr 1e30 without decay: the weights blow up to a finite but absurd held-out loss (3e30 nats/char)."""
    line = one_line_error(train_cli(corpus, tmp_path / "r", "--max-steps", 3, "--lr", "1e30", "--weight-decay", "0"))
    assert "the weights diverged" in line and "no checkpoint was kept" in line
    assert not (tmp_path / "r" / "best").exists()


# -- what a hostile review found: races, temporary names, outputs inside outputs, readers during a save ----------

def test_a_run_finished_by_another_process_while_this_one_started_is_not_replaced(corpus, tmp_path, write_corpus):
    """Check-then-act: B checks an empty --out, then (while B reads its corpus) A runs a whole training there.
    Under its lock B checks again and refuses; A's run is whole."""
    from charlm.errors import RunExistsError

    out = tmp_path / "r"
    other = write_corpus(20, name="other.txt")
    small = dict(hidden_size=8, embedding_dim=4, batch_size=4, num_steps=10, eval_every=4, time_limit=None)
    ran = []

    def meanwhile(nbytes):  # B's corpus is being prepared: A trains on the same --out now
        if not ran:
            ran.append(train(TrainConfig(corpus=str(corpus), out=str(out), max_steps=4, **small)))
            ran.append(digest(out))

    with pytest.raises(RunExistsError, match="already holds a run"):
        train(TrainConfig(corpus=str(other), out=str(out), max_steps=4, **small), prepare_progress=meanwhile)
    assert ran and ck.load_checkpoint(out).corpus_info["path"] == str(corpus.resolve())
    assert digest(out) == ran[1]  # A's run as A left it


def test_entries_named_like_charlms_temporaries_but_unmarked_are_the_users(corpus, run, tmp_path):
    import shutil

    (run / ".metrics.csv.tmp-mynotes").write_text("my notes\n")
    shutil.copytree(run / "last", run / ".last.tmp-mybackup")  # a copy of a checkpoint, without charlm's mark
    shutil.copytree(run / "best", run / ".best.old-keep")
    before = digest(tmp_path)
    line = one_line_error(train_cli(corpus, run, "--resume", "--max-steps", 16))
    assert ".best.old-keep" in line and ".last.tmp-mybackup" in line and ".metrics.csv.tmp-mynotes" in line
    one_line_error(train_cli(corpus, run, "--overwrite", "--max-steps", 2))
    assert digest(tmp_path) == before


def test_marked_leftovers_of_a_killed_save_are_tidied_by_the_next_resume(corpus, run, tmp_path):
    from charlm.checkpoint import _new_temporary

    leftover = _new_temporary(run / "last")  # what a kill while writing last/ leaves: marked as charlm's
    (leftover / "model.pt").write_bytes(b"half")
    assert train_cli(corpus, run, "--resume", "--max-steps", 16, "--eval-every", 4).exit_code == 0
    assert not leftover.exists()


def test_overwrite_from_inside_the_run_is_one_line_and_keeps_the_run(corpus, run, tmp_path, monkeypatch):
    monkeypatch.chdir(run / "best")
    before = digest(tmp_path)
    line = one_line_error(CliRunner().invoke(main, ["train", str(corpus), "--out", "..", "--overwrite", *SMALL,
                                                    "--max-steps", "2"]))
    assert "current directory is inside --out" in line
    assert digest(tmp_path) == before


@pytest.mark.parametrize("command", [["export", "{run}", "--out", "{run}/model.onnx"],
                                     ["train", "{corpus}", "--out", "{run}/sub", *SMALL, "--max-steps", "2"],
                                     ["train", "{corpus}", "--out", "{run}/best/sub", *SMALL, "--max-steps", "2"],
                                     ["download", "timemachine", "--dir", "{run}", "--quiet"]])
def test_an_output_inside_another_charlm_folder_is_refused(corpus, run, tmp_path, command):
    if command[0] == "export":
        pytest.importorskip("onnx")
    before = digest(tmp_path)
    args = [a.format(run=run, corpus=corpus) for a in command]
    line = one_line_error(CliRunner().invoke(main, args))
    assert f"lies inside {run}" in line and "a folder of its own" in line
    assert digest(tmp_path) == before
    assert train_cli(corpus, run, "--resume", "--max-steps", 12, "--eval-every", 4).exit_code == 0  # not blocked


def test_a_load_during_a_save_reads_one_whole_checkpoint(run, monkeypatch):
    """A reader that reads the manifest, then a file after a save swapped the folder, used to call a good model
    corrupt: the load reads again."""
    c = ck.load_checkpoint(run / "last")
    real, swapped = ck._sha256, []

    def hash_then_swap(path):
        digest_ = real(path)
        if not swapped:  # the reader has just read a file: a writer replaces the checkpoint now
            swapped.append(True)
            ck.save_checkpoint(run / "last", c.model, c.vocab, {"progress": {"step": 99}})
        return digest_

    monkeypatch.setattr(ck, "_sha256", hash_then_swap)
    loaded = ck.load_checkpoint(run / "last")
    assert swapped and loaded.progress["step"] == 99


def test_an_interrupt_during_the_final_evaluation_says_the_run_is_complete(corpus, tmp_path):
    """Ctrl-C after the run reached its end (during its final evaluation): nothing to resume, and it says so."""
    from charlm.errors import TrainingInterrupted

    def interrupt_final(event, info):
        if event == "eval" and info["step"] == 7:  # the evaluation after the last step, off the schedule
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as err:
        train(TrainConfig(corpus=str(corpus), out=str(tmp_path / "r"), hidden_size=8, embedding_dim=4, batch_size=4,
                          num_steps=10, max_steps=7, eval_every=4, time_limit=None), callback=interrupt_final)
    assert err.value.complete and err.value.result.steps == 7
