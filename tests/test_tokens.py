"""The token cache: streamed == in memory for every mode and chunk size, cached, checked, read in windows."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlm import load_corpus
from charlm.cli import main
from charlm.data import load_split, make_batches
from charlm.errors import CorpusError
from charlm.evaluation import evaluate
from charlm.models import RNNLM
from charlm.tokens import ENTRY_NAME_BYTES, Normalizer, TokenReader, prepare

MODES = ("raw", "lower", "letters")
# Characters that make chunking hard: CR/LF, a BOM, Greek capital sigma (final form when lowered at a
# word's end), astral and multi-byte characters, letters, spaces and punctuation.
ALPHABET = st.sampled_from(list("ab Z\r\n\r\n.,\ufeffΣσΟΔéß时🙂İ'\t-") + ["ΟΔΟΣ", "ΟΔΟΣ ", "\r\n", "abc def"])
TEXTS = st.lists(ALPHABET, min_size=1, max_size=60).map("".join)


def _ids_in_memory(path, mode, min_count=1):
    corpus = load_corpus(path, preprocess=mode, min_count=min_count)
    return corpus.vocab, np.asarray(corpus.ids, dtype=np.int64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, chunk=st.integers(1, 64), mode=st.sampled_from(MODES))
def test_streamed_equals_in_memory_for_every_chunk_size(tmp_path_factory, text, chunk, mode):
    d = tmp_path_factory.mktemp("s")
    path = d / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    try:
        vocab, ids = _ids_in_memory(path, mode)
    except CorpusError as exc:  # empty after preprocessing: the streamed path must say so too
        with pytest.raises(CorpusError, match="is empty"):
            prepare(path, mode, cache_dir=d / "cache", chunk_bytes=chunk)
        assert "empty" in str(exc)
        return
    prepared = prepare(path, mode, cache_dir=d / "cache", chunk_bytes=chunk)
    assert prepared.vocab == vocab
    np.testing.assert_array_equal(prepared.ids.read().astype(np.int64), ids)


@pytest.mark.parametrize("mode", MODES)
def test_normalizer_pieces_join_to_normalize(mode):
    from charlm.corpus import normalize

    for text in ("ΟΔΟΣ ΟΔΟΣ\r\nhim\r\nwas  ΟΔΟΣ\rx, y.\n\n" * 3, "ab, cd\nef  gh\r\n\n ij.ΣΣ!" * 2):
        for size in (1, 2, 3, 7, 1000):
            n = Normalizer(mode)
            pieces = [n.feed(text[i:i + size]) for i in range(0, len(text), size)] + [n.flush()]
            assert "".join(pieces) == normalize(text, mode), (text, size)


def test_invalid_byte_names_its_offset_and_leaves_no_cache(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("héllo wörld ".encode() * 50 + b"\xff" + b"tail")
    for chunk in (1, 5, 64, 1 << 20):
        with pytest.raises(CorpusError, match=r"not UTF-8: byte 0xff at offset 700 \(invalid start byte\)"):
            prepare(path, cache_dir=tmp_path / "cache", chunk_bytes=chunk)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    path.write_bytes("é".encode()[:1])  # a sequence cut short by the end of the file
    with pytest.raises(CorpusError, match="offset 0"):
        prepare(path, cache_dir=tmp_path / "cache", chunk_bytes=1)


def test_dtype_is_the_smallest_that_holds_the_vocabulary(tmp_path):
    for n_symbols, dtype in ((200, "uint8"), (300, "uint16")):
        path = tmp_path / f"{n_symbols}.txt"
        path.write_text("".join(chr(0x4E00 + i) for i in range(n_symbols - 1)))
        prepared = prepare(path, cache_dir=tmp_path / "cache")
        assert prepared.meta["dtype"] == dtype
        assert prepared.meta["vocab_size"] == n_symbols
        assert (prepared.path / "tokens.bin").stat().st_size == (n_symbols - 1) * np.dtype(dtype).itemsize


def test_cache_hits_and_misses(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the time machine\n" * 100)
    first = prepare(path, cache_dir=tmp_path / "cache")
    assert not first.hit
    again = prepare(path, cache_dir=tmp_path / "cache")
    assert again.hit
    assert again.path == first.path
    assert again.sha256 == first.sha256
    assert prepare(path, "lower", cache_dir=tmp_path / "cache").path != first.path  # another mode, another entry
    path.write_text("the time machine\n" * 101)  # size changes
    grown = prepare(path, cache_dir=tmp_path / "cache")
    assert not grown.hit
    assert len(grown.ids) == 17 * 101
    os.utime(path, ns=(1, 1))  # mtime changes, size does not
    assert not prepare(path, cache_dir=tmp_path / "cache").hit
    assert prepare(path, cache_dir=tmp_path / "cache").hit


def test_concurrent_prepares_build_once(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abcdefgh " * 200_000)
    results, errors = [], []

    def run():
        try:
            results.append(prepare(path, cache_dir=tmp_path / "cache", chunk_bytes=1 << 16))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sorted(r.hit for r in results) == [False, True, True, True]  # one built it, three waited and read it
    assert len({r.path for r in results}) == 1


def test_directory_corpus_is_its_txt_files_in_order_each_followed_by_a_newline(tmp_path):
    d = tmp_path / "books"
    (d / "b").mkdir(parents=True)
    (d / "b" / "2.txt").write_text("second")
    (d / "a.txt").write_text("\ufefffirst")  # a byte-order mark opening a file is dropped
    (d / "notes.md").write_text("not a text file")
    prepared = prepare(d, cache_dir=tmp_path / "cache")
    assert prepared.vocab.decode(prepared.ids.read()) == "first\nsecond\n"
    vocab, ids = _ids_in_memory(d, "raw")
    assert vocab == prepared.vocab
    np.testing.assert_array_equal(prepared.ids.read().astype(np.int64), ids)


def test_min_count_maps_rare_characters_to_unk(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("aaaa bbb cc d 时")
    prepared = prepare(path, min_count=2, cache_dir=tmp_path / "cache")
    assert prepared.vocab.itos[1:] == ["a", " ", "b", "c"]  # by count: a 4, " " 4 (later), b 3, c 2
    assert prepared.vocab.decode(prepared.ids.read()) == "aaaa bbb cc <unk> <unk>"
    vocab, ids = _ids_in_memory(path, "raw", min_count=2)
    assert vocab == prepared.vocab
    np.testing.assert_array_equal(prepared.ids.read().astype(np.int64), ids)


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_token_file_batches_equal_array_batches(tmp_path, sampling):
    path = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    path.write_text("".join(rng.choice(list("abcdefgh \n"), 5000)))
    prepared = prepare(path, cache_dir=tmp_path / "cache")
    array = prepared.ids.read()
    for kwargs in ({}, {"start": 3, "epoch": 2}, {"rank": 1, "world_size": 2, "seed": 5}):
        a = list(make_batches(sampling, array, 8, 12, **kwargs))
        b = list(make_batches(sampling, prepared.ids, 8, 12, **kwargs))
        assert len(a) == len(b) > 10
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb)
            assert torch.equal(ya, yb)


def test_evaluation_reads_blocks_and_equals_the_array_path(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the time traveller smiled\n" * 300)
    prepared = prepare(path, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = RNNLM(len(prepared.vocab), cell="gru", hidden_size=8)
    tail = prepared.ids[-2000:]
    assert isinstance(tail, TokenReader)  # a view, not a copy
    a = evaluate(model, tail, batch_size=7, num_steps=33)
    b = evaluate(model, tail.read(), batch_size=7, num_steps=33)
    assert a.tokens == b.tokens
    assert a.loss == pytest.approx(b.loss, rel=1e-6)


def test_reading_a_large_token_file_keeps_memory_flat(tmp_path):
    """Iterate over 48 MB of ids in random windows: resident memory stays where it started."""
    path = tmp_path / "big.txt"
    block = ("".join(np.random.default_rng(1).choice(list("abcdefghij \n"), 1 << 20))).encode()
    with open(path, "wb") as f:
        for _ in range(48):
            f.write(block)
    code = f"""
