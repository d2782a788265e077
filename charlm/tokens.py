"""Token files: a corpus streamed once, in chunks, into a cached file of ids that training reads
without loading it.

A prepared corpus is a directory in the cache (``$CHARLM_CACHE_DIR``, else ``~/.cache/charlm``)::

    tokens.bin        the ids, in the smallest unsigned type that holds the vocabulary
    tokenizer.json    the vocabulary (charlm.vocab)
    meta.json         format, dtype, token count, preprocessing, min count, the sources (path, size,
                      mtime) and their sha256; written last, so its presence means "complete"

Its name is a key over the sources' resolved paths, sizes and mtimes, the preprocessing and the
minimum count: a changed source gets a new key and is prepared again. A lock file serialises
concurrent preparations of one key (two commands, or the processes of one distributed run), and
the files are written under temporary names and renamed into place, so a half-written cache is
never read.

Streaming gives exactly the ids of the in-memory path (:func:`charlm.corpus.load_corpus`), whatever
the chunk size: the UTF-8 decoder carries a sequence cut in two to the next chunk, and
:class:`Normalizer` holds back the few characters whose result depends on what follows (a ``\\r``
that may start ``\\r\\n``, a word whose final sigma depends on the next letter, a run of non-letters).

One pass over the text is enough: each character gets a provisional id when first seen (so
provisional order is first-occurrence order), the provisional ids and their counts are written and
counted, and a second pass over that compact file maps them to the final ids, which are ordered by
count and then by first occurrence, as ``Vocab.from_text`` orders them.
"""

from __future__ import annotations

import codecs
import errno
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlm.config import PREPROCESS_MODES, check_choice
from charlm.corpus import source_files
from charlm.errors import ConfigError, CorpusError, os_error_line
from charlm.outputs import check_folder, check_not_inside_owned, new_folders, resolve_path
from charlm.vocab import Vocab

FORMAT_VERSION = 1
CACHE_ENV = "CHARLM_CACHE_DIR"
CHUNK_BYTES = 1 << 22  # bytes of text decoded at a time
_UNSEEN = np.iinfo(np.uint32).max  # a code point's provisional id before it is seen
_LETTER = re.compile("[A-Za-z]")
_LOWER_CONTEXT = 64  # characters of look-behind kept for lower(): a sigma's case-ignorable run back to a letter
# An entry's name at most, in bytes: with its temporary (".NAME.tmp-XXXXXXXX") and lock (".NAME.lock") names
# it stays within the 255 bytes a file name may have; a longer source name is cut (the key names the source)
ENTRY_NAME_BYTES = 200
_DTYPES = ("uint8", "uint16", "uint32")  # what a token file's ids may be


# ---------------------------------------------------------------------------------------------
# Streaming a corpus's files (charlm.corpus.source_files), decoded and normalised chunk by chunk


def _stream_text(files: list[Path], directory: bool, chunk_bytes: int, digest, progress) -> Iterator[str]:
    """Decoded text, chunk by chunk; every file's bytes also go through ``digest``."""
    for f in files:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        first, done = True, 0
        try:
            handle = open(f, "rb")
        except OSError as exc:
            raise CorpusError(f"{f}: cannot read ({os_error_line(exc)})") from None
        with handle:
            while True:
                data = handle.read(chunk_bytes)
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    offset = done - pending + exc.start
                    raise CorpusError(f"{f} is not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {offset} "
                                      f"({exc.reason})") from None
                done += len(data)
                digest.update(data)
                if progress is not None and data:
                    progress(len(data))
                if first and text:
                    text = text.removeprefix("\ufeff")
                    first = False
                if text:
                    yield text
                if not data:
                    break
        if directory:
            yield "\n"


