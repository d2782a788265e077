"""The CLI under Hypothesis: ``charlm generate``, ``charlm eval`` and ``charlm export`` with numeric and path
options drawn from everything a user can type (negative, zero, huge, NaN, infinities, words, empty, a file
where a folder belongs and the reverse, ``.``, folders charlm did not write). Each invocation either
succeeds or exits non-zero with one ``Error:`` line; never a traceback, and no file changes outside
``--out`` (export's ``--out`` and the vocabulary named after it; nothing at all for the others).

Each example runs in a fresh sandbox folder holding a trained run, an exported model, a user's folder
and files; the examples are derandomized (the same ones every run) and bounded in number.
"""

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from charlm.cli import main
from charlm.config import TrainConfig
from charlm.training import train

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# Everything a number option may be given as on a command line.
NUMBERS = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-2, 2).map(str),
    st.sampled_from(["", " ", "nan", "-nan", "inf", "-inf", "1e999", "-0", "0x10", "1_000", "１", "3.", ".5", "abc",
                     "9223372036854775807", "9223372036854775808", "-9223372036854775809"]),
)
# What a path option may name, in the sandbox (see _sandbox).
PATHS = st.sampled_from(["run", "run/best", "run/last", "missing", "missing/deeper", "notes.txt", "notes.txt/x",
                         "docs", "empty", ".", "..", "", "model.onnx", "docs/model.onnx", "new/model.onnx",
                         "new-site", "site", "empty/m.onnx", "notes.onnx", "x" * 300, "run/best/model.pt",
                         "a\nb", "-", "corpus.txt", "/", "run/../run", "../outside.txt"])
RUNS = st.one_of(st.sampled_from(["run", "run/best", "run/last"]), PATHS)  # most often a real run
# Values each option takes when it is used as meant (drawn three times as often as the others, so that
# most commands get past their parsing and run).
VALID = {"--length": st.integers(0, 300), "--temperature": st.floats(0, 3), "--top-k": st.integers(1, 100),
         "--top-p": st.floats(0.01, 1), "--seed": st.integers(0, 2**63 - 1), "--num-samples": st.integers(1, 8),
         "--batch-size": st.integers(1, 100), "--dynamic-lr": st.floats(1e-6, 1), "--dynamic-decay": st.floats(0, 1),
         "--dynamic-steps": st.integers(1, 200), "--dynamic-prior": st.integers(0, 10_000),
         "--dynamic-counts": st.integers(0, 14)}


@pytest.fixture(scope="module")
def template(tmp_path_factory, write_corpus_module):
    """The sandbox every example starts from: a trained run, its export, and files charlm did not write."""
    root = tmp_path_factory.mktemp("fuzz-cli-template")
    corpus = write_corpus_module(root)
    train(TrainConfig(corpus=str(corpus), out=str(root / "run"), cell="gru", hidden_size=16, embedding_dim=8,
                      batch_size=4, num_steps=10, max_steps=6, eval_every=3, time_limit=None))
    r = CliRunner().invoke(main, ["export", str(root / "run"), "--out", str(root / "model.onnx")])
    assert r.exit_code == 0, r.output
    (root / "docs").mkdir()
    (root / "docs" / "index.md").write_text("# the user's notes\n")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("the user's file\n")
    (root / "notes.onnx").write_bytes(b"not a model")
    return root


@pytest.fixture(scope="module")
def write_corpus_module():
    from conftest import SENTENCE

    def write(root: Path) -> Path:
        path = root / "corpus.txt"
        path.write_text(SENTENCE * 12)
        return path

    return write


