"""Exact resume: a run stopped and resumed equals one never stopped, on every metrics column but the
clock's and in its final weights bit for bit, across the paths a resume or a stop takes.

The matrix: {random, sequential} x {dropout 0, dropout > 0} x {periodic evaluations of the whole
held-out tail, of its first part only} x {fp32, bf16}. A part-tail run loads best/ on resume (for the
final whole-tail figure); building that model once drew from the RNG just restored, which shifted every
later dropout mask. bf16 runs where this machine has a bf16 kernel for the cell (the same probe
``charlm train`` uses); elsewhere the test checks the one-line refusal instead.
"""

import csv
from pathlib import Path

import pytest
import torch

from charlm import checkpoint as ck
from charlm import training
from charlm.config import TrainConfig
from charlm import device as device_mod
from charlm.device import probe_precision
from charlm.errors import ConfigError, TrainError
from charlm.evaluation import EvalResult
from charlm.training import train

TIME_COLUMNS = {"elapsed_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """About 230 KB: a held-out tail of 23,000 characters, longer than the 20,000 that periodic evaluations
    read by default, so that the part-tail path runs with the default settings."""
    from conftest import SENTENCE

    path = tmp_path_factory.mktemp("resume") / "big.txt"
    path.write_text(SENTENCE * 1150)
    return path


def config(corpus, out, **kw):
    base = dict(corpus=str(corpus), out=str(out), cell="lstm", hidden_size=16, embedding_dim=8, batch_size=4,
                num_steps=10, eval_every=15, time_limit=None, patience=None, epochs=100, seed=3,
                lr_schedule="plateau")  # a 30 + 30 split by --max-steps: a planned run ends at its first plan
    return TrainConfig(**{**base, **kw})


def rows(out) -> list[dict]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def assert_bit_identical(out_a, out_b, name="last"):
    a = ck.load_checkpoint(Path(out_a) / name).model.state_dict()
    b = ck.load_checkpoint(Path(out_b) / name).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}/{k} differs"


def bf16_runs(cell="lstm") -> bool:
    return probe_precision("bf16", "cpu", config("x", "x", cell=cell).model_config(2)).runs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tail", ["whole", "part"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_equals_a_straight_run(big_corpus, tmp_path, sampling, dropout, tail, precision):
    kw = dict(sampling=sampling, dropout=dropout, precision=precision,
              eval_chars=None if tail == "part" else 10**6)  # None: the default rule, 20,000 characters here
    if precision == "bf16" and not bf16_runs():
        with pytest.raises(ConfigError, match=r"^--precision bf16: this CPU \(.*\) has no bf16 kernel for the LSTM"):
            train(config(big_corpus, tmp_path / "straight", max_steps=60, **kw))
        assert not (tmp_path / "straight").exists()  # refused before anything was written
        return
    straight = train(config(big_corpus, tmp_path / "straight", max_steps=60, **kw))
    first = train(config(big_corpus, tmp_path / "parts", max_steps=30, **kw))
    resumed = train(config(big_corpus, tmp_path / "parts", max_steps=60, **kw), resume=True)
    assert first.steps == 30 and straight.steps == resumed.steps == 60
    if tail == "part":  # the path under test really ran: periodic evaluations read a part of the tail
        assert resumed.eval_chars == 20_000 < resumed.val_chars
        assert resumed.best.tokens >= resumed.val_chars - 64  # and the final figure all of it
    else:
        assert resumed.eval_chars == resumed.val_chars
    assert rows(tmp_path / "parts") == rows(tmp_path / "straight")
    assert [int(r["step"]) for r in rows(tmp_path / "straight")] == [15, 30, 45, 60]
    assert_bit_identical(tmp_path / "parts", tmp_path / "straight", "last")
    assert_bit_identical(tmp_path / "parts", tmp_path / "straight", "best")
    assert resumed.best.loss == straight.best.loss


@pytest.mark.parametrize("impl", ["torch", "scratch"])
def test_a_mogrifier_run_resumes_exactly(corpus, tmp_path, impl):
    """The mogrifier's state (h, c) is carried across batches and saved; its rounds' matrices (here at a low
    rank) are weights like the others; the default regularisers (weight drop, locked dropouts) draw the same
    masks after a resume."""
    kw = dict(cell="mogrifier", impl=impl, mogrify_rounds=3, mogrify_rank=4, sampling="sequential", dropout=0.2,
              eval_chars=10**6, eval_every=10, weight_drop=0.25, dropout_input=0.05, dropout_hidden=0.15,
              dropout_output=0.25)
    straight = train(config(corpus, tmp_path / "straight", max_steps=40, num_layers=2, **kw))
    train(config(corpus, tmp_path / "parts", max_steps=20, num_layers=2, **kw))
    resumed = train(config(corpus, tmp_path / "parts", max_steps=40, num_layers=2, **kw), resume=True)
    assert straight.steps == resumed.steps == 40
    assert rows(tmp_path / "parts") == rows(tmp_path / "straight")
    assert_bit_identical(tmp_path / "parts", tmp_path / "straight", "last")
    saved = ck.load_checkpoint(tmp_path / "parts" / "last", with_trainer_state=True)
    assert saved.config.cell == "mogrifier" and (saved.config.mogrify_rounds, saved.config.mogrify_rank) == (3, 4)
    assert len(saved.trainer_state["state"]) == 2  # (h, c)


@pytest.mark.parametrize("change, message", [(dict(mogrify_rounds=4), "mogrify-rounds: 3 -> 4"),
                                             (dict(mogrify_rank=2), "mogrify-rank: 0 -> 2")])
def test_a_mogrifier_resumed_with_other_rounds_or_rank_is_one_line(corpus, tmp_path, change, message):
    """Other rounds or another rank are another model: refused as another --hidden-size is (was a traceback of
    load_state_dict's size mismatch), the run left as it was."""
    kw = dict(cell="mogrifier", mogrify_rounds=3, num_layers=1, max_steps=4, eval_every=2)
    train(config(corpus, tmp_path / "run", **kw))
    before = (tmp_path / "run" / "metrics.csv").read_bytes()
    with pytest.raises(TrainError, match=r"^--resume with different model, data, optimizer or schedule options: "
                                         + message):
        train(config(corpus, tmp_path / "run", **{**kw, "max_steps": 8, **change}), resume=True)
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == before


def test_a_stop_between_evaluations_does_not_change_the_schedule(corpus, tmp_path, monkeypatch):
    """A run that stops off the evaluation schedule is evaluated once more before it exits; that report
    must not decay the lr, count towards patience or restart the training figures' interval, or the
    resumed run would differ. Held-out losses are made to rise at every evaluation (each scheduled one
    halves the lr), so a final evaluation that took part in the schedule would halve it once more."""
    now = {"step": 0}
    real_step = training.Trainer.train_step

    def counting_step(self, X, Y):
        real_step(self, X, Y)
        now["step"] = self.state.step

    monkeypatch.setattr(training.Trainer, "train_step", counting_step)
    monkeypatch.setattr(training, "evaluate", lambda model, ids, **kw: EvalResult(loss=1 + now["step"] / 100,
                                                                                  tokens=len(ids)))
    kw = dict(cell="gru", dropout=0.2, lr_decay=0.5, optimizer="sgd", lr=1.0, sampling="sequential")
    train(config(corpus, tmp_path / "straight", max_steps=45, **kw))
    stopped = train(config(corpus, tmp_path / "parts", max_steps=37, **kw))
    assert stopped.last.loss == pytest.approx(1.37)  # evaluated at the stop
    saved = ck.load_checkpoint(tmp_path / "parts" / "last", with_trainer_state=True).trainer_state
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.5  # halved once, at step 30 (not at 15: the first)
    assert saved["evals_since_best"] == 1 and saved["interval"]["steps"] == 7  # steps 31-37, kept for the resume
    train(config(corpus, tmp_path / "parts", max_steps=45, **kw), resume=True)
    with_report = rows(tmp_path / "parts")
    assert [int(r["step"]) for r in with_report] == [15, 30, 37, 45]
    assert [r for r in with_report if r["step"] != "37"] == rows(tmp_path / "straight")
    assert_bit_identical(tmp_path / "parts", tmp_path / "straight", "last")


def test_loading_a_checkpoint_leaves_the_global_rng_alone(corpus, tmp_path):
    train(config(corpus, tmp_path / "r", max_steps=5, cell="gru"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ck.load_checkpoint(tmp_path / "r" / "last")
    assert torch.equal(torch.get_rng_state(), before)


def test_probing_a_precision_leaves_the_global_rng_alone():
    device_mod._probe.cache_clear()  # a fresh probe, not a cached verdict
    torch.manual_seed(123)
    before = torch.get_rng_state()
    probe_precision("bf16", "cpu", config("x", "x", cell="gru", hidden_size=24).model_config(2))
    assert torch.equal(torch.get_rng_state(), before)
