"""The command line as a user meets it: presets, and one line for every problem a user can fix."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from charlm.cli import main
from charlm.config import D2L_PRESET, ModelConfig, TrainConfig
from charlm.errors import ConfigError


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
    assert r.output.startswith(f"Error: cannot create the run directory {out}" if out.startswith("/proc") else
                               f"Error: --out {out}: cannot write there, {tmp_path / 'a-file'} is a file")
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
    assert r.exit_code == 0
    listed = {line.split()[0] for line in r.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(main.commands) >= {"download", "env", "eval", "generate", "info", "prepare", "serve",
                                             "stats", "train"}


def test_help_and_version_do_not_import_torch():
    """--help and --version answer at once: torch (seconds to import on a slow CPU) is loaded only by the
    commands that use it, and only when they run."""
    code = """
import sys
from charlm.cli import main
for args in [["--help"], ["--version"]] + [[name, "--help"] for name in sorted(main.commands)]:
    try:
        main(args, prog_name="charlm")
    except SystemExit as exc:
        assert exc.code == 0, (args, exc.code)
print("TORCH-LOADED" if "torch" in sys.modules else "NO-TORCH", sorted(main.commands))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("NO-TORCH") and "'train'" in last, last
    import charlm

    assert f"charlm, version {charlm.__version__}" in r.stdout


def test_env_says_what_this_machine_can_do():
    import torch

    from charlm.config import ModelConfig
    from charlm.device import cpu_capability, probe_precision

    r = run("env")
    assert r.exit_code == 0, r.output
    rows = dict(line.split(":", 1) for line in r.output.splitlines())
    rows = {k: v.strip() for k, v in rows.items()}
    assert rows["torch"].startswith(torch.__version__ + " (oneDNN ")
    assert rows["cpu kernels"].startswith(cpu_capability())
    assert rows["threads"].startswith(f"{torch.get_num_threads()} intra-op")
    for cell in ("rnn", "gru", "lstm"):  # the verdicts of the probe that charlm train runs
        probe = probe_precision("bf16", "cpu", ModelConfig(vocab_size=2, cell=cell, embedding_dim=64))
        verdict = "refused" if not probe.runs else "emulated" if probe.emulated else "native"
        assert f"{cell.upper()} {verdict} (" in rows["bf16 on cpu"]
    assert ("cuda" in rows) != any(k.startswith("cuda:") for k in rows)


def test_a_mogrifier_trains_and_info_names_its_rounds(corpus, tmp_path):
    out = tmp_path / "mog"
    r = run("train", corpus, "--cell", "mogrifier", "--mogrify-rounds", 3, "--mogrify-rank", 4, "--hidden-size", 12,
            "--num-layers", 2, "--embedding-dim", 6, "--out", out, "--max-steps", 3, "--batch-size", 4, "--num-steps", 10, "--quiet")
    assert r.exit_code == 0, r.output
    info = run("info", out)
    assert "2 x MOGRIFIER 12, embedding 6" in info.output and "3 mogrifier rounds of rank 4" in info.output
    assert "rounds" not in run("info", _lstm_run(corpus, tmp_path)).output


def _lstm_run(corpus, tmp_path):
    out = tmp_path / "lstm"
    assert run("train", corpus, "--hidden-size", 8, "--out", out, "--max-steps", 2, "--batch-size", 4, "--num-steps",
               10, "--quiet").exit_code == 0
    return out