def _tree(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link"
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


@contextmanager
def _sandbox(template: Path, tmp: Path):
    """A fresh copy of the template, as the current directory (a folder of its own inside ``tmp``, so that
    ``..`` is a folder charlm did not write either)."""
    box = tmp / "box"
    if box.exists():
        shutil.rmtree(box)
    shutil.copytree(template, box / "work", symlinks=True)
    (box / "outside.txt").write_text("beside the sandbox\n")
    here = os.getcwd()
    os.chdir(box / "work")
    try:
        yield box
    finally:
        os.chdir(here)


def _check(result, before: dict, after: dict, allowed=()) -> None:
    """One line or success, never a traceback; nothing changed but ``allowed`` (paths relative to the box)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert "Traceback" not in result.output, result.output
    event(f"exit {result.exit_code}")
    if result.exit_code != 0:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    stray = {k for k in changed if not any(k == a or k.startswith(a.rstrip("/") + "/") for a in allowed)}
    assert not stray, (sorted(stray), result.output)


def _options(draw, names: list[str]) -> list[str]:
    args = []
    for name in names:
        if draw(st.booleans()):
            hostile = draw(st.integers(0, 3)) == 3  # one time in four
            args += [name, draw(NUMBERS if hostile else VALID[name].map(str))]
    return args


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_generate_with_any_numbers_and_paths(template, tmp_path, data):
    options = _options(data.draw, ["--length", "--temperature", "--top-k", "--top-p", "--seed", "--num-samples"])
    engine = data.draw(st.sampled_from(["torch", "onnx"]))
    path = data.draw(st.one_of(st.just("model.onnx"), PATHS) if engine == "onnx" else RUNS)
    prefix = data.draw(st.sampled_from(["the ", "", "THE", "zq", "\u00e9", "-"]))
    argv = ["generate", prefix, "--checkpoint", path, "--engine", engine, *options]
    # valid but long: what a user asks for, not what this test times (the options are parsed all the same)
    assume(not _expensive(argv))
    with _sandbox(template, tmp_path) as box:
        before = _tree(box)
        result = CliRunner().invoke(main, argv)
        _check(result, before, _tree(box))


def _expensive(argv: list[str]) -> bool:
    def value(name):
        if name not in argv:
            return None
        try:
            return float(argv[argv.index(name) + 1])
        except (ValueError, IndexError):
            return None

    length, samples = value("--length"), value("--num-samples")
    return (length is not None and length > 2000) or (samples is not None and samples > 64)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_eval_with_any_numbers_and_paths(template, tmp_path, data):
    checkpoint = data.draw(RUNS)
    files = data.draw(st.lists(st.one_of(st.just("corpus.txt"), PATHS), max_size=2))
    options = _options(data.draw, ["--batch-size"])
    if data.draw(st.booleans()):
        options += ["--dynamic", *_options(data.draw, ["--dynamic-lr", "--dynamic-decay", "--dynamic-steps",
                                                       "--dynamic-prior", "--dynamic-counts"])]
        options += data.draw(st.sampled_from([[], ["--dynamic-rule", "sgd"], ["--dynamic-rule", "rms"]]))
    argv = ["eval", checkpoint, *files, *options, *data.draw(st.sampled_from([[], ["--json"], ["--errors", "skip"]]))]
    with _sandbox(template, tmp_path) as box:
        before = _tree(box)
        result = CliRunner().invoke(main, argv)
        _check(result, before, _tree(box))


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_export_with_any_paths_changes_nothing_outside_out(template, tmp_path, data, monkeypatch):
    from charlm.export import web as webexport

    monkeypatch.setattr(webexport, "ort_web_files", lambda progress=True: {n: b"//" for n in webexport.ORT_WEB_FILES})
    fmt = data.draw(st.sampled_from(["onnx", "web"]))
    good = ["model.onnx", "new/model.onnx", "empty/m.onnx", "docs/m.onnx"] if fmt == "onnx" else ["site", "new-site",
                                                                                                  "empty", "new/s"]
    run, out = data.draw(RUNS), data.draw(st.one_of(st.sampled_from(good), PATHS))
    argv = ["export", run, "--format", fmt, "--out", out, "--quiet"]
    with _sandbox(template, tmp_path) as box:
        before = _tree(box)
        result = CliRunner().invoke(main, argv)
        target = os.path.relpath(os.path.abspath(out), box) if out else "work"
        allowed = [target, *(str(p) for p in Path(target).parents if str(p) not in before and str(p) != ".")]
        if fmt == "onnx" and out.endswith(".onnx"):
            allowed.append(target[: -len(".onnx")] + ".tokenizer.json")
        _check(result, before, _tree(box), allowed if result.exit_code == 0 else ())
