"""Nothing of the user's is lost, by any path, name or moment (issue 35): the canary harness.

Hypothesis composes output paths from a grammar of hostile shapes (tests/canaries.py: ``missing/../docs``,
``./``, ``..``, ``.``, a symbolic link to a user's folder as the path and inside it, names ending ``.old``
or ``.tmp-1a2b``, folders named like files charlm writes, a user's folders whose files all carry charlm's
names, a file where a folder belongs, unicode and 255-byte names, and their combinations). Each example
builds a fresh sandbox full of the user's files (each its own canary), runs one command from inside it
with the path as ``--out`` / ``--dir`` / ``CHARLM_CACHE_DIR`` / ``save_checkpoint``'s path, and checks
that every canary is byte-identical, still there and of the same mode (a folder: not replaced), that
nothing was written outside what the command owns, and that the command worked or said one line.
The same for the commands that only read a checkpoint, with the user's ``NAME.old`` beside it.

Then, one test per reproduction in items 1, 2 and 3 of the issue, named after it.
"""

import os
import resource
import shutil
from pathlib import Path

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from canaries import (CKPT_PLANTS, DETOUR, DIR_LEAVES, EXISTING_FIRST, FOLDER_LEAVES, OLD_KINDS, ONNX_LEAVES,
                      ONNX_PLANTS, READ_PATHS, RUN_PLANTS, WEB_PLANTS, Target, build, build_read_only, canary_settings,
                      check, hostile_paths, plant, run_cli, run_python, snapshot, stays_inside, typed)
from charlm import load_checkpoint, save_checkpoint
from conftest import SENTENCE

TINY = ["--cell", "gru", "--hidden-size", "8", "--num-layers", "1", "--embedding-dim", "4", "--batch-size", "2",
        "--num-steps", "8", "--max-steps", "2", "--eval-every", "1", "--time-limit", "0", "--quiet"]


def _fake_runtime(monkeypatch):
    """onnxruntime-web's files, stood in for (as tests/test_outputs.py's fake_runtime)."""
    from charlm.export import web as webexport

    monkeypatch.setattr(webexport, "ort_web_files", lambda progress=True: {n: b"//" for n in webexport.ORT_WEB_FILES})


def _needs_onnx():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """charlm's own outputs, made once: a tiny trained run (corpus ``tiny.txt``, relative, as in the sandboxes),
    and, with the onnx extra, its ONNX export and its web export."""
    import importlib.util

    exports = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    root = tmp_path_factory.mktemp("canary-artifacts")
    (root / "tiny.txt").write_text(SENTENCE * 12)
    here = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))
        mp.setenv("MPLBACKEND", "Agg")
        _fake_runtime(mp)
        os.chdir(root)
        try:
            for argv in (["train", "tiny.txt", "--out", "run", *TINY],
                         *([["export", "run", "--out", "exported.onnx"],
                            ["export", "run", "--format", "web", "--out", "web", "--quiet"]] if exports else [])):
                outcome = run_cli(argv)
                assert outcome.ok, (argv, outcome)
        finally:
            os.chdir(here)
    return root


@pytest.fixture
def sandboxes(tmp_path):
    """Where each example's sandbox goes (each is deleted after its example)."""
    return tmp_path


def _sandbox(base, artifacts, drawn, plant_name="nothing"):
    assume(stays_inside(drawn))
    box = build(base, artifacts, drawn[1])
    plant(box, plant_name)
    box.before = snapshot(box.root)
    return box


def _folder_target(box, path, own=()):
    return Target(path=box.resolve(path), own_kind={f"work/{o}" for o in own}, typed=path)