class Normalizer:
    """``charlm.corpus.normalize`` for a text that arrives in pieces: ``feed`` returns what is final,
    ``flush`` the rest; the concatenation equals ``normalize`` of the whole (byte-order mark excepted:
    the caller drops it)."""

    def __init__(self, preprocess: str):
        check_choice("preprocessing", preprocess, PREPROCESS_MODES)
        self.preprocess, self.held, self.at_start = preprocess, "", True
        self.before = ""  # lower: the last characters already emitted, as they were before lowering

    def feed(self, text: str) -> str:
        text = self.held + text
        cut = len(text) - 1 if text.endswith("\r") else len(text)  # "\r" may begin "\r\n"
        if self.preprocess == "letters":
            # Up to the last letter: a run of non-letters after it may go on in the next piece.
            match = _LETTER.search(text[::-1])
            cut = len(text) - match.start() if match else 0
        elif self.preprocess == "lower":
            # A capital sigma lowers to its final form when no cased letter follows it: hold back the
            # last word while it has one, until a space or a newline (neither cased nor case-ignorable)
            # settles what follows every sigma before it.
            word = max(text.rfind(" "), text.rfind("\n")) + 1
            if "\u03a3" in text[word:]:
                cut = min(cut, word)
        out = self._apply(text[:cut])
        self.held = text[cut:]
        if self.preprocess == "letters":  # a run of non-letters counts only for whether it holds a line end
            self.held = "\n" if "\n" in self.held else " " if self.held and not self.at_start else ""
        return out

    def flush(self) -> str:
        text, self.held = self.held, ""
        if self.preprocess == "letters":
            return ""  # non-letters at the very end: the last line's trailing strip
        return self._apply(text)

    def _apply(self, text: str) -> str:
        if not text:
            return ""
        if self.preprocess != "letters":
            text = text.replace("\r\n", "\n")
        if self.preprocess == "lower":
            # ... and it looks back for a cased letter: lower with what came before, then drop that part.
            before, self.before = self.before, (self.before + text)[-_LOWER_CONTEXT:]
            return (before + text).lower()[len(before.lower()):]
        if self.preprocess == "letters":
            # normalize's per-line rule on a stream: a run of non-letters becomes nothing when it
            # holds a line end (both lines are stripped there) or opens the text, else one space.
            at_start, self.at_start = self.at_start, False
            return _letters(text, at_start)
        return text


def _letters(text: str, at_start: bool) -> str:
    """normalize's ``letters`` rule, on arrays: each run of non-letters becomes nothing when it holds a
    line end (the lines on both sides are stripped there) or opens the text, else one space; letters
    are lower-cased. ``text`` ends with a letter (the caller holds back a trailing run)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    letter = ((cps >= 65) & (cps <= 90)) | ((cps >= 97) & (cps <= 122))
    run_start = ~letter
    run_start[1:] &= letter[:-1]  # a non-letter after a letter (or first)
    run = np.cumsum(run_start) - 1  # at a non-letter: the number of its run
    has_line_end = np.zeros(int(run_start.sum()), dtype=bool)
    has_line_end[run[cps == 10]] = True
    space = run_start.copy()
    space[run_start] = ~has_line_end
    if at_start and not letter[0]:
        space[0] = False
    keep = letter | space
    out = np.where(space, 32, cps | 32)[keep]  # | 32 lowers A-Z and leaves a-z as they are
    return out.astype(np.uint8).tobytes().decode("ascii")


# ---------------------------------------------------------------------------------------------
# The cache


def cache_root() -> Path:
    """``$CHARLM_CACHE_DIR``, else the user cache directory (``$XDG_CACHE_HOME/charlm`` or ``~/.cache/charlm``)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "charlm"


