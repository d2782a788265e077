"""TensorBoard events (charlm train --tensorboard, charlm tune --tensorboard), read back with TensorBoard's own
event reader."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'charlm-rnn[tensorboard]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from charlm.board import run_name  # noqa: E402
from charlm.cli import main  # noqa: E402

TINY = ("--hidden-size", "16", "--num-layers", "1", "--embedding-dim", "8", "--batch-size", "4", "--num-steps", "16",
        "--eval-every", "7", "--time-limit", "0", "--quiet")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def scalars(folder) -> dict:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_loss_held_out_lr_and_throughput(corpus, tmp_path):
    board = tmp_path / "tb"
    result = invoke("train", corpus, "--out", tmp_path / "run", "--max-steps", 30, "--tensorboard", board, *TINY)
    assert result.exit_code == 0, result.output
    name = run_name(tmp_path / "run")
    assert [p.name for p in board.iterdir()] == [name]  # one run: a subfolder named after the run folder
    assert name.startswith("run-") and len(name) == len("run-") + 8  # its name and 8 hex digits of its path
    got = scalars(board / name)
    rows = metrics(tmp_path / "run")
    held_out = got["held_out/bits_per_char"]
    assert [s for s, _ in held_out] == [int(r["step"]) for r in rows] == [7, 14, 21, 28, 30]
    assert [v for _, v in held_out] == pytest.approx([float(r["val_bpc"]) for r in rows], rel=1e-6)  # float32
    assert [v for _, v in got["lr"]] == pytest.approx([float(r["lr"]) for r in rows], rel=1e-6)
    assert [v for _, v in got["held_out/perplexity"]] == pytest.approx([float(r["val_ppl"]) for r in rows], rel=1e-6)
    train_steps = [s for s, _ in got["train/loss"]]
    assert train_steps == sorted(train_steps) and {10, 20, 30} <= set(train_steps)  # every 10th step, and evaluations
    for (_, nats), (_, bits) in zip(got["train/loss"], got["train/bits_per_char"]):
        assert bits == pytest.approx(nats / math.log(2), rel=1e-6)
    assert all(v > 0 for _, v in got["throughput/chars_per_s"])


def test_a_resumed_run_continues_its_curve(corpus, tmp_path):
    board, run = tmp_path / "tb", tmp_path / "run"
    args = ("train", corpus, "--out", run, "--tensorboard", board, "--lr-schedule", "plateau", *TINY)
    assert invoke(*args, "--max-steps", 14).exit_code == 0
    assert invoke(*args, "--max-steps", 28, "--resume").exit_code == 0
    held_out = scalars(board / run_name(run))["held_out/bits_per_char"]
    assert [s for s, _ in held_out] == [7, 14, 21, 28]  # each step once, in order
    # a run started over in the same folder replaces the curve (TensorBoard purges what came before)
    assert invoke(*args, "--max-steps", 7, "--overwrite").exit_code == 0
    assert [s for s, _ in scalars(board / run_name(run))["held_out/bits_per_char"]] == [7]


def test_missing_tensorboard_is_one_line_naming_the_extra(corpus, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = invoke("train", corpus, "--out", tmp_path / "run", "--max-steps", 5, "--tensorboard", tmp_path / "tb",
                    *TINY)
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --tensorboard needs the tensorboard extra (tensorboard is missing): "
                                     "pip install 'charlm-rnn[tensorboard]'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
    result = invoke("tune", corpus, "--out", tmp_path / "t", "--trials", 1, "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 1 and "tensorboard extra" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_tune_writes_one_run_per_trial_beside_train_runs(corpus, tmp_path):
    pytest.importorskip("optuna", reason="charlm tune needs the tune extra")
    board = tmp_path / "tb"
    assert invoke("train", corpus, "--out", tmp_path / "baseline", "--max-steps", 10, "--tensorboard", board,
                  *TINY).exit_code == 0
    result = invoke("tune", corpus, "--out", tmp_path / "t", "--trials", 2, "--trial-steps", 10, "--pruner", "none",
                    "--study", "s", "--tensorboard", board, "--space", "hidden_size=16", "--space", "num_layers=1",
                    "--space", "embedding_dim=8", "--quiet")
    assert result.exit_code == 0, result.output
    study = run_name(tmp_path / "t", "s")
    assert study.startswith("s-")
    assert sorted(p.name for p in board.iterdir()) == sorted([run_name(tmp_path / "baseline"), study])
    assert sorted(p.name for p in (board / study).iterdir()) == ["trial-0000", "trial-0001"]
    for trial in ("trial-0000", "trial-0001"):
        rows = metrics(tmp_path / "t" / "trials" / trial[-4:])
        held_out = scalars(board / study / trial)["held_out/bits_per_char"]
        assert [s for s, _ in held_out] == [int(r["step"]) for r in rows]
        assert [v for _, v in held_out] == pytest.approx([float(r["val_bpc"]) for r in rows], rel=1e-6)


def tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def one_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_events_inside_a_run_folder_are_refused_before_training(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    assert invoke("train", corpus, "--out", other, "--max-steps", 2, *TINY).exit_code == 0
    before = tree(tmp_path)
    for board, message in [("", "--tensorboard needs a folder"), ("run", "inside run"), ("run/tb", "inside run"),
                           (other, "lies inside"), (other / "last", "lies inside")]:
        result = invoke("train", corpus, "--out", "run", "--max-steps", 2, "--tensorboard", board, *TINY)
        assert message in one_line(result) and "--tensorboard" in result.output, (board, result.output)
        assert tree(tmp_path) == before, board
    # the run's own folder then takes --resume and --overwrite (no events inside it)
    assert invoke("train", corpus, "--out", "run", "--max-steps", 2, "--tensorboard", "tb", *TINY).exit_code == 0
    assert invoke("train", corpus, "--out", "run", "--max-steps", 4, "--tensorboard", "tb", "--resume",
                  *TINY).exit_code == 0
    assert invoke("train", corpus, "--out", "run", "--max-steps", 2, "--tensorboard", "tb", "--overwrite",
                  *TINY).exit_code == 0


def test_a_file_where_the_events_go_is_refused_before_training(corpus, tmp_path):
    board = tmp_path / "tbd"
    board.mkdir()
    (board / run_name(tmp_path / "tb3")).write_text("mine")
    result = invoke("train", corpus, "--out", tmp_path / "tb3", "--max-steps", 2, "--tensorboard", board, *TINY)
    assert "--tensorboard" in one_line(result) and "is a file" in result.output
    assert not (tmp_path / "tb3").exists()
    (tmp_path / "flat").write_text("mine")  # a file where DIR goes
    result = invoke("train", corpus, "--out", tmp_path / "tb3", "--max-steps", 2, "--tensorboard",
                    tmp_path / "flat" / "tb", *TINY)
    assert "--tensorboard" in one_line(result) and "is a file" in result.output
    assert not (tmp_path / "tb3").exists()
    locked = tmp_path / "locked"  # a folder this user cannot write (os.access says so: the tests may run as root)
    locked.mkdir()
    real = os.access
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "access", lambda path, mode: False if Path(path).name == "locked" else real(path, mode))
        result = invoke("train", corpus, "--out", tmp_path / "tb3", "--max-steps", 2, "--tensorboard", locked / "tb",
                        *TINY)
    assert "--tensorboard" in one_line(result) and "locked is not writable" in result.output
    assert not (tmp_path / "tb3").exists() and not any(locked.iterdir())
    pytest.importorskip("optuna", reason="charlm tune needs the tune extra")
    (board / run_name(tmp_path / "t", "s")).write_text("mine")
    result = invoke("tune", corpus, "--out", tmp_path / "t", "--trials", 1, "--trial-steps", 4, "--study", "s",
                    "--tensorboard", board, "--space", "hidden_size=16", "--space", "num_layers=1")
    assert "--tensorboard" in one_line(result) and "is a file" in result.output
    assert not (tmp_path / "t").exists()


def test_runs_named_alike_in_two_folders_keep_their_own_curves(corpus, tmp_path):
    board = tmp_path / "tbc"
    for folder, steps in (("a", 14), ("b", 7)):
        result = invoke("train", corpus, "--out", tmp_path / folder / "run", "--max-steps", steps,
                        "--tensorboard", board, *TINY)
        assert result.exit_code == 0, result.output
    names = [run_name(tmp_path / f / "run") for f in ("a", "b")]
    assert names[0] != names[1] and sorted(p.name for p in board.iterdir()) == sorted(names)
    assert [s for s, _ in scalars(board / names[0])["held_out/bits_per_char"]] == [7, 14]  # not purged by b's
    assert [s for s, _ in scalars(board / names[1])["held_out/bits_per_char"]] == [7]
    # two searches of one corpus (one default study name) each keep their trials' curves
    pytest.importorskip("optuna", reason="charlm tune needs the tune extra")
    for folder in ("t1", "t2"):
        result = invoke("tune", corpus, "--out", tmp_path / folder, "--trials", 1, "--trial-steps", 7, "--pruner",
                        "none", "--tensorboard", board, "--space", "hidden_size=16", "--space", "num_layers=1",
                        "--space", "embedding_dim=8", "--quiet")
        assert result.exit_code == 0, result.output
    studies = [run_name(tmp_path / f, corpus.stem) for f in ("t1", "t2")]
    assert studies[0] != studies[1]
    for study in studies:
        assert [s for s, _ in scalars(board / study / "trial-0000")["held_out/bits_per_char"]] == list(range(1, 8))