def _own_or_any(*own, leaves=FOLDER_LEAVES, suffixes=None, detours=DETOUR):
    """Half the paths lead, through a detour only, to ``own`` in the current directory: the user's things most at
    risk from this command, or charlm's own output it replaces (with the things planted in and beside it); the other
    half end anywhere. The first example is ``missing/../OWN[0]``."""
    extra = {} if suffixes is None else {"suffixes": suffixes}
    return st.one_of(hostile_paths(list(own), places=[""], steps=0, detours=detours, **extra),
                     hostile_paths(leaves, **extra))


def _record(outcome):
    event("worked" if outcome.ok else "refused in one line" if not outcome.problem else "failed badly")


# -- charlm train --out ---------------------------------------------------------------------------------

@pytest.mark.slow
@canary_settings(25)
@given(drawn=_own_or_any("site", "results", "run"))
def test_train_a_new_run_loses_nothing(artifacts, sandboxes, drawn):
    box = _sandbox(sandboxes, artifacts, drawn)
    try:
        path = typed(box, drawn)
        argv = ["train", "tiny.txt", "--out", path, *TINY]
        with box.cwd():
            outcome = run_cli(argv)
        _record(outcome)
        check(box, "charlm " + " ".join(argv), path, outcome, _folder_target(box, path))
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


def _train_again(sandboxes, artifacts, flag, drawn, planted):
    box = _sandbox(sandboxes, artifacts, drawn, planted)
    try:
        path = typed(box, drawn)
        argv = ["train", "tiny.txt", "--out", path, flag, *TINY]
        with box.cwd():
            outcome = run_cli(argv)
        _record(outcome)
        check(box, f"charlm {' '.join(argv)}  (planted: {planted})", path, outcome,
              _folder_target(box, path, own=["run"]))
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


@pytest.mark.slow
@canary_settings(20)
@given(drawn=_own_or_any("run", detours=EXISTING_FIRST), planted=st.sampled_from(RUN_PLANTS))
def test_train_resume_loses_nothing(artifacts, sandboxes, drawn, planted):
    """(Half the paths reach run/ through folders that exist: a resume today stops at a missing one.)"""
    _train_again(sandboxes, artifacts, "--resume", drawn, planted)


@pytest.mark.slow
@canary_settings(20)
@given(drawn=_own_or_any("run", "site"), planted=st.sampled_from(RUN_PLANTS))
def test_train_overwrite_loses_nothing(artifacts, sandboxes, drawn, planted):
    _train_again(sandboxes, artifacts, "--overwrite", drawn, planted)


# -- charlm export --------------------------------------------------------------------------------------

@pytest.mark.slow
@canary_settings(15)
@given(drawn=_own_or_any("mine.onnx", "exported.onnx", "link.onnx", leaves=ONNX_LEAVES, suffixes=[""]),
       planted=st.sampled_from(ONNX_PLANTS), source=st.sampled_from(["run", "ckpt", "./run/best"]))
def test_export_onnx_loses_nothing(artifacts, sandboxes, drawn, planted, source):
    _needs_onnx()
    box = _sandbox(sandboxes, artifacts, drawn, planted)
    try:
        path = typed(box, drawn)
        argv = ["export", source, "--out", path]
        with box.cwd():
            outcome = run_cli(argv)
        _record(outcome)
        resolved = box.resolve(path)
        parent = Path(os.path.realpath(os.path.join(box.work, os.path.dirname(path) or ".")))
        vocab = [resolved.with_name(resolved.stem + ".tokenizer.json"),
                 parent / (Path(path).stem + ".tokenizer.json")]
        target = Target(path=resolved, own_kind={"work/exported.onnx"}, extra=vocab, typed=path, kind="file")
        check(box, f"charlm {' '.join(argv)}  (planted: {planted})", path, outcome, target)
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