def _sources_key(files: list[Path], preprocess: str, min_count: int) -> tuple[list[dict], str]:
    sources = []
    for f in files:
        st = f.stat()
        sources.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    blob = json.dumps({"format": FORMAT_VERSION, "sources": sources, "preprocess": preprocess,
                       "min_count": min_count}, sort_keys=True)
    return sources, hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_name(source: str, preprocess: str, key: str) -> str:
    """A cache entry's name: ``SOURCE-PREPROCESS-KEY``, the source's name cut on a character boundary so
    that the whole has at most ``ENTRY_NAME_BYTES`` bytes (the key alone identifies the source)."""
    tail = f"-{preprocess}-{key}"
    room = ENTRY_NAME_BYTES - len(os.fsencode(tail))
    head, size = [], 0
    for char in source:
        size += len(os.fsencode(char))  # (a byte that is not UTF-8 counts one: the file system's encoding)
        if size > room:
            break
        head.append(char)
    return "".join(head) + tail


@dataclass
class PreparedCorpus:
    """A corpus in the cache: its vocabulary, its ids (a :class:`TokenReader`) and its metadata."""

    path: Path  # the cache directory
    vocab: Vocab
    ids: "TokenReader"
    meta: dict
    hit: bool = False  # found in the cache, not built now

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]


def prepare(corpus: str | os.PathLike, preprocess: str = "raw", min_count: int = 1, cache_dir=None,
            chunk_bytes: int = CHUNK_BYTES, progress=None) -> PreparedCorpus:
    """The prepared corpus from the cache, built first if it is missing or its source changed.

    ``min_count``: characters seen fewer times become ``<unk>`` (id 0, never generated).
    ``progress(nbytes)`` is called as the source is read (only when it is built).
    """
    check_choice("preprocessing", preprocess, PREPROCESS_MODES)
    if not isinstance(min_count, int) or min_count < 1:
        raise ConfigError(f"min count must be an integer >= 1, got {min_count!r}")
    files = source_files(corpus)
    sources, key = _sources_key(files, preprocess, min_count)
    root = resolve_path(cache_dir if cache_dir is not None else cache_root())
    target = root / entry_name(Path(corpus).resolve().name, preprocess, key)
    hit = _open(target)
    if hit is not None:
        return hit
    check_not_inside_owned(target, "token-cache", option=CACHE_ENV)
    try:
        with new_folders(root), _locked(root / f".{target.name}.lock"):
            hit = _open(target)  # built by another process while this one waited
            if hit is not None:
                return hit
            if target.exists():  # a stale entry is replaced once built: refused now if it is not charlm's
                check_folder(target, "token-cache", option=CACHE_ENV, hint=f"; delete it or set {CACHE_ENV}")
            _build(corpus, files, sources, preprocess, min_count, target, chunk_bytes, progress)
    except OSError as exc:
        raise CorpusError(f"cannot write the token cache in {root}: {os_error_line(exc)}; set {CACHE_ENV} to a "
                          f"writable directory") from None
    built = _open(target)
    built.hit = False
    return built


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# meta.json's keys that are read, and their types: an entry without one of them is stale (built again)
_META = {"format_version": int, "dtype": str, "tokens": int, "vocab_size": int, "size": int, "sha256": str,
         "preprocess": str, "min_count": int, "sources": list, "source": str}


def _open(target: Path) -> PreparedCorpus | None:
    """The entry at ``target``, or None when it is missing, incomplete or malformed (then it is built again)."""
    try:
        meta = json.loads((target / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    if any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool) for k, t in _META.items()):
        return None
    if meta["dtype"] not in _DTYPES or meta["tokens"] < 0:
        return None
    tokens = target / "tokens.bin"
    dtype = np.dtype(meta["dtype"])
    try:
        if not tokens.is_file() or tokens.stat().st_size != meta["tokens"] * dtype.itemsize:
            return None
        vocab = Vocab.load(target / "tokenizer.json")
    except (OSError, ValueError):  # (ValueError: a tokenizer.json that is not a charlm vocabulary)
        return None
    if len(vocab) != meta["vocab_size"]:
        return None
    return PreparedCorpus(path=target, vocab=vocab, ids=TokenReader(tokens, dtype), meta=meta, hit=True)


