"""A character n-gram count model, and its mixture with a network's predictions, for dynamic evaluation.

:func:`count_probs` gives, for each character of a text read in order, the probability that an
interpolated absolute-discounting n-gram model assigns it (Ney, Essen and Kneser, 1994): counts of
the training text, and, as the text is read, of the text already read. Its order is the longest
context in characters, as PPM counts it: order 6 reads up to the six characters before each one (a
7-gram), and every shorter context. Each order's counts, less a
fixed discount on every seen continuation, give their share; the discounted mass goes to the next
lower order, down to the uniform distribution over the vocabulary. The prediction of a character
never uses the character itself or any after it.

:func:`mix` mixes a network's probabilities with the counts', ``w * network + (1 - w) * counts``, with
the network's weight ``w`` at each character the value of a grid that scored best on every character
before it (the first character at ``MIX_START``): the weight is learned from text already scored, as
dynamic evaluation learns its weights.

Every count is exact: a context of ``k`` characters is a base-``V`` integer, so ``V ** (order + 1)``
must stay below ``2 ** 63`` (:func:`max_order`).
"""

from __future__ import annotations

import numpy as np

from charlm.errors import ConfigError

DISCOUNT = 0.75  # subtracted from each seen continuation's count, at every order
MIX_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # the network's weights the mixture chooses among
MIX_START = 0.75  # the network's weight for the first character, before any has been scored
_MIX_CHUNK = 65_536


def max_order(vocab_size: int) -> int:
    """The highest order whose (context, character) keys are exact 63-bit integers for ``vocab_size``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise ConfigError(f"a count model needs a vocabulary of at least 2 characters, got {vocab_size!r}")
    vocab_size = int(vocab_size)  # a Python int: numpy's would wrap around below
    order = 0
    while vocab_size ** (order + 2) < 2 ** 63:
        order += 1
    return order


def check_order(order, vocab_size: int) -> int:
    """``order`` as an int, or a ``ConfigError`` when it is not an integer in ``[1, max_order(vocab_size)]``."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ConfigError(f"the count model's order (characters of context) must be an integer >= 1, got {order!r}")
    top = max_order(vocab_size)
    if order > top:
        raise ConfigError(f"the count model's order {order} is too high for a vocabulary of {int(vocab_size)} "
                          f"characters: at most {top}")
    return int(order)


def _context_keys(ids: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """The base-``vocab_size`` key of ``ids[t-k:t]`` for ``t`` in ``k .. len(ids)`` (``len(ids) - k + 1`` keys)."""
    n = len(ids)
    keys = np.zeros(n - k + 1, dtype=np.int64)
    for i in range(k):
        keys = keys * vocab_size + ids[i:n - k + 1 + i]
    return keys


def _earlier(keys: np.ndarray, flags: np.ndarray | None = None) -> np.ndarray:
    """For each ``i``: how many ``j < i`` have ``keys[j] == keys[i]`` (and ``flags[j]``, when given)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    counted = np.ones(n, dtype=np.int64) if flags is None else flags[order].astype(np.int64)
    before = np.cumsum(counted) - counted  # counted items before each, over the whole sorted list
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = before - before[group_start]
    return out


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` at the place of each query in the sorted ``keys``, 0 where it is not there."""
    if len(keys) == 0:
        return np.zeros(len(queries), dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[at] == queries, values[at], 0)


def _ids(name: str, ids, vocab_size: int) -> np.ndarray:
    """``ids`` as a 1-D int64 array, or a ``ConfigError`` (not integers, not 1-D, outside the vocabulary)."""
    a = np.asarray(ids)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"the {name} text's ids must be a 1-D array of integers, got {a.dtype} of shape {a.shape}")
    if a.min() < 0 or a.max() >= vocab_size:
        raise ConfigError(f"the {name} text's ids must lie in [0, {vocab_size}), got {a.min()}..{a.max()}")
    return a.astype(np.int64, copy=False)


