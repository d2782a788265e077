import numpy as np
import pytest
import torch

from charlm.data import make_batches, min_tokens, random_batches, sequential_batches, split


def test_split_holds_out_contiguous_tail():
    ids = np.arange(100)
    train, val = split(ids, 0.1)
    assert train.tolist() == list(range(90))
    assert val.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match="val_fraction"):
        split(ids, 1.0)


@pytest.mark.parametrize("n, fraction, held_out", [(29, 0.1, 3), (24, 0.1, 2), (1000, 0.0555, 56)])
def test_split_rounds_the_held_out_length(n, fraction, held_out):
    train, val = split(np.arange(n), fraction)  # round(n * fraction), not its floor
    assert len(val) == held_out
    assert len(train) == n - held_out


def test_sequential_hand_worked():
    # 26 tokens, B=2, T=3. With offset o the stream ids[o:] is laid out as 2 rows.
    ids = np.arange(26)
    for seed in range(20):
        b = sequential_batches(ids, batch_size=2, num_steps=3, seed=seed)
        o = b.offset
        assert 0 <= o <= 2
        n = (26 - o - 1) // 2 * 2
        rows = np.arange(o, o + n).reshape(2, -1)
        batches = list(b)
        assert len(batches) == len(b) == rows.shape[1] // 3
        for k, (X, Y) in enumerate(batches):
            assert X.dtype == torch.int64
            assert X.shape == (2, 3)
            assert X.tolist() == rows[:, 3 * k: 3 * k + 3].tolist()
            assert Y.tolist() == (rows[:, 3 * k: 3 * k + 3] + 1).tolist()
        # row i of batch k+1 continues row i of batch k
        for (X0, _), (X1, _) in zip(batches, batches[1:]):
            assert (X1[:, 0] == X0[:, -1] + 1).all()


def test_sequential_offset_zero_exact_values():
    ids = np.arange(24)
    b = next(bb for bb in (sequential_batches(ids, 2, 3, seed=s) for s in range(50)) if bb.offset == 0)
    # rows: 0..10 and 11..21 (23 usable tokens -> 22 = 2 x 11); 3 blocks of 3 columns
    X = [x.tolist() for x, _ in b]
    assert X == [[[0, 1, 2], [11, 12, 13]], [[3, 4, 5], [14, 15, 16]], [[6, 7, 8], [17, 18, 19]]]


def test_random_hand_worked():
    ids = np.arange(30)
    for seed in range(20):
        b = random_batches(ids, batch_size=2, num_steps=4, seed=seed)
        o = b.offset
        assert 0 <= o <= 3
        windows = [list(range(s, s + 4)) for s in range(o, 30 - 4, 4) if s + 4 < 30]
        seen = []
        for X, Y in b:
            assert X.shape == (2, 4)
            assert (Y == X + 1).all()
            seen += X.tolist()
        assert len(b) == len(windows) // 2
        # non-overlapping windows cut at the offset, each used at most once
        assert all(w in windows for w in seen)
        assert len({tuple(w) for w in seen}) == len(seen)


def test_offset_never_reaches_num_steps():
    offsets = {random_batches(np.arange(100), 2, 5, seed=s).offset for s in range(300)}
    assert offsets == set(range(5))
    offsets = {sequential_batches(np.arange(100), 2, 5, seed=s).offset for s in range(300)}
    assert offsets == set(range(5))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_same_seed_same_batches_and_epochs_differ(mode):
    ids = np.random.default_rng(0).integers(0, 50, 5000)
    a = [x for x, _ in make_batches(mode, ids, 4, 7, seed=3, epoch=1)]
    b = [x for x, _ in make_batches(mode, torch.from_numpy(ids), 4, 7, seed=3, epoch=1)]
    c = [x for x, _ in make_batches(mode, ids, 4, 7, seed=3, epoch=2)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert len(a) == len(b)
    assert len(a) != len(c) or any((x != y).any() for x, y in zip(a, c))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_start_skips_batches(mode):
    ids = np.arange(1000)
    full = list(make_batches(mode, ids, 4, 5, seed=1))
    rest = make_batches(mode, ids, 4, 5, seed=1, start=3)
    assert len(rest) == len(full) - 3
    assert all((x == y).all() for (x, _), (y, _) in zip(full[3:], rest))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_shards_take_contiguous_rows(mode):
    ids = np.arange(2000)
    full = list(make_batches(mode, ids, 4, 5, seed=1))
    parts = [list(make_batches(mode, ids, 4, 5, seed=1, rank=r, world_size=2)) for r in range(2)]
    for k, (X, Y) in enumerate(full):
        assert torch.equal(torch.cat([parts[0][k][0], parts[1][k][0]]), X)
        assert torch.equal(torch.cat([parts[0][k][1], parts[1][k][1]]), Y)
    with pytest.raises(ValueError, match="split evenly"):
        make_batches(mode, ids, 3, 5, world_size=2)


def test_memmap_input(tmp_path):
    path = tmp_path / "ids.bin"
    np.arange(500, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    X, Y = next(iter(sequential_batches(mm, 2, 10, seed=0)))
    assert X.dtype == torch.int64
    assert (Y == X + 1).all()


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_too_short_says_have_and_need(mode):
    need = min_tokens(4, 10)
    assert need == 50
    make_batches(mode, np.arange(need), 4, 10, seed=0)  # exactly enough: at least one batch
    for seed in range(20):
        assert len(make_batches(mode, np.arange(need), 4, 10, seed=seed)) >= 1
    with pytest.raises(ValueError, match="has 49 tokens.*needs at least 50"):
        make_batches(mode, np.arange(49), 4, 10, seed=0)
    with pytest.raises(ValueError, match="sampling must be"):
        make_batches("shuffled", np.arange(100), 2, 2)
