"""Text generation: warm the state up on a prefix, then continue one character at a time.

Decoding: temperature 0 is greedy (argmax); otherwise the logits are divided by the temperature,
filtered by top-k and then top-p (nucleus), and a character is drawn by inverting the cumulative
distribution at a uniform number.

Reproducibility: every sample has its own uniform stream, from a ``torch.Generator`` seeded from
``(seed, sample index)``. So a seed gives the same text on every run, and sample ``i`` of a batch of
``N`` is the sample that a batch of one with the same stream gives: batching changes the speed,
not the text (up to float rounding of logits at a tie).

Speed: after the prefix (one ``model.forward`` call, cuDNN on GPUs), each step runs ``_Stepper``
on the model's own weights under ``inference_mode``: a table lookup for the first layer's input,
one matmul per layer and the cell's pointwise ops in place, with no autograd and no module
dispatch. One greedy sequence on a CPU reads each argmax as a Python int and indexes the table with
it; other cases keep the ids on the device. On a CPU, one sequence's wide matmuls are split over
the threads, and 2 to 8 sequences run on one thread.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
_BLOCK = 1024  # uniforms drawn per sample at a time
_SINGLE_THREAD_MAX_N = 8  # decode 2 to this many samples on one CPU thread
_MIN_BLOCK_BYTES = 512 * 1024  # weights per thread, at least, when one sequence's products are split (_Stepper._matmul)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, length: int = 0) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top-p must lie in (0, 1], got {top_p}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the nucleus of mass ``top_p``.

    The nucleus is the smallest set of most probable characters whose probabilities sum to at
    least ``top_p`` (ties at its edge are broken by index order).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the more probable characters
        drop_sorted = mass_before >= top_p  # already reached p without this character
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class _Uniforms:
    """One reproducible stream of uniforms per sample."""

    def __init__(self, seed: int | None, num_samples: int, device):
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generators = []
        for i in range(num_samples):
            s = int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1)
            self.generators.append(torch.Generator().manual_seed(s))
        self.device, self.block, self.pos = device, None, _BLOCK

    def next(self) -> torch.Tensor:
        if self.pos == _BLOCK:
            self.block = torch.stack([torch.rand(_BLOCK, generator=g, dtype=torch.float64) for g in self.generators],
                                     1).to(self.device)  # (BLOCK, N)
            self.pos = 0
        u = self.block[self.pos]
        self.pos += 1
        return u  # (N,)


def _no_unk(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with the ``<unk>`` column (id 0) at -inf: generation never emits it."""
    logits = logits.clone()
    logits[..., 0] = float("-inf")
    return logits


