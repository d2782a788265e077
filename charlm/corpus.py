"""Reading, normalising and downloading text corpora.

A corpus is a UTF-8 text file. :func:`load_corpus` reads it strictly (a byte that is not UTF-8 is
an error naming its offset, never a silent replacement), normalises it with one of the
``PREPROCESS_MODES`` and encodes it with a character :class:`~charlm.vocab.Vocab`.

Known corpora (:data:`KNOWN_CORPORA`) are downloaded, never shipped: :func:`download` fetches one,
verifies its sha256 and renames it into place only once it is complete, so an interrupted download
leaves nothing behind. ``CHARLM_CORPUS_MIRROR`` (a directory or a base URL) is tried before the
official URL; that is how the tests run offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charlm.config import PREPROCESS_MODES, check_choice
from charlm.errors import CorpusError
from charlm.outputs import check_not_inside_owned, check_parent, new_folders, resolve_path, temp_prefix
from charlm.vocab import Vocab

__all__ = ["KNOWN_CORPORA", "MIRROR_ENV", "PREPROCESS_MODES", "Corpus", "CorpusError", "download", "ensure_corpus",
           "load_corpus", "normalize", "read_normalized", "read_source", "read_text", "source_files"]

MIRROR_ENV = "CHARLM_CORPUS_MIRROR"


@dataclass(frozen=True)
class KnownCorpus:
    name: str
    url: str
    sha256: str
    size: int  # bytes
    licence: str

    @property
    def filename(self) -> str:
        return f"{self.name}.txt"


# Checksums and sizes of the files the canonical URLs serve.
KNOWN_CORPORA: dict[str, KnownCorpus] = {
    c.name: c
    for c in (
        KnownCorpus(
            name="timemachine",
            url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
            sha256="8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
            size=178_979,
            licence="H. G. Wells, The Time Machine (1895): public domain; the d2l book's copy.",
        ),
        KnownCorpus(
            name="tinyshakespeare",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1_115_394,
            licence="Shakespeare's plays (public domain), as collected for char-rnn.",
        ),
    )
}


@dataclass
class Corpus:
    """A normalised text with its vocabulary and its ids (a compact 1-D integer array)."""

    text: str
    vocab: Vocab
    ids: np.ndarray
    path: Path | None = None
    preprocess: str = "raw"

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------
# Normalisation


_NOT_LETTERS = re.compile("[^A-Za-z]+")


def normalize(text: str, preprocess: str = "raw") -> str:
    """Apply one of :data:`PREPROCESS_MODES` to ``text``.

    - ``raw``: the text as it is, but a leading byte-order mark is dropped and CRLF becomes LF.
    - ``lower``: ``raw``, lower-cased.
    - ``letters``: d2l's ``read_time_machine`` rule exactly: every line becomes
      ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()`` and the lines are joined with nothing
      (so a line ending between two words fuses them, as in the book).
    """
    check_choice("preprocessing", preprocess, PREPROCESS_MODES)
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n")
    if preprocess == "lower":
        return text.lower()
    if preprocess == "letters":
        # str.splitlines would also split on \x0b, \x1c, U+2028, ...; d2l's readlines() splits on \n.
        return "".join(_NOT_LETTERS.sub(" ", line).strip().lower() for line in text.split("\n"))
    return text


# ---------------------------------------------------------------------------------------------
# Reading


def read_text(path: str | os.PathLike, allow_empty: bool = False) -> str:
    """Read a whole UTF-8 file strictly; every failure is a one-line :class:`CorpusError`."""
    path = Path(path)
    if path.is_dir():
        raise CorpusError(f"{path} is a directory, not a text file")
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data and not allow_empty:
        raise CorpusError(f"{path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason})"
        ) from None


def known_corpus_for(path: str | os.PathLike) -> KnownCorpus | None:
    """The known corpus whose file stem ``path`` names (``corpora/timemachine.txt``), if any."""
    p = Path(path)
    if p.suffix not in ("", ".txt"):
        return None
    return KNOWN_CORPORA.get(p.stem)


def ensure_corpus(path: str | os.PathLike, progress: bool = True, on_download=None) -> Path:
    """Return ``path``, first downloading it if it is missing and its stem names a known corpus.

    ``on_download(known, path)`` is called before a download starts (the CLI prints one line).
    """
    p = Path(path)
    if not p.exists():
        known = known_corpus_for(p)
        if known is not None:
            if on_download is not None:
                on_download(known, p)
            download(known.name, p.parent, progress=progress, filename=p.name)
    return p


def source_files(corpus: str | os.PathLike) -> list[Path]:
    """The files a corpus is made of: itself, or every ``*.txt`` under a directory in sorted path order."""
    path = Path(corpus)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"{path} is a directory with no *.txt file under it")
        return files
    return [path]


def read_source(corpus: str | os.PathLike) -> str:
    """The whole text of a corpus in memory: a file's text, or a directory's files each followed by a
    newline. A byte-order mark opening a file is dropped. (The streamed path gives the same text.)"""
    files = source_files(corpus)
    if len(files) == 1 and files[0] == Path(corpus):
        return read_text(files[0])
    texts = [read_text(f, allow_empty=True) for f in files]
    text = "".join(t.removeprefix("\ufeff") + "\n" for t in texts)
    if not any(texts):
        raise CorpusError(f"{corpus}: every *.txt file under it is empty")
    return text


def read_normalized(path: str | os.PathLike, preprocess: str = "raw") -> str:
    """The text of ``path`` (a file, or a directory of ``*.txt`` files) after ``preprocess``; a text that
    preprocessing empties is an error."""
    text = normalize(read_source(path), preprocess)
    if not text:
        raise CorpusError(f"{path} is empty after {preprocess!r} preprocessing")
    return text


def load_corpus(path: str | os.PathLike, preprocess: str = "raw", min_count: int = 1) -> Corpus:
    """Read ``path`` whole, normalise it, build its vocabulary and encode it, in memory.

    ``min_count``: characters seen fewer times are left out of the vocabulary and encoded as
    ``<unk>`` (id 0). Training reads large corpora through the token cache instead (charlm.tokens),
    which gives the same ids without holding the text.
    """
    from charlm.vocab import _code_points

    text = read_normalized(path, preprocess)
    cps = _code_points(text)  # once, for counting and encoding
    vocab = Vocab._from_code_points(cps, min_count=min_count)
    ids = vocab._encode_code_points(cps, "strict" if min_count == 1 else "replace", text)
    return Corpus(text=text, vocab=vocab, ids=ids, path=Path(path), preprocess=preprocess)


# ---------------------------------------------------------------------------------------------
# Downloading


def _sources(known: KnownCorpus) -> list[str]:
    """Where to look for ``known``, in order: the mirror (if set), then the official URL."""
    sources = []
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        if "://" in mirror:
            sources.append(mirror.rstrip("/") + "/" + known.filename)
        else:
            sources.append(str(Path(mirror) / known.filename))
    sources.append(known.url)
    return sources


def _copy_stream(src, dst, total: int | None, desc: str, progress: bool) -> str:
    """Copy ``src`` to ``dst`` in chunks, returning the sha256 of what was copied."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False
    ) as bar:
        while chunk := src.read(1 << 16):
            dst.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download(
    name: str,
    directory: str | os.PathLike = "corpora",
    progress: bool = True,
    filename: str | None = None,
    timeout: float = 30.0,
) -> Path:
    """Fetch the known corpus ``name`` into ``directory`` and return its path.

    The bytes go to a temporary file beside the target; only when the sha256 matches is it
    renamed into place. A file already there with the right checksum is kept as it is.
    """
    known = KNOWN_CORPORA.get(name)
    if known is None:
        raise CorpusError(
            f"unknown corpus {name!r}; known corpora: {', '.join(sorted(KNOWN_CORPORA))}"
        )
    directory = resolve_path(directory)  # (nope/../corpora is corpora, checked as such)
    check_parent(directory, option="--dir")
    if directory.exists() and not directory.is_dir():
        raise CorpusError(f"--dir {directory} is a file, not a folder")
    target = directory / (filename or known.filename)
    check_not_inside_owned(target, "corpus", option="--dir")
    if target.is_file() and _sha256_file(target) == known.sha256:
        return target
    if target.exists() or target.is_symlink():  # not the corpus: a file charlm did not write, kept as it is
        what = "a folder" if target.is_dir() else "not the " + name + " corpus (its sha256 differs)"
        raise CorpusError(f"{target} exists and is {what}; nothing was touched; move it or pass another --dir")
    try:
        with new_folders(directory):  # (removed again if nothing is kept)
            return _fetch(known, target, progress, timeout)
    except OSError as exc:
        raise CorpusError(f"cannot create {directory}: {exc.strerror or exc}") from None


