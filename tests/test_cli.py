"""The command line as a user meets it: presets, and one line for every problem a user can fix."""

import dataclasses
import json
import sys

import pytest
from click.testing import CliRunner

from charlm.cli import main
from charlm.config import D2L_PRESET, TrainConfig



@pytest.fixture
def corpus(write_corpus):
    return write_corpus(12, "Tiny Text.txt", upper=True)  # upper case: --d2l's letters preprocessing must lower it


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_d2l_preset_names_only_training_options():
    assert set(D2L_PRESET) <= {f.name for f in dataclasses.fields(TrainConfig)}
    TrainConfig(corpus="x.txt", **D2L_PRESET)  # and every value is valid


def test_d2l_trains_the_books_model_and_explicit_options_win(corpus, tmp_path):
    out = tmp_path / "d2l"
    r = run("train", corpus, "--d2l", "--out", out, "--max-steps", 3, "--hidden-size", 16, "--quiet")
    assert r.exit_code == 0, r.output
    assert "training perplexity" in r.output  # --d2l reports it beside the held-out figure
    saved = json.loads((out / "last" / "config.json").read_text())
    train, model = saved["train"], saved["model"]
    for key in ("preprocess", "max_chars", "cell", "embedding_dim", "num_steps", "optimizer", "lr", "epochs"):
        assert train[key] == D2L_PRESET[key], key
    assert train["hidden_size"] == 16  # typed on the command line: wins over the preset
    assert model["embedding_dim"] == 0  # one-hot inputs
    letters = {c for c in corpus.read_text().lower() if c.isalpha()}
    assert model["vocab_size"] == len(letters) + 2  # lower-case letters, space and <unk>, as in d2l
    assert saved["corpus"]["preprocess"] == "letters"


@pytest.mark.parametrize("out", ["/proc/charlm-run", "{file}/run"])
def test_unwritable_out_is_one_line(corpus, tmp_path, out):
    (tmp_path / "a-file").write_text("x")
    out = out.format(file=tmp_path / "a-file")
    r = run("train", corpus, "--out", out, "--max-steps", 2, "--batch-size", 4, "--num-steps", 10, "--quiet")
    assert r.exit_code == 1, r.output
    assert r.output.startswith(f"Error: cannot create the run directory {out}")
    assert r.output.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["stats", "{tmp}/missing.txt"], "no such file"),
    (["stats", "{tmp}/no-text"], "is a directory with no *.txt file under it"),
    (["stats", "{tmp}/bad.txt"], "not UTF-8: byte 0xff at offset 3"),
    (["download", "nope"], "unknown corpus 'nope'"),
    (["info", "{tmp}"], "holds no checkpoint"),
    (["eval", "{tmp}/nowhere"], "no such checkpoint or run directory"),
    (["train", "{tmp}/bad.txt"], "not UTF-8"),
    (["train", "{tmp}/empty.txt", "--preprocess", "letters"], "is empty after 'letters' preprocessing"),
])
def test_every_command_reports_user_errors_in_one_line(tmp_path, args, message):
    (tmp_path / "bad.txt").write_bytes(b"abc\xff")
    (tmp_path / "empty.txt").write_text("123 456\n")
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "notes.md").write_text("not a .txt file")
    r = run(*[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert r.output.count("\n") == 1
    assert "Traceback" not in r.output


def test_a_bug_is_not_turned_into_one_line(monkeypatch, corpus):
    """Only CharlmError is a user's problem; anything else keeps its traceback for the bug report."""
    import charlm.tokens

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(charlm.tokens, "prepare", broken)
    r = run("stats", corpus)
    assert r.exit_code == 1
    assert isinstance(r.exception, ZeroDivisionError)


def test_help_lists_every_command():
    r = run("--help")
    for command in ("download", "eval", "generate", "info", "stats", "train"):
        assert command in r.output
    assert sys.executable  # the console script is tested as a process in test_sample.py