import sys
from charlm.tokens import prepare
from charlm.data import make_batches
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) // 1024
p = prepare({str(path)!r}, cache_dir={str(tmp_path / 'cache')!r})
base = rss()
for epoch in range(2):
    for i, (x, y) in enumerate(make_batches('random', p.ids, 32, 64, epoch=epoch)):
        if i == 3000:
            break
after_random = rss()
for i, (x, y) in enumerate(make_batches('sequential', p.ids, 32, 64)):
    if i == 3000:
        break
print(base, after_random, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    base, after_random, after_sequential = map(int, out.stdout.split())
    # the shuffled window order of 48 MB / 64 is 3 MB; a memory map would have added ~100 MB of pages here
    assert after_random - base < 30, out.stdout
    assert after_sequential - base < 30, out.stdout


# ---- through the CLI ---------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_prepare_one_line_then_cached(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the time machine\n" * 100)
    r = run("prepare", path, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output.count("\n") == 1
    assert r.output.startswith("1,700 tokens, 11 symbols (with <unk>), uint8, ")
    assert "MB/s" in r.output
    r = run("prepare", path)
    assert "cached" in r.output


@pytest.mark.parametrize("name, data, message", [
    ("missing.txt", None, "no such file or directory"),
    ("empty.txt", b"", "is empty"),
    ("e", "dir", "is a directory with no *.txt file under it"),
    ("bin.txt", bytes(range(256)), "is not UTF-8: byte 0x80 at offset 128"),
])
def test_cli_prepare_bad_inputs_one_line(tmp_path, name, data, message):
    path = tmp_path / name
    if data == "dir":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    r = run("prepare", path)
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert r.output.count("\n") == 1


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("abc")
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    r = run("prepare", tmp_path / "c.txt")
    assert r.exit_code == 1
    assert "cannot write the token cache" in r.output
    assert "CHARLM_CACHE_DIR" in r.output
    assert r.output.count("\n") == 1


def test_full_disk_while_preparing_is_one_line_and_leaves_no_cache(tmp_path, tiny_disk):
    path = tmp_path / "c.txt"
    path.write_text("abcdefgh\n" * 100_000)  # 900 KB of ids: more than the 512 KB disk
    cache = tmp_path / "cache"
    cache.mkdir()
    p = tiny_disk(cache, "512k", f"CHARLM_CACHE_DIR={cache} {sys.executable} -m charlm prepare {path} --quiet; "
                                 f"echo rc=$?; ls -a {cache}")
    assert "rc=1" in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    assert "cannot write the token cache" in p.stderr
    assert "No space left on device" in p.stderr
    assert [n for n in p.stdout.split() if n not in (".", "..", "rc=1") and not n.endswith(".lock")] == []


def test_resume_refuses_a_changed_corpus(tmp_path):
    path = tmp_path / "c.txt"
    text = "the time traveller smiled and the machine was gone\n"
    path.write_text(text * 60)
    args = ["train", path, "--out", tmp_path / "run", "--hidden-size", 8, "--batch-size", 4, "--num-steps", 10,
            "--eval-every", 2, "--quiet"]
    assert run(*args, "--max-steps", 4).exit_code == 0
    path.write_text(text * 59 + text.replace("smiled", "frowned"))  # same letters, other text
    r = run(*args, "--max-steps", 8, "--resume")
    assert r.exit_code == 1
    assert f"{path} changed since the run started" in r.output
    assert r.output.count("\n") == 1
    r = run("eval", tmp_path / "run")  # the held-out split would no longer be the run's
    assert r.exit_code == 1
    assert "changed since the run used it" in r.output


def test_large_vocabulary_trains_and_generates(tmp_path):
    """A synthetic CJK corpus with 5,000 distinct characters, most of them rare."""
    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.zipf(1.3, 60_000), 5000) - 1
    path = tmp_path / "cjk.txt"
    path.write_text("".join(chr(0x4E00 + int(r)) for r in ranks))
    out = tmp_path / "run"
    r = run("train", path, "--out", out, "--hidden-size", 16, "--embedding-dim", 8, "--num-layers", 1,
            "--max-steps", 6, "--eval-every", 3, "--min-count", 3, "--quiet")
    assert r.exit_code == 0, r.output
    r = run("generate", chr(0x4E00), "--checkpoint", out, "--length", 50, "--temperature", 1, "--seed", 0)
    assert r.exit_code == 0, r.output
    text = r.output.rstrip("\n")
    assert len(text) == 51
    assert "<unk>" not in text
    data = load_split(path, "raw", 0.1, min_count=3)
    assert 0 < len(data.vocab) < 5000  # rare characters left out
    assert Path(data.cache).is_dir()


@pytest.mark.parametrize("stem", ["c" * 251, "é" * 125 + "a", "时" * 83 + "ab"])  # each 255 bytes with ".txt"
def test_a_corpus_with_a_long_file_name_is_cached(tmp_path, monkeypatch, stem):
    """#35: a 255-byte source name (the longest a file may have) made a cache entry's name too long."""
    path = tmp_path / f"{stem}.txt"
    assert len(os.fsencode(path.name)) == 255
    path.write_text("the time machine\n" * 10)
    first = prepare(path, cache_dir=tmp_path / "cache")
    assert not first.hit and prepare(path, cache_dir=tmp_path / "cache").hit
    name = first.path.name
    assert len(os.fsencode(name)) <= ENTRY_NAME_BYTES
    assert name.endswith(f"-raw-{name.rsplit('-', 1)[1]}") and path.name.startswith(name.split("-raw-")[0])
    assert len(name.split("-raw-")[0]) > 40  # readable: as much of the name as fits, cut between characters
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    r = run("prepare", path)
    assert r.exit_code == 0 and "cached" in r.output, r.output


def _mutated(meta: dict, how: str):
    if how == "not an object":
        return [meta]
    if how.startswith("no "):
        return {k: v for k, v in meta.items() if k != how[3:]}
    key, value = how.split("=", 1)
    return {**meta, key: json.loads(value)}


@pytest.mark.parametrize("how", ["no dtype", "no tokens", "no sha256", "no vocab_size", "no size", "not an object",
                                 'dtype="float64"', 'dtype="no such type"', "dtype=8", 'tokens="1700"', "tokens=true",
                                 "tokens=-1", "sha256=null", "vocab_size=3"])
def test_a_malformed_cache_meta_json_is_stale_and_rebuilt(tmp_path, monkeypatch, how):
    """#35: a meta.json without dtype was a KeyError traceback; any malformed entry is built again."""
    path = tmp_path / "c.txt"
    path.write_text("the time machine\n" * 100)
    first = prepare(path, cache_dir=tmp_path / "cache")
    meta_path = first.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(_mutated(meta, how)))
    again = prepare(path, cache_dir=tmp_path / "cache")
    assert not again.hit and again.path == first.path
    assert json.loads(meta_path.read_text())["sha256"] == meta["sha256"]
    assert again.vocab.decode(again.ids.read()) == path.read_text()
    meta_path.write_text(json.dumps(_mutated(meta, how)))
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    r = run("prepare", path)
    assert r.exit_code == 0 and "cached" not in r.output and r.exception is None, r.output


def test_a_cache_entry_with_a_broken_tokenizer_is_rebuilt(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the time machine\n" * 100)
    first = prepare(path, cache_dir=tmp_path / "cache")
    (first.path / "tokenizer.json").write_text("{not json")
    again = prepare(path, cache_dir=tmp_path / "cache")
    assert not again.hit and again.vocab == first.vocab


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_cache_entries_take_the_mode_the_umask_gives_a_new_folder(tmp_path, umask, mode):
    """#35: entries were made 0700 (tempfile.mkdtemp) whatever the umask."""
    path = tmp_path / "c.txt"
    path.write_text("the time machine\n" * 100)
    old = os.umask(umask)
    try:
        prepared = prepare(path, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert prepared.path.stat().st_mode & 0o777 == mode
    assert (prepared.path / "tokens.bin").stat().st_mode & 0o777 == mode & 0o666


def test_a_min_count_that_leaves_no_character_is_one_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("aaab")
    with pytest.raises(CorpusError, match=r"min count 4 leaves no character of .* \(the most frequent one is seen 3 "):
        prepare(path, min_count=4, cache_dir=tmp_path / "cache")
    r = run("prepare", path, "--min-count", 2**70)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "leaves no character" in r.output, r.output