@pytest.mark.slow
@canary_settings(15)
@given(drawn=_own_or_any("site", "web", "run"), planted=st.sampled_from(WEB_PLANTS))
def test_export_web_loses_nothing(artifacts, sandboxes, drawn, planted, monkeypatch):
    _needs_onnx()
    _fake_runtime(monkeypatch)
    box = _sandbox(sandboxes, artifacts, drawn, planted)
    try:
        path = typed(box, drawn)
        argv = ["export", "run", "--format", "web", "--out", path, "--quiet"]
        with box.cwd():
            outcome = run_cli(argv)
        _record(outcome)
        check(box, f"charlm {' '.join(argv)}  (planted: {planted})", path, outcome,
              _folder_target(box, path, own=["web"]))
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


# -- charlm download --dir, charlm prepare (CHARLM_CACHE_DIR), save_checkpoint --------------------------

@pytest.mark.slow
@canary_settings(30)
@given(drawn=_own_or_any("corpora", "link", leaves=DIR_LEAVES))
def test_download_loses_nothing(artifacts, sandboxes, mirror, drawn):
    box = _sandbox(sandboxes, None, drawn)
    try:
        path = typed(box, drawn)
        argv = ["download", "timemachine", "--dir", path, "--quiet"]
        with box.cwd():
            outcome = run_cli(argv)
        _record(outcome)
        target = Target(path=box.resolve(path) / "timemachine.txt", own_kind=set(), typed=path, kind="file")
        check(box, f"CHARLM_CORPUS_MIRROR={mirror} charlm {' '.join(argv)}", path, outcome, target)
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


@pytest.mark.slow
@canary_settings(25)
@given(drawn=hostile_paths(FOLDER_LEAVES))
def test_prepare_with_the_cache_anywhere_loses_nothing(artifacts, sandboxes, drawn, monkeypatch):
    box = _sandbox(sandboxes, None, drawn)
    try:
        path = typed(box, drawn)
        monkeypatch.setenv("CHARLM_CACHE_DIR", path)
        argv = ["prepare", "tiny.txt", "--quiet"]
        with box.cwd():
            outcome = run_cli(argv)
        _record(outcome)
        root = box.rel(box.resolve(path))

        def in_cache(rel):  # the cache's entries (and their locks) under its root; not a temporary left behind
            if not (root == "." or rel.startswith(root + "/")):
                return False
            first = (rel[len(root) + 1:] if root != "." else rel).split("/")[0]
            return ".tmp-" not in first and not first.endswith(".part")

        target = Target(path=box.resolve(path), own_kind=set(), owns_new=in_cache, typed=path, kind="shared")
        check(box, f"CHARLM_CACHE_DIR={path!r} charlm {' '.join(argv)}", path, outcome, target)
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


@pytest.fixture(scope="module")
def model(artifacts):
    return load_checkpoint(artifacts / "run" / "best")


@pytest.mark.slow
@canary_settings(40)
@given(drawn=_own_or_any("site", "weights", "ckpt", "run/best", "run/last"), planted=st.sampled_from(CKPT_PLANTS))
def test_save_checkpoint_loses_nothing(artifacts, sandboxes, model, drawn, planted):
    box = _sandbox(sandboxes, artifacts, drawn, planted)
    try:
        path = typed(box, drawn)
        with box.cwd():
            outcome = run_python(lambda: save_checkpoint(path, model.model, model.vocab, model.meta))
        _record(outcome)
        check(box, f"charlm.save_checkpoint({path!r}, ...)  (planted: {planted})", path, outcome,
              _folder_target(box, path, own=["ckpt", "run/best", "run/last"]))
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


# -- the commands that only read a checkpoint -----------------------------------------------------------

READERS = ["info", "generate", "eval", "serve", "export"]


def _stub_server(monkeypatch):
    """charlm serve up to its loading of the checkpoint: then it says one line instead of listening (both names
    of the server's maker are replaced, so that a test never serves for ever)."""
    try:
        import charlm.serve
        import charlm.serve.host
    except ModuleNotFoundError:  # (without the serve extra, charlm serve says so in one line)
        return

    def refuse(*args, **kwargs):
        raise OSError(98, "not listening in the canary harness")

    monkeypatch.setattr(charlm.serve, "make_server", refuse)
    monkeypatch.setattr(charlm.serve.host, "make_server", refuse)


