"""Recurrent layers written from scratch: a multi-layer RNN (tanh), GRU and LSTM.

These are teaching code: each gate is one line with its equation beside it. They are also exact
drop-in replacements for ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` with ``batch_first=True``:

- the same equations (https://pytorch.org/docs/stable/generated/torch.nn.GRU.html), including
  the GRU's reset gate acting on ``W_hn h + b_hn`` rather than on ``h`` as some textbooks write it;
- the same parameter names and shapes (``weight_ih_l0`` is ``(G*H, I)`` with the ``G`` gates stacked
  in torch's order: GRU ``r, z, n``; LSTM ``i, f, g, o``), so their state dicts are interchangeable;
- the same initialisation (every parameter uniform in ``±1/sqrt(H)``), the same dropout between
  layers (training only, not after the last layer), and the same state: ``(L, B, H)``, or a pair
  ``(h, c)`` of those for the LSTM.

Why they are fast (d2l's from-scratch RNN is an order of magnitude slower than torch's kernels): the input
projection ``W_ih x_t + b_ih`` does not depend on the state, so it is computed for all time steps in
one matmul before the loop; for one-hot input (``x`` given as a ``(B, T)`` tensor of indices) it is
just a lookup of columns of ``W_ih``, with no one-hot tensor at all. Only the recurrent matmul
``W_hh h`` stays inside the loop over time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import GATES, check_choice


class ScratchRecurrent(nn.Module):
    """A stack of ``num_layers`` recurrent layers of one ``cell`` type, batch first."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        check_choice("cell", cell, GATES)
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        self.num_layers, self.dropout = num_layers, dropout
        G = GATES[cell]
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(G * hidden_size, layer_input)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(G * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(G * hidden_size)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(G * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _params(self, layer: int):
        return tuple(getattr(self, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def init_state(self, batch_size: int, device=None, dtype=None):
        """Zeros: ``(L, B, H)``, or ``(h, c)`` for the LSTM."""
        w = self.weight_hh_l0
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device or w.device, dtype=dtype or w.dtype)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h

    def forward(self, x: torch.Tensor, state=None):
        """Run the stack over a whole sequence.

        ``x``: ``(B, T, I)`` floats, or ``(B, T)`` integer indices meaning one-hot vectors of size I.
        Returns ``(output (B, T, H) of the last layer, final state)``.
        """
        B = x.shape[0]
        if state is None:
            state = self.init_state(B, device=x.device)
        if self.cell == "lstm":
            h0, c0 = state
        else:
            h0, c0 = state, None
        h_last, c_last = [], []
        for layer in range(self.num_layers):
            out, h, c = self.run_layer(layer, x, h0[layer], None if c0 is None else c0[layer])
            h_last.append(h)
            c_last.append(c)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                out = F.dropout(out, self.dropout, training=True)  # between layers only, as torch does
            x = out  # (B, T, H): the next layer's input
        h_n = torch.stack(h_last)  # (L, B, H)
        return x, ((h_n, torch.stack(c_last)) if self.cell == "lstm" else h_n)

    def run_layer(self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None,
                  w_hh: torch.Tensor | None = None):
        """Layer ``layer`` over a whole sequence: ``x`` (B, T, I) floats, or (B, T) indices of one-hot
        vectors; ``h`` (and the LSTM's ``c``) (B, H). ``w_hh`` stands in for the layer's hidden-to-hidden
        matrix (a weight-dropped copy). Returns ``(out (B, T, H), h, c)``, ``c`` None but for the LSTM."""
        w_ih, own_w_hh, b_ih, b_hh = self._params(layer)
        w_hh = own_w_hh if w_hh is None else w_hh
        # Input projection for every time step at once, laid out time-major for the loop.
        # The RNN and LSTM add b_hh outside any gate product, so it joins b_ih here; the GRU's
        # b_hn sits inside r * (W_hn h + b_hn) and must stay in the loop.
        b = b_ih if self.cell == "gru" else b_ih + b_hh  # (G*H,)
        if not x.is_floating_point():
            # One-hot input: W_ih @ onehot(k) is column k of W_ih, so look the columns up in a
            # (V, G*H) table that already holds the bias: no one-hot tensor, no matmul.
            xp = F.embedding(x.t(), w_ih.t() + b)  # (T, B, G*H)
        else:
            xp = F.linear(x.transpose(0, 1), w_ih, b)  # (T, B, G*H)
        if self.cell == "gru":
            out, h = _gru_layer(xp, h, w_hh, b_hh)
        elif self.cell == "lstm":
            out, (h, c) = _lstm_layer(xp, h, c, w_hh)
        else:
            out, h = _rnn_layer(xp, h, w_hh)
        return out, h, c

    def extra_repr(self) -> str:
        return (f"{self.cell}, input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, dropout={self.dropout}")


def _rnn_layer(xp: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor):
    """Elman RNN with tanh.

    ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; ``xp`` (T, B, H) already holds
    ``W_ih x_t + b_ih + b_hh``.
    """
    w_hh_t = w_hh.t()  # (H, H), a view: addmm multiplies by the transpose without copying
    outputs = []
    for x_t in xp:  # x_t: (B, H)
        h = torch.tanh(torch.addmm(x_t, h, w_hh_t))  # h_t = tanh(x_t-part + W_hh h_{t-1})
        outputs.append(h)
    return torch.stack(outputs, dim=1), h  # (B, T, H), (B, H)


def _gru_layer(xp: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor):
    """Gated recurrent unit, torch's variant.

    ``xp`` (T, B, 3H) holds ``W_i{r,z,n} x_t + b_i{r,z,n}`` for every step. Per step::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)          reset gate
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)          update gate
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))       candidate state
        h' = (1 - z) * n + z * h                            new state
    """
    H = h.shape[1]
    w_hh_t = w_hh.t()  # (H, 3H)
    outputs = []
    for x_t in xp:  # x_t: (B, 3H)
        gh = torch.addmm(b_hh, h, w_hh_t)  # (B, 3H): W_h{r,z,n} h + b_h{r,z,n}
        rz = torch.sigmoid(x_t[:, : 2 * H] + gh[:, : 2 * H])  # (B, 2H): r and z in one call
        r, z = rz[:, :H], rz[:, H:]
        n = torch.tanh(x_t[:, 2 * H :] + r * gh[:, 2 * H :])  # the reset gate scales W_hn h + b_hn
        h = n + z * (h - n)  # = (1 - z) * n + z * h, one op fewer
        outputs.append(h)
    return torch.stack(outputs, dim=1), h  # (B, T, H), (B, H)


def _lstm_layer(xp: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor):
    """Long short-term memory.

    ``xp`` (T, B, 4H) holds ``W_i{i,f,g,o} x_t + b_i + b_h`` for every step. Per step::

        i = sigmoid(W_ii x + W_hi h + b)     input gate
        f = sigmoid(W_if x + W_hf h + b)     forget gate
        g = tanh(W_ig x + W_hg h + b)        candidate cell
        o = sigmoid(W_io x + W_ho h + b)     output gate
        c' = f * c + i * g                   new cell
        h' = o * tanh(c')                    new state
    """
    w_hh_t = w_hh.t()  # (H, 4H)
    outputs = []
    for x_t in xp:  # x_t: (B, 4H)
        gates = torch.addmm(x_t, h, w_hh_t)  # (B, 4H): all four pre-activations
        # chunk, not four slices: its backward is one concatenation instead of four padded copies
        i, f, g, o = gates.chunk(4, 1)  # each (B, H)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = torch.addcmul(f * c, i, g)  # c' = f * c + i * g
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, dim=1), (h, c)  # (B, T, H), ((B, H), (B, H))
