"""The fast inference step: the cells' equations again, on an ``RNNLM``'s own weights, for decoding.

:mod:`charlm.sample` decides what to emit; this module only advances the state by one character
and leaves the next logits in a buffer. It reads the parameters of ``model.rnn`` by torch's names
(``weight_ih_l0``, ...; the scratch cells use the same) and mirrors the equations of
:mod:`charlm.models.scratch`; the tests check it against ``RNNLM.forward`` for every cell, impl and
input kind.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from charlm.config import GATES
from charlm.models.mogrifier import round_counts
from charlm.models.rnnlm import RNNLM

MIN_BLOCK_BYTES = 512 * 1024  # weights per thread, at least, when one sequence's products are split (Stepper._matmul)


def lstm_gate_order(hidden_size: int, device=None) -> torch.Tensor:
    """Row indices that reorder an LSTM weight's gate blocks from torch's (i, f, g, o) to (i, f, o, g),
    so that one sigmoid covers the three sigmoid gates."""
    H = hidden_size
    return torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(device)


def step_bytes(cell: str, num_layers: int, hidden_size: int, vocab_size: int, embedding_dim: int = 0,
               mogrify_rounds: int = 0) -> int:
    """Bytes of fp32 weights one character's step reads: each layer's ``W_hh``, ``W_ih`` above layer 0 and
    the head (layer 0's input projection is a row of a table); a mogrifier's also layer 0's ``W_ih`` (its
    input is gated first) and every layer's round matrices (``mogrify_rounds`` of ``I x H``). What sets the
    speed of a step on few sequences, and so how many threads it repays."""
    G, H = GATES[cell], hidden_size
    weights = G * H * H * (2 * num_layers - 1) + H * vocab_size
    if cell == "mogrifier":
        first = embedding_dim or vocab_size  # layer 0's input size
        weights += G * H * first + mogrify_rounds * H * (first + H * (num_layers - 1))
    return 4 * weights


class Stepper:
    """One character step for N sequences: one matmul per layer, every result in a buffer made once.

    - Layer 0's input gates, ``W_ih x + b_ih``, depend only on the character: a table of V rows,
      computed once (a one-hot row picks a column of ``W_ih``; an embedding row is a constant).
    - The new state of layer k is multiplied once, by ``[W_ih of layer k+1 | W_hh of layer k]``
      (``[W_head | W_hh]`` at the top): this step's input gates of the layer above (or the logits)
      and the next step's hidden gates of layer k come out of one ``addmm``.
    - The pointwise part is the cells' formulas (those of ``torch.gru_cell`` etc.) on views made
      once, written in place; the GRU's last update is one ``lerp``, and the LSTM's gate rows are
      reordered to (i, f, o, g) so that one sigmoid covers three gates. The text equals the plain
      ``model.forward`` path's (tested); the floats may differ from it in the last bit.

    ``never`` is an id whose logit is held at -inf (default: ``<unk>``, id 0, which generation never
    emits); ``None`` keeps every logit. ``threads`` > 1 lets one sequence's wide products be split
    over the CPU threads (see :meth:`_matmul`). A mogrifier model gets a :class:`MogrifierStepper`.
    """

    def __new__(cls, model: RNNLM, *args, **kwargs):
        if cls is Stepper and model.config.cell == "mogrifier":
            cls = MogrifierStepper
        return super().__new__(cls)

    def __init__(self, model: RNNLM, num_samples: int, threads: int = 1, never: int | None = 0,
                 like: "Stepper | None" = None):
        cfg = model.config
        self.cell, L, V, H = cfg.cell, cfg.num_layers, cfg.vocab_size, cfg.hidden_size
        N, GH = num_samples, GATES[cfg.cell] * cfg.hidden_size
        head = model.head.weight
        new = lambda *shape: torch.zeros(*shape, device=head.device, dtype=head.dtype)  # noqa: E731
        # The prepared weights: from ``like`` (another Stepper of the same model, any N), or made here.
        self.weights = like.weights if like is not None else self._prepare(model, never)
        self.table = self.weights[0]  # (V, GH): layer 0's input gates per character
        self.h = [new(N, H) for _ in range(L)]
        self.c = [new(N, H) for _ in range(L)] if self.cell == "lstm" else None
        self.out, self.blocks, self.mm, above = [], [], [], []  # mm: per layer, (op, inputs, out) of its matmul
        for k, (w, b) in enumerate(self.weights[1]):  # w: (H, C), b: (C,)
            C = w.shape[1]
            above.append(C - GH)
            blocks = max(1, min(threads, H * C * head.element_size() // MIN_BLOCK_BYTES)) if N == 1 else 1  # _matmul
            self.blocks.append(blocks)
            self.out.append(new(N, C + -C % blocks))  # padded to a multiple of the blocks
            self.mm.append(self._matmul(w, b, self.h[k], self.out[k], blocks))
        self.logits = self.out[-1][:, :V]  # (N, V): after start() or step(), the next prediction
        self.gi0 = new(N, GH)  # layer 0's input gates for a batch, gathered from the table
        # Per layer, the views its cell step reads and writes: split once here, so a step slices nothing.
        if self.cell == "gru":  # (r, z) and n
            self.gi_views = lambda gi: (gi[:, :2 * H], gi[:, 2 * H:])  # noqa: E731
        else:
            self.gi_views = lambda gi: (gi,)  # noqa: E731
        self.layers = []
        for k in range(L):
            gi = self.gi0 if k == 0 else self.out[k - 1][:, :GH]
            self.layers.append(self.gi_views(gi) + self._state_views(self.out[k][:, above[k]:above[k] + GH], k))
        self.upper = list(zip(self.layers[1:], self.mm[1:]))
        self.cell_step = {"rnn": self._rnn, "gru": self._gru, "lstm": self._lstm}[self.cell]

    @staticmethod
    def _prepare(model: RNNLM, never: int | None) -> tuple:
        """(table, [(w, b) per layer]): layer 0's input-gate table, and each layer's ``[W_ih above | W_hh]``
        (``[W_head | W_hh]`` at the top) transposed to (H, C) with its bias; LSTM gate rows as (i, f, o, g)."""
        cfg = model.config
        L, V, H = cfg.num_layers, cfg.vocab_size, cfg.hidden_size
        head = model.head.weight
        order = lstm_gate_order(H, head.device) if cfg.cell == "lstm" else None

        def param(name, k):
            p = getattr(model.rnn, f"{name}_l{k}").detach()
            return p if order is None else p[order]

        inputs = (model.embedding.weight.detach() if model.embedding is not None
                  else torch.eye(V, device=head.device, dtype=head.dtype))
        table = torch.addmm(param("bias_ih", 0), inputs, param("weight_ih", 0).t())  # (V, GH)
        layers = []
        for k in range(L):
            if k + 1 < L:
                w, b = param("weight_ih", k + 1), param("bias_ih", k + 1)
            else:
                w, b = head.detach(), model.head.bias.detach().clone()
                if never is not None:
                    b[never] = float("-inf")  # that id's logit: never the argmax, never drawn
            layers.append((torch.cat([w, param("weight_hh", k)]).t().contiguous(), torch.cat([b, param("bias_hh", k)])))
        return table, layers

    @functools.cached_property
    def rows(self) -> list[tuple]:
        """Per character, layer 0's views with the table's row as its input gates (one sequence: no gather)."""
        n_gi = len(self.gi_views(self.gi0))
        return [self.gi_views(self.table[v: v + 1]) + self.layers[0][n_gi:] for v in range(len(self.table))]

    @staticmethod
    def _matmul(w, b, h, out, blocks: int):
        """A layer's product ``out = b + h @ w``: (op, inputs, out) for ``op(*inputs, out=out)``.

        torch runs one sequence's product, (1 x H) @ (H x C), on one thread. Split into column
        blocks, it becomes a batched matmul, whose matrices ATen spreads over its threads; each
        block then waits for every thread, a cost that only large products repay: hence at least
        ``MIN_BLOCK_BYTES`` of weights per block (the README's generation benchmark has the
        measurements behind that threshold).
        """
        if blocks == 1:
            return torch.addmm, (b, h, w), out
        (H, C), width = w.shape, out.shape[1] // blocks
        w = F.pad(w, (0, width * blocks - C)).reshape(H, blocks, width)
        w = w.transpose(0, 1).contiguous()  # (blocks, H, width): block j holds columns j*width ... (j+1)*width - 1
        b = F.pad(b, (0, width * blocks - C)).view(blocks, 1, width)
        return torch.baddbmm, (b, h.expand(blocks, 1, H), w), out.view(blocks, 1, width)

    def _state_views(self, gh, k):
        h = self.h[k]
        N, H = h.shape
        if self.cell == "rnn":
            return gh, h
        if self.cell == "gru":
            rz = h.new_empty((N, 2 * H))
            return gh[:, :2 * H], gh[:, 2 * H:], rz, rz[:, :H], rz[:, H:], torch.empty_like(h), h
        g = h.new_empty((N, 4 * H))  # pre-activations, then activations, in place
        return (gh, g, g[:, :3 * H], g[:, 3 * H:], g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H],
                torch.empty_like(h), self.c[k], h)

    @staticmethod
    def _rnn(views):
        gi, gh, h = views
        torch.add(gi, gh, out=h).tanh_()

    @staticmethod
    def _gru(views):
        gi_rz, gi_n, gh_rz, gh_n, rz, r, z, n, h = views
        torch.add(gi_rz, gh_rz, out=rz).sigmoid_()
        torch.addcmul(gi_n, r, gh_n, out=n).tanh_()  # n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        torch.lerp(n, h, z, out=h)  # h' = n + z * (h - n) = (1 - z) * n + z * h, one op instead of three

    @staticmethod
    def _lstm(views):
        gi, gh, g, ifo, cand, i, f, o, tmp, c, h = views
        torch.add(gi, gh, out=g)
        ifo.sigmoid_()
        cand.tanh_()
        c.mul_(f).addcmul_(i, cand)  # c' = f * c + i * g
        torch.mul(o, torch.tanh(c, out=tmp), out=h)  # h' = o * tanh(c')

    def start(self, state) -> None:
        """Take the state the prefix left, shaped as the model's: (L, N, H), or (h, c) for the LSTM."""
        h, c = state if self.cell == "lstm" else (state, None)
        for k in range(len(self.h)):
            self.h[k].copy_(h[k])
            if c is not None:
                self.c[k].copy_(c[k])
            op, inputs, out = self.mm[k]
            op(*inputs, out=out)

    def step(self, ids) -> None:
        """Advance every sequence by one character: ``ids`` is a (N,) tensor, or an int when N is 1."""
        if isinstance(ids, int):
            first = self.rows[ids]
        else:
            torch.index_select(self.table, 0, ids, out=self.gi0)
            first = self.layers[0]
        cell_step = self.cell_step
        cell_step(first)
        op, inputs, out = self.mm[0]
        op(*inputs, out=out)
        for views, (op, inputs, out) in self.upper:
            cell_step(views)
            op(*inputs, out=out)