def _fetch(known: KnownCorpus, target: Path, progress: bool, timeout: float) -> Path:
    """The first of the corpus's sources whose bytes have the right sha256, renamed to ``target``."""
    name, directory = known.name, target.parent
    failures = []
    for source in _sources(known):
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".part", dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if "://" in source:
                    with urllib.request.urlopen(source, timeout=timeout) as response:
                        length = response.headers.get("Content-Length")
                        total = int(length) if length else known.size
                        sha = _copy_stream(response, out, total, known.name, progress)
                else:
                    with open(source, "rb") as src:
                        sha = _copy_stream(src, out, known.size, known.name, progress)
            if sha != known.sha256:
                failures.append(f"{source}: checksum mismatch (sha256 {sha[:12]}…, expected {known.sha256[:12]}…)")
                continue
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
            os.replace(tmp, target)
            return target
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            failures.append(f"{source}: {reason}")
        finally:
            tmp.unlink(missing_ok=True)

    if any("checksum mismatch" in f for f in failures):
        raise CorpusError(f"could not fetch {name}: " + "; ".join(failures) + " (nothing was kept)")
    raise CorpusError(
        f"could not download {name} from {known.url} ({failures[-1].split(': ', 1)[-1]}); "
        f"when offline, set {MIRROR_ENV} to a directory or URL that holds {known.filename}"
        + (f" (tried: {'; '.join(failures[:-1])})" if len(failures) > 1 else "")
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
