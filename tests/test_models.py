import pytest
import torch

from charlm import RNNLM, ModelConfig
from charlm.models import ScratchRecurrent, detach_state

V = 11
CASES = [(cell, layers, emb) for cell in ("rnn", "gru", "lstm") for layers in (1, 2) for emb in (0, 5)]


def pair(cell, layers, emb, hidden=8, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    ref = RNNLM(V, cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=emb, dropout=dropout, impl="torch")
    ours = RNNLM(V, cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=emb, dropout=dropout, impl="scratch")
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


@pytest.mark.parametrize("cell, layers, emb", CASES)
def test_same_logits_state_and_gradients(cell, layers, emb):
    ref, ours = pair(cell, layers, emb)
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
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_state_carried_across_calls_equals_one_call(cell, impl):
    torch.manual_seed(0)
    m = RNNLM(V, cell=cell, hidden_size=8, num_layers=2, impl=impl).eval()
    X = ids(2, 10)
    whole, s_whole = m(X)
    a, s = m(X[:, :4])
    b, s = m(X[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flat(s), flat(s_whole), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
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
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("B, T", [(1, 1), (1, 6), (4, 1)])
def test_shapes(cell, impl, B, T):
    m = RNNLM(V, cell=cell, hidden_size=5, num_layers=2, impl=impl)
    logits, state = m(ids(B, T))
    assert logits.shape == (B, T, V)
    states = state if isinstance(state, tuple) else (state,)
    assert len(states) == (2 if cell == "lstm" else 1)
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


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_scratch_dropout_applies_between_layers_only(cell):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    one = ScratchRecurrent(cell, 3, 4, num_layers=1, dropout=0.9).train()
    torch.testing.assert_close(one(x)[0], one(x)[0])  # one layer: nothing to drop
    two = ScratchRecurrent(cell, 3, 4, num_layers=2, dropout=0.9).train()
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
    core = ScratchRecurrent(cell, 3, 4, num_layers=2).double()
    x = torch.randint(0, 3, (2, 3)) if onehot else torch.randn(2, 3, 3, dtype=torch.double, requires_grad=True)
    h = torch.randn(2, 2, 4, dtype=torch.double, requires_grad=True)
    c = torch.randn(2, 2, 4, dtype=torch.double, requires_grad=True)
    params = list(core.parameters())
    names = [n for n, _ in core.named_parameters()]

    def f(*args):
        *ps, h_, c_ = args[-(len(params) + 2):]
        sd = dict(zip(names, ps))
        xin = x if onehot else args[0]
        out, st = torch.func.functional_call(core, sd, (xin, (h_, c_) if cell == "lstm" else h_))
        return out, *(st if isinstance(st, tuple) else (st,))

    inputs = ([] if onehot else [x]) + params + [h, c]
    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-5)


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