class MogrifierStepper(Stepper):
    """:class:`Stepper` for the Mogrifier LSTM (:mod:`charlm.models.mogrifier`): the same attributes and
    calls (``h``, ``c``, ``logits``, ``start``, ``step``), another layout.

    A layer's input is gated before its product, so no product reaches across layers: per layer, the rounds
    (a product by each ``Q``/``R``, on the full matrices a low rank multiplies out to) write the gated ``x``
    and ``h`` side by side into one buffer, and one product by ``[W_ih | W_hh]`` (gate rows reordered to
    (i, f, o, g), as the LSTM's are here) gives the four gates; then the head. Layer 0's inputs are rows of
    a table (the embedding, or the identity for one-hot inputs).
    """

    def __init__(self, model: RNNLM, num_samples: int, threads: int = 1, never: int | None = 0,
                 like: "Stepper | None" = None):
        cfg = model.config
        self.cell, L, V, H = cfg.cell, cfg.num_layers, cfg.vocab_size, cfg.hidden_size
        N = num_samples
        head = model.head.weight
        new = lambda *shape: torch.zeros(*shape, device=head.device, dtype=head.dtype)  # noqa: E731
        self.weights = like.weights if like is not None else self._prepare(model, never)
        self.table, layers, (w_head, b_head) = self.weights
        self.h = [new(N, H) for _ in range(L)]
        self.c = [new(N, H) for _ in range(L)]
        self.x0 = new(N, self.table.shape[1])  # layer 0's inputs for a batch, gathered from the table
        self.blocks, self.plan = [], []
        for k, (qt, rt, w, b) in enumerate(layers):  # qt (nQ, H, I), rt (nR, I, H), w (I + H, 4H), b (4H,)
            I = w.shape[0] - H  # noqa: E741
            xh = new(N, I + H)  # the gated x and h, side by side
            xs = [new(N, I) for _ in range(len(qt) - 1)] + [xh[:, :I]]  # x^1, x^3, ..., the last in xh
            hs = [new(N, H) for _ in range(len(rt) - 1)] + [xh[:, I:]]  # h^2, h^4, ..., the last in xh
            rounds = [(qt[i // 2], new(N, I), xs[i // 2]) if i % 2 == 0 else (rt[i // 2], new(N, H), hs[i // 2])
                      for i in range(len(qt) + len(rt))]  # per round: its matrix, its gate, its result
            blocks = self._blocks(N, threads, w)
            acts = new(N, 4 * H + -4 * H % blocks)
            self.blocks.append(blocks)
            self.plan.append((rounds, xh, self._matmul(w, b, xh, acts, blocks), acts[:, :4 * H]))
        blocks = self._blocks(N, threads, w_head)
        self.out = new(N, V + -V % blocks)
        self.blocks.append(blocks)
        self.head_mm = self._matmul(w_head, b_head, self.h[-1], self.out, blocks)
        self.logits = self.out[:, :V]

    @staticmethod
    def _blocks(N: int, threads: int, w: torch.Tensor) -> int:
        return max(1, min(threads, w.numel() * w.element_size() // MIN_BLOCK_BYTES)) if N == 1 else 1

    @staticmethod
    def _prepare(model: RNNLM, never: int | None) -> tuple:
        """(table, [(Q^T, R^T, [W_ih | W_hh]^T, b) per layer], (W_head^T, b_head)): layer 0's inputs per
        character, each layer's round matrices transposed (R^T None-free: (0, I, H) without R rounds), its
        gate product (I + H, 4H) with the rows in (i, f, o, g) order and both biases, and the head."""
        cfg, rnn = model.config, model.rnn
        H, head = cfg.hidden_size, model.head.weight
        order = lstm_gate_order(H, head.device)
        table = (model.embedding.weight.detach() if model.embedding is not None
                 else torch.eye(cfg.vocab_size, device=head.device, dtype=head.dtype))
        layers = []
        for k in range(cfg.num_layers):
            q, r = (m.detach() if m is not None else None for m in rnn.mogrifier_matrices(k))
            p = lambda name: getattr(rnn, f"{name}_l{k}").detach()  # noqa: E731
            w = torch.cat([p("weight_ih"), p("weight_hh")], 1)[order].t().contiguous()  # (I + H, 4H)
            rt = (r.transpose(1, 2).contiguous() if r is not None
                  else q.new_empty(0, q.shape[1], H))  # (nR, I, H)
            layers.append((q.transpose(1, 2).contiguous(), rt, w, (p("bias_ih") + p("bias_hh"))[order]))
        b_head = model.head.bias.detach().clone()
        if never is not None:
            b_head[never] = float("-inf")
        return table, layers, (head.detach().t().contiguous(), b_head)

    @functools.cached_property
    def rows(self) -> list[torch.Tensor]:
        """Per character, layer 0's input as a (1, I) view of the table (one sequence: no gather)."""
        return [self.table[v: v + 1] for v in range(len(self.table))]

    def start(self, state) -> None:
        """Take the state the prefix left, ``(h, c)``, each (L, N, H)."""
        h, c = state
        for k in range(len(self.h)):
            self.h[k].copy_(h[k])
            self.c[k].copy_(c[k])
        op, inputs, out = self.head_mm
        op(*inputs, out=out)

    def step(self, ids) -> None:
        """Advance every sequence by one character: ``ids`` is a (N,) tensor, or an int when N is 1."""
        if isinstance(ids, int):
            x = self.rows[ids]
        else:
            x = torch.index_select(self.table, 0, ids, out=self.x0)
        H = self.h[0].shape[1]
        for (rounds, xh, (op, inputs, out), a), h, c in zip(self.plan, self.h, self.c):
            xcur, hcur = x, h
            for i, (m, gate, result) in enumerate(rounds):
                if i % 2 == 0:  # x <- x * 2 sigmoid(Q h)
                    xcur = torch.mul(xcur, torch.mm(hcur, m, out=gate).sigmoid_().mul_(2), out=result)
                else:  # h <- h * 2 sigmoid(R x)
                    hcur = torch.mul(hcur, torch.mm(xcur, m, out=gate).sigmoid_().mul_(2), out=result)
            if len(rounds) == 1:
                xh[:, xh.shape[1] - H:] = h  # no R round: the LSTM reads the state as it was
            op(*inputs, out=out)  # the four gates, (i, f, o, g)
            a[:, :3 * H].sigmoid_()
            a[:, 3 * H:].tanh_()
            i, f, o, g = a.chunk(4, 1)
            c.mul_(f).addcmul_(i, g)  # c' = f * c + i * g
            torch.mul(o, torch.tanh(c), out=h)  # h' = o * tanh(c')
            x = h
        op, inputs, out = self.head_mm
        op(*inputs, out=out)
