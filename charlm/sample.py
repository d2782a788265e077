"""Text generation: warm the state up on a prefix, then continue one character at a time.

Decoding: temperature 0 is greedy (argmax); otherwise the logits are divided by the temperature,
filtered by top-k and then top-p (nucleus), and a character is drawn by inverting the cumulative
distribution at a uniform number.

Reproducibility: every sample has its own uniform stream, from a ``torch.Generator`` seeded from
``(seed, sample index)``. So a seed gives the same text on every run, and sample ``i`` of a batch of
``N`` is the sample that a batch of one with the same stream gives: batching changes the speed,
not the text (up to float rounding of logits at a tie).

Speed: after the prefix (one ``model.forward`` call, cuDNN on GPUs), each step runs
:class:`charlm.models.stepper.Stepper` on the model's own weights under ``inference_mode``: a table lookup for the first layer's input,
one matmul per layer and the cell's pointwise ops in place, with no autograd and no module
dispatch. One sequence on a CPU (greedy or sampled) reads each id as a Python int and takes its
table row with it; other cases keep the ids on the device. On a CPU, one sequence's wide matmuls are split over
the threads, and 2 to 8 sequences run on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from charlm.config import SampleConfig
from charlm.errors import ConfigError
from charlm.models.stepper import Stepper, step_bytes

_BLOCK = 1024  # uniforms drawn per sample at a time
_SINGLE_THREAD_MAX_N = 8  # decode 2 to this many samples on one CPU thread, if the model is small:
_SINGLE_THREAD_MAX_BYTES = 768 * 1024  # a step reading fewer bytes of weights (``step_bytes``) than this
_DEFAULT = SampleConfig()
GREEDY_BELOW = 1e-30  # temperatures under this decode greedily (see DrawParams)
MAX_TEMPERATURE = 1e30
MIN_TOP_P = 1e-30


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the nucleus of mass ``top_p``.

    The nucleus is the smallest set of most probable characters whose probabilities sum to at
    least ``top_p`` (ties at its edge are broken by index order).
    """
    rows = logits.reshape(-1, logits.shape[-1])
    params = DrawParams([(1.0, top_k, top_p)] * rows.shape[0], rows.shape[-1], logits.device)
    return _filter_rows(rows, params).view_as(logits)


class DrawParams:
    """Each row's decoding settings (temperature, top-k, top-p) as tensors, so that rows with different
    settings are drawn together: a row decodes exactly as it would in a batch of its own settings."""

    def __init__(self, settings: list[tuple[float, int | None, float | None]], vocab_size: int, device):
        # float32 holds the settings: a temperature under GREEDY_BELOW is greedy (its limit; it would
        # underflow to 0), one over MAX_TEMPERATURE is that (inf would make NaN of the -inf logits), and a
        # top-p under MIN_TOP_P is that (0 would drop every character; the most probable one stays)
        temps = [0.0 if t < GREEDY_BELOW else min(t, MAX_TEMPERATURE) for t, _, _ in settings]
        self.all_greedy = all(t == 0 for t in temps)
        self.any_greedy = any(t == 0 for t in temps)
        self.greedy = torch.tensor([t == 0 for t in temps], device=device)
        self.temps = torch.tensor([[t if t > 0 else 1.0] for t in temps], dtype=torch.float32, device=device)
        # top-k: the index of the k-th largest logit (the smallest one, for rows without top-k: no effect)
        ks = [k for _, k, _ in settings]
        self.kth = None if all(k is None or k >= vocab_size for k in ks) else torch.tensor(
            [[min(k or vocab_size, vocab_size) - 1] for k in ks], device=device)
        # top-p: a mass never reached (2) for rows without it, so nothing is dropped there
        ps = [2.0 if p is None or p >= 1.0 else max(p, MIN_TOP_P) for _, _, p in settings]
        self.top_p = None if all(p == 2.0 for p in ps) else torch.tensor([[p] for p in ps], dtype=torch.float32,
                                                                          device=device)


