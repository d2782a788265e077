import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from charlm.vocab import Vocab

# Any Unicode text a file can hold (no lone surrogates: they are not valid UTF-8).
texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=200)


def test_order_is_frequency_then_first_occurrence():
    v = Vocab.from_text("banana bread")
    # counts: a 4, n 2, b 2, r 1 ... ties by first occurrence: b before n, ' ' before r, e, d
    assert v.itos == ["<unk>", "a", "b", "n", " ", "r", "e", "d"]
    assert len(v) == 8
    assert v.stoi["a"] == 1


def test_encode_decode_and_dtype():
    v = Vocab.from_text("hello world\n")
    ids = v.encode("hello\nworld")
    assert ids.dtype == np.uint8
    assert v.decode(ids) == "hello\nworld"
    assert v.decode([int(i) for i in ids]) == "hello\nworld"


def test_unknown_characters_strict_names_them():
    v = Vocab.from_text("abc")
    with pytest.raises(ValueError) as err:
        v.encode("abxcy😀x")
    msg = str(err.value)
    assert "'x' (U+0078)" in msg
    assert "'y' (U+0079)" in msg
    assert "U+1F600" in msg
    assert "4 character(s)" in msg


def test_unknown_characters_replace_one_id_each():
    v = Vocab.from_text("abc")
    ids = v.encode("a😀é\u0301c", errors="replace")
    assert ids.tolist() == [1, 0, 0, 0, 3]
    with pytest.raises(ValueError):
        v.encode("a", errors="ignore")


def test_large_vocab_uses_wider_dtype():
    text = "".join(chr(0x4E00 + i) for i in range(300))
    v = Vocab.from_text(text)
    assert v.encode(text).dtype == np.uint16
    assert v.decode(v.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(texts)
def test_roundtrip_any_unicode(text):
    v = Vocab.from_text(text)
    assert v.decode(v.encode(text)) == text
    assert len(v) == len(set(text)) + 1


@settings(max_examples=60, deadline=None)
@given(texts, texts)
def test_tokenizer_json_matches_numpy_path(tmp_path_factory, text, other):
    v = Vocab.from_text(text)
    path = v.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    probe = text + other  # includes characters outside the vocabulary
    assert tok.encode(probe).ids == v.encode(probe, errors="replace").tolist()
    assert tok.decode(v.encode(text).tolist()) == text
    assert Vocab.load(path) == v


def test_special_characters_roundtrip_through_tokenizer_json(tmp_path):
    text = "tab\there\nnew line, e\u0301 combining, 中文, emoji 👍🏽, <unk> literal\r\n"
    v = Vocab.from_text(text)
    v.save(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode(text).ids == v.encode(text).tolist()
    assert tok.decode(tok.encode(text).ids) == text
    assert Vocab.load(tmp_path).decode(v.encode(text)) == text


def test_load_refuses_foreign_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Vocab.load(tmp_path)
