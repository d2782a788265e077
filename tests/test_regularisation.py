"""AWD-LSTM-style regularisation: DropConnect on the hidden-to-hidden weights and locked dropout on the
input, between layers and on the output. Training only; evaluation, generation and checkpoints see the
model's own weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from charlm import RNNLM
from charlm.config import ModelConfig, TrainConfig
from charlm.errors import ConfigError
from charlm.models import rnnlm

AWD = dict(weight_drop=0.25, dropout_input=0.05, dropout_hidden=0.15, dropout_output=0.25)


def model(cell="lstm", impl="torch", embedding_dim=8, num_layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    return RNNLM(13, cell=cell, hidden_size=10, num_layers=num_layers, embedding_dim=embedding_dim, impl=impl, **kw)


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "mogrifier"])
def test_without_masks_the_layer_by_layer_pass_is_the_fused_one(cell, impl):
    for embedding_dim in (0, 8):
        m = model(cell, impl, embedding_dim, dropout=0.0)
        X = torch.randint(0, 13, (4, 7))
        fused, state = m(X)
        layered, layered_state = m.regularised_forward(X, m.init_state(4), {})
        torch.testing.assert_close(layered, fused, atol=1e-6, rtol=0)
        paired = cell in ("lstm", "mogrifier")
        for a, b in zip(state if paired else (state,), layered_state if paired else (layered_state,)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_locked_masks_are_the_same_at_every_step_and_differ_between_sequences(monkeypatch):
    m = model(dropout_input=0.5, dropout_output=0.5, dropout_hidden=0.5)
    seen = []
    real = rnnlm._torch_layer

    def spy(cell, x, h, c, weights):
        seen.append(x.detach().clone())
        return real(cell, x, h, c, weights)

    monkeypatch.setattr(rnnlm, "_torch_layer", spy)
    X = torch.full((32, 9), 3)  # every position the same character: inputs differ only by their masks
    m.train()
    m(X)
    inputs, between = seen  # layer 0's input (the dropped embedding), layer 1's (layer 0's dropped output)
    dropped = inputs == 0  # (B, T, E)
    assert dropped.any() and not dropped.all()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # the same features at every step
    assert len({tuple(row.tolist()) for row in dropped[:, 0]}) > 1  # and other features in other sequences
    zeros = between == 0
    assert torch.equal(zeros, zeros[:, :1].expand_as(zeros)) and zeros.any()
    masks = m.draw_masks(32)
    assert masks["input"].shape == (32, 1, 8) and masks["hidden_l0"].shape == masks["output"].shape == (32, 1, 10)
    assert set(masks["input"].unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1 / (1 - p)


def test_weight_drop_changes_what_the_kernel_sees_in_training_only(monkeypatch):
    m = model(weight_drop=0.5)
    plain = model()  # the same seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
    seen = []
    real = rnnlm._torch_layer
    monkeypatch.setattr(rnnlm, "_torch_layer",
                        lambda cell, x, h, c, w: seen.append(w[1].detach()) or real(cell, x, h, c, w))
    X = torch.randint(0, 13, (4, 6))
    m.train()
    m(X)
    for k, w_seen in enumerate(seen):
        own = getattr(m.rnn, f"weight_hh_l{k}").detach()
        zeroed = (w_seen == 0).float().mean().item()
        assert 0.3 < zeroed < 0.7, zeroed  # about half the connections dropped for this batch
        kept = w_seen != 0
        torch.testing.assert_close(w_seen[kept], own[kept] * 2)  # the rest scaled by 1 / (1 - p)
    assert not (m.rnn.weight_hh_l0 == 0).any()  # the parameter itself is untouched
    m.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(X)[0], plain(X)[0], atol=0, rtol=0)  # evaluation: the undropped weights
    assert m.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep their format


@pytest.mark.parametrize("impl", ["torch", "scratch"])
def test_weight_drop_reaches_the_mogrifiers_hidden_to_hidden_matrix_alone(monkeypatch, impl):
    """The mogrifier's W_hh is dropped as the LSTM's is; its rounds' matrices are not (they gate, and are not
    the hidden-to-hidden product)."""
    from charlm.models import mogrifier

    m = model("mogrifier", impl, weight_drop=0.5)
    seen = []
    name = "fast_layer" if impl == "torch" else "scratch_layer"
    real = getattr(mogrifier, name)
    monkeypatch.setattr(mogrifier, name, lambda x, h, c, w_ih, w_hh, b, q, r, *rest: seen.append((w_hh, q))
                        or real(x, h, c, w_ih, w_hh, b, q, r, *rest))
    m.train()
    m(torch.randint(0, 13, (4, 6)))
    for k, (w_seen, q) in enumerate(seen):
        own = getattr(m.rnn, f"weight_hh_l{k}").detach()
        assert 0.3 < (w_seen == 0).float().mean().item() < 0.7
        torch.testing.assert_close(w_seen[w_seen != 0].detach(), own[w_seen != 0] * 2)
        q = torch.stack(q) if isinstance(q, list) else q
        assert torch.equal(q.detach(), getattr(m.rnn, f"weight_q_l{k}").detach())


def _reference_lstm_logits(m, X, masks):
    """The regularised LSTM written out by hand, one time step at a time: embedding -> input mask ->
    per layer h = o * tanh(c), c = f * c + i * g with (W_hh * mask) -> locked masks -> head."""
    cfg = m.config
    x = m.embedding(X) * masks["input"]  # (B, T, E)
    B, T = X.shape
    for k in range(cfg.num_layers):
        w_ih, b_ih = getattr(m.rnn, f"weight_ih_l{k}"), getattr(m.rnn, f"bias_ih_l{k}")
        w_hh, b_hh = getattr(m.rnn, f"weight_hh_l{k}") * masks[f"weight_hh_l{k}"], getattr(m.rnn, f"bias_hh_l{k}")
        h = torch.zeros(B, cfg.hidden_size)
        c = torch.zeros(B, cfg.hidden_size)
        outs = []
        for t in range(T):
            i, f, g, o = (x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        x = torch.stack(outs, 1)
        x = x * masks["hidden_l0"] if k == 0 else x * masks["output"]
    return x @ m.head.weight.T + m.head.bias


@pytest.mark.parametrize("impl", ["torch", "scratch"])
def test_gradients_match_a_hand_written_reference(impl):
    m = model("lstm", impl, dropout=0.0, **AWD)
    m.train()
    X, Y = torch.randint(0, 13, (5, 6)), torch.randint(0, 13, (5, 6))
    torch.manual_seed(7)
    masks = m.draw_masks(5)
    logits, _ = m.regularised_forward(X, m.init_state(5), masks)
    F.cross_entropy(logits.reshape(-1, 13), Y.reshape(-1)).backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    reference = _reference_lstm_logits(m, X, masks)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    F.cross_entropy(reference.reshape(-1, 13), Y.reshape(-1)).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_options_are_checked_and_reach_the_model(write_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"weight-drop must lie in \[0, 1\)"):
        ModelConfig(vocab_size=5, weight_drop=1.0)
    cfg = TrainConfig(corpus="x", **AWD).model_config(20)
    assert cfg.regularised and not ModelConfig(vocab_size=5).regularised
    assert {k: getattr(cfg, k) for k in AWD} == AWD
    from charlm import checkpoint as ck
    from charlm.training import train

    corpus = write_corpus(12)
    train(TrainConfig(corpus=str(corpus), out=str(tmp_path / "r"), hidden_size=16, embedding_dim=8, batch_size=4,
                      num_steps=10, max_steps=4, eval_every=2, time_limit=None, **AWD))
    saved = ck.load_checkpoint(tmp_path / "r")
    assert {k: getattr(saved.config, k) for k in AWD} == AWD
    assert math.isfinite(saved.progress["best_val_loss"])


def test_a_checkpoint_without_regularisation_has_the_model_config_it_had_before():
    """config.json of an unregularised model names no regulariser (charlm before them refuses unknown
    fields); a regularised one names those in use, and both rebuild the same ModelConfig."""
    plain = ModelConfig(vocab_size=5)
    assert set(plain.to_dict()) == {"vocab_size", "cell", "hidden_size", "num_layers", "embedding_dim", "dropout",
                                    "impl"}
    awd = ModelConfig(vocab_size=5, weight_drop=0.25, dropout_output=0.1)
    assert {"weight_drop", "dropout_output"} <= set(awd.to_dict()) and "dropout_input" not in awd.to_dict()
    assert ModelConfig.from_dict(plain.to_dict()) == plain and ModelConfig.from_dict(awd.to_dict()) == awd
