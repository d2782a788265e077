import dataclasses

import pytest
import torch

from charlm import RNNLM, ModelConfig
from charlm.config import mogrify_rank_limit
from charlm.models import ScratchRecurrent, detach_state, recurrent_layer
from charlm.models.mogrifier import MogrifierLSTM

V = 11
CELLS = ("rnn", "gru", "lstm", "mogrifier")
CASES = [(cell, layers, emb) for cell in CELLS for layers in (1, 2) for emb in (0, 5)]


def pair(cell, layers, emb, hidden=8, dropout=0.0, seed=0, **options):
    """The same model with torch's kernels and with charlm's own cells (the mogrifier: its fast and its scratch
    form)."""
    torch.manual_seed(seed)
    ref = RNNLM(V, cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=emb, dropout=dropout, impl="torch",
                **options)
    ours = RNNLM(V, cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=emb, dropout=dropout,
                 impl="scratch", **options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def ids(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def flat(state):
    return torch.cat([s.reshape(-1) for s in state]) if isinstance(state, tuple) else state.reshape(-1)


@pytest.mark.parametrize("cell, layers, emb", CASES)
def test_same_state_dict_keys_and_shapes(cell, layers, emb):
    ref, ours = pair(cell, layers, emb)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("cell, layers, emb", CASES + [("mogrifier-rank", 2, 5), ("mogrifier-rank", 1, 0)])
def test_same_logits_state_and_gradients(cell, layers, emb):
    options = dict(mogrify_rounds=4, mogrify_rank=3) if cell == "mogrifier-rank" else {}
    ref, ours = pair(cell.split("-")[0], layers, emb, **options)
    X = ids(3, 7)
    s0 = ref.init_state(3)
    s0 = tuple(torch.randn_like(s) for s in s0) if isinstance(s0, tuple) else torch.randn_like(s0)
    out_r, st_r = ref(X, s0)
    out_o, st_o = ours(X, s0)
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat(st_o), flat(st_r), atol=1e-5, rtol=1e-5)
    (out_r.square().mean() + flat(st_r).sum()).backward()
    (out_o.square().mean() + flat(st_o).sum()).backward()
    grads_r = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_across_calls_equals_one_call(cell, impl):
    torch.manual_seed(0)
    m = RNNLM(V, cell=cell, hidden_size=8, num_layers=2, impl=impl).eval()
    X = ids(2, 10)
    whole, s_whole = m(X)
    a, s = m(X[:, :4])
    b, s = m(X[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flat(s), flat(s_whole), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_weights_move_both_ways(cell):
    torch.manual_seed(0)
    ref = RNNLM(V, cell=cell, hidden_size=6, num_layers=2, embedding_dim=4, impl="torch")
    ours = RNNLM(V, cell=cell, hidden_size=6, num_layers=2, embedding_dim=4, impl="scratch")
    ours.load_state_dict(ref.state_dict())  # torch -> scratch
    back = RNNLM(V, cell=cell, hidden_size=6, num_layers=2, embedding_dim=4, impl="torch")
    back.load_state_dict(ours.state_dict())  # scratch -> torch
    X = ids(2, 5)
    torch.testing.assert_close(back(X)[0], ref(X)[0])


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B, T", [(1, 1), (1, 6), (4, 1)])
def test_shapes(cell, impl, B, T):
    m = RNNLM(V, cell=cell, hidden_size=5, num_layers=2, impl=impl)
    logits, state = m(ids(B, T))
    assert logits.shape == (B, T, V)
    states = state if isinstance(state, tuple) else (state,)
    assert len(states) == (2 if cell in ("lstm", "mogrifier") else 1)
    assert all(s.shape == (2, B, 5) for s in states)


@pytest.mark.parametrize("impl", ["torch", "scratch"])
def test_dropout_off_in_eval_and_training_with_dropout_runs(impl):
    torch.manual_seed(0)
    m = RNNLM(V, cell="lstm", hidden_size=16, num_layers=2, embedding_dim=8, dropout=0.5, impl=impl)
    X = ids(4, 12)
    m.eval()
    torch.testing.assert_close(m(X)[0], m(X)[0])
    m.train()
    assert not torch.allclose(m(X)[0], m(X)[0])
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        logits, _ = m(X[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), X[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("cell", CELLS)
def test_scratch_dropout_applies_between_layers_only(cell):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    one = recurrent_layer(cell, 3, 4, num_layers=1, dropout=0.9, impl="scratch").train()
    torch.testing.assert_close(one(x)[0], one(x)[0])  # one layer: nothing to drop
    two = recurrent_layer(cell, 3, 4, num_layers=2, dropout=0.9, impl="scratch").train()
    a, b = two(x)[0], two(x)[0]
    assert not torch.allclose(a, b)  # the first layer's output was dropped before the second read it
    # ... but not the last layer's output: dropout would zero most of it and scale the rest by 10,
    # past the range of a tanh/sigmoid-gated state
    assert (a != 0).all()
    assert a.abs().max() < 1
    two.eval()
    torch.testing.assert_close(two(x)[0], two(x)[0])  # evaluation: no dropout at all


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("onehot", [False, True])
def test_gradcheck_scratch_cells(cell, onehot):
    torch.manual_seed(0)
    assert _gradcheck_core(ScratchRecurrent(cell, 3, 4, num_layers=2).double(), onehot, pair=cell == "lstm")


def _gradcheck_core(core, onehot: bool, pair: bool) -> bool:
    """gradcheck of a 2-layer recurrent core of 4 units over 3 inputs (one-hot ids or a dense input), through its
    input, every parameter and its initial state (a pair (h, c) for ``pair`` cells)."""
    x = torch.randint(0, 3, (2, 3)) if onehot else torch.randn(2, 3, 3, dtype=torch.double, requires_grad=True)
    h = torch.randn(2, 2, 4, dtype=torch.double, requires_grad=True)
    c = torch.randn(2, 2, 4, dtype=torch.double, requires_grad=True)
    params = list(core.parameters())
    names = [n for n, _ in core.named_parameters()]

    def f(*args):
        *ps, h_, c_ = args[-(len(params) + 2):]
        out, st = torch.func.functional_call(core, dict(zip(names, ps)), (x if onehot else args[0],
                                                                          (h_, c_) if pair else h_))
        return out, *(st if isinstance(st, tuple) else (st,))

    inputs = ([] if onehot else [x]) + params + [h, c]
    return torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_init_matches_torch_bounds(cell):
    torch.manual_seed(0)
    core = ScratchRecurrent(cell, 5, 16, num_layers=2)
    bound = 0.25  # 1/sqrt(16)
    values = torch.cat([p.detach().reshape(-1) for p in core.parameters()])
    assert values.max() <= bound
    assert values.min() >= -bound
    # uniform over the whole of [-bound, bound]: both ends reached, mean ~0, std ~bound/sqrt(3)
    assert values.max() > 0.95 * bound
    assert values.min() < -0.95 * bound
    assert abs(values.mean().item()) < 0.02
    assert values.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    ref = torch.nn.GRU(5, 16, num_layers=2) if cell == "gru" else None
    if ref is not None:  # torch's own init has the same spread
        torch_values = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        assert torch_values.std().item() == pytest.approx(values.std().item(), rel=0.1)


def test_detach_state():
    h = torch.zeros(1, 2, 3, requires_grad=True) * 2
    assert not detach_state(h).requires_grad
    hc = detach_state((h, h))
    assert isinstance(hc, tuple)
    assert not hc[0].requires_grad
    assert detach_state(None) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(cell="transformer"), "unknown cell 'transformer'"),
    (dict(impl="cuda"), "unknown impl 'cuda'"),
    (dict(hidden_size=0), "hidden_size must be an integer >= 1"),
    (dict(num_layers=0), "num_layers must be an integer >= 1"),
    (dict(embedding_dim=-1), "embedding_dim must be an integer >= 0"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must lie in \[0, 1\)"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RNNLM(V, **kwargs)


def test_config_roundtrip_and_num_parameters():
    m = RNNLM(28, cell="gru", hidden_size=256)
    cfg = ModelConfig.from_dict(m.config.to_dict())
    assert cfg == m.config
    assert RNNLM.from_config(cfg).num_parameters() == m.num_parameters()
    # d2l's one-hot GRU 256 on 28 symbols: 3*(256*28 + 256*256 + 2*256) + 256*28 + 28
    assert m.num_parameters() == 3 * (256 * 28 + 256 * 256 + 2 * 256) + 256 * 28 + 28
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"vocab_size": 3, "layers": 2})


# The Mogrifier LSTM (charlm.models.mogrifier): its two forms, its parameters, its equations.

def _mogrifier(impl, rounds=5, rank=0, input_size=3, hidden=4, layers=2, seed=0):
    torch.manual_seed(seed)
    return MogrifierLSTM(input_size, hidden, layers, rounds=rounds, rank=rank, impl=impl).double()


@pytest.mark.parametrize("rounds, rank, shapes", [
    (5, 0, {"weight_q_l0": (3, 3, 4), "weight_r_l0": (2, 4, 3), "weight_q_l1": (3, 4, 4), "weight_r_l1": (2, 4, 4)}),
    (1, 0, {"weight_q_l0": (1, 3, 4), "weight_q_l1": (1, 4, 4)}),  # no R round, no R matrix
    (4, 2, {"weight_ql_l0": (2, 3, 2), "weight_qr_l0": (2, 2, 4), "weight_rl_l0": (2, 4, 2), "weight_rr_l0": (2, 2, 3),
            "weight_ql_l1": (2, 4, 2), "weight_qr_l1": (2, 2, 4), "weight_rl_l1": (2, 4, 2), "weight_rr_l1": (2, 2, 4)}),
])
def test_mogrifier_parameters_are_torchs_lstm_and_the_rounds_matrices(rounds, rank, shapes):
    lstm = torch.nn.LSTM(3, 4, 2, batch_first=True)
    for impl in ("torch", "scratch"):
        m = _mogrifier(impl, rounds, rank)
        got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert got == {**{k: tuple(v.shape) for k, v in lstm.state_dict().items()}, **shapes}
        bound = 0.5  # 1/sqrt(4): torch's LSTM initialisation for every parameter
        assert all(p.abs().max() <= bound for p in m.parameters())


@pytest.mark.parametrize("impl", ["torch", "scratch"])
def test_a_mogrifier_whose_rounds_are_the_identity_is_torchs_lstm(impl):
    """Q = R = 0 makes every round 2 sigmoid(0) = 1 times its input: the LSTM, gate for gate, as torch has it."""
    m = _mogrifier(impl).float()
    with torch.no_grad():
        m.weight_q_l0.zero_(), m.weight_r_l0.zero_(), m.weight_q_l1.zero_(), m.weight_r_l1.zero_()
    lstm = torch.nn.LSTM(3, 4, 2, batch_first=True)
    lstm.load_state_dict({k: v for k, v in m.state_dict().items() if "_q_" not in k and "_r_" not in k})
    x, h, c = torch.randn(2, 6, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    out, (h_n, c_n) = m(x, (h, c))
    want, (h_w, c_w) = lstm(x, (h, c))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h_n, h_w)
    torch.testing.assert_close(c_n, c_w)


def test_the_mogrifier_rounds_follow_the_papers_equations():
    """One step of one layer by hand: x^1 = 2 s(Q^1 h) x, h^2 = 2 s(R^2 x^1) h, x^3 = 2 s(Q^3 h^2) x^1."""
    m = _mogrifier("torch", rounds=3, layers=1)
    x, h, c = torch.randn(2, 1, 3, dtype=torch.double), torch.randn(1, 2, 4, dtype=torch.double), \
        torch.randn(1, 2, 4, dtype=torch.double)
    q, r = m.weight_q_l0.detach(), m.weight_r_l0.detach()
    x1 = 2 * torch.sigmoid(h[0] @ q[0].t()) * x[:, 0]
    h2 = 2 * torch.sigmoid(x1 @ r[0].t()) * h[0]
    x3 = 2 * torch.sigmoid(h2 @ q[1].t()) * x1
    cell = torch.nn.LSTMCell(3, 4).double()
    cell.load_state_dict({k[:-3]: v for k, v in m.state_dict().items() if "_q_" not in k and "_r_" not in k})
    h_want, c_want = cell(x3, (h2, c[0]))
    out, (h_n, c_n) = m(x, (h, c))
    torch.testing.assert_close(h_n[0], h_want)
    torch.testing.assert_close(c_n[0], c_want)


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("rounds, rank", [(5, 0), (1, 0), (4, 2), (3, 1)])
@pytest.mark.parametrize("onehot", [False, True])
def test_gradcheck_mogrifier(impl, rounds, rank, onehot):
    """The fast form's hand-written backward pass (and the scratch form's autograd) against finite differences,
    for the input, the state and every parameter."""
    assert _gradcheck_core(_mogrifier(impl, rounds, rank), onehot, pair=True)


@pytest.mark.parametrize("onednn", [True, False])
def test_the_fast_mogrifier_equals_the_scratch_one_under_weight_drop_and_locked_dropout(monkeypatch, onednn):
    """Training's path (RNNLM.regularised_forward with one set of masks): the same logits and gradients, with the
    fast form's products through oneDNN (where it runs) and through torch's own."""
    from charlm.models import mogrifier

    if onednn and not mogrifier._onednn_runs():
        pytest.skip("oneDNN's matrix product does not run in this torch")
    monkeypatch.setattr(mogrifier, "_ONEDNN", onednn)
    options = dict(weight_drop=0.3, dropout_input=0.2, dropout_hidden=0.2, dropout_output=0.2)
    for emb in (0, 5):
        fast, scratch = pair("mogrifier", 2, emb, **options)
        X = ids(3, 9)
        torch.manual_seed(5)
        masks = fast.draw_masks(3)
        results = []
        for m in (fast, scratch):
            m.train()
            logits, (h, c) = m.regularised_forward(X, m.init_state(3), masks)
            (logits.square().mean() + h.sum() + c.sum()).backward()
            results.append((logits, h, c, {n: p.grad for n, p in m.named_parameters()}))
        (a, ha, ca, ga), (b, hb, cb, gb) = results
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([ha, ca]), torch.cat([hb, cb]), atol=1e-5, rtol=1e-5)
        for name, g in ga.items():
            torch.testing.assert_close(g, gb[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_fast_mogrifier_runs_in_fp32_under_bf16_autocast():
    """A low precision has no kernel to gain for the mogrifier's core: it runs in fp32, and its gradients arrive."""
    torch.manual_seed(0)
    m = RNNLM(V, cell="mogrifier", hidden_size=8, num_layers=2, embedding_dim=4)
    X = ids(2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m.rnn(m.encode_inputs(X))
        loss = m.head(out).float().square().mean()
    assert out.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(cell="mogrifier", mogrify_rounds=0), "mogrify-rounds must be an integer >= 1"),
    (dict(cell="mogrifier", mogrify_rank=-1), "mogrify-rank must be an integer >= 0"),
    (dict(cell="lstm", mogrify_rounds=3), "mogrify-rounds applies to the mogrifier cell only"),
    (dict(cell="gru", mogrify_rank=8), "mogrify-rank applies to the mogrifier cell only"),
    (dict(cell="mogrifier", mogrify_rounds=2**70), "mogrify-rounds must be an integer >= 1 and at most 64"),
    (dict(cell="mogrifier", mogrify_rank=2**70), "mogrify-rank must be an integer >= 0"),
    # a rank whose two factors hold as many numbers as the matrix, in every layer: more parameters, nothing gained
    (dict(cell="mogrifier", hidden_size=8, embedding_dim=4, mogrify_rank=8), "mogrify-rank 8 saves no parameters"),
    (dict(cell="mogrifier", hidden_size=8, embedding_dim=8, num_layers=2, mogrify_rank=4),
     "mogrify-rank 4 saves no parameters: .* at most 3"),
    (dict(cell="mogrifier", hidden_size=1, mogrify_rank=1), "pass 0 \\(full matrices\\)"),
])
def test_bad_mogrifier_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RNNLM(V, **kwargs)


def test_the_largest_rank_that_saves_parameters_is_accepted():
    """(I x k + k x H < I x H in at least one layer: the limit is the largest such k over the layers' inputs.)"""
    for hidden, emb, layers in ((8, 4, 1), (8, 8, 2), (320, 64, 2), (12, 6, 2), (5, 0, 1)):
        cfg = ModelConfig(vocab_size=V, cell="mogrifier", hidden_size=hidden, embedding_dim=emb, num_layers=layers)
        limit = mogrify_rank_limit(cfg)
        inputs = {cfg.input_size} | ({hidden} if layers > 1 else set())
        assert any(limit * (i + hidden) < i * hidden for i in inputs)
        assert all((limit + 1) * (i + hidden) >= i * hidden for i in inputs)
        if limit:
            RNNLM.from_config(dataclasses.replace(cfg, mogrify_rank=limit))


def test_the_mogrifier_options_are_saved_with_a_mogrifier_only():
    """A model of another cell saves the config it did before the mogrifier existed (earlier charlm reads it)."""
    assert "mogrify_rounds" not in RNNLM(V, cell="lstm").config.to_dict()
    cfg = RNNLM(V, cell="mogrifier", hidden_size=6, mogrify_rounds=4, mogrify_rank=2).config
    assert {k: cfg.to_dict()[k] for k in ("mogrify_rounds", "mogrify_rank")} == {"mogrify_rounds": 4, "mogrify_rank": 2}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert RNNLM.from_config(cfg).num_parameters() == RNNLM(V, cell="mogrifier", hidden_size=6, mogrify_rounds=4,
                                                            mogrify_rank=2).num_parameters()