def _filter_rows(logits: torch.Tensor, params: DrawParams) -> torch.Tensor:
    if params.kth is not None:
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, params.kth)  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the more probable characters
        drop_sorted = mass_before >= params.top_p  # already reached p without this character
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, params: DrawParams, u: torch.Tensor | None) -> torch.Tensor:
    """Next ids (N,) from logits (N, V): the argmax for greedy rows; for the others, the character where
    the row's uniform ``u`` (float64, (N,)) falls in the cumulative distribution of its filtered,
    temperature-scaled logits."""
    if params.all_greedy:
        return logits.argmax(-1)
    logits = logits.float()
    # shifted by each row's largest logit first, so that a tiny temperature cannot overflow to inf (NaN after
    # softmax): the largest is 0 at any temperature, and the others at most 0
    logits_t = _filter_rows((logits - logits.amax(-1, keepdim=True)) / params.temps, params)
    cdf = logits_t.softmax(-1).double().cumsum(-1)  # (N, V)
    idx = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)  # scaled: no drift past 1
    idx = idx.clamp_(max=logits.shape[-1] - 1)
    return torch.where(params.greedy, logits.argmax(-1), idx) if params.any_greedy else idx


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


def iter_generate(model, vocab, prefix: str, length: int = _DEFAULT.length, temperature: float = _DEFAULT.temperature,
                  top_k: int | None = _DEFAULT.top_k, top_p: float | None = _DEFAULT.top_p,
                  seed: int | None = _DEFAULT.seed, num_samples: int = _DEFAULT.num_samples,
                  fast: bool = True, chunk: int = 32) -> Iterator[list[str]]:
    """Yield, every ``chunk`` steps, the next characters of each of the ``num_samples`` continuations.

    The options are :class:`~charlm.config.SampleConfig`'s (checked there: a bad value is a
    ``ConfigError``); a prefix character outside the vocabulary is an ``UnknownCharactersError``.
    """
    SampleConfig(length, temperature, top_k, top_p, seed, num_samples)  # validates
    prefix_ids = vocab.encode(prefix)
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
                stepper = Stepper(model, N, threads=threads if cpu else 1)
                stepper.start(state)
                if logits is not None:
                    stepper.logits.copy_(logits)  # the prefix's own prediction, as the plain path has it
                logits = stepper.logits  # a view the steps write into
            elif logits is None:
                h = state[0] if isinstance(state, tuple) else state
                logits = _no_unk(model.head(h[-1]))
            itos = vocab.itos
            params = DrawParams([(temperature, top_k, top_p)] * N, logits.shape[-1], device)
            # A small model's step on a few sequences is a handful of vector-sized ops: splitting each
            # across threads costs more than it saves (2-8 samples on two threads: RNN 256 5-14% slower,
            # 2 x GRU 128 0-9%), while a large one's is bound by reading its weights, which two threads
            # do faster (2 x LSTM 320: 17-25%); one sequence's matmuls: see Stepper._matmul.
            cfg = model.config
            small = step_bytes(cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.embedding_dim,
                               cfg.mogrify_rounds) < _SINGLE_THREAD_MAX_BYTES
            if cpu and ((1 < N <= _SINGLE_THREAD_MAX_N and small) or (N == 1 and not fast)):
                torch.set_num_threads(1)
            if fast and N == 1 and temperature == 0 and cpu:
                yield from _greedy_one(stepper, itos, length, chunk)
                return
            pending = []  # ids of the last few steps: decoded in one go, not one .tolist() per step
            one = fast and N == 1 and cpu  # one sequence on a CPU: the id as an int picks its table row (no gather)
            for t in range(length):
                ids = draw(logits, params, uniforms.next() if uniforms else None)  # (N,)
                pending.append(ids)
                if len(pending) == chunk or t + 1 == length:
                    block = torch.stack(pending, 1).tolist()  # (N, steps)
                    pending = []
                    yield ["".join(itos[i] for i in row) for row in block]
                if t + 1 == length:
                    break
                if one:
                    stepper.step(int(ids))
                elif fast:
                    stepper.step(ids)
                else:  # the plain path: one model.forward call per character (d2l's predict_ch8)
                    out, state = model(ids.unsqueeze(1), state)
                    logits = _no_unk(out[:, -1])
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)  # (between yields, the caller too runs on the one thread)