def _draw(logits: torch.Tensor, temperature, top_k, top_p, uniforms: _Uniforms | None) -> torch.Tensor:
    """Next ids (N,) from logits (N, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    cdf = logits.softmax(-1).double().cumsum(-1)  # (N, V)
    u = uniforms.next().unsqueeze(1) * cdf[:, -1:]  # scale by the total: no drift past 1
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[-1] - 1)


class _Stepper:
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
    """

    def __init__(self, model, num_samples: int, threads: int = 1):
        cfg = model.config
        self.cell, L, V, H = cfg.cell, cfg.num_layers, cfg.vocab_size, cfg.hidden_size
        N, GH = num_samples, _GATES[cfg.cell] * cfg.hidden_size
        head = model.head.weight
        new = lambda *shape: torch.zeros(*shape, device=head.device, dtype=head.dtype)  # noqa: E731
        order = None
        if self.cell == "lstm":  # rows (i, f, g, o) -> (i, f, o, g)
            order = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
            order = order.to(head.device)

        def param(name, k):
            p = getattr(model.rnn, f"{name}_l{k}").detach()
            return p if order is None else p[order]

        inputs = (model.embedding.weight.detach() if model.embedding is not None
                  else torch.eye(V, device=head.device, dtype=head.dtype))
        self.table = torch.addmm(param("bias_ih", 0), inputs, param("weight_ih", 0).t())  # (V, GH)
        self.h = [new(N, H) for _ in range(L)]
        self.c = [new(N, H) for _ in range(L)] if self.cell == "lstm" else None
        self.out, self.blocks, self.mm, above = [], [], [], []  # mm: per layer, (op, inputs, out) of its matmul
        for k in range(L):
            if k + 1 < L:
                w, b = param("weight_ih", k + 1), param("bias_ih", k + 1)
            else:
                w, b = head.detach(), _no_unk(model.head.bias.detach())  # <unk> is never generated
            above.append(w.shape[0])
            C = w.shape[0] + GH
            blocks = max(1, min(threads, H * C * head.element_size() // _MIN_BLOCK_BYTES)) if N == 1 else 1  # _matmul
            self.blocks.append(blocks)
            self.out.append(new(N, C + -C % blocks))  # padded to a multiple of the blocks
            w = torch.cat([w, param("weight_hh", k)]).t().contiguous()  # (H, C)
            b = torch.cat([b, param("bias_hh", k)])
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
        block then waits for every thread, a cost that only large products repay. On this
        project's shared 2-core CPU (medians of 12 alternating rounds; the machine has quiet and
        busy periods): a 2 x LSTM 320 step (3.3 and 1.7 MB of weights) 80 -> 53 us quiet, 74 -> 67
        us busy; a GRU 256 step (0.8 MB) 15.6 -> 13.2 us quiet but 14.9 -> 18.4 us busy. Hence at
        least ``_MIN_BLOCK_BYTES`` of weights per block: the GRU 256 stays on one thread.
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


def iter_generate(model, vocab, prefix: str, length: int, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, num_samples: int = 1,
                  fast: bool = True, chunk: int = 32) -> Iterator[list[str]]:
    """Yield, every ``chunk`` steps, the next characters of each of the ``num_samples`` continuations."""
    check_sampling(temperature, top_k, top_p, length)
    if num_samples < 1:
        raise ValueError(f"num-samples must be >= 1, got {num_samples}")
    prefix_ids = vocab.encode(prefix)  # raises ValueError naming unknown characters
    device = next(model.parameters()).device
    was_training = model.training
    threads = torch.get_num_threads()
    model.eval()
    try:
        with torch.inference_mode():
            N = num_samples
            uniforms = _Uniforms(seed, N, device) if temperature > 0 else None
            if len(prefix_ids):
                X = torch.as_tensor(prefix_ids.astype(np.int64), device=device).expand(N, -1)  # (N, P)
                logits, state = model(X)
                logits = _no_unk(logits[:, -1])  # (N, V)
            else:  # an empty prefix: zero state, and the first character predicted from it
                state = model.init_state(N, device=device)
                logits = None
            cpu = device.type == "cpu"
            if fast:
                stepper = _Stepper(model, N, threads=threads if cpu else 1)
                stepper.start(state)
                if logits is not None:
                    stepper.logits.copy_(logits)  # the prefix's own prediction, as the plain path has it
                logits = stepper.logits  # a view the steps write into
            elif logits is None:
                h = state[0] if isinstance(state, tuple) else state
                logits = _no_unk(model.head(h[-1]))
            itos = vocab.itos
            # A step on a few sequences is a handful of vector-sized ops: splitting each across
            # threads costs more than it saves, except one sequence's matmuls (see _Stepper._matmul).
            if cpu and (1 < N <= _SINGLE_THREAD_MAX_N or (N == 1 and not fast)):
                torch.set_num_threads(1)
            if fast and N == 1 and temperature == 0 and cpu:
                yield from _greedy_one(stepper, itos, length, chunk)
                return
            pending = []  # ids of the last few steps: decoded in one go, not one .tolist() per step
            for t in range(length):
                ids = _draw(logits, temperature, top_k, top_p, uniforms)  # (N,)
                pending.append(ids)
                if len(pending) == chunk or t + 1 == length:
                    block = torch.stack(pending, 1).tolist()  # (N, steps)
                    pending = []
                    yield ["".join(itos[i] for i in row) for row in block]
                if t + 1 == length:
                    break
                if fast:
                    stepper.step(ids)
                else:  # the plain path: one model.forward call per character (d2l's predict_ch8)
                    out, state = model(ids.unsqueeze(1), state)
                    logits = _no_unk(out[:, -1])
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)  # (between yields, the caller too runs on the one thread)


def _greedy_one(stepper: _Stepper, itos, length: int, chunk: int) -> Iterator[list[str]]:
    """Greedy decoding of one sequence on the CPU: the argmax read as a Python int picks the table row."""
    logits, step = stepper.logits, stepper.step
    for start in range(0, length, chunk):
        ids = []
        for t in range(start, min(start + chunk, length)):
            i = int(logits.argmax())
            ids.append(i)
            if t + 1 < length:
                step(i)
        yield ["".join(itos[i] for i in ids)]


def generate(model, vocab, prefix: str, length: int = 100, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, num_samples: int = 1, fast: bool = True):
    """The prefix and its continuation: a string, or a list of ``num_samples`` strings."""
    parts = [[prefix] for _ in range(num_samples)]
    for chars in iter_generate(model, vocab, prefix, length, temperature, top_k, top_p, seed, num_samples, fast):
        for p, c in zip(parts, chars):
            p.append(c)
    texts = ["".join(p) for p in parts]
    return texts[0] if num_samples == 1 else texts
