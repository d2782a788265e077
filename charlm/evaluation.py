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
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlm.config import DYNAMIC_RMS_BETA, DYNAMIC_RULE, DYNAMIC_RULES, EVAL_BATCH_SIZE, EVAL_NUM_STEPS
from charlm.corpus import read_normalized
from charlm.data import _as_numpy, load_split
from charlm.tokens import windows
from charlm.errors import CheckpointError, ConfigError, CorpusError
from charlm.models import detach_state


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy, nats per character
    tokens: int  # characters predicted

    @property
    def bits_per_char(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows past ~709

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "loss": self.loss, "bits_per_char": self.bits_per_char,
                "perplexity": self.perplexity}


def _rows(n: int, batch_size: int) -> tuple[int, int, np.ndarray]:
    """How ``n`` ids are read: ``B = min(batch_size, (n-1) // 2)`` rows of ``cols = (n-1) // B`` predictions,
    row r reading ``ids[r*cols : (r+1)*cols + 1]``; returns ``(B, cols, row starts)``."""
    if n < 2:
        raise ConfigError(f"need at least 2 characters to evaluate, got {n}")
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
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
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
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1),
                                         reduction="sum").double()
    finally:
        model.train(was_training)
    if dist is not None:
        dist.sum(total)
    return EvalResult(loss=total.item() / (B * cols), tokens=B * cols)


def evaluate_dynamic(model, ids, lr: float | None = None, decay: float | None = None,
                     num_steps: int | None = None, batch_size: int = 1, device=None,
                     on_segment=None, rule: str = DYNAMIC_RULE) -> EvalResult:
    """Mean next-character cross-entropy of ``model`` over ``ids`` under dynamic evaluation.

    The text is read as :func:`evaluate` reads it (``batch_size`` rows, one by default: the text in its
    order) in segments of ``num_steps`` characters. Each segment is scored first, then the model takes
    one step on that segment's mean loss (the state carried in from the segments before it, detached),
    and moves ``decay`` of the way back towards the trained weights. ``rule`` "sgd" steps by ``lr`` times
    the gradient; "rms" (the default) by ``lr`` times the gradient divided by the root of its running mean
    square over the segments read so far, per weight, so the step does not depend on the gradient's scale.
    ``lr``, ``decay`` and ``num_steps`` default to the rule's (``DYNAMIC_RULES``). Dropout is off. The
    model is a copy: ``model`` and its checkpoint are never changed. ``on_segment(done, total)`` follows
    the progress.
    """
    lr, num_steps, decay = dynamic_settings(rule, lr, num_steps, decay)
    ids = _as_numpy(ids)
    B, cols, row_starts = _rows(len(ids), batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = copy.deepcopy(model).to(device).eval()  # adapted here, never the caller's
    params = [p for p in model.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    mean_sq = [torch.zeros_like(p) for p in params] if rule == "rms" else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    segments = range(0, cols, num_steps)
    for done, start in enumerate(segments, 1):
        block = torch.from_numpy(windows(ids, row_starts + start, min(num_steps, cols - start) + 1)).to(device)
        X, Y = block[:, :-1], block[:, 1:]
        logits, state = model(X, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1), reduction="sum")
        total += loss.detach().double()  # scored before the model learns from this segment
        model.zero_grad(set_to_none=True)
        (loss / Y.numel()).backward()
        with torch.no_grad():
            _dynamic_step(params, trained, mean_sq, lr, decay, done)
        state = detach_state(state)
        if on_segment is not None:
            on_segment(done, len(segments))
    return EvalResult(loss=total.item() / (B * cols), tokens=B * cols)


def dynamic_settings(rule: str, lr: float | None = None, num_steps: int | None = None,
                     decay: float | None = None) -> tuple[float, int, float]:
    """(lr, num_steps, decay) of dynamic evaluation under ``rule``: each one given, else the rule's own."""
    if rule not in DYNAMIC_RULES:
        raise ValueError(f"rule must be one of {sorted(DYNAMIC_RULES)}, not {rule!r}")
    given = (lr, num_steps, decay)
    return tuple(default if value is None else value for value, default in zip(given, DYNAMIC_RULES[rule]))


def _dynamic_step(params, trained, mean_sq, lr: float, decay: float, n: int) -> None:
    """One step of dynamic evaluation (the ``n``-th): plain SGD, or RMS-normalised when ``mean_sq`` is given."""
    beta = DYNAMIC_RMS_BETA
    for i, (p, p0) in enumerate(zip(params, trained)):
        if p.grad is None:
            continue
        if mean_sq is None:
            p.add_(p.grad, alpha=-lr)
        else:
            mean_sq[i].mul_(beta).addcmul_(p.grad, p.grad, value=1 - beta)
            rms = (mean_sq[i] / (1 - beta ** n)).sqrt_().add_(1e-8)
            p.addcdiv_(p.grad, rms, value=-lr)
        if decay:
            p.add_(p0 - p, alpha=decay)  # back towards the trained weights


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


def held_out_ids(ckpt) -> np.ndarray:
    """The held-out tail of the corpus that ``ckpt``'s run trained on, split as training split it."""
    if ckpt.corpus_path is None:
        raise CheckpointError(f"{ckpt.path} names no corpus; pass FILES to evaluate on")
    if not ckpt.corpus_path.exists():
        raise CorpusError(f"the run's corpus {ckpt.corpus_path} is gone; pass FILES to evaluate on")
    return load_split(ckpt.corpus_path, ckpt.preprocess, ckpt.val_fraction, min_count=ckpt.min_count,
                      vocab=ckpt.vocab, sha256=ckpt.corpus_info.get("sha256")).val_ids
