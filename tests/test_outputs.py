"""Output-path ownership, one rule for every writer (charlm.outputs): charlm replaces only what it wrote itself;
a folder holding other files, a file it did not write, ``.`` and a file where a folder belongs (or the
reverse) are one line, and nothing is touched."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from charlm import RNNLM, Vocab, load_checkpoint, save_checkpoint
from charlm.cli import main
from charlm.outputs import NotOwnedError

TEXT = "the time traveller smiled and the machine was gone\n" * 4


def digest(root: Path) -> dict:
    """Every file and folder under ``root`` with its content hash: what a refused write must leave as it was."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def ckpt(tmp_path):
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="gru", hidden_size=16, num_layers=1, embedding_dim=4)
    meta = {"corpus": {"path": "tiny.txt", "preprocess": "raw"}, "progress": {"step": 3, "best_val_loss": 2.5}}
    return load_checkpoint(save_checkpoint(tmp_path / "run" / "best", model, vocab, meta))


@pytest.fixture
def docs(tmp_path):
    """A folder of the user's: what no writer may replace."""
    folder = tmp_path / "docs"
    (folder / "img").mkdir(parents=True)
    (folder / "index.md").write_text("# my notes\n")
    (folder / "img" / "a.png").write_bytes(b"\x89PNG")
    return folder


# -- export --format web -------------------------------------------------------------------------------

@pytest.fixture
def fake_runtime(monkeypatch):
    """onnxruntime-web's files, stood in for (the page is not run here: tests/test_browser.py runs it)."""
    pytest.importorskip("onnxruntime")
    from charlm.export import web as webexport

    monkeypatch.setattr(webexport, "ort_web_files", lambda progress=True: {n: b"//" for n in webexport.ORT_WEB_FILES})


def test_a_web_export_never_replaces_a_folder_of_other_files(tmp_path, ckpt, docs, fake_runtime):
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--format", "web", "--out", docs, "--quiet"))
    assert str(docs) in line and "index.md" in line and "not a charlm web export" in line
    assert digest(tmp_path) == before


def test_a_web_export_replaces_its_own_folder_but_not_one_with_a_file_added(tmp_path, ckpt, fake_runtime):
    site = tmp_path / "site"
    assert run("export", ckpt.path, "--format", "web", "--out", site, "--quiet").exit_code == 0
    first = digest(site)
    assert (site / ".charlm").is_file() and (site / "model.tokenizer.json").is_file()
    r = run("export", ckpt.path, "--format", "web", "--out", site, "--quiet")
    assert r.exit_code == 0, r.output
    assert digest(site).keys() == first.keys()
    (site / "CNAME").write_text("example.org\n")  # the user's file inside the export
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--format", "web", "--out", site, "--quiet"))
    assert "CNAME" in line and "also holds" in line
    assert digest(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site")]  # no temporary folder left


def test_a_web_export_before_markers_is_still_recognised(tmp_path, ckpt, fake_runtime):
    site = tmp_path / "site"
    assert run("export", ckpt.path, "--format", "web", "--out", site, "--quiet").exit_code == 0
    (site / ".charlm").unlink()  # as exports made before the marker existed
    assert run("export", ckpt.path, "--format", "web", "--out", site, "--quiet").exit_code == 0


@pytest.mark.parametrize("where", [".", "..", ""])
def test_a_web_export_into_the_current_directory_is_one_line(tmp_path, ckpt, fake_runtime, monkeypatch, where):
    here = tmp_path / "empty" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--format", "web", "--out", where, "--quiet"))
    assert "current directory" in line
    assert digest(tmp_path) == before


def test_a_web_export_onto_a_file_is_one_line(tmp_path, ckpt, fake_runtime):
    (tmp_path / "site").write_text("a file of the user's")
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--format", "web", "--out", tmp_path / "site", "--quiet"))
    assert "is a file" in line
    assert digest(tmp_path) == before


# -- export --format onnx --------------------------------------------------------------------------------

def test_two_models_exported_into_one_folder_both_work(tmp_path, ckpt):
    pytest.importorskip("onnxruntime")
    from charlm.export import OnnxModel

    other = tmp_path / "other"
    vocab = Vocab.from_text("abc def\n" * 10)
    model = RNNLM(len(vocab), cell="lstm", hidden_size=8)
    save_checkpoint(other, model, vocab, {"corpus": {"preprocess": "raw"}})
    out = tmp_path / "models"
    assert run("export", ckpt.path, "--out", out / "a.onnx").exit_code == 0
    r = run("export", other, "--out", out / "b.onnx")
    assert r.exit_code == 0 and "b.tokenizer.json" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "a.tokenizer.json", "b.onnx", "b.tokenizer.json"]
    assert OnnxModel(out / "a.onnx").vocab.itos == ckpt.vocab.itos
    assert OnnxModel(out / "b.onnx").vocab.itos == vocab.itos


