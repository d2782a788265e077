"""Dynamic evaluation: each segment scored before the model learns from it; the checkpoint untouched."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from charlm import RNNLM
from charlm.cli import main
from charlm.evaluation import evaluate, evaluate_dynamic


def tiny_model(vocab=12, seed=0):
    torch.manual_seed(seed)
    return RNNLM(vocab, cell="lstm", hidden_size=24, num_layers=1, embedding_dim=8)


def repeated(vocab=12, period=50, times=20, seed=1):
    rng = np.random.default_rng(seed)
    return np.tile(rng.integers(1, vocab, period), times)


LEARNS = {"sgd": 3.0, "rms": 0.02}  # a step size with which each rule learns the repeats below


@pytest.mark.parametrize("rule", sorted(LEARNS))
def test_a_single_segment_is_scored_before_any_learning(rule):
    """One segment: nothing to learn from before it, so dynamic = static whatever the step size (a version
    that learned from a segment before scoring it would score this one lower)."""
    model = tiny_model()
    ids = repeated(times=1)[:41]  # 40 predictions: one 50-character segment
    static = evaluate(model, ids, batch_size=1)
    for lr in (0.01, 1.0, 30.0):
        dynamic = evaluate_dynamic(model, ids, lr=lr, num_steps=50, rule=rule)
        assert dynamic.tokens == static.tokens == 40
        assert dynamic.loss == pytest.approx(static.loss, rel=1e-6)


@pytest.mark.parametrize("rule", sorted(LEARNS))
def test_it_learns_from_what_it_has_read_and_leaves_the_model_alone(rule):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = repeated(times=40)  # a 50-character random string, 40 times: learnable only from the text itself
    static = evaluate(model, ids, batch_size=1)
    segments = []
    dynamic = evaluate_dynamic(model, ids, lr=LEARNS[rule], num_steps=50, rule=rule,
                               on_segment=lambda done, total: segments.append((done, total)))
    assert segments[-1] == (40, 40) and len(segments) == 40
    assert dynamic.tokens == static.tokens == len(ids) - 1
    assert dynamic.loss < static.loss - 0.5  # it learned the repeats as it read them
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # a copy was adapted
    assert evaluate_dynamic(model, ids, lr=1e-12, num_steps=50, rule=rule).loss == pytest.approx(static.loss,
                                                                                                  rel=1e-5)


def test_the_rms_step_is_the_gradient_over_its_running_root_mean_square():
    from charlm.config import DYNAMIC_RMS_BETA as beta
    from charlm.evaluation import _dynamic_step

    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    trained, mean_sq = [p.detach().clone()], [torch.zeros(3)]
    grads = [torch.tensor([2.0, -0.001, 0.0]), torch.tensor([1.0, -0.001, 4.0])]
    want, ms = p.detach().clone(), torch.zeros(3)
    for n, g in enumerate(grads, 1):
        p.grad = g.clone()
        with torch.no_grad():
            _dynamic_step([p], trained, mean_sq, lr=0.1, decay=0.5, n=n)
        ms = beta * ms + (1 - beta) * g * g
        want = want - 0.1 * g / ((ms / (1 - beta ** n)).sqrt() + 1e-8)
        want = want + 0.5 * (trained[0] - want)
        assert torch.allclose(p.detach(), want, atol=1e-6), n
    # the first step moves every weight by lr (or 0), whatever its gradient's size: the scale is divided out
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([50.0, -1e-4, 0.0])
    with torch.no_grad():
        _dynamic_step([q], [q.detach().clone()], [torch.zeros(3)], lr=0.1, decay=0.0, n=1)
    assert torch.allclose(q.detach(), torch.tensor([-0.1, 0.1, 0.0]), atol=1e-4)


def test_cli_reports_static_and_dynamic_and_leaves_the_checkpoint_files_unchanged(corpus, tmp_path):
    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "16", "--batch-size", "4",
                                  "--num-steps", "10", "--max-steps", "6", "--eval-every", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).rglob("*")) if p.is_file()}
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-lr", "0.05"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 2 and "bits/char" in lines[0]
    assert "read in order" in lines[1] and "static " in lines[1] and "dynamic " in lines[1]
    assert "rms lr 0.05, decay 0.01, 50-char segments" in lines[1]  # the rule's defaults where not given
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).rglob("*")) if p.is_file()}
    assert after == digest
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-rule", "sgd"])
    assert r.exit_code == 0 and "sgd lr 0.3, decay 0, 100-char segments" in r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--json"])
    assert r.exit_code == 0 and '"dynamic": {' in r.output and '"static_one_row": {' in r.output
