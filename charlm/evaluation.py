"""Held-out loss, bits per character and perplexity of a model on an id stream.

The stream is laid out as ``B`` rows (as ``sequential_batches`` does, offset 0) and read in
chunks of ``T`` columns with the state carried from chunk to chunk, so every prediction sees all
the text before it in its row. ``B`` rows make it fast; each row starts from a zero state.

Dynamic evaluation (:func:`evaluate_dynamic`, Krause et al., 2018, https://arxiv.org/abs/1709.07432)
reads the same way, segment by segment, and after scoring each segment takes a gradient step on it:
the model keeps learning from the text it has already been scored on, which is still a fair
prediction of every character before it is seen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlm.config import (DYNAMIC_RMS_BETA, DYNAMIC_RULE, DYNAMIC_RULES, EVAL_BATCH_SIZE, EVAL_NUM_STEPS, MAX_LR,
                           REGULARISERS, _is_real, check_choice)
from charlm.corpus import read_normalized
from charlm.data import _as_numpy, load_split, load_split_onto
from charlm.tokens import TokenReader, windows
from charlm.errors import CheckpointError, ConfigError, CorpusError
from charlm.models import detach_state


@dataclass(frozen=True)
class EvalResult:
    """How well a model predicted a text: what :func:`~charlm.evaluate` and
    :func:`~charlm.evaluation.evaluate_dynamic` return.

    ``loss`` is the mean cross-entropy of the next character, in nats (natural log) per character,
    over ``tokens`` predicted characters; :attr:`bits_per_char` and :attr:`perplexity` are the same
    figure in other units (see the docs' page on units).
    """

    loss: float  # mean cross-entropy, nats per character
    tokens: int  # characters predicted

    @property
    def bits_per_char(self) -> float:
        """The loss in bits per character: ``loss / ln 2``."""
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        """``exp(loss)``: the number of equally likely characters that would be as uncertain (inf on overflow)."""
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows past ~709

    @classmethod
    def of(cls, losses) -> "EvalResult":
        """The figure of per-character losses (nats, an array): their mean, over as many characters."""
        return cls(loss=float(np.sum(losses)) / len(losses), tokens=len(losses))

    def to_dict(self) -> dict:
        """``tokens``, ``loss``, ``bits_per_char`` and ``perplexity``, as ``charlm eval --json`` prints them."""
        return {"tokens": self.tokens, "loss": self.loss, "bits_per_char": self.bits_per_char,
                "perplexity": self.perplexity}


def _char_losses(logits, Y, reduction: str = "none"):
    """The cross-entropy of each target in ``Y`` under ``logits`` (fp32), shaped as ``Y``, or their sum."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1), reduction=reduction)
    return losses if reduction == "sum" else losses.view(Y.shape)


def _count(value) -> bool:
    """An integer >= 1 (a numpy one too; no bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _rows(n: int, batch_size: int) -> tuple[int, int, np.ndarray]:
    """How ``n`` ids are read: ``B = min(batch_size, (n-1) // 2)`` rows of ``cols = (n-1) // B`` predictions,
    row r reading ``ids[r*cols : (r+1)*cols + 1]``; returns ``(B, cols, row starts)``."""
    if n < 2:
        raise ConfigError(f"need at least 2 characters to evaluate, got {n}")
    if not _count(batch_size):
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    B = max(1, min(batch_size, (n - 1) // 2))
    cols = (n - 1) // B
    return B, cols, cols * np.arange(B, dtype=np.int64)


def evaluate(model, ids, batch_size: int = EVAL_BATCH_SIZE, num_steps: int = EVAL_NUM_STEPS, device=None,
             dist=None) -> EvalResult:
    """Mean next-character cross-entropy of ``model`` over ``ids``.

    ``B = min(batch_size, (n-1) // 2)`` rows of ``(n-1) // B`` characters each; the last
    ``(n-1) % B`` characters are not predicted (``tokens`` says how many were). With ``dist`` (a
    :class:`~charlm.distributed.Dist` of several processes) each rank reads every ``world_size``-th
    row and the sums are reduced: every rank gets the figure one process would.
    """
    ids = _as_numpy(ids)
    B, cols, row_starts = _rows(len(ids), batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if dist is not None and dist.enabled:
        row_starts = row_starts[dist.rank::dist.world_size]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _, logits, Y in _static_blocks(model, ids, row_starts, cols, num_steps, device):
        total += _char_losses(logits, Y, "sum").double()
    if dist is not None:
        total = dist.sum(total)
    return EvalResult(loss=total.item() / (B * cols), tokens=B * cols)


def losses_in_order(model, ids, num_steps: int = EVAL_NUM_STEPS, device=None) -> np.ndarray:
    """Each character's loss (nats) under ``model``, the text read in one row, in order: ``ids[1:]``'s, as
    float64. Their mean is :func:`evaluate`'s figure with ``batch_size=1``."""
    ids = _as_numpy(ids)
    _, cols, row_starts = _rows(len(ids), 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = torch.empty(cols, dtype=torch.float64, device=device)  # on the device: no wait per block
    for start, logits, Y in _static_blocks(model, ids, row_starts, cols, num_steps, device):
        out[start:start + Y.shape[1]] = _char_losses(logits, Y)[0]
    return out.cpu().numpy()


def _static_blocks(model, ids, row_starts, cols: int, num_steps: int, device):
    """``(first column, logits, targets)`` of each block of ``num_steps`` columns of the rows starting at
    ``row_starts``, the state carried from block to block; the model in eval mode meanwhile."""
    if not _count(num_steps):
        raise ConfigError(f"num steps must be an integer >= 1, got {num_steps!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            state = None
            for start in range(0, cols if len(row_starts) else 0, num_steps):  # a block of columns at a time
                width = min(num_steps, cols - start)
                block = torch.from_numpy(windows(ids, row_starts + start, width + 1))  # (B, width+1)
                if device.type == "cuda":
                    block = block.pin_memory()  # so that the copies below need not wait
                X = block[:, :-1].to(device, non_blocking=True)
                Y = block[:, 1:].to(device, non_blocking=True)
                logits, state = model(X, state)
                yield start, logits, Y
    finally:
        model.train(was_training)


def evaluate_dynamic(model, ids, lr: float | None = None, decay: float | None = None,
                     num_steps: int | None = None, batch_size: int = 1, device=None,
                     on_segment=None, rule: str = DYNAMIC_RULE, prior_ids=None) -> EvalResult:
    """Mean next-character cross-entropy of ``model`` over ``ids`` under dynamic evaluation.

    The text is read as :func:`evaluate` reads it (``batch_size`` rows, one by default: the text in its
    order) in segments of ``num_steps`` characters. Each segment is scored first, then the model takes
    one step on that segment's mean loss (the state carried in from the segments before it, detached),
    and moves back towards the trained weights. ``rule`` "sgd" steps by ``lr`` times the gradient and
    moves ``decay`` of the way back; "rms" (the default) steps by ``lr`` times the gradient divided by
    the root of its running mean square, per weight, so the step does not depend on the gradient's
    scale, and moves each weight back by ``decay`` times its root mean square over the mean of all of
    them (at most all the way: the weights that move most in learning are pulled back hardest). The
    mean square starts from ``prior_ids`` when given (text the model was trained on, e.g. the end of
    its training text, read the same way at the trained weights: Krause et al.'s global prior), else
    from the segments read so far (bias-corrected). ``lr``, ``decay`` and ``num_steps`` default to the
    rule's (``DYNAMIC_RULES``). Dropout is off. The model is a copy: ``model`` and its checkpoint are
    never changed. ``on_segment(done, total)`` follows the progress, the prior's segments first.
    """
    losses = dynamic_losses(model, ids, lr=lr, decay=decay, num_steps=num_steps, batch_size=batch_size,
                            device=device, on_segment=on_segment, rule=rule, prior_ids=prior_ids)
    return EvalResult.of(losses)


def dynamic_losses(model, ids, lr: float | None = None, decay: float | None = None,
                   num_steps: int | None = None, batch_size: int = 1, device=None,
                   on_segment=None, rule: str = DYNAMIC_RULE, prior_ids=None) -> np.ndarray:
    """Each predicted character's loss (nats, float64) under :func:`evaluate_dynamic`, which takes the same
    arguments: the rows' characters one row after another, so with one row ``ids[1:]``'s, in order."""
    lr, num_steps, decay = dynamic_settings(rule, lr, num_steps, decay)
    ids = _as_numpy(ids)
    prior_ids = _as_numpy(prior_ids) if rule == "rms" and prior_ids is not None else None  # sgd has no prior
    if prior_ids is not None and len(prior_ids) < 2:
        raise ConfigError(f"dynamic evaluation's prior needs at least 2 characters, got {len(prior_ids)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = _adaptable_copy(model, device)  # adapted here, never the caller's
    params = [p for p in model.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    n_prior = _num_segments(len(prior_ids), 1, num_steps) if prior_ids is not None else 0
    total_segments = n_prior + _num_segments(len(ids), batch_size, num_steps)
    progress = (lambda done: on_segment(done, total_segments)) if on_segment is not None else None
    rms = None
    if rule == "rms":
        rms = _RMSState(params, _gradient_mean_square(model, params, prior_ids, num_steps, device, progress)
                        if n_prior else None)
    B, cols, _ = _rows(len(ids), batch_size)
    out = torch.empty((B, cols), dtype=torch.float64, device=device)  # on the device: no wait per segment
    start = 0
    for done, losses in enumerate(_segment_losses(model, ids, batch_size, num_steps, device), n_prior + 1):
        width = losses.shape[1]
        out[:, start:start + width] = losses.detach()  # scored before the model learns from it
        start += width
        model.zero_grad(set_to_none=True)
        losses.mean().backward()
        with torch.no_grad():
            if rms is None:
                _sgd_step(params, trained, lr, decay)
            else:
                rms.step(params, trained, lr, decay)
        if progress is not None:
            progress(done)
    if not torch.isfinite(out).all():
        raise ConfigError(f"dynamic evaluation diverged at lr {lr:g} (its loss is {out.sum().item()}): take a "
                          f"smaller lr (--dynamic-lr)")
    return out.reshape(-1).cpu().numpy()


def _adaptable_copy(model, device):
    """A copy of ``model`` to learn from the text: every dropout off, yet in training mode, because cuDNN runs
    an RNN's backward pass only in training mode (a model in ``eval()`` is refused on CUDA GPUs); with its
    dropouts at 0, training mode computes what evaluation mode does."""
    config = dataclasses.replace(model.config, dropout=0.0, **{name: 0.0 for name in REGULARISERS})
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: not from the caller's RNG
        copy_ = type(model).from_config(config)
    copy_.load_state_dict(copy.deepcopy(model.state_dict()))
    return copy_.to(device).train()


def _num_segments(n: int, batch_size: int, num_steps: int) -> int:
    return math.ceil(_rows(n, batch_size)[1] / num_steps)


def _segment_losses(model, ids, batch_size: int, num_steps: int, device):
    """Each segment's per-character losses ``(rows, width)``, of ``ids`` read in ``batch_size`` rows, in order;
    the state is carried to the next segment (detached) once the caller has used the losses."""
    B, cols, row_starts = _rows(len(ids), batch_size)
    state = None
    for start in range(0, cols, num_steps):
        block = torch.from_numpy(windows(ids, row_starts + start, min(num_steps, cols - start) + 1)).to(device)
        X, Y = block[:, :-1], block[:, 1:]
        logits, state = model(X, state)
        yield _char_losses(logits, Y)
        state = detach_state(state)


def _gradient_mean_square(model, params, ids, num_steps: int, device, progress=None) -> list:
    """Each weight's squared gradient of a segment's mean loss, averaged over the segments of ``ids`` (one
    row, in order) at the model's weights, which are not changed."""
    sums = [torch.zeros_like(p) for p in params]
    n = 0
    for n, losses in enumerate(_segment_losses(model, ids, 1, num_steps, device), 1):
        model.zero_grad(set_to_none=True)
        losses.mean().backward()
        for s, p in zip(sums, params):
            if p.grad is not None:
                s.addcmul_(p.grad, p.grad)
        if progress is not None:
            progress(n)
    model.zero_grad(set_to_none=True)
    return [s / max(n, 1) for s in sums]


def _sgd_step(params, trained, lr: float, decay: float) -> None:
    """The plain step: ``lr`` times the gradient, then ``decay`` of the way back to the trained weights."""
    for p, p0 in zip(params, trained):
        if p.grad is None:
            continue
        p.add_(p.grad, alpha=-lr)
        if decay:
            p.add_(p0 - p, alpha=decay)


class _RMSState:
    """The rms rule's running mean square of each weight's gradient, from a prior (its decay scale then
    fixed by the prior) or from zero (bias-corrected, as Adam's, and the decay scale follows it)."""

    def __init__(self, params, prior=None):
        self.mean_sq = [torch.zeros_like(p) for p in params] if prior is None else [m.clone() for m in prior]
        self.scale = None if prior is None else _relative([m.sqrt() for m in prior])
        self.n = 0

    def step(self, params, trained, lr: float, decay: float) -> None:
        beta = DYNAMIC_RMS_BETA
        self.n += 1
        for m, p in zip(self.mean_sq, params):
            if p.grad is not None:
                m.mul_(beta).addcmul_(p.grad, p.grad, value=1 - beta)
        if self.scale is None:  # started from zero
            roots = [(m / (1 - beta ** self.n)).sqrt_() for m in self.mean_sq]
            scale = _relative(roots)
        else:
            roots, scale = [m.sqrt() for m in self.mean_sq], self.scale
        for p, p0, r, s in zip(params, trained, roots, scale):
            if p.grad is None:
                continue
            p.addcdiv_(p.grad, r.add_(1e-8), value=-lr)
            if decay:
                p.add_((p0 - p) * (s * decay).clamp_(max=1.0))  # back towards the trained weights


def _relative(roots) -> list:
    """Each weight's root mean square over the mean of all the weights' (on the device: no wait per step)."""
    if not roots:
        return []
    mean = torch.stack([r.sum() for r in roots]).sum() / sum(r.numel() for r in roots)
    return [torch.where(mean > 0, r / mean, torch.ones_like(r)) for r in roots]


def dynamic_settings(rule: str, lr: float | None = None, num_steps: int | None = None,
                     decay: float | None = None) -> tuple[float, int, float]:
    """(lr, num_steps, decay) of dynamic evaluation under ``rule``: each one given, else the rule's own; a
    ``ConfigError`` for an unknown rule, an ``lr`` outside (0, ``MAX_LR``], a ``num_steps`` under 1 or a
    ``decay`` outside [0, 1]."""
    check_choice("dynamic evaluation rule", rule, sorted(DYNAMIC_RULES))
    given = (lr, num_steps, decay)
    lr, num_steps, decay = (default if value is None else value for value, default in zip(given, DYNAMIC_RULES[rule]))
    if not _is_real(lr, 0, MAX_LR, low_open=True):
        raise ConfigError(f"dynamic evaluation's lr must be > 0 and at most {MAX_LR:g}, got {lr!r}")
    if not _count(num_steps):
        raise ConfigError(f"dynamic evaluation's num_steps must be an integer >= 1, got {num_steps!r}")
    if not _is_real(decay, 0, 1):
        raise ConfigError(f"dynamic evaluation's decay must lie in [0, 1], got {decay!r}")
    return lr, num_steps, decay


def file_ids(path: str | os.PathLike, vocab, preprocess: str, skip_unknown: bool = False) -> tuple[np.ndarray, int]:
    """The ids of a text file read as a run reads its corpus, and how many characters were skipped.

    Characters outside ``vocab`` raise :class:`~charlm.errors.UnknownCharactersError`, or with
    ``skip_unknown`` are dropped (and counted): a model cannot be scored on what it cannot read.
    """
    text = read_normalized(path, preprocess)
    if not skip_unknown:
        return vocab.encode(text), 0
    ids = vocab.encode(text, errors="replace")
    known = ids != 0  # <unk>: the characters outside the vocabulary
    skipped = len(ids) - int(known.sum())
    return (ids[known] if skipped else ids), skipped


def whole(ids) -> np.ndarray:
    """``ids`` as an int64 array in memory (a :class:`~charlm.tokens.TokenReader` read whole)."""
    ids = _as_numpy(ids)
    return (ids.read() if isinstance(ids, TokenReader) else ids).astype(np.int64, copy=False)


def counts_in_order(ids, count_ids, vocab_size: int, order: int) -> np.ndarray:
    """The probability of each of ``ids[1:]`` under a count model of order ``order`` (contexts of up to
    ``order`` characters; :func:`charlm.ngram.count_probs`) of ``count_ids`` (the run's training text) and of
    the part of ``ids`` read before it, ``ids`` read in one row, in order."""
    from charlm.ngram import count_probs

    return count_probs(whole(count_ids), whole(ids), vocab_size, order)


def mixed_with_counts(network_losses, counts) -> EvalResult:
    """The figure of a network mixed with a count model (:func:`charlm.ngram.mix`: the network's weight learned
    as the text is read): ``network_losses`` are the network's loss (nats) of each character of a text read in
    one row, in order (:func:`losses_in_order`, or :func:`dynamic_losses` with one row), ``counts`` the count
    model's probability of each (:func:`counts_in_order`)."""
    from charlm.ngram import mix

    network_losses = np.asarray(network_losses, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if network_losses.ndim != 1 or len(network_losses) == 0 or network_losses.shape != counts.shape:
        raise ConfigError(f"mixed_with_counts needs one loss and one count probability per character, got "
                          f"{network_losses.shape} and {counts.shape}")
    if np.isnan(network_losses).any() or (network_losses < 0).any():
        raise ConfigError("a network's losses are >= 0 (nats), not NaN")
    return EvalResult.of(-np.log(mix(np.exp(-network_losses), counts)))


def held_out_ids(ckpt) -> np.ndarray:
    """The held-out tail of the corpus that ``ckpt``'s run trained on, split as training split it."""
    return _run_split(ckpt, "pass FILES to evaluate on").val_ids


def training_tail_ids(ckpt, chars: int):
    """The last ``chars`` characters of the text ``ckpt``'s run trained on (all of it if shorter)."""
    train = _run_split(ckpt, "its training text is needed").train_ids
    max_chars = ckpt.corpus_info.get("max_chars")
    if max_chars is not None:  # the run trained on the first max_chars of its training part only
        train = train[:max_chars]
    return train[max(0, len(train) - chars):]


def _run_split(ckpt, why: str):
    """The run's corpus split as training split it: the first of its candidate places whose text is the run's."""
    candidates = ckpt.corpus_candidates
    if not candidates:
        raise CheckpointError(f"{ckpt.path} names no corpus; {why}")
    existing = [c for c in candidates if c.exists()]
    if not existing:
        raise CorpusError(f"the run's corpus {candidates[0]} is gone; {why}")
    first_error = None
    for path in existing:
        try:
            split = _split_of(ckpt, path)
        except CorpusError as exc:  # another text now at that place: the next candidate may be the run's
            first_error = first_error or exc
            continue
        ckpt._corpus_found = path
        return split
    raise first_error


def _split_of(ckpt, path):
    sha256 = ckpt.corpus_info.get("sha256")
    lineage = ckpt.lineage
    if lineage is None:
        return load_split(path, ckpt.preprocess, ckpt.val_fraction, min_count=ckpt.min_count, vocab=ckpt.vocab,
                          sha256=sha256)
    # a fine-tuned model: the corpus numbered in its vocabulary (the parent's, extended by the characters the run
    # added, or with those it lacked read as <unk>), as its run read it
    policy = "unk" if lineage.get("new_chars") == "unk" else "error"
    return load_split_onto(path, ckpt.preprocess, ckpt.val_fraction, ckpt.vocab, policy, min_count=ckpt.min_count,
                           sha256=sha256)
