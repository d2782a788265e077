"""Text generation: warm the state up on a prefix, then continue one character at a time.

Decoding: temperature 0 is greedy (argmax); otherwise the logits are divided by the temperature,
filtered by top-k and then top-p (nucleus), and a character is drawn by inverting the cumulative
distribution at a uniform number.

Reproducibility: every sample has its own uniform stream, from a ``torch.Generator`` seeded from
``(seed, sample index)``. So a seed gives the same text on every run, and sample ``i`` of a batch of
``N`` is the sample that a batch of one with the same stream gives: batching changes the speed,
not the text (up to float rounding of logits at a tie).

Speed: after the prefix (one ``model.forward`` call, cuDNN on GPUs), each step calls the fused
ATen cell ops (``torch.gru_cell`` etc., the ones ``nn.GRUCell`` uses) on the model's own weights
under ``inference_mode``: no autograd, no module dispatch, the state in place.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

_CELL_OPS = {"rnn": torch.rnn_tanh_cell, "gru": torch.gru_cell, "lstm": torch.lstm_cell}
_BLOCK = 1024  # uniforms drawn per sample at a time
_SINGLE_THREAD_MAX_N = 8  # decode this many samples or fewer on one CPU thread


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
    """One character step for N sequences with the fused cell ops and the model's weights."""

    def __init__(self, model):
        cfg = model.config
        self.cell, self.L, self.V = cfg.cell, cfg.num_layers, cfg.vocab_size
        core = model.rnn
        self.layers = [tuple(getattr(core, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                       for k in range(self.L)]
        # Layer 0 reads a one-hot row or an embedding row, looked up in a (V, I) table.
        self.inputs = (model.embedding.weight if model.embedding is not None
                       else torch.eye(self.V, device=model.head.weight.device, dtype=model.head.weight.dtype))
        self.head_w_t = model.head.weight.t()
        self.head_b = _no_unk(model.head.bias)  # <unk> gets -inf: it is never generated
        self.op = _CELL_OPS[self.cell]

    def step(self, ids: torch.Tensor, state):
        """ids (N,) -> logits (N, V); ``state`` is a list per layer of h, or of (h, c), updated."""
        x = self.inputs[ids]  # (N, I)
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.layers):
            if self.cell == "lstm":
                h, c = self.op(x, state[k], w_ih, w_hh, b_ih, b_hh)
                state[k] = (h, c)
            else:
                h = self.op(x, state[k], w_ih, w_hh, b_ih, b_hh)
                state[k] = h
            x = h
        return torch.addmm(self.head_b, x, self.head_w_t)  # (N, V)

    def split_state(self, state):
        """Model state (L, N, H) or ((L, N, H), (L, N, H)) -> list per layer."""
        if self.cell == "lstm":
            return [(state[0][k], state[1][k]) for k in range(self.L)]
        return [state[k] for k in range(self.L)]


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
            stepper = _Stepper(model) if fast else None
            layer_state = stepper.split_state(state) if fast else None
            if logits is None:
                if fast:
                    h_top = layer_state[-1][0] if model.config.cell == "lstm" else layer_state[-1]
                    logits = torch.addmm(stepper.head_b, h_top, stepper.head_w_t)
                else:
                    h = state[0] if isinstance(state, tuple) else state
                    logits = _no_unk(model.head(h[-1]))
            itos = vocab.itos
            # A step on a few sequences is a handful of vector-sized ops: splitting each across
            # threads costs more than it saves (1 thread: ~10% more characters/s at N=1, hidden 256).
            if N <= _SINGLE_THREAD_MAX_N and device.type == "cpu":
                torch.set_num_threads(1)
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
                    logits = stepper.step(ids, layer_state)
                else:  # the plain path: one model.forward call per character (d2l's predict_ch8)
                    out, state = model(ids.unsqueeze(1), state)
                    logits = _no_unk(out[:, -1])
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)  # (between yields, the caller too runs on the one thread)


def generate(model, vocab, prefix: str, length: int = 100, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, num_samples: int = 1, fast: bool = True):
    """The prefix and its continuation: a string, or a list of ``num_samples`` strings."""
    parts = [[prefix] for _ in range(num_samples)]
    for chars in iter_generate(model, vocab, prefix, length, temperature, top_k, top_p, seed, num_samples, fast):
        for p, c in zip(parts, chars):
            p.append(c)
    texts = ["".join(p) for p in parts]
    return texts[0] if num_samples == 1 else texts
