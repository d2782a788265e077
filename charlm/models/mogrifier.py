"""The Mogrifier LSTM (Melis, Kočiský and Blunsom, "Mogrifier LSTM", ICLR 2020, https://arxiv.org/abs/1909.01792).

An LSTM whose input ``x`` and previous state ``h`` first gate each other for ``r`` rounds, so that what the
LSTM reads depends on the context it reads it in (the paper's equations 1-2)::

    x^i = 2 sigmoid(Q^i h^(i-1)) * x^(i-2)     odd i = 1, 3, 5, ... <= r      (x^-1 = x)
    h^i = 2 sigmoid(R^i x^(i-1)) * h^(i-2)     even i = 2, 4, ... <= r        (h^0 = h)

and then the usual LSTM step reads the last ``x^i`` and ``h^i`` (and the previous cell ``c``, untouched). The
factor 2 keeps a round near the identity while ``Q`` and ``R`` are small, as they start; ``r = 0`` would be the
LSTM. The paper finds 4 to 6 rounds best (5 is charlm's default) and optionally factors each ``Q^i`` (``I x H``)
and ``R^i`` (``H x I``) as a product of two matrices of a low rank ``k`` (``Q^i = Q^i_left Q^i_right``).

Parameters, per layer ``l`` (the LSTM's named and laid out as torch's ``nn.LSTM``, gates ``i, f, g, o``)::

    weight_ih_l{l} (4H, I)   weight_hh_l{l} (4H, H)   bias_ih_l{l} (4H,)   bias_hh_l{l} (4H,)
    weight_q_l{l} (ceil(r/2), I, H)   weight_r_l{l} (floor(r/2), H, I)             full rank
    weight_ql_l{l} (ceil(r/2), I, k)  weight_qr_l{l} (ceil(r/2), k, H)             rank k: Q = Q_left Q_right
    weight_rl_l{l} (floor(r/2), H, k) weight_rr_l{l} (floor(r/2), k, I)            and R = R_left R_right

every one uniform in ``±1/sqrt(H)``, as torch initialises its LSTM (``weight_r_l{l}`` is absent when ``r = 1``).

Two forms of the same layer, chosen by ``impl`` as the other cells' are, with the same parameters and outputs:

- ``"scratch"`` (:func:`scratch_layer`): teaching code, one line per equation, every step through autograd.
- ``"torch"`` (:class:`_MogrifierFunction`): what is fast on a CPU. Unlike the LSTM's, the input projection
  ``W_ih x`` cannot be computed for all steps at once (``x`` depends on the state), so every product runs step
  by step; the forward pass writes every intermediate into buffers made once, and a hand-written backward pass
  runs the steps in reverse with only the products that carry the gradient back in time, leaving the weight
  gradients to one large product each over all the steps (what autograd would do as ``T`` small ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import IMPLS, check_choice


def round_counts(rounds: int) -> tuple[int, int]:
    """(Q rounds, R rounds) of ``rounds``: the odd rounds gate ``x``, the even ones ``h``."""
    return (rounds + 1) // 2, rounds // 2


class MogrifierLSTM(nn.Module):
    """A stack of ``num_layers`` Mogrifier LSTM layers, batch first, with ``nn.LSTM``'s interface.

    ``forward(x, (h, c))`` takes ``x`` (B, T, I) floats, or (B, T) indices of one-hot vectors, and the state
    ``(h, c)``, each (L, B, H); it returns ``(output (B, T, H) of the last layer, (h, c))``. ``dropout`` acts
    between layers, in training only, as in torch.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 rounds: int = 5, rank: int = 0, impl: str = "torch"):
        super().__init__()
        check_choice("impl", impl, IMPLS)
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        self.rounds, self.rank, self.impl = rounds, rank, impl
        H = hidden_size
        nq, nr = round_counts(rounds)
        for layer in range(num_layers):
            I = input_size if layer == 0 else hidden_size  # noqa: E741
            shapes = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}
            if rank:
                shapes.update(weight_ql=(nq, I, rank), weight_qr=(nq, rank, H), weight_rl=(nr, H, rank),
                              weight_rr=(nr, rank, I))
            else:
                shapes.update(weight_q=(nq, I, H), weight_r=(nr, H, I))
            for name, shape in shapes.items():
                if shape[0]:  # (no R matrices for a single round)
                    self.register_parameter(f"{name}_l{layer}", nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's LSTM initialisation for every parameter: uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _param(self, name: str, layer: int) -> torch.Tensor | None:
        return getattr(self, f"{name}_l{layer}", None)

    def mogrifier_matrices(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``layer``'s ``Q`` (ceil(r/2), I, H) and ``R`` (floor(r/2), H, I), or None without R rounds;
        the products of their factors at a low rank (through autograd: gradients reach the factors)."""
        if not self.rank:
            return self._param("weight_q", layer), self._param("weight_r", layer)
        r_left = self._param("weight_rl", layer)
        return (torch.bmm(self._param("weight_ql", layer), self._param("weight_qr", layer)),
                None if r_left is None else torch.bmm(r_left, self._param("weight_rr", layer)))

    def init_state(self, batch_size: int, device=None, dtype=None):
        """Zeros: ``(h, c)``, each (L, B, H)."""
        w = self.weight_hh_l0
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device or w.device,
                        dtype=dtype or w.dtype)
        return h, torch.zeros_like(h)

    def forward(self, x: torch.Tensor, state=None):
        """Run the stack over a whole sequence (see the class docstring)."""
        h0, c0 = self.init_state(x.shape[0], device=x.device) if state is None else state
        hs, cs = [], []
        for layer in range(self.num_layers):
            x, h, c = self.run_layer(layer, x, h0[layer], c0[layer])
            hs.append(h)
            cs.append(c)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)  # between layers only, as torch does
        return x, (torch.stack(hs), torch.stack(cs))

    def run_layer(self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                  w_hh: torch.Tensor | None = None):
        """Layer ``layer`` over a whole sequence: ``x`` (B, T, I) floats or (B, T) indices of one-hot vectors,
        ``h`` and ``c`` (B, H); ``w_hh`` stands in for the layer's hidden-to-hidden matrix (a weight-dropped
        copy). Returns ``(out (B, T, H), h, c)``."""
        w_ih, b_ih, b_hh = (self._param(n, layer) for n in ("weight_ih", "bias_ih", "bias_hh"))
        w_hh = self._param("weight_hh", layer) if w_hh is None else w_hh
        if not x.is_floating_point():
            x = F.one_hot(x, w_ih.shape[1]).to(w_ih.dtype)  # (B, T, I): the rounds scale the input's elements
        if self.impl == "scratch":
            q, r = self._factors(layer)
            return scratch_layer(x, h, c, w_ih, w_hh, b_ih + b_hh, q, r)
        names = ("weight_ql", "weight_rl", "weight_qr", "weight_rr") if self.rank else ("weight_q", "weight_r")
        return fast_layer(x, h, c, w_ih, w_hh, b_ih + b_hh, *(self._param(n, layer) for n in names))

    def _factors(self, layer: int) -> tuple[list, list]:
        """Per round, its matrix, or at a low rank the pair (left, right) of its factors: Q rounds, R rounds."""
        if not self.rank:
            q, r = self._param("weight_q", layer), self._param("weight_r", layer)
            return list(q), [] if r is None else list(r)
        ql, qr, rl, rr = (self._param(n, layer) for n in ("weight_ql", "weight_qr", "weight_rl", "weight_rr"))
        return list(zip(ql, qr)), [] if rl is None else list(zip(rl, rr))

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                f"rounds={self.rounds}, rank={self.rank}, dropout={self.dropout}, impl={self.impl}")


def _times(v: torch.Tensor, m) -> torch.Tensor:
    """``v @ m.T`` for a matrix ``m``, or ``(v @ right.T) @ left.T`` for the factors ``m = (left, right)``."""
    if isinstance(m, tuple):
        left, right = m
        return v @ right.t() @ left.t()
    return v @ m.t()


def scratch_layer(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b: torch.Tensor, qs: list, rs: list):
    """One Mogrifier LSTM layer over a sequence, step by step, every operation through autograd.

    ``x`` (B, T, I), ``h`` and ``c`` (B, H); ``b`` is ``b_ih + b_hh``; ``qs`` and ``rs`` are the rounds'
    matrices ``Q^1, Q^3, ...`` (I, H) and ``R^2, R^4, ...`` (H, I), or (left, right) pairs of factors. Per step::

        x = 2 * sigmoid(Q^1 h) * x           round 1: the state gates the input
        h = 2 * sigmoid(R^2 x) * h           round 2: the gated input gates the state
        ...                                  (r rounds in all)
        i, f, g, o = W_ih x + W_hh h + b     the LSTM's gates on the gated x and h
        c' = f * c + i * g                   new cell (the old cell is not gated)
        h' = o * tanh(c')                    new state

    Returns ``(out (B, T, H), h, c)``.
    """
    outputs = []
    for x_t in x.unbind(1):  # x_t: (B, I)
        h_t = h  # the state the rounds gate; the step's own h is left as it was
        for i in range(1, len(qs) + len(rs) + 1):
            if i % 2:
                x_t = 2 * torch.sigmoid(_times(h_t, qs[i // 2])) * x_t  # x^i = 2 sigmoid(Q^i h^(i-1)) * x^(i-2)
            else:
                h_t = 2 * torch.sigmoid(_times(x_t, rs[i // 2 - 1])) * h_t  # h^i = 2 sigmoid(R^i x^(i-1)) * h^(i-2)
        gates = x_t @ w_ih.t() + h_t @ w_hh.t() + b  # (B, 4H): the LSTM's four pre-activations
        i, f, g, o = gates.chunk(4, 1)  # each (B, H), in torch's order
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g  # c' = f * c + i * g
        h = o * torch.tanh(c)  # h' = o * tanh(c')
        outputs.append(h)
    return torch.stack(outputs, dim=1), h, c  # (B, T, H), (B, H), (B, H)


def _gate_order(H: int, device) -> torch.Tensor:
    """Rows that reorder the LSTM's gate blocks from (i, f, g, o) to (i, f, o, g): one sigmoid for three gates."""
    return torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(device)