@pytest.mark.parametrize("args, message", [
    (["--cell", "lstm", "--mogrify-rounds", 3], "mogrify-rounds applies to the mogrifier cell only (cell 'lstm')"),
    (["--mogrify-rank", 2], "mogrify-rank applies to the mogrifier cell only"),
])
def test_mogrifier_options_with_another_cell_are_one_line(corpus, tmp_path, args, message):
    r = run("train", corpus, "--out", tmp_path / "run", *args)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--mogrify-rounds", 65], 2, "Invalid value for '--mogrify-rounds': 65 is not in the range 1<=x<=64"),
    (["--mogrify-rounds", 0], 2, "Invalid value for '--mogrify-rounds': 0 is not in the range 1<=x<=64"),
    (["--mogrify-rank", -1], 2, "Invalid value for '--mogrify-rank': -1 is not in the range"),
    (["--mogrify-rank", 9], 1, "mogrify-rank 9 saves no parameters: a pair of rank-9 factors holds as many numbers "
                               "as the matrix it stands for, or more, in every layer (4 inputs x 8 units); pass a "
                               "rank of at most 2, or 0 (full matrices)"),
])
def test_mogrifier_options_past_what_they_mean_are_one_line(corpus, tmp_path, args, code, message):
    """A rank whose factors are no smaller than the matrix, and rounds past any useful count, were accepted (a huge number
    of rounds ran for ever or stopped at the memory check, which named other options)."""
    r = run("train", corpus, "--cell", "mogrifier", "--hidden-size", 8, "--embedding-dim", 4, "--num-layers", 1,
            "--max-steps", 1, "--batch-size", 2, "--num-steps", 8, "--quiet", "--out", tmp_path / "run", *args)
    assert r.exit_code == code and message in r.output, r.output
    assert "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith("Error:")
    assert not (tmp_path / "run").exists()


def test_the_memory_check_names_the_mogrifiers_options(monkeypatch):
    from charlm import device

    cfg = ModelConfig(vocab_size=30, cell="mogrifier", hidden_size=64, num_layers=2, embedding_dim=0, mogrify_rounds=6,
                      mogrify_rank=3)
    monkeypatch.setattr(device, "available_memory", lambda dev: 1)
    with pytest.raises(ConfigError, match=r"\(--hidden-size 64, --num-layers 2, --embedding-dim 0, --mogrify-rounds 6, "
                                          r"--mogrify-rank 3\) .* use a smaller --hidden-size, --embedding-dim, "
                                          r"--mogrify-rounds or --batch-size"):
        device.check_memory(cfg, 4, 8, "adam", torch.device("cpu"))


def test_a_one_hot_mogrifiers_rank_is_checked_on_the_texts_vocabulary(corpus, tmp_path):
    """One-hot inputs are as many as the text's symbols: a rank that saves parameters there is taken (it was checked
    against a vocabulary of 2 before the text was read, and refused); one past the text's limit is still one line."""
    common = ["--cell", "mogrifier", "--hidden-size", 16, "--embedding-dim", 0, "--num-layers", 1, "--max-steps", 1,
              "--batch-size", 2, "--num-steps", 8, "--quiet"]
    r = run("train", corpus, "--out", tmp_path / "ok", *common, "--mogrify-rank", 4)
    assert r.exit_code == 0, r.output
    r = run("train", corpus, "--out", tmp_path / "no", *common, "--mogrify-rank", 16)
    assert r.exit_code == 1 and "mogrify-rank 16 saves no parameters" in r.output, r.output
    assert not (tmp_path / "no").exists()


def test_mogrifier_options_with_another_cell_and_a_resume_with_another_cell(corpus, tmp_path):
    common = ["--hidden-size", 8, "--embedding-dim", 4, "--num-layers", 1, "--batch-size", 2, "--num-steps", 8,
              "--quiet"]
    for value in (3, 5):  # (5 is the default: given, it is refused all the same)
        r = run("train", corpus, "--out", tmp_path / "lstm", "--cell", "lstm", "--mogrify-rounds", value, *common)
        assert r.exit_code == 1 and "mogrify-rounds applies to the mogrifier cell only (cell 'lstm')" in r.output
        assert r.output.count("\n") == 1, r.output
    assert not (tmp_path / "lstm").exists()
    r = run("train", corpus, "--out", tmp_path / "mog", "--cell", "mogrifier", "--mogrify-rounds", 3, "--max-steps", 1,
            *common)
    assert r.exit_code == 0, r.output
    r = run("train", corpus, "--out", tmp_path / "mog", "--resume", "--cell", "gru", "--max-steps", 2, *common)
    assert r.exit_code == 1 and "cell: 'mogrifier' -> 'gru'" in r.output and "mogrify" not in r.output, r.output
