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


def tiny_model(vocab=12, seed=0, cell="lstm"):
    torch.manual_seed(seed)
    return RNNLM(vocab, cell=cell, hidden_size=24, num_layers=1, embedding_dim=8)


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


@pytest.mark.parametrize("cell", ["lstm", "mogrifier"])
@pytest.mark.parametrize("rule", sorted(LEARNS))
def test_it_learns_from_what_it_has_read_and_leaves_the_model_alone(rule, cell):
    model = tiny_model(cell=cell)
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
    from charlm.evaluation import _RMSState

    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    trained = [p.detach().clone()]
    rms = _RMSState([p])
    grads = [torch.tensor([2.0, -0.001, 0.0, 1.0]), torch.tensor([1.0, -0.001, 4.0, 1.0])]
    want, ms = p.detach().clone(), torch.zeros(4)
    for n, g in enumerate(grads, 1):
        p.grad = g.clone()
        with torch.no_grad():
            rms.step([p], trained, lr=0.1, decay=0.5)
        ms = beta * ms + (1 - beta) * g * g
        root = (ms / (1 - beta ** n)).sqrt()
        want = want - 0.1 * g / (root + 1e-8)
        share = (0.5 * root / root.mean()).clamp(max=1)  # pulled back in proportion to its root mean square
        want = want + share * (trained[0] - want)
        assert torch.allclose(p.detach(), want, atol=1e-6), n
    # the first step moves every weight by lr (or 0), whatever its gradient's size: the scale is divided out
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([50.0, -1e-4, 0.0])
    with torch.no_grad():
        _RMSState([q]).step([q], [q.detach().clone()], lr=0.1, decay=0.0)
    assert torch.allclose(q.detach(), torch.tensor([-0.1, 0.1, 0.0]), atol=1e-4)


def test_with_a_prior_the_mean_square_starts_from_it_and_fixes_the_pull_back():
    from charlm.config import DYNAMIC_RMS_BETA as beta
    from charlm.evaluation import _RMSState

    prior = torch.tensor([4.0, 1.0, 0.01])  # roots 2, 1, 0.1: mean 1.0333
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    trained = [torch.zeros(3)]
    rms = _RMSState([p], [prior])
    g = torch.tensor([1.0, 1.0, 1.0])
    p.grad = g.clone()
    with torch.no_grad():
        rms.step([p], trained, lr=0.1, decay=0.5)
    ms = beta * prior + (1 - beta) * g * g  # no bias correction: it did not start from zero
    want = 1.0 - 0.1 * g / (ms.sqrt() + 1e-8)
    share = (0.5 * prior.sqrt() / prior.sqrt().mean()).clamp(max=1)  # [0.968, 0.484, 0.048]
    want = want * (1 - share)
    assert torch.allclose(p.detach(), want, atol=1e-6)
    assert rms.mean_sq[0] is not prior and torch.equal(prior, torch.tensor([4.0, 1.0, 0.01]))  # a copy moves


def test_the_prior_is_read_first_at_the_trained_weights_and_the_text_still_scored_before_learning():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = repeated(times=10, seed=2)  # 500 characters: 10 segments of 50
    ids = repeated(times=1)[:41]  # one segment: nothing learned before it is scored, prior or not
    static = evaluate(model, ids, batch_size=1)
    segments = []
    dynamic = evaluate_dynamic(model, ids, lr=1.0, num_steps=50, prior_ids=training,
                               on_segment=lambda done, total: segments.append((done, total)))
    assert dynamic.loss == pytest.approx(static.loss, rel=1e-6)
    assert segments == [(i, 11) for i in range(1, 12)]  # the prior's 10 segments, then the text's one
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ids = repeated(times=40)
    plain = evaluate_dynamic(model, ids, lr=0.02, num_steps=50).loss
    with_prior = evaluate_dynamic(model, ids, lr=0.02, num_steps=50, prior_ids=training).loss
    assert with_prior != pytest.approx(plain, rel=1e-4)  # the prior changes the steps
    assert with_prior < evaluate(model, ids, batch_size=1).loss - 0.5  # and it still learns the repeats
    assert evaluate_dynamic(model, ids, lr=0.02, num_steps=50, prior_ids=training, rule="sgd").loss == \
        pytest.approx(evaluate_dynamic(model, ids, lr=0.02, num_steps=50, rule="sgd").loss, rel=1e-9)  # sgd: none