def fast_layer(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
               b: torch.Tensor, q: torch.Tensor, r: torch.Tensor | None, q_right: torch.Tensor | None = None,
               r_right: torch.Tensor | None = None):
    """:func:`scratch_layer` with the rounds' matrices stacked: ``q`` (nQ, I, H) and ``r`` (nR, H, I) or None;
    at a low rank k, their left factors ``q`` (nQ, I, k) and ``r`` (nR, H, k) and the right ones ``q_right``
    (nQ, k, H) and ``r_right`` (nR, k, I). Through :class:`_MogrifierFunction` where a gradient is wanted,
    else the same forward pass keeping nothing."""
    args = (x, h, c, w_ih, w_hh, b, q, q_right, r, r_right)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _MogrifierFunction.apply(*args)
    with torch.autocast(x.device.type, enabled=False):
        out, h, c, _ = _forward(*args, keep=False)
    return out, h, c


_ONEDNN: bool | None = None  # whether oneDNN's matrix product runs in this process (tried once, on first use)


def _onednn_runs() -> bool:
    global _ONEDNN
    if _ONEDNN is None:
        try:
            x, w = torch.ones(2, 3), torch.ones(4, 3)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 2), None, "none",
                                                   [], "")
            _ONEDNN = bool(torch.backends.mkldnn.is_available() and torch.equal(y, x @ w.t()))
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN = False
    return _ONEDNN


