"""--weight-decay: each step shrinks the weight matrices by lr x decay of themselves, apart from the
gradient, and leaves the biases alone; 0 builds the optimizer earlier versions built (one Adam group,
so their saved optimizer states load); a resume with another setting is refused in one line; and a
run with it stopped and resumed equals one never stopped."""

from pathlib import Path

import pytest
import torch

from charlm import checkpoint as ck
from charlm.config import D2L_PRESET, TrainConfig
from charlm.errors import TrainError
from charlm.models import RNNLM
from charlm.training import _make_optimizer, train


def tiny(corpus, out, **kw):
    base = dict(corpus=str(corpus), out=str(out), cell="lstm", hidden_size=16, embedding_dim=8, batch_size=4,
                num_steps=10, eval_every=10, time_limit=None, patience=None, epochs=100, seed=5,
                lr_schedule="plateau", weight_decay=0.3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_matrices_shrink_and_the_biases_do_not(optimizer):
    cfg = TrainConfig(corpus="x", optimizer=optimizer, lr=0.1, weight_decay=0.5)
    model = RNNLM.from_config(cfg.model_config(7))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = _make_optimizer(cfg, model, cfg.resolved_weight_decay(100))
    for p in model.parameters():  # no gradient: what moves is the decay alone
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kinds = set()
    for name, p in model.named_parameters():
        matrix = p.dim() >= 2
        kinds.add(matrix)
        expected = before[name] * (1 - 0.1 * 0.5) if matrix else before[name]
        assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-7), name
    assert kinds == {True, False}  # both kinds were checked


def test_no_decay_builds_the_optimizer_of_earlier_runs():
    cfg = TrainConfig(corpus="x", weight_decay=0.0)
    optimizer = _make_optimizer(cfg, RNNLM.from_config(cfg.model_config(7)), cfg.resolved_weight_decay(100))
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    assert TrainConfig(corpus="x", **D2L_PRESET).weight_decay == 0.0  # the book's recipe has none
    assert TrainConfig.from_dict({"corpus": "x"}).weight_decay == 0.0  # nor a run saved before the option


def test_a_resume_with_another_decay_is_refused(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "r", max_steps=10))
    with pytest.raises(TrainError, match=r"^--resume with different model, data, optimizer or schedule options: "
                                         r"weight-decay: 0\.3 -> 0\.0; a run resumes with the options it started"):
        train(tiny(corpus, tmp_path / "r", max_steps=20, weight_decay=0.0), resume=True)


def test_a_decayed_run_resumes_exactly(corpus, tmp_path):
    straight = train(tiny(corpus, tmp_path / "straight", max_steps=40))
    train(tiny(corpus, tmp_path / "parts", max_steps=20))
    resumed = train(tiny(corpus, tmp_path / "parts", max_steps=40), resume=True)
    assert resumed.best.loss == straight.best.loss
    a, b = (ck.load_checkpoint(Path(tmp_path / run / "last")).model.state_dict() for run in ("straight", "parts"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    no_decay = train(tiny(corpus, tmp_path / "none", max_steps=40, weight_decay=0.0))
    assert no_decay.best.loss != straight.best.loss  # the option reached the optimizer


def test_the_default_decays_a_small_corpus_only(corpus, tmp_path):
    seen = {}

    def callback(event, info):
        if event == "start":
            seen["decay"] = info["weight_decay"]

    run = train(tiny(corpus, tmp_path / "small", max_steps=2, weight_decay=None), callback=callback)
    assert seen["decay"] == 0.3  # a few KB of text
    groups = torch.load(run.out / "last" / "trainer.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]