class _TooManySymbols(Exception):
    pass


def _build(corpus, files, sources, preprocess, min_count, target: Path, chunk_bytes, progress) -> None:
    t0 = time.perf_counter()
    directory = Path(corpus).is_dir()
    if not sum(s["size"] for s in sources):
        raise CorpusError(f"{corpus}: every *.txt file under it is empty" if directory else f"{corpus} is empty")
    tmp = _new_folder(target.parent, f".{target.name}.tmp-")
    try:
        provisional = tmp / "provisional.bin"
        for width in (np.uint16, np.uint32):  # provisional ids: 2 bytes each unless > 65,535 symbols
            digest = hashlib.sha256()
            try:
                with open(provisional, "wb") as out:
                    chars, counts = _first_pass(_stream_text(files, directory, chunk_bytes, digest, progress),
                                                Normalizer(preprocess), out, np.dtype(width))
                break
            except _TooManySymbols:
                continue
        if not counts.sum():
            raise CorpusError(f"{corpus} is empty after {preprocess!r} preprocessing")
        order = np.lexsort((np.arange(len(chars)), -counts))  # by count, then first occurrence
        order = order[counts[order] >= min_count]
        if not len(order):
            raise CorpusError(f"min count {min_count:,} leaves no character of {corpus} (the most frequent one is "
                              f"seen {int(counts.max()):,} times)")
        vocab = Vocab([chars[i] for i in order])
        dtype = vocab.dtype  # the smallest unsigned type for its ids
        final = np.zeros(len(chars), dtype=dtype)  # provisional id -> final id; dropped ones -> <unk>
        final[order] = np.arange(1, len(order) + 1, dtype=dtype)
        n = _remap(provisional, tmp / "tokens.bin", final, np.dtype(width))
        provisional.unlink()
        vocab.save(tmp / "tokenizer.json")
        meta = {"format_version": FORMAT_VERSION, "dtype": dtype.name, "tokens": n, "vocab_size": len(vocab),
                "preprocess": preprocess, "min_count": min_count, "sources": sources,
                "source": str(Path(sources[0]["path"]).parent if directory else sources[0]["path"]),
                "size": sum(s["size"] for s in sources), "sha256": digest.hexdigest(),
                "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "meta.json.part").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name in ("tokens.bin", "tokenizer.json", "meta.json.part"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp / "meta.json.part", tmp / "meta.json")  # last: its presence means complete
        if target.exists():  # a stale entry (another format, a truncated file): checked to be charlm's before
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``PREFIX`` + random letters in ``parent``, with the mode the umask gives any new folder
    (``tempfile.mkdtemp`` makes it 0700 whatever the umask, and the entry is this folder renamed)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, f"no free name for a new folder {prefix}* in {parent}")


def _first_pass(texts, normalizer: Normalizer, out, width: np.dtype) -> tuple[list[str], np.ndarray]:
    """Write provisional ids (in first-occurrence order, as ``width``) to ``out``; return the characters
    and their counts. Raises ``_TooManySymbols`` when ``width`` cannot number them."""
    pid = np.full(0x110000, _UNSEEN, dtype=np.uint32)  # code point -> provisional id
    chars: list[str] = []
    counts = np.zeros(0, dtype=np.int64)

    def emit(text: str):
        nonlocal counts
        if not text:
            return
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = pid[cps]
        unseen = ids == _UNSEEN
        if unseen.any():  # new characters: provisional ids in order of first appearance
            where = np.flatnonzero(unseen)
            first = np.full(len(pid), len(cps), dtype=np.int64)
            np.minimum.at(first, cps[where], where)
            new_cps = np.flatnonzero(first < len(cps))
            for cp in new_cps[np.argsort(first[new_cps], kind="stable")]:
                pid[cp] = len(chars)
                chars.append(chr(int(cp)))
            if len(chars) > np.iinfo(width).max + 1:
                raise _TooManySymbols
            ids = pid[cps]
        counts = np.concatenate([counts, np.zeros(len(chars) - len(counts), np.int64)])
        ids = ids.astype(width)
        counts += np.bincount(ids, minlength=len(chars))
        out.write(ids.tobytes())

    for text in texts:
        emit(normalizer.feed(text))
    emit(normalizer.flush())
    return chars, counts


