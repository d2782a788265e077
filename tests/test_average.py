"""Weight averaging (``--average ema``): the average is the exponential moving average of the training weights
over the steps taken; held-out evaluations read it and best/ holds it as the model; last/ holds the training
weights with the average in its trainer state; a run stopped and resumed equals one never stopped; bad values
are one line; and ``--average none`` leaves the training path as it was."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from charlm import checkpoint as ck
from charlm import training
from charlm.cli import main
from charlm.config import LEGACY_TRAIN, TrainConfig, with_legacy
from charlm.errors import ConfigError, TrainError
from charlm.evaluation import evaluate
from charlm.training import train
from conftest import rewrite_config

TIME_COLUMNS = {"elapsed_s", "tokens_per_s"}


def config(corpus, out, **kw):
    base = dict(corpus=str(corpus), out=str(out), cell="lstm", hidden_size=16, embedding_dim=8, batch_size=4,
                num_steps=10, eval_every=15, time_limit=None, patience=None, epochs=100, seed=3, average="ema",
                average_decay=0.8)
    return TrainConfig(**{**base, **kw})


def rows(out) -> list[dict]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def weights(out, name) -> dict:
    return ck.load_checkpoint(Path(out) / name).model.state_dict()


def trainer_state(out, name="last") -> dict:
    return ck.load_checkpoint(Path(out) / name, with_trainer_state=True).trainer_state


def averaged(out, name="last") -> dict:
    """The averaged weights a checkpoint's trainer state holds, under the model's own names."""
    return {k.removeprefix("module."): v for k, v in trainer_state(out, name)["average"].items() if k != "n_averaged"}


def assert_equal(a: dict, b: dict, what=""):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}{k} differs"


@pytest.mark.parametrize("skip", ["non-finite", "overflow"])
def test_the_average_is_the_ema_of_the_weights_after_each_step_taken(corpus, tmp_path, monkeypatch, skip):
    """By hand: the first step's weights start the average, each later step taken moves it by 1 - decay of the way
    to the new weights; a step not taken (here the third) leaves it as it was: a non-finite loss, or (``overflow``)
    gradients that overflowed under a loss scaler, which skips the optimizer's step itself (fp16's, on CUDA;
    here the same scaler on the CPU)."""
    seen = []
    real_step, real_finite = training.Trainer.train_step, training.Trainer.finite

    def recording_step(self, X, Y):
        if skip == "overflow":  # the third step's gradients overflow
            param = next(self.model.parameters())
            hook = param.register_hook(lambda g: g * math.inf if self.state.step == 2 else g)
        real_step(self, X, Y)
        if skip == "overflow":
            hook.remove()
        seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def finite(self, loss, grad_norm):
        return (skip != "non-finite" or self.state.step != 2) and real_finite(self, loss, grad_norm)

    monkeypatch.setattr(training.Trainer, "train_step", recording_step)
    monkeypatch.setattr(training.Trainer, "finite", finite)
    if skip == "overflow":
        monkeypatch.setattr(training, "grad_scaler", lambda precision, device: torch.amp.GradScaler("cpu"))
    decay = 0.8
    result = train(config(corpus, tmp_path / "r", max_steps=6, eval_every=6, average_decay=decay))
    assert result.steps == 6 and len(seen) == 6
    assert_equal(seen[2], seen[1])  # the skipped step moved nothing
    taken = [w for i, w in enumerate(seen) if i != 2]
    expected = dict(taken[0])
    for n, w in enumerate(taken[1:], start=1):  # (n: updates the average had taken in before this one)
        d = min(decay, (1 + n) / (10 + n))  # the warm-up: early weights soon forgotten
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    best, last = weights(tmp_path / "r", "best"), weights(tmp_path / "r", "last")
    for k in expected:
        torch.testing.assert_close(best[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
        assert not torch.allclose(best[k], last[k]), k  # the average is not the last weights
    assert int(trainer_state(tmp_path / "r")["average"]["n_averaged"]) == 5  # five steps taken
    assert_equal(last, seen[-1], "last/")
    assert_equal(averaged(tmp_path / "r"), best, "trainer.pt's average vs best/: ")


def test_best_holds_the_averaged_weights_and_its_eval_is_the_figure_the_run_reported(corpus, tmp_path):
    """One evaluation, at the last step: best/ and last/ were saved at the same step, best/ with the average
    (which the run evaluated and reported), last/ with the training weights, which score otherwise."""
    cfg = config(corpus, tmp_path / "r", max_steps=20, eval_every=20)
    result = train(cfg)
    best = ck.load_checkpoint(tmp_path / "r" / "best")
    val_ids = training.load_data(cfg).val_ids
    assert evaluate(best.model, val_ids).loss == result.best.loss
    assert best.progress["held_out"]["loss"] == result.best.loss == float(rows(tmp_path / "r")[-1]["val_loss"])
    assert best.progress["weights"] == "averaged"
    raw = ck.load_checkpoint(tmp_path / "r" / "last")
    assert raw.progress["weights"] == "training"
    assert evaluate(raw.model, val_ids).loss != result.best.loss
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert f"{result.best.bits_per_char:.4f} bits/char" in r.output


def test_last_holds_the_training_weights_of_an_unaveraged_run_and_the_average(corpus, tmp_path):
    """Averaging changes no training step: last/'s weights equal, bit for bit, those of the same run without it;
    the average travels in last/'s trainer state, and equals best/ (both saved at the one evaluation, the last
    step)."""
    train(config(corpus, tmp_path / "ema", max_steps=30, eval_every=30))
    train(config(corpus, tmp_path / "plain", max_steps=30, eval_every=30, average="none", average_decay=0.999))
    assert_equal(weights(tmp_path / "ema", "last"), weights(tmp_path / "plain", "last"), "last/")
    assert "average" not in trainer_state(tmp_path / "plain")
    assert [r["train_loss"] for r in rows(tmp_path / "ema")] == [r["train_loss"] for r in rows(tmp_path / "plain")]
    assert [r["val_loss"] for r in rows(tmp_path / "ema")] != [r["val_loss"] for r in rows(tmp_path / "plain")]
    assert_equal(averaged(tmp_path / "ema"), weights(tmp_path / "ema", "best"), "average vs best/: ")


@pytest.mark.parametrize("stop", [30, 37])
@pytest.mark.parametrize("tail", ["whole", "part"])
def test_a_run_stopped_and_resumed_equals_one_never_stopped(write_corpus, tmp_path, stop, tail):
    """Under the plateau schedule (whose lr decays follow the averaged weights' figures) with the default
    regularisers' dropout masks, stopped on the evaluation schedule (30) or off it (37: a final evaluation that
    saves last/, and best/ when better, between two scheduled ones); periodic evaluations of the whole tail, or of
    its first part (a resume then reads best/, the averaged weights, for the final whole-tail figure)."""
    corpus = write_corpus(60)  # a tail of 1,140 characters
    kw = dict(lr_schedule="plateau", sampling="sequential", eval_chars=10**6 if tail == "whole" else 400)
    straight = train(config(corpus, tmp_path / "straight", max_steps=60, **kw))
    train(config(corpus, tmp_path / "parts", max_steps=stop, **kw))
    resumed = train(config(corpus, tmp_path / "parts", max_steps=60, **kw), resume=True)
    assert straight.steps == resumed.steps == 60
    assert [r for r in rows(tmp_path / "parts") if r["step"] != "37"] == rows(tmp_path / "straight")
    for name in ("last", "best"):
        assert_equal(weights(tmp_path / "parts", name), weights(tmp_path / "straight", name), f"{name}/")
    assert_equal(averaged(tmp_path / "parts"), averaged(tmp_path / "straight"), "last/'s average: ")
    assert resumed.best.loss == straight.best.loss
    if tail == "part":
        assert resumed.eval_chars == 400 < resumed.val_chars and resumed.best.tokens > 400


def test_a_resume_with_other_averaging_is_refused_in_one_line(corpus, tmp_path):
    train(config(corpus, tmp_path / "r", max_steps=4, eval_every=2))
    before = (tmp_path / "r" / "metrics.csv").read_bytes()
    message = r"^--resume with different model, data, optimizer or schedule options: "
    with pytest.raises(TrainError, match=message + r"average-decay: 0\.8 -> 0\.9;"):
        train(config(corpus, tmp_path / "r", max_steps=8, eval_every=2, average_decay=0.9), resume=True)
    with pytest.raises(TrainError, match=message + r"average: 'ema' -> 'none'; a run resumes"):
        train(config(corpus, tmp_path / "r", max_steps=8, eval_every=2, average="none", average_decay=0.999),
              resume=True)
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == before
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "r"), "--resume", "--average", "none",
                                  "--max-steps", "8", "--quiet"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "average: 'ema' -> 'none'; a run resumes" in r.output and "Traceback" not in r.output


def test_a_run_saved_before_averaging_existed_resumes_without_it(corpus, tmp_path):
    """A checkpoint whose config names no averaging (charlm before it) reads as --average none."""
    assert with_legacy({})["average"] == LEGACY_TRAIN["average"] == "none"
    train(config(corpus, tmp_path / "r", max_steps=4, eval_every=2, average="none", average_decay=0.999,
                 lr_schedule="plateau"))
    last = ck.resolve_checkpoint_dir(tmp_path / "r" / "last")
    meta = json.loads((last / "config.json").read_text())
    for name in ("average", "average_decay"):
        del meta["train"][name]
    rewrite_config(last, meta)
    with pytest.raises(TrainError, match=r"average: 'none' -> 'ema'"):
        train(config(corpus, tmp_path / "r", max_steps=8, eval_every=2, lr_schedule="plateau"), resume=True)
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "r"), "--resume", "--max-steps", "8",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert ck.load_checkpoint(tmp_path / "r" / "last").progress["step"] == 8


@pytest.mark.parametrize("field, value, message", [
    ("average", "swa", r"average must be one of none, ema, got 'swa'"),
    ("average_decay", 0.0, r"average decay must lie in \(0, 1\), got 0\.0"),
    ("average_decay", 1.0, r"average decay must lie in \(0, 1\), got 1\.0"),
    ("average_decay", math.nan, r"average decay must lie in \(0, 1\), got nan"),
    ("average_decay", True, r"average decay must lie in \(0, 1\), got True"),
])
def test_bad_values_are_one_config_error(field, value, message):
    with pytest.raises(ConfigError, match="^" + message + "$"):
        TrainConfig(corpus="c.txt", **{"average": "ema", field: value})
    with pytest.raises(ConfigError, match=r"^average decay means something only with average 'ema'"):
        TrainConfig(corpus="c.txt", average_decay=0.9)


@pytest.mark.parametrize("args, code, words", [
    (["--average-decay", "0.9"], 1, "average-decay applies to --average ema only (average 'none')"),
    (["--average-decay", "0.999"], 1, "average-decay applies to --average ema only"),  # even at its default
    (["--average", "ema", "--average-decay", "1"], 2, "Invalid value for '--average-decay'"),
    (["--average", "ema", "--average-decay", "nan"], 2, "Invalid value for '--average-decay'"),
    (["--average", "swa"], 2, "Invalid value for '--average'"),
])
def test_bad_options_are_one_line_and_write_nothing(corpus, tmp_path, args, code, words):
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "r"), "--max-steps", "2", *args])
    assert r.exit_code == code, r.output
    assert words in r.output and "Traceback" not in r.output
    assert code == 2 or r.output.count("\n") == 1, r.output
    assert not (tmp_path / "r").exists()


def test_no_averaging_builds_nothing_of_it_and_saves_what_it_did(corpus, tmp_path, monkeypatch):
    """--average none (the default) runs the training path as it was: no averaged copy, the
    trainer state's keys of before, and best/ the training weights of the step it was saved at."""
    def refuse(*args, **kwargs):
        raise AssertionError("AveragedModel built under --average none")

    monkeypatch.setattr(training, "AveragedModel", refuse)
    seen = {}
    real_step = training.Trainer.train_step

    def recording_step(self, X, Y):
        assert self.average is None and self.eval_model is self.model
        real_step(self, X, Y)
        seen[self.state.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(training.Trainer, "train_step", recording_step)
    train(config(corpus, tmp_path / "r", max_steps=30, average="none", average_decay=0.999))
    state = trainer_state(tmp_path / "r")
    assert set(state) == {"optimizer", "step", "epoch", "batch_in_epoch", "best_loss", "plateau_loss",
                          "evals_since_best", "nonfinite", "planned_steps", "plan_anchor", "plan_ceiling", "torch_rng",
                          "rank_rng", "world_size", "cuda_rng", "scaler", "state", "interval"}
    best = ck.load_checkpoint(tmp_path / "r" / "best")
    assert "weights" not in best.progress
    assert_equal(best.model.state_dict(), seen[best.progress["step"]], "best/")
    assert_equal(weights(tmp_path / "r", "last"), seen[30], "last/")


def test_info_names_the_averaging_and_which_weights_a_checkpoint_holds(corpus, tmp_path):
    train(config(corpus, tmp_path / "r", max_steps=4, eval_every=2, average_decay=0.99))
    train(config(corpus, tmp_path / "plain", max_steps=4, eval_every=2, average="none", average_decay=0.999))
    runner = CliRunner()
    best = runner.invoke(main, ["info", str(tmp_path / "r")])
    last = runner.invoke(main, ["info", str(tmp_path / "r" / "last")])
    plain = runner.invoke(main, ["info", str(tmp_path / "plain")])
    assert best.exit_code == last.exit_code == plain.exit_code == 0, best.output + last.output + plain.output
    assert "averaging:    EMA of the weights, decay 0.99; this checkpoint holds the averaged weights" in best.output
    assert "averaging:    EMA of the weights, decay 0.99; this checkpoint holds the training weights" in last.output
    assert "averaging:" not in plain.output


@pytest.mark.slow
def test_two_processes_average_as_one(write_corpus, tmp_path, monkeypatch):
    """Under torchrun each rank averages its unwrapped model, the same weights after every step: the average two
    processes save is one process's (within the order of the gradients' sums), and resumes exactly."""
    import test_distributed as td

    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    corpus = write_corpus(40, "c.txt")
    kw = {"average": "ema", "average-decay": 0.8, "max-steps": 20}
    two = td.run(td.train_args(corpus, tmp_path / "two", **kw), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = td.run(td.train_args(corpus, tmp_path / "one", **kw))
    assert one.returncode == 0, one.stderr[-3000:]
    td.assert_close(weights(tmp_path / "two", "best"), weights(tmp_path / "one", "best"))
    td.assert_close(averaged(tmp_path / "two"), averaged(tmp_path / "one"))
    td.assert_rows_close(td.metrics(tmp_path / "two"), td.metrics(tmp_path / "one"))
    rest = td.run(td.train_args(corpus, tmp_path / "two", **{**kw, "max-steps": 30, "resume": True}), nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    whole = td.run(td.train_args(corpus, tmp_path / "whole", **{**kw, "max-steps": 30}), nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert td.metrics(tmp_path / "two") == td.metrics(tmp_path / "whole")
    for name in ("last", "best"):
        assert_equal(weights(tmp_path / "two", name), weights(tmp_path / "whole", name), f"{name}/")
    assert_equal(averaged(tmp_path / "two"), averaged(tmp_path / "whole"), "last/'s average: ")


def test_a_fine_tuning_run_evaluates_its_parent_until_a_step_is_taken(corpus, tmp_path, monkeypatch):
    """The average starts from the first step's weights: before any (every step skipped as non-finite), the
    weights evaluated and kept in best/ are the training weights, here the parent's (never the copy the average
    was made from before the parent's weights were loaded)."""
    train(config(corpus, tmp_path / "parent", max_steps=4, eval_every=4, average="none", average_decay=0.999))
    monkeypatch.setattr(training.Trainer, "finite", lambda self, loss, grad_norm: False)
    train(config(corpus, tmp_path / "child", max_steps=2, eval_every=2), init_from=str(tmp_path / "parent"))
    assert_equal(weights(tmp_path / "child", "best"), weights(tmp_path / "parent", "best"), "best/")
    assert int(trainer_state(tmp_path / "child")["average"]["n_averaged"]) == 0


def test_the_decay_warms_up_to_the_one_asked():
    """Early updates keep less of the average than ``--average-decay`` asks, (1 + n) / (10 + n) after n updates,
    so that after 1,600 steps at 0.999 the first step's weights weigh in for almost nothing (0.999**1600 = 0.20
    without it)."""
    assert training.ema_decay(0.999, 1) == 2 / 11 and training.ema_decay(0.999, 90) == 91 / 100
    assert training.ema_decay(0.999, 10**6) == 0.999 and training.ema_decay(0.5, 100) == 0.5 and training.ema_decay(0.5, 3) == 4 / 13
    kept = 1.0
    for n in range(1, 1600):
        kept *= training.ema_decay(0.999, n)
    assert kept < 1e-3