def _read_argv(command, path):
    return {"info": ["info", path], "generate": ["generate", "--checkpoint", path, "the ", "--length", "5"],
            "eval": ["eval", path], "serve": ["serve", path, "--port", "0"],
            "export": ["export", path, "--out", "exports/m.onnx"]}[command]


def _read_only(box, command, path):
    argv = _read_argv(command, path)
    with box.cwd():
        outcome = run_cli(argv)
    if command == "serve" and not outcome.ok and "not listening in the canary harness" in outcome.said:
        outcome.ok = True  # it loaded the checkpoint and went on to listen: that is all it does here
    target = None
    if command == "export":
        out = box.work / "exports" / "m.onnx"
        target = Target(path=out, own_kind=set(), extra=[out.with_name("m.tokenizer.json")], typed="exports/m.onnx",
                        kind="file")
    return argv, outcome, target


@pytest.mark.slow
@canary_settings(40)
@given(command=st.sampled_from(READERS), layout=st.sampled_from(["checkpoint", "run"]), present=st.booleans(),
       old=st.sampled_from([*OLD_KINDS, None]), where=st.sampled_from(["beside", "best", "last"]),
       shape=st.sampled_from(READ_PATHS))
def test_read_only_commands_touch_nothing(artifacts, sandboxes, monkeypatch, command, layout, present, old, where,
                                          shape):
    _stub_server(monkeypatch)
    if not (layout == "run" and present):
        where = "beside"  # (best.old and last.old are inside a run)
    box = build_read_only(sandboxes, artifacts, layout, present, old, where)
    box.before = snapshot(box.root)
    try:
        path = typed(box, ("<work>/", shape[len("<work>/"):]) if shape.startswith("<work>/") else ("", shape))
        argv, outcome, target = _read_only(box, command, path)
        _record(outcome)
        setup = (f"bk/model: {'a ' + layout if present else 'not there'}; "
                 f"{'bk/model.old' if where == 'beside' or not present else 'bk/model/' + where + '.old'}: {old}")
        check(box, f"charlm {' '.join(argv)}  ({setup})", path, outcome, target)
    finally:
        shutil.rmtree(box.root, ignore_errors=True)


# -- the reproductions, one test each -----------------------------------------------------------

def _changes(root, before):
    after = snapshot(root)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _unchanged(root, before, what):
    changed = _changes(root, before)
    assert not changed, f"{what} changed: {changed}"


def _not_one_line(outcome):
    if outcome.ok:
        return [f"it succeeded ({outcome.said.strip()})"]
    return [f"it failed without one line: {outcome.problem.strip()}"] if outcome.problem else []


def _refused_untouched(outcome, root, before, what):
    """``what`` was refused in one line and changed nothing under ``root``."""
    changed = _changes(root, before)
    problems = ([f"it changed {changed}"] if changed else []) + _not_one_line(outcome)
    assert not problems, f"{what}: " + "; ".join(problems)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A folder of the user's as the current directory."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# 1. A `..` after a folder that does not exist yet passes every check.

def test_export_out_through_a_missing_folder_and_dotdot_keeps_the_users_file(artifacts, here):
    _needs_onnx()
    (here / "mine.onnx").write_text("the user's text, not a model\n")
    before = snapshot(here)
    outcome = run_cli(["export", str(artifacts / "run"), "--out", "x/../mine.onnx"])
    # (as --out mine.onnx is refused)
    _refused_untouched(outcome, here, before, "charlm export RUN --out x/../mine.onnx over the user's mine.onnx")


