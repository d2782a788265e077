"""A synthetic corpus whose best possible bits per character is known: a random Markov chain.

Each character depends on the ``--order`` characters before it through a transition table drawn
at random (each row from a symmetric Dirichlet with concentration ``--alpha``: small values give
peaked, predictable rows). Its entropy rate, the bits per character that the true model itself
needs in the long run and that no model can beat on average, is computed exactly:

    H = sum over contexts c of  pi(c) * H(next | c),

with ``pi`` the stationary distribution of contexts (power iteration on the chain of contexts).
The script also scores the true model on the held-out tail that ``charlm train`` uses
(``--val-fraction``), which is the figure to set beside the held-out bits per char of a trained
model: their gap is what the whole pipeline (model, optimisation, data, evaluation) leaves on the
table.

    python scripts/markov_corpus.py corpora/markov.txt
    charlm train corpora/markov.txt --time-limit 180
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from charlm.data import split

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;!?"  # 32 printable symbols


def make_chain(symbols: int, order: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Transition table ``P[c1, ..., ck, next]``: one Dirichlet row per context."""
    return rng.dirichlet(np.full(symbols, alpha), size=symbols**order).reshape((symbols,) * (order + 1))


def stationary(P: np.ndarray, tol: float = 1e-13, max_iter: int = 100_000) -> np.ndarray:
    """Stationary distribution over contexts: pi'[c2..ck, x] = sum_c1 pi[c1..ck] P[c1..ck, x]."""
    pi = np.full(P.shape[:-1], 1.0 / P[..., 0].size)
    for _ in range(max_iter):
        new = (pi[..., None] * P).sum(axis=0)  # drop the oldest symbol, append the next one
        if np.abs(new - pi).max() < tol:
            return new
        pi = new
    raise RuntimeError("the chain of contexts did not converge")


def entropy_rate(P: np.ndarray) -> float:
    """Bits per character of the chain in the long run."""
    pi = stationary(P)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_rows = -np.where(P > 0, P * np.log2(P), 0.0).sum(axis=-1)  # H(next | context)
    return float((pi * h_rows).sum())


def sample(P: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    order, S = P.ndim - 1, P.shape[-1]
    cdf = np.cumsum(P.reshape(-1, S), axis=1)
    cdf[:, -1] = 1.0
    out = np.empty(n, dtype=np.int64)
    out[:order] = rng.integers(0, S, order)
    u = rng.random(n)
    ctx = 0
    for k in range(order):
        ctx = ctx * S + int(out[k])
    size = S**order
    for i in range(order, n):  # a Python loop: about a million characters a second
        x = int(np.searchsorted(cdf[ctx], u[i], side="right"))
        out[i] = x
        ctx = (ctx * S + x) % size
    return out


def contexts(seq: np.ndarray, positions: np.ndarray, order: int, S: int) -> np.ndarray:
    """The index of the ``order`` characters before each position, as a row of ``P.reshape(-1, S)``."""
    ctx = np.zeros(len(positions), dtype=np.int64)
    for k in range(order, 0, -1):
        ctx = ctx * S + seq[positions - k]
    return ctx


def true_model_bits(P: np.ndarray, seq: np.ndarray, positions: np.ndarray) -> float:
    """Mean -log2 P(seq[i] | the ``order`` characters before it) over ``positions``."""
    order, S = P.ndim - 1, P.shape[-1]
    probs = P.reshape(-1, S)[contexts(seq, positions, order, S), seq[positions]]
    return float(-np.log2(probs).mean())


def counting_model_bits(seq, train_pos, test_pos, order: int, S: int, add: float = 0.5) -> float:
    """An n-gram model of the right order, counted on ``train_pos`` (add-``add`` smoothing), scored
    on ``test_pos``: how close the training text alone lets a model of the true form get."""
    counts = np.bincount(contexts(seq, train_pos, order, S) * S + seq[train_pos], minlength=S ** (order + 1))
    counts = counts.reshape(-1, S) + add
    probs = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log2(probs[contexts(seq, test_pos, order, S), seq[test_pos]]).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="text file to write")
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--order", type=int, default=2, help="characters of context")
    ap.add_argument("--symbols", type=int, default=len(ALPHABET), help=f"at most {len(ALPHABET)}")
    ap.add_argument("--alpha", type=float, default=0.05, help="Dirichlet concentration of each row")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as charlm train's, to score the same tail")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 2 <= args.symbols <= len(ALPHABET):
        raise SystemExit(f"--symbols must lie in [2, {len(ALPHABET)}]")
    rng = np.random.default_rng(args.seed)
    P = make_chain(args.symbols, args.order, args.alpha, rng)
    rate = entropy_rate(P)
    seq = sample(P, args.chars, rng)
    text = "".join(np.array(list(ALPHABET[: args.symbols]))[seq])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    train, val = split(np.arange(args.chars), args.val_fraction)
    # charlm's evaluation predicts every held-out character but the first
    held_out = true_model_bits(P, seq, val[1:])
    counted = counting_model_bits(seq, train[args.order :], val[1:], args.order, args.symbols)
    info = {"file": args.out, "chars": args.chars, "symbols": args.symbols, "order": args.order,
            "alpha": args.alpha, "seed": args.seed, "entropy_rate_bits": rate,
            "true_model_held_out_bits": held_out, "counting_model_held_out_bits": counted, "held_out_chars": int(len(val) - 1),
            "uniform_bits": math.log2(args.symbols)}
    Path(args.out).with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.chars:,} characters of an order-{args.order} chain over {args.symbols} symbols to {args.out}")
    print(f"entropy rate {rate:.4f} bits/char (uniform: {math.log2(args.symbols):.3f}); the true model scores "
          f"{held_out:.4f} bits/char on the held-out last {args.val_fraction:.0%}, an order-{args.order} "
          f"counting model fitted on the rest {counted:.4f}")
    return info


if __name__ == "__main__":
    main()