def test_the_gradient_mean_square_is_the_mean_of_each_segments_squared_gradient():
    from charlm.evaluation import _gradient_mean_square

    model = tiny_model().eval()
    params = list(model.parameters())
    ids = repeated(times=3, seed=4)  # 150 characters: segments of 50, 50, 49 predictions
    got = _gradient_mean_square(model, params, ids, 50, torch.device("cpu"))
    want = [torch.zeros_like(p) for p in params]
    state = None
    for start, width in ((0, 50), (50, 50), (100, 49)):
        x = torch.from_numpy(ids[start:start + width + 1].astype(np.int64))[None]
        logits, state = model(x[:, :-1], state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[0, 1:])
        grads = torch.autograd.grad(loss, params)
        want = [w + g * g / 3 for w, g in zip(want, grads)]
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(got, want))
    assert all(p.grad is None for p in params)


def test_cli_reports_static_and_dynamic_and_leaves_the_checkpoint_files_unchanged(corpus, tmp_path):
    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "16", "--batch-size", "4",
                                  "--num-steps", "10", "--max-steps", "6", "--eval-every", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).rglob("*")) if p.is_file()}
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-lr", "0.05"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 3 and "bits/char" in lines[0]
    assert "read in order" in lines[1] and "static " in lines[1] and "dynamic " in lines[1]
    assert "rms lr 0.05, decay 0.01, 50-char segments" in lines[1]  # the rule's defaults where not given
    text = Path(corpus).read_text(encoding="utf-8")
    train_chars = len(text) - round(len(text) * 0.1)  # the whole training text: shorter than the prior asked
    assert (f"mean square from {train_chars:,} training chars, mixed with counts of contexts up to 6 characters in "
            f"{train_chars:,} training chars and the text read)") in lines[1]
    assert "its parts: the network's steps without the counts " in lines[2]
    assert ", the counts with the static network " in lines[2]
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).rglob("*")) if p.is_file()}
    assert after == digest
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-rule", "sgd"])
    assert r.exit_code == 0 and "sgd lr 0.3, decay 0, 100-char segments" in r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--json"])
    assert r.exit_code == 0 and '"dynamic": {' in r.output and '"static_one_row": {' in r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-prior", "100", "--dynamic-counts", "0"])
    assert r.exit_code == 0 and "segments, mean square from 100 training chars)" in r.output
    assert "its parts" not in r.output and len(r.output.strip().splitlines()) == 2  # the network alone
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-prior", "0", "--dynamic-counts", "0"])
    assert r.exit_code == 0 and "50-char segments)" in r.output and "training chars" not in r.output
    from charlm.checkpoint import load_checkpoint
    from charlm.ngram import max_order

    vocab = len(load_checkpoint(out).vocab)
    top = max_order(vocab)
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-counts", str(top)])
    assert r.exit_code == 0 and f"mixed with counts of contexts up to {top} characters" in r.output
    for option, value in (("--dynamic-counts", "3"), ("--dynamic-rule", "rms"), ("--dynamic-prior", "100000"),
                          ("--dynamic-lr", "0.1"), ("--dynamic-decay", "0"), ("--dynamic-steps", "9")):
        r = CliRunner().invoke(main, ["eval", str(out), option, value])  # without --dynamic: refused, not ignored
        assert r.exit_code == 2 and f"{option} is a setting of dynamic evaluation: add --dynamic" in r.output
        assert "read in order" not in r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-rule", "sgd", "--dynamic-prior", "0"])
    assert r.exit_code == 2 and "--dynamic-prior is a setting of the rms rule: --dynamic-rule sgd has no prior" \
        in r.output  # (it was ignored)
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-counts", str(top + 1)])
    assert r.exit_code == 2 and f"--dynamic-counts {top + 1}: at most {top} for a vocabulary of {vocab} characters" \
        in r.output and "Traceback" not in r.output


def test_cli_dynamic_without_the_runs_corpus_starts_the_mean_square_from_the_text_read(corpus, tmp_path):
    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "16", "--batch-size", "4",
                                  "--num-steps", "10", "--max-steps", "3", "--eval-every", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    text = tmp_path / "other.txt"
    text.write_text(Path(corpus).read_text(encoding="utf-8")[:300], encoding="utf-8")
    Path(corpus).unlink()
    r = CliRunner().invoke(main, ["eval", str(out), str(text), "--dynamic"])  # output: stdout and stderr
    assert r.exit_code == 0, r.output
    assert "is gone" in r.output and "starts from the text read" in r.output
    assert "count model counts the text read only" in r.output
    assert "read in order" in r.output and "counts of contexts up to 6 characters in 0 training chars" in r.output
    assert "mean square from" not in r.output


def test_a_prior_too_short_for_a_gradient_is_refused_in_one_line():
    from charlm.errors import ConfigError

    with pytest.raises(ConfigError, match="prior needs at least 2 characters, got 1"):
        evaluate_dynamic(tiny_model(), repeated(times=2), prior_ids=repeated(times=1)[:1])