def test_download_dir_through_a_missing_folder_and_dotdot_keeps_the_users_corpus(here, mirror):
    (here / "corpora").mkdir()
    (here / "corpora" / "timemachine.txt").write_text("my own edited copy of the corpus\n")
    before = snapshot(here)
    outcome = run_cli(["download", "timemachine", "--dir", "nope/../corpora", "--quiet"])
    _refused_untouched(outcome, here, before,
                       "charlm download timemachine --dir nope/../corpora over an edited corpus")


def test_save_checkpoint_through_a_missing_folder_and_dotdot_keeps_the_users_folder(model, here):
    (here / "userdir").mkdir()
    (here / "userdir" / "thesis.tex").write_text("\\begin{document}\n")
    before = snapshot(here)
    outcome = run_python(lambda: save_checkpoint("missing/../userdir", model.model, model.vocab))
    _refused_untouched(outcome, here, before,
                       "save_checkpoint('missing/../userdir') over a folder holding thesis.tex")


def test_web_export_through_a_missing_folder_and_dotdot_keeps_the_users_site(artifacts, here, monkeypatch):
    _needs_onnx()
    _fake_runtime(monkeypatch)
    (here / "site").mkdir()
    (here / "site" / "index.md").write_text("# my site\n")
    before = snapshot(here)
    outcome = run_cli(["export", str(artifacts / "run"), "--format", "web", "--out", "q/../site", "--quiet"])
    _refused_untouched(outcome, here, before, "charlm export RUN --format web --out q/../site over the user's site/")


def test_train_dotdot_default_out_writes_no_run_into_the_current_folder(tmp_path, monkeypatch):
    """``charlm train ..``: the corpus is the folder above; the default --out, checkpoints/.., is the current
    folder, which holds the user's notes.md: no run may be written into it (refused, or put elsewhere)."""
    (tmp_path / "tiny.txt").write_text(SENTENCE * 12)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("the user's notes\n")
    monkeypatch.chdir(work)
    before = snapshot(work)
    outcome = run_cli(["train", "..", *TINY])
    assert not outcome.problem, f"charlm train ..: {outcome.problem}\n{outcome.said}"
    after = snapshot(work)
    assert after["notes.md"] == before["notes.md"]
    written = sorted(set(p.name for p in work.iterdir()) - {"notes.md", "checkpoints"})
    assert not written, f"charlm train .. wrote {written} into the current folder beside notes.md ({outcome.said})"
    if not outcome.ok:
        _unchanged(work, before, "charlm train .. (refused)")


# 2. Loading a checkpoint deletes or renames a user's NAME.old.

def _backup_beside(artifacts, here, model_there=True):
    bk = here / "bk"
    bk.mkdir()
    if model_there:
        shutil.copytree(artifacts / "run" / "best", bk / "model")  # cp -r run/best bk/model
    shutil.copytree(artifacts / "run" / "last", bk / "model.old")  # cp -r run/last bk/model.old
    shutil.copy(artifacts / "tiny.txt", here / "tiny.txt")  # the run's corpus, for eval
    return bk


def test_generate_keeps_a_users_model_old_backup(artifacts, here):
    _backup_beside(artifacts, here)
    before = snapshot(here)
    outcome = run_cli(["generate", "--checkpoint", "bk/model", "the ", "--length", "5"])
    assert outcome.ok, outcome
    _unchanged(here, before, "charlm generate --checkpoint bk/model (with the user's bk/model.old beside it)")


def test_info_with_only_NAME_old_renames_nothing(artifacts, here):
    bk = here / "bk"
    bk.mkdir()
    shutil.copytree(artifacts / "run" / "best", bk / "v1.old")  # the user's backup, and no v1
    before = snapshot(here)
    outcome = run_cli(["info", "bk/v1"])
    assert not outcome.problem, outcome
    _unchanged(here, before, "charlm info bk/v1 (with only bk/v1.old there)")


