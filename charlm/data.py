"""Train/validation split and the d2l minibatch iterators.

Both iterators cover one epoch, know their length, and are deterministic given ``(seed, epoch)``,
so a run can be resumed at any batch (``start=``) and every epoch gets its own random offset.
They accept numpy arrays, 1-D tensors or a token file (:class:`~charlm.tokens.TokenReader`: each
batch is read as ``B`` windows, the file never whole), and yield ``(X, Y)`` int64 tensors of shape ``(B, T)`` where ``Y`` is
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

from charlm.config import NEW_CHARS, SAMPLINGS, check_choice
from charlm.errors import ConfigError, CorpusError, UnknownCharactersError
from charlm.tokens import TokenReader, prepare, windows
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
    """A corpus as a run sees it: its vocabulary and its training and held-out ids (token-file views)."""

    vocab: Vocab
    train_ids: TokenReader
    val_ids: TokenReader
    num_chars: int  # the whole corpus after preprocessing
    sha256: str  # of the source bytes
    cache: str  # the prepared corpus's directory
    new_chars: tuple = ()  # (char, count) of the corpus's characters a given vocabulary lacked (load_split_onto)


def load_split(corpus: str | os.PathLike, preprocess: str, val_fraction: float, max_chars: int | None = None,
               min_count: int = 1, vocab: Vocab | None = None, sha256: str | None = None,
               progress=None) -> RunData:
    """The corpus from the token cache (prepared first if needed), its tail held out, as a run sees it.

    ``max_chars`` keeps the first characters of the training part only; the held-out part stays the
    corpus's tail. A given ``vocab`` or ``sha256`` (a run's) must still be the corpus's: otherwise the
    corpus changed since the run, and its held-out part is no longer the run's.
    """
    prepared = prepare(corpus, preprocess, min_count, progress=progress)
    if sha256 is not None and prepared.sha256 != sha256:
        raise CorpusError(f"{corpus} changed since the run used it (sha256 {sha256[:12]}..., now "
                          f"{prepared.sha256[:12]}...)")
    if vocab is not None and prepared.vocab != vocab:
        raise CorpusError(f"{corpus} no longer gives the vocabulary the run was trained with: it changed since")
    train_ids, val_ids = split(prepared.ids, val_fraction)
    if max_chars is not None:
        train_ids = train_ids[:max_chars]
    return RunData(vocab=prepared.vocab, train_ids=train_ids, val_ids=val_ids, num_chars=len(prepared.ids),
                   sha256=prepared.sha256, cache=str(prepared.path))


def load_split_onto(corpus: str | os.PathLike, preprocess: str, val_fraction: float, vocab: Vocab,
                    new_chars: str = "extend", max_chars: int | None = None, min_count: int = 1,
                    progress=None, sha256: str | None = None) -> RunData:
    """The corpus as :func:`load_split` gives it, numbered in ``vocab``'s ids (a parent model's, to fine-tune
    it). The corpus's characters ``vocab`` lacks, by ``new_chars``: ``"error"`` raises
    :class:`~charlm.errors.UnknownCharactersError` naming them with their counts; ``"unk"`` reads them as
    ``<unk>``; ``"extend"`` appends them to the vocabulary (the old ids unchanged; the new ones by count,
    then first occurrence), which is then ``RunData.vocab``. ``RunData.new_chars`` lists them either way.
    The token file is read through a lookup table: never whole, never rewritten."""
    check_choice("new-chars policy", new_chars, NEW_CHARS)
    prepared = prepare(corpus, preprocess, min_count, progress=progress)
    if sha256 is not None and prepared.sha256 != sha256:
        raise CorpusError(f"{corpus} changed since the run used it (sha256 {sha256[:12]}..., now "
                          f"{prepared.sha256[:12]}...)")
    own = prepared.vocab
    lookup = np.array([vocab.stoi.get(c, 0) for c in own.itos], dtype=np.int64)
    lookup[0] = 0  # <unk> stays <unk>
    missing = [i for i, c in enumerate(own.itos) if i and c not in vocab.stoi]
    target, found = vocab, ()
    if missing:
        counts = prepared.ids.counts(len(own))
        found = tuple((own.itos[i], int(counts[i])) for i in missing)
        if new_chars == "error":
            listed = ", ".join(f"{c!r} (U+{ord(c):04X}) x {n:,}" for c, n in found[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise UnknownCharactersError(
                f"{corpus} has {len(found)} character(s) the model does not know: {listed}{more}; pass --new-chars "
                f"extend to add them to its vocabulary, or --new-chars unk to read them as <unk>", [c for c, _ in found])
        if new_chars == "extend":
            target = Vocab([*vocab.itos[1:], *(c for c, _ in found)])
            lookup[missing] = np.arange(len(vocab), len(target))
    ids = prepared.ids.remapped(lookup.astype(target.dtype))
    train_ids, val_ids = split(ids, val_fraction)
    if max_chars is not None:
        train_ids = train_ids[:max_chars]
    return RunData(vocab=target, train_ids=train_ids, val_ids=val_ids, num_chars=len(ids), sha256=prepared.sha256,
                   cache=str(prepared.path), new_chars=found)


def min_tokens(batch_size: int, num_steps: int) -> int:
    """Fewest tokens that give at least one batch whatever random offset is drawn."""
    return batch_size * num_steps + num_steps


def _as_numpy(ids):
    """``ids`` as a 1-D numpy array; a :class:`~charlm.tokens.TokenReader` stays as it is (never read whole)."""
    if isinstance(ids, TokenReader):
        return ids
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
        self.rng, self.offset = _epoch_rng(seed, epoch, num_steps)
        self.start = start
        share = batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)

    def __len__(self) -> int:
        return self.num_batches - self.start


class random_batches(_Batches):  # noqa: N801
    """d2l's ``seq_data_iter_random``: shuffled, non-overlapping windows.

    (A class with a function's name: it is called like d2l's generator function, which is the
    name the book's readers look for, and it is public API; as a class it also knows its length.)

    Drop a random offset in ``[0, T-1]``, cut the rest into windows of ``T`` characters (each
    with its target shifted by one), shuffle the windows, and yield ``B`` of them at a time.
    Adjacent batches are unrelated, so the model state is reset for every batch::

        stream:  o o o | w0 w0 w0 | w1 w1 w1 | w2 w2 w2 | w3 w3 w3 | ...   (o = offset, T = 3)
        batch 0: X = [w2, w0]   batch 1: X = [w3, w1]   (B = 2, after shuffling)

    The shuffled order is kept as window numbers in 4 bytes each (not 8-byte starts): half the
    memory on a large corpus, and the same permutation, so the same batches.
    """

    def __init__(self, ids, batch_size, num_steps, seed=0, epoch=0, start=0, rank=0, world_size=1):
        super().__init__(ids, batch_size, num_steps, seed, epoch, start, rank, world_size)
        num_windows = (len(self.ids) - self.offset - 1) // num_steps
        order = np.arange(num_windows, dtype=np.uint32 if num_windows < 2**32 else np.uint64)
        self.rng.shuffle(order)  # in place
        self.num_batches = num_windows // batch_size
        self.order = order[: self.num_batches * batch_size].reshape(self.num_batches, batch_size)  # (batches, B)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.num_steps
        for k in range(self.start, self.num_batches):
            starts = self.offset + T * self.order[k, self.rows].astype(np.int64)
            window = torch.from_numpy(windows(self.ids, starts, T + 1))  # (B, T+1)
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

    Each block is read as ``B`` windows of ``T + 1`` ids (``X`` and, shifted by one, ``Y``), so a
    token file is never read whole.
    """

    def __init__(self, ids, batch_size, num_steps, seed=0, epoch=0, start=0, rank=0, world_size=1):
        super().__init__(ids, batch_size, num_steps, seed, epoch, start, rank, world_size)
        self.cols = (len(self.ids) - self.offset - 1) // batch_size  # characters per row
        self.num_batches = self.cols // num_steps
        self.row_starts = self.offset + self.cols * np.arange(batch_size, dtype=np.int64)[self.rows]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.num_steps
        for k in range(self.start, self.num_batches):
            window = torch.from_numpy(windows(self.ids, self.row_starts + k * T, T + 1))  # (B, T+1)
            yield window[:, :-1], window[:, 1:]


def _epoch_rng(seed: int, epoch: int, num_steps: int) -> tuple[np.random.Generator, int]:
    """An epoch's generator and its random offset, its first draw: in ``[0, T-1]`` (d2l draws from ``[0, T]``;
    the last value only ever drops data, d2l-zh #1302)."""
    rng = np.random.default_rng([seed, epoch])
    return rng, int(rng.integers(0, num_steps))


def count_batches(num_tokens: int, batch_size: int, num_steps: int, offset: int = 0) -> int:
    """Batches in an epoch of ``num_tokens`` ids at ``offset``, without building the iterator: the same
    for both samplings (windows of ``T`` taken ``B`` at a time, or rows of ``B`` cut into blocks of ``T``)."""
    return (num_tokens - offset - 1) // (batch_size * num_steps)


EXACT_EPOCHS = 100_000  # run_batches counts each epoch's batches up to this many epochs (about a second)


def run_batches(num_tokens: int, batch_size: int, num_steps: int, seed: int, epochs: int,
                cap: int | None = None) -> int:
    """Batches in epochs ``0 .. epochs-1`` of a run, each at its own random offset (which may drop one), at
    most ``cap``. Exact up to EXACT_EPOCHS epochs; past them each epoch counts as its fewest batches, so the
    figure is never more than the run takes."""
    fewest = count_batches(num_tokens, batch_size, num_steps, num_steps - 1)
    if fewest == count_batches(num_tokens, batch_size, num_steps):  # no offset drops a batch
        total = fewest * epochs
    else:
        total = 0
        for epoch in range(epochs):
            if cap is not None and total >= cap:
                break
            if epoch == EXACT_EPOCHS:
                total += fewest * (epochs - epoch)
                break
            total += count_batches(num_tokens, batch_size, num_steps, _epoch_rng(seed, epoch, num_steps)[1])
    return total if cap is None else min(total, cap)


def make_batches(sampling: str, ids, batch_size, num_steps, **kwargs) -> _Batches:
    """``random_batches`` or ``sequential_batches`` by name."""
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    cls = random_batches if sampling == "random" else sequential_batches
    return cls(ids, batch_size, num_steps, **kwargs)