def test_the_model_learns_in_training_mode_with_every_dropout_off(monkeypatch):
    """cuDNN runs an RNN's backward pass only in training mode: the copy that learns is in training mode
    (the CPU would let eval mode pass), with its dropouts at 0, so it reads the text as evaluate() does."""
    torch.manual_seed(0)
    model = RNNLM(12, cell="lstm", hidden_size=16, num_layers=2, dropout=0.3, weight_drop=0.2, dropout_input=0.1,
                  dropout_hidden=0.1, dropout_output=0.2).eval()
    modes = []
    forward = RNNLM.forward

    def watched(self, X, state=None):
        modes.append((self.training, self.config.dropout, self.config.regularised))
        return forward(self, X, state)

    monkeypatch.setattr(RNNLM, "forward", watched)
    ids = np.random.default_rng(0).integers(1, 12, 400)
    rng_before = torch.get_rng_state()
    first = evaluate_dynamic(model, ids, lr=1e-9, num_steps=50, rule="sgd")
    assert modes and all(m == (True, 0.0, False) for m in modes)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building the copy drew nothing from the caller's RNG
    assert not model.training and model.config.dropout == 0.3  # the caller's model as it was
    monkeypatch.setattr(RNNLM, "forward", forward)
    assert first.loss == pytest.approx(evaluate(model, ids, batch_size=1).loss, rel=1e-6)  # lr ~0: the static figure


def _one_step(rule, start, trained, grad, decay, prior=None):
    from charlm.evaluation import _RMSState, _sgd_step

    p = torch.nn.Parameter(start.clone())
    p.grad = grad.clone()
    with torch.no_grad():
        if rule == "sgd":
            _sgd_step([p], [trained], 0.1, decay)
        else:
            _RMSState([p], None if prior is None else [prior]).step([p], [trained], 0.1, decay)
    return p.detach()


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("rule", ["sgd", "rms"])
def test_each_rules_decay_draws_every_weight_back_towards_its_trained_value(rule, prior):
    """The same step with and without decay: the decay moves each weight towards its trained value (never away,
    never past it), so the step with decay ends nearer the trained weights."""
    g = torch.Generator().manual_seed(3)
    trained = torch.randn(200, generator=g)
    start = trained + torch.randn(200, generator=g)  # where earlier steps took them
    grad = torch.randn(200, generator=g)
    prior = torch.rand(200, generator=g) + 0.01 if prior else None
    free = _one_step(rule, start, trained, grad, 0.0, prior)
    for decay in (0.05, 0.5, 1.0):
        pulled = _one_step(rule, start, trained, grad, decay, prior)
        towards, moved = trained - free, pulled - free
        assert (moved * towards >= 0).all(), decay  # each weight's pull has the sign of the way back
        assert (moved.abs() <= towards.abs() * (1 + 1e-6)).all(), decay  # and stops at the trained value at most
        assert (moved != 0).sum() > 150, decay  # it is a pull, not a no-op (rms: every weight, by its share)
        assert (pulled - trained).norm() < (free - trained).norm(), decay
        if rule == "rms":  # each weight by its own share: decay times its root mean square over their mean, at most 1
            roots = prior.sqrt() if prior is not None else grad.abs()  # (one step from zero: bias-corrected g^2)
            share = (decay * roots / roots.mean()).clamp(max=1.0)
            assert torch.allclose(moved, share * towards, atol=1e-5), decay
    if rule == "sgd":  # the plain rule's pull is exactly decay of the way back
        assert torch.allclose(_one_step(rule, start, trained, grad, 0.3) - free, 0.3 * (trained - free), atol=1e-6)


@pytest.mark.parametrize("rule", sorted(LEARNS))
def test_over_a_whole_text_the_decay_keeps_the_adapted_weights_nearer_the_trained_ones(rule, monkeypatch):
    import charlm.evaluation as ev

    copies = []
    make = ev._adaptable_copy
    monkeypatch.setattr(ev, "_adaptable_copy", lambda model, device: copies.append(make(model, device)) or copies[-1])
    model = tiny_model()
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    ids = repeated(times=20)
    distance = {}
    for decay in (0.0, 0.1):
        evaluate_dynamic(model, ids, lr=LEARNS[rule], num_steps=50, rule=rule, decay=decay)
        adapted = torch.cat([p.detach().flatten() for p in copies[-1].parameters()])
        distance[decay] = (adapted - trained).norm().item()
    assert 0 < distance[0.1] < 0.8 * distance[0.0], distance