def _greedy_one(stepper: Stepper, itos, length: int, chunk: int) -> Iterator[list[str]]:
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


def generate(model, vocab, prefix: str, length: int = _DEFAULT.length, temperature: float = _DEFAULT.temperature,
             top_k: int | None = _DEFAULT.top_k, top_p: float | None = _DEFAULT.top_p, seed: int | None = _DEFAULT.seed,
             num_samples: int = _DEFAULT.num_samples, fast: bool = True):
    """The prefix and its continuation: a string, or a list of ``num_samples`` strings."""
    parts = [[prefix] for _ in range(num_samples)]
    for chars in iter_generate(model, vocab, prefix, length, temperature, top_k, top_p, seed, num_samples, fast):
        for p, c in zip(parts, chars):
            p.append(c)
    texts = ["".join(p) for p in parts]
    return texts[0] if num_samples == 1 else texts


def tie_margin(model, vocab, prefix: str, text: str, position: int, temperature: float = _DEFAULT.temperature,
               top_k: int | None = _DEFAULT.top_k, top_p: float | None = _DEFAULT.top_p,
               seed: int | None = _DEFAULT.seed) -> float:
    """How close to a tie the character at ``position`` of ``text`` (a continuation of ``prefix`` with these
    options) was: for temperature sampling, the distance from the sample's uniform (scaled to the
    distribution's mass) to the nearest edge of the drawn character's interval of the cumulative
    distribution; for greedy decoding, the gap between the two largest logits. Both computed on one
    sequence, as :func:`generate` computes them.

    Why: a batch's matrix products (a server stepping many requests at once) may differ from one
    sequence's in the last bits of the logits, so two continuations that must be equal can part
    where the model was all but tied; a margin of about 1e-5 or less says that is what happened.
    """
    SampleConfig(max(position, 0), temperature, top_k, top_p, seed, 1)  # validates
    if not 0 <= position < len(text):
        raise ConfigError(f"position {position} is outside the text ({len(text)} characters)")
    was_training = model.training
    model.eval()
    try:
        return _tie_margin(model, vocab, prefix, text, position, temperature, top_k, top_p, seed)
    finally:
        model.train(was_training)


def _tie_margin(model, vocab, prefix, text, position, temperature, top_k, top_p, seed) -> float:
    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.as_tensor(vocab.encode(prefix + text[:position]).astype(np.int64), device=device).unsqueeze(0)
        if ids.shape[1]:
            logits = _no_unk(model(ids)[0][:, -1].float())
        else:
            state = model.init_state(1, device=device)
            h = state[0] if isinstance(state, tuple) else state
            logits = _no_unk(model.head(h[-1]).float())
        logits = logits.cpu()
        if temperature < GREEDY_BELOW:
            top2 = logits[0].topk(2).values
            return float(top2[0] - top2[1])
        uniforms = _Uniforms(seed, 1, "cpu")
        for _ in range(position):
            uniforms.next()
        u = uniforms.next()
        params = DrawParams([(temperature, top_k, top_p)], logits.shape[-1], "cpu")  # (the clamps of draw)
        logits_t = _filter_rows((logits - logits.amax(-1, keepdim=True)) / params.temps, params)
        cdf = logits_t.softmax(-1).double().cumsum(-1)[0]
        target = float(u[0] * cdf[-1])
        j = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)[0])
        lower = float(cdf[j - 1]) if j > 0 else 0.0
        return min(abs(target - lower), abs(float(cdf[min(j, len(cdf) - 1)]) - target))
