"""The character vocabulary: characters <-> integer ids.

Id 0 is ``<unk>``; then come the characters by descending frequency, ties broken by first
occurrence, which is the order of d2l's ``Vocab`` (so a ``--d2l`` run numbers characters as the
book does).

The vocabulary is saved as a HuggingFace ``tokenizer.json`` that ``tokenizers.Tokenizer.from_file``
reads and that gives the same ids: a ``WordLevel`` model with the explicit vocabulary, a
``Split("", "isolated")`` pre-tokenizer (one token per character; a ``Regex(".")`` would not match
``\\n``) and a ``Fuse`` decoder (without it, ``decode`` puts spaces between characters).
This is the only module that imports ``tokenizers``.

Encoding does not go through ``tokenizers``, which handles one character at a time in Python-visible
objects: the text's UTF-32 code points index a numpy lookup table, two orders of magnitude faster
(``scripts/bench_encode.py``; figures in the README). The tests check both give the same ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from charlm.errors import ConfigError, UnknownCharactersError

UNK = "<unk>"
ERRORS = ("strict", "replace")
_CODE_POINTS = 0x110000
_BLOCK = 1 << 22  # code points counted at a time by from_text


def _code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as a uint32 array (no Python loop over characters)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _describe(chars: Iterable[str], limit: int = 5) -> str:
    chars = list(chars)
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit])
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return shown + more


class Vocab:
    """An ordered character vocabulary with ``<unk>`` at id 0."""

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ConfigError(f"a vocabulary entry must be one character, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ConfigError("the vocabulary lists a character twice")
        self.itos: list[str] = [UNK, *chars]
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        self.dtype = np.dtype(np.uint8 if len(self.itos) <= 256 else np.uint16 if len(self.itos) <= 65536 else np.uint32)
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        # Dense table over every code point, in the ids' own type: table[cp] = id, and 0 (the id of
        # <unk>, which no text character has) for characters outside the vocabulary.
        self._table = np.zeros(_CODE_POINTS, dtype=self.dtype)
        self._table[cps] = np.arange(1, len(chars) + 1)
        self._chars = np.array(self.itos, dtype=object)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, min_count: int = 1) -> "Vocab":
        """Characters of ``text`` by descending count, ties by first occurrence; those seen fewer than
        ``min_count`` times are left out (they encode as ``<unk>`` with ``errors="replace"``)."""
        return cls._from_code_points(_code_points(text), min_count)

    @classmethod
    def _from_code_points(cls, cps: np.ndarray, min_count: int = 1) -> "Vocab":
        if not isinstance(min_count, int) or min_count < 1:
            raise ConfigError(f"min count must be an integer >= 1, got {min_count!r}")
        counts = np.zeros(_CODE_POINTS, dtype=np.int64)
        first = np.full(_CODE_POINTS, len(cps), dtype=np.int64)
        for start in range(0, len(cps), _BLOCK):  # in blocks: a character's first block finds it
            block = cps[start:start + _BLOCK]
            new = first[block] == len(cps)  # characters not seen in an earlier block
            if new.any():
                where = np.flatnonzero(new)
                np.minimum.at(first, block[where], where + start)
            block_counts = np.bincount(block)  # up to the block's largest code point only
            counts[: len(block_counts)] += block_counts
        present = np.flatnonzero(counts >= min_count)
        order = np.lexsort((first[present], -counts[present]))  # by -count, then first position
        return cls(chr(int(cp)) for cp in present[order])

    # -- basics ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __contains__(self, char: str) -> bool:
        return char in self.stoi

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, chars={''.join(self.itos[1:21])!r}{'…' if len(self) > 21 else ''})"

    # -- encoding -------------------------------------------------------------------------
    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        ids = self._lookup(_code_points(text))
        bad = np.flatnonzero(ids == 0)
        return list(dict.fromkeys(text[i] for i in bad))

    def _lookup(self, cps: np.ndarray) -> np.ndarray:
        """Ids of code points (every one is < 0x110000); 0 for those outside the vocabulary."""
        return self._table[cps]

    def encode(self, text: str, errors: str = "strict") -> np.ndarray:
        """Ids of the characters of ``text`` as a compact integer array.

        ``errors="strict"`` raises :class:`~charlm.errors.UnknownCharactersError` naming the unknown characters; ``"replace"``
        maps each of them to ``<unk>`` (id 0), one id per character.
        """
        return self._encode_code_points(_code_points(text), errors, text)

    def _encode_code_points(self, cps: np.ndarray, errors: str, text: str) -> np.ndarray:
        if errors not in ERRORS:
            raise ConfigError(f"errors must be one of {', '.join(ERRORS)}, got {errors!r}")
        ids = self._lookup(cps)  # unknown characters are already <unk> (0)
        if errors == "strict" and not ids.all():
            chars = self.unknown_chars(text)
            raise UnknownCharactersError(
                f"{int((ids == 0).sum())} character(s) not in the vocabulary: {_describe(chars)}", chars)
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids`` (any iterable of ints, numpy array or tensor); id 0 is ``<unk>``."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ConfigError(f"ids must lie in [0, {len(self) - 1}]")
        return "".join(self._chars[ids])

    # -- persistence ----------------------------------------------------------------------
    def to_tokenizer(self):
        """This vocabulary as a ``tokenizers.Tokenizer`` (character level)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=dict(self.stoi), unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        tok.decoder = decoders.Fuse()
        return tok

    def to_json(self) -> str:
        return self.to_tokenizer().to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a file or a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ConfigError(f"not a valid tokenizer.json ({exc})") from None
        vocab = tok.get_vocab(with_added_tokens=False)
        itos = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in itos] != list(range(len(itos))) or not itos or itos[0] != UNK:
            raise ConfigError("tokenizer.json is not a charlm vocabulary (ids must be 0..V-1, <unk> first)")
        return cls(itos[1:])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Read a ``tokenizer.json`` written by :meth:`save` (``path``: file or directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls.from_json(path.read_text(encoding="utf-8"))
