"""Dynamic evaluation's count model (charlm.ngram) and its mixture with the network: exact counts, a
distribution at every character, nothing read before it is predicted, the weight learned from text scored."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm import RNNLM
from charlm.errors import ConfigError
from charlm.evaluation import (counts_in_order, dynamic_losses, evaluate, evaluate_dynamic, losses_in_order,
                               mixed_with_counts)
from charlm.ngram import MIX_GRID, MIX_START, check_order, count_probs, max_order, mix


def direct(train, ids, V, order, discount, online):
    """The count model written out: every count taken afresh for every character."""
    train, ids = list(train), list(ids)
    out = []
    for t in range(1, len(ids)):
        p = 1.0 / V
        for k in range(order + 1):
            if k > t:
                break
            ctx = tuple(ids[t - k:t])
            follow = Counter(train[i + k] for i in range(len(train) - k) if tuple(train[i:i + k]) == ctx)
            if online:
                follow.update(ids[i + k] for i in range(t - k) if tuple(ids[i:i + k]) == ctx)
            total = sum(follow.values())
            if total:
                p = (max(follow[ids[t]] - discount, 0) + discount * len(follow) * p) / total
        out.append(p)
    return np.array(out)


@pytest.mark.parametrize("online", [False, True])
def test_the_counts_are_those_of_a_direct_count(online):
    rng = np.random.default_rng(0)
    for trial in range(12):
        V = int(rng.integers(2, 7))
        train = rng.integers(0, V, int(rng.integers(0, 120)))
        ids = rng.integers(0, V, int(rng.integers(2, 80)))
        for order in (1, 2, 4):
            got = count_probs(train, ids, V, order, 0.6, online)
            assert np.allclose(got, direct(train, ids, V, order, 0.6, online), rtol=1e-12, atol=0), (trial, order)


@pytest.mark.parametrize("online", [False, True])
def test_every_prediction_is_a_distribution_over_the_vocabulary(online):
    rng = np.random.default_rng(1)
    V = 5
    train = rng.integers(0, V, 200)
    for length in (1, 2, 7, 40):
        history = list(rng.integers(0, V, length))
        total = sum(count_probs(train, history + [v], V, 3, online=online)[-1] for v in range(V))
        assert total == pytest.approx(1.0, abs=1e-12), length


def test_no_prediction_reads_its_character_or_any_after_it():
    rng = np.random.default_rng(2)
    V = 6
    train, ids = rng.integers(0, V, 300), rng.integers(0, V, 120)
    probs = count_probs(train, ids, V, 5)
    for t in (1, 30, 119):
        changed = ids.copy()
        changed[t:] = (changed[t:] + 1) % V
        assert np.array_equal(count_probs(train, changed, V, 5)[:t - 1], probs[:t - 1])  # ids[1..t-1]'s


def test_the_text_read_is_counted_as_it_is_read():
    rng = np.random.default_rng(3)
    V = 8
    phrase = rng.integers(0, V, 60)
    ids = np.concatenate([phrase, phrase])  # a passage the training text does not hold, read twice
    train = rng.integers(0, V, 500)
    online, fixed = count_probs(train, ids, V, 6), count_probs(train, ids, V, 6, online=False)
    assert np.log(online[70:]).mean() > np.log(fixed[70:]).mean() + 1.0  # the second reading is predicted
    assert np.log(online[70:]).mean() > math.log(0.5)  # one earlier reading, less its discount, and more


def test_orders_are_exact_integers_or_refused():
    assert max_order(71) == 9 and 71 ** 10 < 2 ** 63 < 71 ** 11
    assert max_order(2) == 61 and max_order(3_000) == 4
    for size in (np.int64(71), np.int32(71), np.uint8(71), np.int64(2)):  # numpy's would wrap around
        assert max_order(size) == max_order(int(size))
    ids = np.array([3, 1, 4, 1, 5])
    assert np.array_equal(count_probs([], ids, ids.max() + 1, 2), count_probs([], ids, 6, 2))
    for bad in (0, -1, True, 2.5, "6", None):
        with pytest.raises(ConfigError, match=r"order \(characters of context\) must be an integer >= 1"):
            check_order(bad, 71)
    with pytest.raises(ConfigError, match="order 10 is too high for a vocabulary of 71 characters: at most 9"):
        count_probs([1, 2], [1, 2, 3], 71, 10)
    with pytest.raises(ConfigError, match="vocabulary of at least 2"):
        max_order(1)
    with pytest.raises(ConfigError, match=r"ids must lie in \[0, 4\)"):
        count_probs([1, 2], [1, 4, 3], 4, 2)
    for bad in ([1.5, 2.0], [[1, 2], [2, 1]]):
        with pytest.raises(ConfigError, match="ids must be a 1-D array of integers"):
            count_probs([1, 2], bad, 4, 2)
    for discount in (1.0, 0.0, float("nan")):
        with pytest.raises(ConfigError, match=r"discount must lie in \(0, 1\)"):
            count_probs([1, 2], [1, 2, 3], 4, 2, discount=discount)
    assert count_probs([], [3, 1], 4, 2, online=False).tolist() == [0.25]  # nothing counted: uniform
    assert count_probs([], [3, 1], 4, 2).tolist() == [0.75 * 0.25]  # the 3 read: a quarter's discount spread
    deep = count_probs(np.zeros(300_000, dtype=np.int64), np.array([0] * 70 + [1]), 2, 61)  # (0.75 / 3e5) ** 61
    assert deep.min() > 0 and math.isfinite(mixed_with_counts(np.full(70, 0.5), deep).loss)


def test_the_mixture_weight_is_the_grid_value_best_on_the_characters_before():
    network = np.array([0.9] * 5 + [0.01] * 40)
    counts = np.array([0.1] * 5 + [0.5] * 40)
    mixed = mix(network, counts)
    weights = (mixed - counts) / (network - counts)
    assert weights[0] == pytest.approx(MIX_START)
    assert weights[1:6] == pytest.approx([MIX_GRID.max()] * 5)  # the network was better on all before
    assert weights[-1] == pytest.approx(MIX_GRID.min())  # by the end the counts are
    for t, w in enumerate(weights[1:], 1):  # each weight the best on the characters before it
        scores = [np.log(g * network[:t] + (1 - g) * counts[:t]).sum() for g in MIX_GRID]
        assert w == pytest.approx(MIX_GRID[int(np.argmax(scores))])


def test_the_mixture_never_reads_ahead_and_is_the_same_chunked(monkeypatch):
    import charlm.ngram as ngram

    rng = np.random.default_rng(4)
    network, counts = rng.uniform(0.01, 1, 300), rng.uniform(0.01, 1, 300)
    whole = mix(network, counts)
    later = network.copy()
    later[200:] = 1e-6
    assert np.array_equal(mix(later, counts)[:200], whole[:200])
    monkeypatch.setattr(ngram, "_MIX_CHUNK", 7)
    assert np.allclose(mix(network, counts), whole, rtol=1e-13, atol=0)
    with pytest.raises(ConfigError, match="two equal 1-D arrays"):
        mix(network, counts[:-1])
    for bad_network, bad_counts in ((network * 2, counts), (network, counts * 0), (network * np.nan, counts)):
        with pytest.raises(ConfigError, match="mix needs probabilities"):
            mix(bad_network, bad_counts)


def test_the_losses_read_in_order_are_those_evaluate_sums():
    torch.manual_seed(0)
    model = RNNLM(12, cell="lstm", hidden_size=24, num_layers=1, embedding_dim=8)
    ids = np.random.default_rng(5).integers(1, 12, 700)
    losses = losses_in_order(model, ids, num_steps=64)
    assert losses.shape == (699,) and losses.dtype == np.float64
    assert losses.mean() == pytest.approx(evaluate(model, ids, batch_size=1).loss, rel=1e-6)
    dynamic = dynamic_losses(model, ids, lr=0.01, num_steps=50)
    assert dynamic.shape == (699,)
    assert dynamic.mean() == pytest.approx(evaluate_dynamic(model, ids, lr=0.01, num_steps=50).loss, rel=1e-12)
    assert dynamic[:49] == pytest.approx(losses[:49], rel=1e-5)  # the first segment: scored before any step


def test_a_network_mixed_with_counts_predicts_a_repeated_text_better_than_alone():
    torch.manual_seed(0)
    model = RNNLM(12, cell="lstm", hidden_size=24, num_layers=1, embedding_dim=8)  # untrained
    rng = np.random.default_rng(6)
    ids = np.tile(rng.integers(1, 12, 50), 8)
    train = rng.integers(1, 12, 2_000)  # nothing of the passage in it
    static = losses_in_order(model, ids)
    counts = counts_in_order(ids, train, 12, 6)
    assert np.array_equal(counts, count_probs(train, ids, 12, 6))
    mixed = mixed_with_counts(static, counts)
    assert mixed.tokens == len(ids) - 1
    assert mixed.loss < static.mean() - 1.0  # the counts learn the repeats the network cannot
    manual = -np.log(mix(np.exp(-static), counts)).mean()
    assert mixed.loss == pytest.approx(manual, rel=1e-12)
    with pytest.raises(ConfigError, match=r"one loss and one count probability per character, got \(398,\) and"):
        mixed_with_counts(static[:-1], counts)
    with pytest.raises(ConfigError, match="per character, got \\(0,\\)"):
        mixed_with_counts([], [])
    for bad in (-0.5, np.nan):
        with pytest.raises(ConfigError, match="losses are >= 0"):
            mixed_with_counts(np.full(399, bad), counts)
    assert math.isfinite(mixed_with_counts(np.full(399, np.inf), counts).loss)  # a network's 0: the counts' share


def test_a_large_vocabulary_lowers_the_default_order_to_exact_keys(tmp_path):
    from click.testing import CliRunner

    from charlm.cli import main

    corpus = tmp_path / "many.txt"
    corpus.write_text("".join(chr(0x4E00 + i) for i in range(2_100)) * 3, encoding="utf-8")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "8", "--embedding-dim", "4",
                                  "--batch-size", "2", "--num-steps", "5", "--max-steps", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-prior", "0"])
    assert r.exit_code == 0, r.output
    assert "mixed with counts of contexts up to 4 characters" in r.output
    assert max_order(2_101) == 4  # 2,101 ** 6 is past 2 ** 63


def test_the_cli_figures_are_the_mixtures_of_the_parts(corpus, tmp_path):
    """charlm eval --dynamic --json: each figure is the one its parts give through the library."""
    import json

    from click.testing import CliRunner

    from charlm.checkpoint import load_checkpoint
    from charlm.cli import main
    from charlm.config import DYNAMIC_PRIOR_CHARS
    from charlm.evaluation import held_out_ids, training_tail_ids

    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "16", "--batch-size", "4",
                                  "--num-steps", "10", "--max-steps", "6", "--eval-every", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--json", "--dynamic-counts", "3"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    ckpt = load_checkpoint(out)
    ids, train = held_out_ids(ckpt), training_tail_ids(ckpt, 10**9)
    static = losses_in_order(ckpt.model, ids)
    steps = dynamic_losses(ckpt.model, ids, prior_ids=training_tail_ids(ckpt, DYNAMIC_PRIOR_CHARS))
    counts = counts_in_order(ids, train, len(ckpt.vocab), 3)
    want = {"static_one_row": static.mean(), "dynamic_network": steps.mean(),
            "dynamic": mixed_with_counts(steps, counts).loss, "static_counts": mixed_with_counts(static, counts).loss}
    for key, loss in want.items():
        assert got[key]["loss"] == pytest.approx(loss, rel=1e-9), key
        assert got[key]["tokens"] == len(ids) - 1
    assert got["dynamic"]["loss"] < got["dynamic_network"]["loss"] - 0.05  # the counts matter to this tiny model
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-counts", "3"])  # the lines say the same
    assert r.exit_code == 0, r.output
    _, order_line, parts_line = r.output.strip().splitlines()
    bits = {key: f"{value['bits_per_char']:.4f}" for key, value in got.items() if isinstance(value, dict)}
    delta = {key: f"{got[key]['bits_per_char'] - got['static_one_row']['bits_per_char']:+.4f}" for key in bits}
    assert (f"static {bits['static_one_row']} bits/char, dynamic {bits['dynamic']} ({delta['dynamic']}; "
            in order_line and "contexts up to 3 characters" in order_line)
    assert parts_line.endswith(f"its parts: the network's steps without the counts {bits['dynamic_network']} "
                               f"({delta['dynamic_network']}), the counts with the static network "
                               f"{bits['static_counts']} ({delta['static_counts']})")
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-counts", "1"])
    assert r.exit_code == 0 and "contexts up to 1 character in" in r.output


def test_a_run_trained_on_part_of_its_text_counts_that_part_only(corpus, tmp_path):
    """max_chars (--d2l's) keeps the first characters of the training part: the counts (and the rms prior) read
    those."""
    from click.testing import CliRunner

    from charlm.checkpoint import load_checkpoint
    from charlm.cli import main
    from charlm.config import TrainConfig
    from charlm.evaluation import held_out_ids, training_tail_ids
    from charlm.training import train

    out = tmp_path / "r"
    train(TrainConfig(corpus=str(corpus), out=str(out), hidden_size=16, batch_size=4, num_steps=10, max_steps=2,
                      max_chars=300, time_limit=None))
    ckpt = load_checkpoint(out)
    text = ckpt.vocab.encode(Path(corpus).read_text(encoding="utf-8"))
    assert np.array_equal(training_tail_ids(ckpt, 10**9), text[:300])
    assert np.array_equal(training_tail_ids(ckpt, 100), text[200:300])
    assert np.array_equal(held_out_ids(ckpt), text[len(text) - len(held_out_ids(ckpt)):])  # the tail, as before
    r = CliRunner().invoke(main, ["eval", str(out), "--dynamic", "--dynamic-prior", "0"])
    assert r.exit_code == 0 and "up to 6 characters in 300 training chars" in r.output, r.output