def test_an_onnx_export_never_replaces_a_file_it_did_not_write(tmp_path, ckpt):
    pytest.importorskip("onnx")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the user's own model")
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--out", out / "model.onnx"))
    assert "model.onnx exists and is not an ONNX model charlm wrote" in line
    assert digest(tmp_path) == before
    (out / "model.onnx").unlink()
    (out / "model.tokenizer.json").write_text("{}")  # a file of that name that is not this model's vocabulary
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--out", out / "model.onnx"))
    assert "model.tokenizer.json exists" in line
    assert digest(tmp_path) == before


def test_an_onnx_export_replaces_its_own_files(tmp_path, ckpt):
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    assert run("export", ckpt.path, "--out", out).exit_code == 0
    assert run("export", ckpt.path, "--out", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.tokenizer.json", "run"]


@pytest.mark.parametrize("target", [".", "dir.onnx", "file/x.onnx", ".onnx"])
def test_odd_onnx_paths_are_one_line(tmp_path, ckpt, monkeypatch, target):
    pytest.importorskip("onnx")
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "file").write_text("a file where a folder would be")
    monkeypatch.chdir(tmp_path)
    before = digest(tmp_path)
    one_line_error(run("export", ckpt.path, "--out", target))
    assert digest(tmp_path) == before


# -- train --out -----------------------------------------------------------------------------------------

def _train(corpus, out, *extra):
    return run("train", corpus, "--out", out, "--cell", "gru", "--hidden-size", "8", "--embedding-dim", "4",
               "--batch-size", "2", "--num-steps", "8", "--max-steps", "2", "--eval-every", "2", "--quiet",
               "--time-limit", "0", *extra)


@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--resume",)])
def test_train_never_writes_into_a_folder_of_other_files(tmp_path, corpus, docs, flags):
    before = digest(tmp_path)
    line = one_line_error(_train(corpus, docs, *flags))
    assert str(docs) in line and ("index.md" in line or "nothing to resume" in line)
    assert digest(tmp_path) == before


def test_overwrite_replaces_a_run_but_not_the_files_a_user_put_in_it(tmp_path, corpus):
    out = tmp_path / "r"
    assert _train(corpus, out).exit_code == 0
    assert (out / ".charlm").is_file()
    r = _train(corpus, out, "--overwrite")
    assert r.exit_code == 0, r.output
    (out / "notes.txt").write_text("what I tried")
    before = digest(tmp_path)
    line = one_line_error(_train(corpus, out, "--overwrite"))
    assert "notes.txt" in line and "is a charlm run but also holds" in line
    assert digest(tmp_path) == before
    (out / "notes.txt").unlink()
    (out / ".charlm").unlink()  # a run made before the marker: recognised by its checkpoints
    assert _train(corpus, out, "--overwrite").exit_code == 0


def test_train_out_dot_is_refused_in_a_full_folder_and_works_in_an_empty_one(tmp_path, corpus, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "script.py").write_text("print('mine')\n")
    monkeypatch.chdir(work)
    before = digest(tmp_path)
    line = one_line_error(_train(corpus, ".", "--overwrite"))
    assert "script.py" in line
    assert digest(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert _train(corpus, ".").exit_code == 0
    assert (empty / "best" / "manifest.json").is_file()
    r = _train(corpus, ".", "--overwrite")  # its own run, in place: the folder itself stays
    assert r.exit_code == 0, r.output
    assert Path.cwd() == empty and (empty / "last").is_dir()


def test_train_out_a_file_is_one_line(tmp_path, corpus):
    (tmp_path / "f").write_text("x")
    before = digest(tmp_path)
    assert "is a file" in one_line_error(_train(corpus, tmp_path / "f", "--overwrite"), code=2)  # click's check
    assert digest(tmp_path) == before


# -- download, the token cache, save_checkpoint, load ----------------------------------------------------

def test_download_never_replaces_a_file_it_did_not_write(tmp_path, mirror):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "timemachine.txt").write_text("my own edited copy\n")
    (corpora / "tinyshakespeare.txt").mkdir()  # a folder where the file goes
    before = digest(tmp_path)
    assert "sha256 differs" in one_line_error(run("download", "timemachine", "--dir", corpora, "--quiet"))
    assert "a folder" in one_line_error(run("download", "tinyshakespeare", "--dir", corpora, "--quiet"))
    assert digest(tmp_path) == before
    (tmp_path / "plain").write_text("a file where the folder goes")
    assert "is a file" in one_line_error(run("download", "timemachine", "--dir", tmp_path / "plain", "--quiet"), code=2)


def test_the_token_cache_replaces_only_its_own_entries(tmp_path, corpus, monkeypatch):
    from charlm.tokens import prepare

    cache = tmp_path / "cache"
    entry = prepare(corpus, cache_dir=cache).path
    (entry / "meta.json").write_text("{}")  # stale: rebuilt, as charlm's own
    assert prepare(corpus, cache_dir=cache).hit is False
    (entry / "meta.json").write_text("{}")
    (entry / "mine.txt").write_text("not the cache's")
    before = digest(tmp_path)
    with pytest.raises(NotOwnedError, match="mine.txt"):
        prepare(corpus, cache_dir=cache)
    assert digest(tmp_path) == before