class _Products:
    """``x @ w.T`` (plus a bias, then a sigmoid, or plus another tensor) for the fast form: through oneDNN's
    matrix product where torch has it and has it on (fp32 on a CPU; the operator that torch.compile's CPU backend
    uses), else torch's own. On a CPU, these products of a batch's few rows ran 1.5 to 2.5 times as fast through
    oneDNN as through ``torch.mm`` (docs: benchmarks). ``pack`` lays a weight out for them once per sequence."""

    def __init__(self, like: torch.Tensor):
        self.dnn = (like.device.type == "cpu" and like.dtype == torch.float32 and torch.backends.mkldnn.enabled
                    and _onednn_runs())  # (torch.backends.mkldnn.flags(enabled=False) turns it off, as for torch's)

    def pack(self, w: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows) if self.dnn else w

    def __call__(self, x, w, b=None, sigmoid: bool = False) -> torch.Tensor:
        if self.dnn:
            return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(w), b, "sigmoid" if sigmoid else "none", [],
                                                      "")
        y = x @ w.t() if b is None else torch.addmm(b, x, w.t())
        return y.sigmoid_() if sigmoid else y

    def add(self, other, x, w) -> torch.Tensor:
        """``other + x @ w.T``, a new tensor."""
        if self.dnn:
            return torch.ops.mkldnn._linear_pointwise.binary(_dense(x), other, _dense(w), None, "add")
        return torch.addmm(other, x, w.t())


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where it is neither contiguous nor the transpose of a contiguous matrix (a
    slice of columns): oneDNN multiplies such a layout through a path a thousand times as slow."""
    if t.layout != torch.strided or t.is_contiguous() or t.t().is_contiguous():
        return t
    return t.contiguous()


def _rounds(q, q_right, r, r_right) -> list:
    """Per round, in order: (left, right) of its matrix ``left @ right``, right None for a full matrix."""
    nq, nr = q.shape[0], 0 if r is None else r.shape[0]
    pick = lambda m, j: None if m is None else m[j]  # noqa: E731
    return [(q[i // 2], pick(q_right, i // 2)) if i % 2 == 0 else (r[i // 2], pick(r_right, i // 2))
            for i in range(nq + nr)]


def _forward(x, h, c, w_ih, w_hh, b, q, q_right, r, r_right, keep: bool):
    """The fast forward pass: ``(out (B, T, H), h, c, saved)``; ``saved`` holds what the backward pass reads
    (every step's intermediates) when ``keep``, else None (one step's buffers, reused)."""
    B, T, I = x.shape
    H = h.shape[1]
    mm = _Products(x)
    mats = _rounds(q, q_right, r, r_right)
    nq = (len(mats) + 1) // 2
    nr = len(mats) - nq
    order = _gate_order(H, x.device)
    w_cat = torch.cat([w_ih, w_hh], 1)[order]  # (4H, I + H), gates (i, f, o, g): [x | h] times this is the LSTM's
    b = b[order]
    S = T if keep else 1  # steps the buffers hold
    new = lambda *shape: x.new_empty(S, *shape)  # noqa: E731
    xh = new(B, I + H)  # the last x and h of each step, side by side: the LSTM's input
    first = x.transpose(0, 1) if keep else new(B, I)  # (S, B, I): the input x^-1
    xs = [first] + [new(B, I) for _ in range(nq - 1)] + [xh[..., :I]]  # x^-1, x^1, ..., the last
    hs = [new(B, H) for _ in range(nr)] + [xh[..., I:]]  # h^0, h^2, ..., the last
    rounds = []  # per round: its source, its target before and after, its matrices (packed), gates and products
    for i, (left, right) in enumerate(mats):
        j = i // 2
        src, before, after = (hs[j], xs[j], xs[j + 1]) if i % 2 == 0 else (xs[j + 1], hs[j], hs[j + 1])
        mid = None if right is None else new(B, right.shape[0])  # source @ right.T, (S, B, k)
        rounds.append((src, before, after, mm.pack(left, B), None if right is None else right.t(), [None] * S, mid))
    acts, cs, tc = [None] * S, x.new_empty(S + 1, B, H), new(B, H)  # gates (i, f, o, g); c before and after; tanh c
    out = x.new_empty(B, T, H)
    w_packed = mm.pack(w_cat, B)
    cs[0] = c
    for t in range(T):
        s, s1 = (t, t + 1) if keep else (0, 1)
        if not keep:
            first[0] = x[:, t]
        hs[0][s] = h
        for src, before, after, left, right_t, gates, mid in rounds:  # after = before * 2 sigmoid(M src)
            v = src[s] if right_t is None else torch.mm(src[s], right_t, out=mid[s])
            gates[s] = gate = mm(v, left, sigmoid=True).mul_(2)
            torch.mul(before[s], gate, out=after[s])
        acts[s] = a = mm(xh[s], w_packed, b)  # (B, 4H)
        a[:, :3 * H].sigmoid_()
        a[:, 3 * H:].tanh_()
        i_, f, o, g = a.chunk(4, 1)
        torch.mul(f, cs[s], out=cs[s1]).addcmul_(i_, g)  # c' = f * c + i * g
        h = torch.mul(o, torch.tanh(cs[s1], out=tc[s]), out=out[:, t])  # h' = o * tanh(c')
        if not keep:
            cs[0] = cs[1]
    c = cs[-1].clone()
    saved = (w_cat, order, mats, rounds, acts, cs, tc, xh) if keep else None
    return out, h.clone(), c, saved


def _backward(saved, dout, dh, dc):
    """The gradients of ``_forward``'s inputs, given those of its outputs (None: zero)."""
    w_cat, order, mats, rounds, acts, cs, tc, xh = saved
    T, B, H = tc.shape
    I = xh.shape[2] - H  # noqa: E741
    mm = _Products(xh)
    dh = xh.new_zeros(B, H) if dh is None else dh.clone()
    dc = xh.new_zeros(B, H) if dc is None else dc.clone()
    dgates = xh.new_empty(T, B, 4 * H)  # the pre-activations' gradients, (i, f, o, g)
    dpre = [xh.new_empty(T, B, left.shape[0]) for left, _ in mats]  # each round's pre-activation's gradient
    dmid = [None if mid is None else torch.empty_like(mid) for *_, mid in rounds]
    w_t = mm.pack(w_cat.t(), B)  # (I + H, 4H): the gates' gradient times this is the last x's and h's
    lefts_t = [mm.pack(left.t(), B) for left, _ in mats]
    dx = xh.new_empty(T, B, I)
    for t in range(T - 1, -1, -1):
        if dout is not None:
            dh += dout[:, t]
        a, d = acts[t], dgates[t]
        i_, f, o, g = a.chunk(4, 1)
        di, df, do, dg = d.chunk(4, 1)
        dc.addcmul_(dh * o, 1 - tc[t] * tc[t])  # through h = o * tanh(c)
        torch.mul(dc, g, out=di)
        torch.mul(dc, cs[t], out=df)
        torch.mul(dh, tc[t], out=do)
        sig = a[:, :3 * H]
        d[:, :3 * H].mul_(sig - sig * sig)  # the sigmoid's derivative, for i, f and o at once
        torch.mul(dc, i_, out=dg).mul_(1 - g * g)
        dc.mul_(f)  # the previous step's cell
        dxh = mm(d, w_t)  # (B, I + H): the gradients of the last x and h
        dxc, dhc = dxh[:, :I], dxh[:, I:]  # the gradients of the current x and h
        for i in range(len(rounds) - 1, -1, -1):
            _, before, _, _, _, gates, _ = rounds[i]
            right = mats[i][1]
            s = gates[t]  # after = before * s, s = 2 sigmoid(pre); its derivative: 2 sigmoid (1 - sigmoid) = s (1 - s/2)
            d_after = dxc if i % 2 == 0 else dhc
            pre = torch.mul(d_after, before[t], out=dpre[i][t]).mul_(s * (1 - 0.5 * s))
            d_after.mul_(s)  # now the gradient of `before`
            d_src = dhc if i % 2 == 0 else dxc  # the source's gradient so far, to add to
            if right is None:
                d_src = mm.add(d_src, pre, lefts_t[i])  # + pre @ M
            else:  # + (pre @ left) @ right, the middle kept for the factors' gradients
                dmid[i][t] = back = mm(pre, lefts_t[i])
                d_src = torch.addmm(d_src, back, right)
            if i % 2 == 0:
                dhc = d_src
            else:
                dxc = d_src
        dx[t] = dxc
        dh.copy_(dhc)
    # the weights' gradients: one product each over all T * B rows
    flat = dgates.view(T * B, 4 * H)
    rows = lambda m: m.reshape(T * B, m.shape[-1])  # noqa: E731
    inverse = torch.argsort(order)
    dw_cat = mm(flat.t(), rows(xh).t())[inverse]  # (4H, I + H), back in torch's gate order
    db = flat.sum(0)[inverse]
    d_left, d_right = [], []
    for (src, *_, mid), dp, dm in zip(rounds, dpre, dmid):
        d_left.append(mm(rows(dp).t(), rows(src if mid is None else mid).t()))  # (out, in) or (out, k)
        d_right.append(None if mid is None else mm(rows(dm).t(), rows(src).t()))  # (k, in)
    stack = lambda ms: torch.stack(ms) if ms and ms[0] is not None else None  # noqa: E731
    return (dx.transpose(0, 1), dh, dc, dw_cat[:, :I], dw_cat[:, I:], db, stack(d_left[0::2]), stack(d_right[0::2]),
            stack(d_left[1::2]), stack(d_right[1::2]))


class _MogrifierFunction(torch.autograd.Function):
    """``_forward`` and ``_backward`` (the fast form's passes) as one autograd node per layer and sequence (in
    fp32 or the weights' own type, autocast or not: a low precision has no fused kernel to gain here)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b, q, q_right, r, r_right):
        with torch.autocast(x.device.type, enabled=False):
            out, h, c, ctx.saved = _forward(x, h, c, w_ih, w_hh, b, q, q_right, r, r_right, keep=True)
        return out, h, c

    @staticmethod
    def backward(ctx, dout, dh, dc):
        with torch.autocast(ctx.saved[0].device.type, enabled=False):
            return _backward(ctx.saved, dout, dh, dc)