def _remap(src: Path, dst: Path, final: np.ndarray, width: np.dtype, block: int = 1 << 22) -> int:
    n = 0
    with open(src, "rb") as f, open(dst, "wb") as out:
        while data := f.read(block * width.itemsize):
            out.write(final[np.frombuffer(data, dtype=width)].tobytes())
            n += len(data) // width.itemsize
    return n


# ---------------------------------------------------------------------------------------------
# Reading


class TokenReader:
    """A read-only view of ids in a token file, read with ``pread`` into fresh arrays.

    It is used like the in-memory id array: ``len()``, slicing with a step of 1 (a view, no read),
    ``read()`` (the ids as an array) and :meth:`windows`. Nothing stays mapped: resident memory is
    what the caller keeps, whatever the file's size (a memory map kept open would count every page
    ever touched as resident).
    """

    def __init__(self, path: str | os.PathLike, dtype, start: int = 0, stop: int | None = None,
                 lookup: np.ndarray | None = None):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        total = self.path.stat().st_size // self.dtype.itemsize
        self.start, self.stop = start, total if stop is None else stop
        self.lookup = lookup  # the file's id -> the id read (another vocabulary's numbering); None: as stored
        self._fd = None

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def ndim(self) -> int:
        return 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ConfigError("a token file is sliced with a step of 1 only")
            return TokenReader(self.path, self.dtype, self.start + start, self.start + max(start, stop), self.lookup)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(key)
            return self.read(i, 1)[0]
        raise TypeError(f"TokenReader indices are ints or slices, not {type(key).__name__}")

    def __getstate__(self):  # picklable (worker processes): the descriptor is reopened there
        return {**self.__dict__, "_fd": None}

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def read(self, start: int = 0, length: int | None = None) -> np.ndarray:
        """``length`` ids from ``start`` (relative to this view); all of them by default."""
        length = len(self) - start if length is None else length
        size = self.dtype.itemsize
        data = os.pread(self._file(), length * size, (self.start + start) * size)
        if len(data) != length * size:
            raise CorpusError(f"{self.path} is shorter than its metadata says; delete it to prepare it again")
        ids = np.frombuffer(data, dtype=self.dtype)
        return ids if self.lookup is None else self.lookup[ids]

    def remapped(self, lookup: np.ndarray) -> "TokenReader":
        """The same ids read through ``lookup`` (stored id -> id), e.g. into another model's vocabulary."""
        return TokenReader(self.path, self.dtype, self.start, self.stop, lookup)

    def counts(self, size: int, block: int = 1 << 24) -> np.ndarray:
        """How often each id 0..size-1 occurs, read in blocks (the file never whole)."""
        total = np.zeros(size, dtype=np.int64)
        for start in range(0, len(self), block):
            total += np.bincount(self.read(start, min(block, len(self) - start)), minlength=size)[:size]
        return total

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype)

    def windows(self, starts, length: int) -> np.ndarray:
        """``(len(starts), length)`` int64: the ids from each start on (relative to this view)."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, s in enumerate(np.asarray(starts).tolist()):
            out[row] = self.read(s, length)
        return out


def windows(ids, starts, length: int) -> np.ndarray:
    """``(len(starts), length)`` int64 windows of ``ids`` (an array or a :class:`TokenReader`)."""
    if isinstance(ids, TokenReader):
        return ids.windows(starts, length)
    starts = np.asarray(starts, dtype=np.int64)
    return np.ascontiguousarray(ids[starts[:, None] + np.arange(length)], dtype=np.int64)