def test_save_checkpoint_never_replaces_a_folder_of_other_files(tmp_path, docs, ckpt):
    before = digest(tmp_path)
    with pytest.raises(NotOwnedError, match="index.md"):
        save_checkpoint(docs, ckpt.model, ckpt.vocab)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotOwnedError, match="is a file"):
        save_checkpoint(tmp_path / "f", ckpt.model, ckpt.vocab)
    assert digest(tmp_path) == before | {"f": hashlib.sha256(b"x").hexdigest()}
    save_checkpoint(ckpt.path, ckpt.model, ckpt.vocab)  # its own checkpoint: replaced


def test_a_folder_named_like_an_interrupted_replacement_is_never_deleted(tmp_path, ckpt):
    project = tmp_path / "project"
    save_checkpoint(project, ckpt.model, ckpt.vocab)
    backup = tmp_path / "project.old"  # the user's own folder, by chance named as a save's leftover
    backup.mkdir()
    (backup / "thesis.tex").write_text("\\begin{document}")
    before = digest(backup)
    load_checkpoint(project)
    assert run("info", project).exit_code == 0
    assert digest(backup) == before
    save_checkpoint(project, ckpt.model, ckpt.vocab)  # a replacement's backup has a name (and mark) of its own
    assert digest(backup) == before and (project / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "project.old", "run"]


def test_overwrite_never_deletes_a_file_put_inside_a_checkpoint(tmp_path, corpus):
    out = tmp_path / "r"
    assert _train(corpus, out).exit_code == 0
    (out / "last" / "notes.txt").write_text("mine")
    before = digest(tmp_path)
    line = one_line_error(_train(corpus, out, "--overwrite"))
    assert "last/notes.txt" in line
    assert digest(tmp_path) == before


def test_an_export_left_half_way_is_retried(tmp_path, ckpt):
    """A kill between the export's two renames leaves one of its two files: the same export then succeeds."""
    pytest.importorskip("onnx")
    assert run("export", ckpt.path, "--out", tmp_path / "a.onnx").exit_code == 0
    (tmp_path / "a.tokenizer.json").rename(tmp_path / "z.tokenizer.json")  # a vocabulary, no model beside it
    r = run("export", ckpt.path, "--out", tmp_path / "z.onnx")
    assert r.exit_code == 0, r.output


def test_a_symlinked_out_is_one_line_and_leaves_nothing(tmp_path, ckpt, fake_runtime):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = digest(tmp_path)
    line = one_line_error(run("export", ckpt.path, "--format", "web", "--out", tmp_path / "link", "--quiet"))
    assert "symbolic link" in line
    assert digest(tmp_path) == before


def test_save_checkpoint_never_replaces_the_current_directory(tmp_path, ckpt, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(NotOwnedError, match="current directory"):
        save_checkpoint(".", ckpt.model, ckpt.vocab)
    assert Path.cwd() == here and not any(here.iterdir())


def test_lock_probes_at_the_same_moment_never_see_each_other_and_a_writer_waits_out_a_probe(tmp_path):
    """Each rank of a torchrun run probes the run's lock as it checks the folder: two exclusive probes at the same
    moment saw each other as a writer, and a resume failed in one line naming a process long gone."""
    import fcntl
    import threading

    from charlm.outputs import FolderLock, LockedError

    with FolderLock(tmp_path):  # (made, named, let go)
        pass
    probe = os.open(tmp_path / ".charlm.lock", os.O_RDONLY)
    letting_go = threading.Timer(0.2, fcntl.flock, (probe, fcntl.LOCK_UN))  # the probe lets go a moment later
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another process's probe, at this moment
        FolderLock(tmp_path).check_free()  # this one's probe: not refused
        letting_go.start()
        with FolderLock(tmp_path):  # the writer waits it out
            with pytest.raises(LockedError):  # and a writer is still a writer to a probe
                FolderLock(tmp_path).check_free()
    finally:
        letting_go.cancel()
        if letting_go.is_alive():
            letting_go.join()
        os.close(probe)


@pytest.mark.parametrize("inside", ["nothing", "an empty mark", "a user's file"])
def test_a_temporary_killed_before_it_was_marked_is_charlms_only_when_it_holds_nothing(tmp_path, inside):
    """A writer killed between making .last.tmp-XXXX and marking it left it unmarked: a resume then refused the
    run (charlm tune, SIGKILL). Empty, or holding only an empty mark, it holds nothing of anyone's."""
    from charlm.outputs import TMP, TMP_MARK, _temporary_is_ours

    tmp = tmp_path / ".last.tmp-abcd1234"
    tmp.mkdir()
    if inside == "an empty mark":
        (tmp / TMP_MARK).write_bytes(b"")
    elif inside == "a user's file":
        (tmp / "notes.txt").write_text("mine")
    assert _temporary_is_ours(tmp, TMP) is (inside != "a user's file")
