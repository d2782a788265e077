import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from charlm import corpus as cm
from charlm.cli import main


def test_letters_is_d2l_rule_and_joins_lines_with_nothing():
    text = "The Time-Machine, 1895!\r\nHim\nwas  here\n"
    assert cm.normalize(text, "letters") == "the time machinehimwas here"
    assert cm.normalize("\ufeffA\r\nB", "raw") == "A\nB"
    assert cm.normalize("\ufeffA\r\nB", "lower") == "a\nb"
    with pytest.raises(ValueError, match="unknown preprocessing"):
        cm.normalize("x", "words")


def test_timemachine_letters_matches_the_book(mirror, tmp_path):
    c = cm.load_corpus(mirror / "timemachine.txt", preprocess="letters")
    assert len(c.text) == 170_580
    assert len(c.vocab) == 28
    assert c.vocab.itos[:5] == ["<unk>", " ", "e", "t", "a"]  # d2l's order
    assert c.ids.dtype == np.uint8
    assert c.ids.ndim == 1
    assert c.vocab.decode(c.ids[:20]) == c.text[:20]


def test_registry_matches_mirror_checksums(mirror):
    for known in cm.KNOWN_CORPORA.values():
        data = (mirror / known.filename).read_bytes()
        assert len(data) == known.size
        assert hashlib.sha256(data).hexdigest() == known.sha256


def test_download_from_mirror(mirror, tmp_path):
    path = cm.download("timemachine", tmp_path / "corpora", progress=False)
    assert path == tmp_path / "corpora" / "timemachine.txt"
    assert path.read_bytes() == (mirror / "timemachine.txt").read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["timemachine.txt"]


def test_download_bad_checksum_keeps_nothing(tmp_path, monkeypatch):
    bad = tmp_path / "mirror"
    bad.mkdir()
    (bad / "timemachine.txt").write_text("not the time machine")
    monkeypatch.setenv(cm.MIRROR_ENV, str(bad))
    out = tmp_path / "out"
    with pytest.raises(cm.CorpusError, match="checksum mismatch"):
        cm.download("timemachine", out, progress=False, timeout=0.5)
    assert not out.exists()  # nothing kept, and the folder the download made removed again


def test_interrupted_download_leaves_nothing(mirror, tmp_path, monkeypatch):
    real = cm._copy_stream

    def dying_copy(src, dst, total, desc, progress):
        dst.write(src.read(1000))
        raise KeyboardInterrupt  # Ctrl-C in the middle of the transfer

    monkeypatch.setattr(cm, "_copy_stream", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        cm.download("timemachine", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(cm, "_copy_stream", real)
    assert cm.download("timemachine", tmp_path, progress=False).stat().st_size == 178_979


def test_offline_without_mirror_names_url_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(cm.MIRROR_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(cm, "KNOWN_CORPORA", {
        "timemachine": cm.KnownCorpus("timemachine", "http://127.0.0.1:9/timemachine.txt",
                                      cm.KNOWN_CORPORA["timemachine"].sha256, 178_979, "pd")})
    with pytest.raises(cm.CorpusError) as err:
        cm.download("timemachine", tmp_path / "out", progress=False, timeout=2)
    msg = str(err.value)
    assert "http://127.0.0.1:9/timemachine.txt" in msg
    assert cm.MIRROR_ENV in msg
    assert "\n" not in msg


def test_read_text_errors(tmp_path):
    with pytest.raises(cm.CorpusError, match="no such file"):
        cm.read_text(tmp_path / "missing.txt")
    with pytest.raises(cm.CorpusError, match="is a directory"):
        cm.read_text(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(cm.CorpusError, match="is empty"):
        cm.read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("utf-8") + b" na\xefve")
    with pytest.raises(cm.CorpusError, match=r"byte 0xef at offset 11"):
        cm.read_text(tmp_path / "latin1.txt")


def test_letters_can_empty_a_file(tmp_path):
    (tmp_path / "digits.txt").write_text("1234\n5678\n")
    with pytest.raises(cm.CorpusError, match="empty after 'letters'"):
        cm.load_corpus(tmp_path / "digits.txt", preprocess="letters")


# -- through the command line: one line, non-zero exit, no traceback ----------------------------

def _run(args, **kw):
    result = CliRunner().invoke(main, args, catch_exceptions=False, **kw)
    return result


@pytest.mark.parametrize("setup, expected", [
    (lambda d: None, "no such file"),
    (lambda d: (d / "c.txt").mkdir(), "is a directory"),
    (lambda d: (d / "c.txt").write_bytes(b""), "is empty"),
    (lambda d: (d / "c.txt").write_bytes(b"ab\xff"), "not UTF-8: byte 0xff at offset 2"),
])
def test_cli_bad_corpus_is_one_line(tmp_path, setup, expected):
    setup(tmp_path)
    result = _run(["stats", str(tmp_path / "c.txt")])
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert result.output.strip().count("\n") == 0
    assert "Traceback" not in result.output


def test_cli_unknown_corpus_name(tmp_path):
    result = _run(["download", "moby", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown corpus 'moby'; known corpora: timemachine, tinyshakespeare"


def test_cli_bad_checksum(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tinyshakespeare.txt").write_text("forged")
    monkeypatch.setenv(cm.MIRROR_ENV, str(tmp_path / "m"))
    monkeypatch.setattr(cm, "KNOWN_CORPORA", {
        "tinyshakespeare": cm.KnownCorpus("tinyshakespeare", "http://127.0.0.1:9/x.txt",
                                          cm.KNOWN_CORPORA["tinyshakespeare"].sha256, 1, "pd")})
    result = _run(["download", "tinyshakespeare", "--dir", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert "checksum mismatch" in result.output
    assert "nothing was kept" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_downloads_known_corpus_named_by_a_missing_path(mirror, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run(["stats", "corpora/timemachine.txt", "--preprocess", "letters"])
    assert result.exit_code == 0, result.output
    assert "downloading the timemachine corpus" in result.output
    assert "170,580 characters, 28 symbols" in result.output
    assert Path("corpora/timemachine.txt").stat().st_size == 178_979


def test_cli_version():
    result = _run(["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("charlm, version ")