def test_save_checkpoint_model_then_model_old_keeps_both(model, here):
    save_checkpoint("model.old", model.model, model.vocab, model.meta)
    first = snapshot(here / "model.old")
    outcome = run_python(lambda: save_checkpoint("model", model.model, model.vocab, model.meta))
    assert outcome.ok, f"save_checkpoint('model') after save_checkpoint('model.old'): {outcome.said}"
    assert (here / "model.old").is_dir(), "save_checkpoint('model') deleted the checkpoint saved as model.old"
    _unchanged(here / "model.old", first, "model.old (saved first) after save_checkpoint('model')")
    assert load_checkpoint("model").config == model.config


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("model_there", [True, False], ids=["beside-NAME", "only-NAME.old"])
def test_read_only_commands_keep_a_users_NAME_old(artifacts, here, monkeypatch, command, model_there):
    """Each command that reads a checkpoint (serve up to its loading), with the user's copy of a checkpoint as
    ``bk/model.old`` beside ``bk/model``, or alone: nothing deleted, renamed or changed."""
    if command == "export":
        _needs_onnx()
    if command == "serve":
        pytest.importorskip("fastapi")
    _stub_server(monkeypatch)
    _backup_beside(artifacts, here, model_there)
    before = snapshot(here)
    argv = _read_argv(command, "bk/model")
    outcome = run_cli(argv)
    if command == "serve" and "not listening in the canary harness" in outcome.said:
        outcome.ok = True
    assert not outcome.problem, outcome
    after = {k: v for k, v in snapshot(here).items() if not k.startswith("exports")}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"charlm {' '.join(argv)} changed {changed} ({outcome.said.strip()})"
    if model_there:
        assert outcome.ok, outcome


# 3. --overwrite deletes the old run before the new options are known to work.

class _AddressSpace:
    """A cap on this process's address space (soft limit, restored after): a model too large to allocate fails
    quickly here whatever the machine's memory, instead of being paged in."""

    def __init__(self, headroom=8 << 30):
        self.headroom = headroom

    def __enter__(self):
        if not Path("/proc/self/status").exists():
            pytest.skip("needs Linux's /proc to cap the address space")
        self.limits = resource.getrlimit(resource.RLIMIT_AS)
        size = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:"))
        soft, hard = self.limits
        cap = size + self.headroom
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.limits)


IMPOSSIBLE = [["--hidden-size", "1000000000"], ["--lr", "1e300"], ["--embedding-dim", "100000000000"]]


def _train_with(out, *extra):
    # the impossible option last: it replaces TINY's value of the same option (click keeps the last one)
    return run_cli(["train", "tiny.txt", "--out", out, *TINY, *extra])


def test_overwrite_with_an_impossible_hidden_size_keeps_the_old_run(artifacts, here):
    shutil.copy(artifacts / "tiny.txt", here / "tiny.txt")
    shutil.copytree(artifacts / "run", here / "ov")
    before = snapshot(here)
    with _AddressSpace():
        outcome = _train_with("ov", "--overwrite", "--hidden-size", "1000000000")
    after = snapshot(here)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    problems = ([f"the old run in ov changed: {changed}"] if changed else []) + _not_one_line(outcome)
    assert not problems, "charlm train tiny.txt --out ov --overwrite --hidden-size 1000000000: " + "; ".join(problems)


@pytest.mark.parametrize("impossible", IMPOSSIBLE, ids=lambda a: a[0].lstrip("-"))
def test_train_with_an_impossible_size_leaves_no_run_folder(artifacts, here, impossible):
    shutil.copy(artifacts / "tiny.txt", here / "tiny.txt")
    with _AddressSpace():
        outcome = _train_with("new", *impossible)
    problems = _not_one_line(outcome)
    if (here / "new").exists():
        problems.append(f"it left new/ holding {sorted(os.listdir('new'))}")
    again = _train_with("new")
    if not again.ok:
        problems.append(f"then the same --out with workable options failed: {again.said.strip()}")
    assert not problems, f"charlm train tiny.txt --out new {' '.join(impossible)}: " + "; ".join(problems)