def count_probs(train_ids, ids, vocab_size: int, order: int, discount: float = DISCOUNT,
                online: bool = True) -> np.ndarray:
    """The count model's probability of ``ids[t]`` given ``ids[:t]``, for ``t`` in ``1 .. len(ids) - 1``.

    Counts come from ``train_ids`` (contexts within it only) and, with ``online``, from the part of
    ``ids`` before ``t``; the history is ``ids``' own (its first characters use the orders it has).
    """
    check_order(order, vocab_size)
    if not 0 < discount < 1:
        raise ConfigError(f"the count model's discount must lie in (0, 1), got {discount!r}")
    V = int(vocab_size)
    train, ids = _ids("training", train_ids, V), _ids("read", ids, V)
    n = len(ids)
    probs = np.full(max(n - 1, 0), 1.0 / V)
    for k in range(order + 1):
        first = max(k, 1)  # the first place with k characters before it
        if first > n - 1:
            break
        if len(train) > k:  # the training text's (context, next) pairs, counted
            pairs = _context_keys(train, k, V)[:-1] * V + train[k:]
            pair_keys, pair_counts = np.unique(pairs, return_counts=True)
            ctx_keys, ctx_first, ctx_kinds = np.unique(pair_keys // V, return_index=True, return_counts=True)
            ctx_totals = np.add.reduceat(pair_counts, ctx_first)
        else:
            pair_keys = pair_counts = ctx_keys = ctx_kinds = ctx_totals = np.zeros(0, dtype=np.int64)
        ctx = _context_keys(ids, k, V)[:-1]  # the context of each t in k .. n-1 (order 0 counts ids[0] too)
        pairs = ctx * V + ids[k:]
        trained = _lookup(pair_keys, pair_counts, pairs)
        count = trained.astype(np.float64)
        total = _lookup(ctx_keys, ctx_totals, ctx).astype(np.float64)
        kinds = _lookup(ctx_keys, ctx_kinds, ctx).astype(np.float64)
        if online:
            seen_pair = _earlier(pairs)
            count += seen_pair
            total += _earlier(ctx)
            kinds += _earlier(ctx, (seen_pair == 0) & (trained == 0))  # continuations new to this context
        count, total, kinds = count[first - k:], total[first - k:], kinds[first - k:]  # t from first: predicted
        lower = probs[first - 1:]
        seen = total > 0
        per = np.where(seen, total, 1.0)
        probs[first - 1:] = np.where(seen, (np.maximum(count - discount, 0.0) + discount * kinds * lower) / per,
                                     lower)
    # dozens of orders of back-off can round a share to 0: the smallest positive float instead (a probability)
    return np.maximum(probs, np.finfo(np.float64).tiny)


def mix(network_probs, counts_probs, grid=MIX_GRID, start: float = MIX_START) -> np.ndarray:
    """``w * network + (1 - w) * counts`` at each character, ``w`` the value of ``grid`` whose mixture scored
    best (highest summed log-probability) on every character before it; ``start`` for the first."""
    network = np.asarray(network_probs, dtype=np.float64)
    counts = np.asarray(counts_probs, dtype=np.float64)
    if network.shape != counts.shape or network.ndim != 1:
        raise ConfigError(f"mix needs two equal 1-D arrays, got {network.shape} and {counts.shape}")
    if not ((network >= 0) & (network <= 1)).all() or not ((counts > 0) & (counts <= 1)).all():
        raise ConfigError("mix needs probabilities: the network's in [0, 1], the counts' in (0, 1]")
    grid = np.asarray(grid, dtype=np.float64)
    weight = np.empty(len(network))
    scores = np.zeros(len(grid))  # each grid weight's summed log-probability over the characters before
    best = start
    for lo in range(0, len(network), _MIX_CHUNK):  # a chunk at a time: (chunk, grid) arrays, not (n, grid)
        hi = min(lo + _MIX_CHUNK, len(network))
        running = scores + np.cumsum(np.log(grid[None, :] * network[lo:hi, None]
                                            + (1 - grid[None, :]) * counts[lo:hi, None]), axis=0)
        weight[lo] = best
        weight[lo + 1:hi] = grid[np.argmax(running[:-1], axis=1)]
        scores = running[-1]
        best = grid[np.argmax(scores)]
    return weight * network + (1 - weight) * counts
