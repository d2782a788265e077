"""Train/validation split and the d2l minibatch iterators.

Both iterators cover one epoch, know their length, and are deterministic given ``(seed, epoch)``,
so a run can be resumed at any batch (``start=``) and every epoch gets its own random offset.
They accept numpy arrays (a ``np.memmap`` too: batches are sliced from it, the stream is never
copied whole) or 1-D tensors, and yield ``(X, Y)`` int64 tensors of shape ``(B, T)`` where ``Y`` is
``X`` shifted by one character.

``rank``/``world_size`` give each of several processes its own contiguous share of the ``B`` rows
of every batch (``B`` must divide evenly), which is what distributed data parallel needs.

:func:`load_split` is "the training and held-out ids of a run": ``charlm train`` and ``charlm eval``
both call it, so they always hold out the same characters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from charlm.config import SAMPLINGS
from charlm.corpus import read_normalized
from charlm.errors import ConfigError
from charlm.vocab import Vocab


def split(ids, val_fraction: float):
    """Hold out the contiguous tail: ``(train_ids, val_ids)`` with ``len(val) = round(n * f)``."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n = len(ids)
    n_val = int(round(n * val_fraction))
    if n_val < 2 or n - n_val < 2:
        raise ConfigError(f"a corpus of {n} characters is too short to hold out {val_fraction:.0%} of it")
    return ids[: n - n_val], ids[n - n_val :]


@dataclass
class RunData:
    """A corpus as a run sees it: its vocabulary and its training and held-out ids."""

    vocab: Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    num_chars: int  # the whole corpus after preprocessing


def load_split(corpus: str | os.PathLike, preprocess: str, val_fraction: float, max_chars: int | None = None,
               vocab: Vocab | None = None) -> RunData:
    """Read ``corpus``, encode it and hold out its tail, as a run does.

    ``vocab=None`` builds the vocabulary from the text (training); a given ``vocab`` (a checkpoint's)
    encodes it, characters outside it becoming ``<unk>``. ``max_chars`` keeps the first characters of
    the training part only; the held-out part stays the corpus's tail.
    """
    text = read_normalized(corpus, preprocess)
    if vocab is None:
        vocab = Vocab.from_text(text)
        ids = vocab.encode(text)
    else:
        ids = vocab.encode(text, errors="replace")
    train_ids, val_ids = split(ids, val_fraction)
    if max_chars is not None:
        train_ids = train_ids[:max_chars]
    return RunData(vocab=vocab, train_ids=train_ids, val_ids=val_ids, num_chars=len(ids))


def min_tokens(batch_size: int, num_steps: int) -> int:
    """Fewest tokens that give at least one batch whatever random offset is drawn."""
    return batch_size * num_steps + num_steps


def _as_numpy(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ConfigError(f"ids must be 1-D, got shape {ids.shape}")
    return ids


class _Batches:
    """Shared argument checks, offset drawing and sharding of the two iterators."""

    def __init__(self, ids, batch_size, num_steps, seed=0, epoch=0, start=0, rank=0, world_size=1):
        if batch_size < 1 or num_steps < 1:
            raise ConfigError(f"batch_size and num_steps must be >= 1, got {batch_size} and {num_steps}")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise ConfigError(
                f"rank {rank} of {world_size} processes: batch_size {batch_size} must split evenly"
            )
        self.ids = _as_numpy(ids)
        self.batch_size, self.num_steps = batch_size, num_steps
        need = min_tokens(batch_size, num_steps)
        if len(self.ids) < need:
            raise ConfigError(
                f"the corpus has {len(self.ids)} tokens, but batch size {batch_size} x {num_steps} steps "
                f"needs at least {need}"
            )
        self.rng = np.random.default_rng([seed, epoch])
        # d2l draws the offset from [0, T]; the last value only ever drops data (d2l-zh #1302).
        self.offset = int(self.rng.integers(0, num_steps))
        self.start = start
        share = batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)

    def __len__(self) -> int:
        return self.num_batches - self.start

    @staticmethod
    def _tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


class random_batches(_Batches):  # noqa: N801
    """d2l's ``seq_data_iter_random``: shuffled, non-overlapping windows.

    (A class with a function's name: it is called like d2l's generator function, which is the
    name the book's readers look for, and it is public API; as a class it also knows its length.)

    Drop a random offset in ``[0, T-1]``, cut the rest into windows of ``T`` characters (each
    with its target shifted by one), shuffle the windows, and yield ``B`` of them at a time.
    Adjacent batches are unrelated, so the model state is reset for every batch::

        stream:  o o o | w0 w0 w0 | w1 w1 w1 | w2 w2 w2 | w3 w3 w3 | ...   (o = offset, T = 3)
        batch 0: X = [w2, w0]   batch 1: X = [w3, w1]   (B = 2, after shuffling)
    """

    def __init__(self, ids, batch_size, num_steps, seed=0, epoch=0, start=0, rank=0, world_size=1):
        super().__init__(ids, batch_size, num_steps, seed, epoch, start, rank, world_size)
        num_windows = (len(self.ids) - self.offset - 1) // num_steps
        starts = self.offset + num_steps * np.arange(num_windows)
        self.rng.shuffle(starts)
        self.num_batches = num_windows // batch_size
        # (num_batches, B): the start of every window of every batch, in order.
        self.starts = starts[: self.num_batches * batch_size].reshape(self.num_batches, batch_size)
        self._span = np.arange(num_steps + 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(self.start, self.num_batches):
            idx = self.starts[k, self.rows, None] + self._span  # (B, T+1)
            window = self._tensor(self.ids[idx])
            yield window[:, :-1], window[:, 1:]


class sequential_batches(_Batches):  # noqa: N801
    """d2l's ``seq_data_iter_sequential``: consecutive column blocks of a ``B``-row stream.

    (Lower case for the same reason as :class:`random_batches`.)

    After a random offset in ``[0, T-1]`` the stream is laid out as ``B`` rows and cut into
    blocks of ``T`` columns, so row ``i`` of batch ``k+1`` continues row ``i`` of batch ``k`` and the
    state is carried across batches (detached: truncated backpropagation through time)::

        stream: a b c d e f g h i j k l m n o p q r s t u v w x    (offset 0, B = 2, T = 3)
        rows:   a b c d e f g h i j k     (Y: b c d ... l)
                l m n o p q r s t u v     (Y: m n o ... w)
        batch 0: X = [[a b c], [l m n]]   batch 1: X = [[d e f], [o p q]]   ...
    """

    def __init__(self, ids, batch_size, num_steps, seed=0, epoch=0, start=0, rank=0, world_size=1):
        super().__init__(ids, batch_size, num_steps, seed, epoch, start, rank, world_size)
        num_tokens = (len(self.ids) - self.offset - 1) // batch_size * batch_size
        o = self.offset
        self.xs = self.ids[o : o + num_tokens].reshape(batch_size, -1)  # (B, cols), a view
        self.ys = self.ids[o + 1 : o + 1 + num_tokens].reshape(batch_size, -1)
        self.num_batches = self.xs.shape[1] // num_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.num_steps
        for k in range(self.start, self.num_batches):
            cols = slice(k * T, (k + 1) * T)
            yield self._tensor(self.xs[self.rows, cols]), self._tensor(self.ys[self.rows, cols])


def make_batches(sampling: str, ids, batch_size, num_steps, **kwargs) -> _Batches:
    """``random_batches`` or ``sequential_batches`` by name."""
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    cls = random_batches if sampling == "random" else sequential_batches
    return cls(ids, batch_size, num_steps, **kwargs)
