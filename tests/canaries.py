"""The canary harness's sandbox, path grammar and checks (tests/test_canaries.py uses them).

A sandbox is a fresh folder holding a user's things, each with contents of its own (its canary)::

    root/                      the folder above the current directory        [the user's standard entries]
      elsewhere/               the target of work/link                        [standard entries]
        timemachine.txt        an edited copy of a corpus
      work/                    the current directory while a command runs     [standard entries]
        tiny.txt               the corpus the training commands read
        docs/ données/ l...l/  folders of the user's (the last one's name is 255 bytes long) [standard entries]
        docs/timemachine.txt/  a folder where charlm download writes a file
        link -> ../elsewhere   a symbolic link to a folder of the user's
        link.onnx -> ../elsewhere/mine.onnx
        run/ web/ ckpt/        charlm's own: a trained run, a web export, a checkpoint (copies of `artifacts`)
        exported.onnx exported.tokenizer.json   charlm's own ONNX export

The standard entries of each of those folders: ``canary.txt``; ``notes.txt`` (a file where a folder may be
asked for); ``mine.onnx`` (a file named like a model); ``site/`` (``index.md``, ``img/a.png``), ``site.old/``
and ``site.tmp-1a2b/`` (folders named like charlm's backups and temporaries); ``empty/`` (an empty folder,
mode 0750); ``corpora/timemachine.txt`` (an edited corpus); ``metrics.csv/``, ``model.onnx/``,
``index.html/``, ``manifest.json/`` (folders named like files charlm writes); and folders whose files all
carry the names charlm writes, with the user's text in them: ``results/`` (``metrics.csv``, ``curve.png``,
``last/`` and ``best/`` holding ``manifest.json``, ``config.json``, ``model.pt``), ``www/`` (``index.html``,
``app.js``, ``model.onnx``, ``charlm.json``) and ``weights/`` (a checkpoint's five file names).
The user's files are mode 0640 and folders 0750, so that one replaced by charlm shows.

Every entry is recorded before the command (type, bytes, mode, the folder's inode, a link's target) and
compared after it. What a command may change is only what it owns: the path it was given, *resolved* as
the kernel resolves it once the missing folders exist (``os.path.realpath``: ``missing/../docs`` is
``docs``), and then only when that was new, an empty folder of the user's, or charlm's own output of the
command's kind (e.g. ``run/`` for ``--resume``); the new folders a ``mkdir -p`` of the path makes are
tolerated. A command that failed must have said one line and left everything as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

# -- names ----------------------------------------------------------------------------------------------

LONG = "l" * 255  # an existing folder of the user's with the longest name a folder can have
NEW_LONG = "é" * 127 + "n"  # 255 bytes (UTF-8), not there: a valid name; charlm's temporary names beside it are not
TOO_LONG = "t" * 256  # one byte more than a file name may have
ONNX_LONG = "o" * 250 + ".onnx"  # 255 bytes: a valid model name whose vocabulary's name (NAME.tokenizer.json) is not

USER_FILE_MODE, USER_DIR_MODE = 0o640, 0o750

# The user's standard entries (folders end in /); folders' contents are nested.
STANDARD = {
    "canary.txt": None,
    "notes.txt": None,
    "mine.onnx": None,
    "site/": {"index.md": None, "img/": {"a.png": None}},
    "site.old/": {"backup.md": None},
    "site.tmp-1a2b/": {"draft.md": None},
    "empty/": {},
    "corpora/": {"timemachine.txt": None},
    "metrics.csv/": {"canary.txt": None},
    "model.onnx/": {"canary.txt": None},
    "index.html/": {"canary.txt": None},
    "manifest.json/": {"canary.txt": None},
    "results/": {"metrics.csv": None, "curve.png": None,
                 "last/": {"manifest.json": None, "config.json": None, "model.pt": None},
                 "best/": {"manifest.json": None, "config.json": None, "model.pt": None}},
    "www/": {"index.html": None, "app.js": None, "model.onnx": None, "charlm.json": None},
    "weights/": {"model.pt": None, "trainer.pt": None, "config.json": None, "tokenizer.json": None,
                 "manifest.json": None},
}

# -- the path grammar -----------------------------------------------------------------------------------

# Detours that end where they began, through a folder that does not exist yet (the checks look at the path as
# typed, which names nothing until the writer creates the folder) ...
MISSING_DETOURS = ["missing/..", "a/missing/../..", "nouveau-été/..", "new.tmp-1a2b/..", NEW_LONG + "/..",
                   "docs/missing/../.."]
# ... or through things that exist: folders, the symbolic link (its .. is the link target's parent), a file.
DETOURS = ["docs/..", "link/..", "site/../docs/..", "empty/..", "notes.txt/..", LONG + "/.."]
DOWN = ["docs", "link", "données", "missing", "site", "empty", "notes.txt", "results", "run", LONG, "elsewhere"]
STEPS = st.one_of(st.sampled_from(MISSING_DETOURS), st.sampled_from(DETOURS), st.sampled_from(DOWN),
                  st.sampled_from([".", ".."]))

# What a path may end with, for a folder a command writes (train --out, export --format web --out,
# save_checkpoint, CHARLM_CACHE_DIR), for export --format onnx's file, and for download --dir.
FOLDER_LEAVES = ["new", "site", "empty", "results", "www", "weights", "docs", "link", "site.old", "site.tmp-1a2b",
                 "metrics.csv", "index.html", "notes.txt", ".", "..", "run", "web", "ckpt", "données", "nouveau-été",
                 "new.old", "new.tmp-1a2b", LONG, NEW_LONG, TOO_LONG]
ONNX_LEAVES = ["new.onnx", "mine.onnx", "exported.onnx", "model.onnx", "link.onnx", "nouvel-été.onnx", "notes.txt",
               "site", "mine.onnx.old", ONNX_LONG, TOO_LONG + ".onnx"]
DIR_LEAVES = ["new", "corpora", "docs", "link", "elsewhere", "empty", "site", "notes.txt", ".", "..", "corpora.old",
              "nouveau-été", NEW_LONG, TOO_LONG]
SUFFIXES = ["", "/", "/."]


# Where the leaf lies: the current directory, a folder of the user's (through the link too), the parent, a
# folder that is empty or missing.
PLACES = ["", "docs", "link", "..", "données", LONG, "empty", "missing", "site"]


# A detour: half the time through a missing folder (the first one tried: ``missing/..``), or none, or through
# things that exist; the second, with no detour first, for a path that must reach something that exists (a
# resume today stops at a missing folder).
DETOUR = st.one_of(st.sampled_from(MISSING_DETOURS), st.sampled_from(["", *DETOURS]))
EXISTING_FIRST = st.sampled_from(["", *DETOURS, *MISSING_DETOURS])


def hostile_paths(leaves: list[str], suffixes: list[str] = SUFFIXES, places: list[str] = PLACES, steps: int = 2,
                  detours=DETOUR):
    """Paths relative to ``work`` (or absolute, or ``./``-prefixed): up to ``steps`` free steps, a detour, a place,
    a leaf and a suffix, e.g. ``docs/missing/../link/site/.``. The simplest (Hypothesis's first example) is
    ``missing/../LEAF`` with the first leaf (with the default detours)."""
    def compose(prefix, free, detour, place, leaf, suffix):
        return prefix, "/".join(p for p in [*free, detour, place, leaf] if p) + suffix

    return st.builds(compose, st.sampled_from(["", "./", "<work>/"]), st.lists(STEPS, max_size=steps), detours,
                     st.sampled_from(places), st.sampled_from(leaves), st.sampled_from(suffixes))


def typed(box: "Sandbox", drawn: tuple[str, str]) -> str:
    """The drawn path as the user types it (``<work>/`` made the sandbox's absolute current directory)."""
    prefix, rest = drawn
    return (str(box.work) + "/" if prefix == "<work>/" else prefix) + rest


def stays_inside(drawn: tuple[str, str], depth: int = 1) -> bool:
    """Whether every prefix of the path stays inside the sandbox (``work`` is ``depth`` folders below its root;
    ``link`` leads to ``root/elsewhere``, one folder below)."""
    prefix, rest = drawn
    if prefix == "<work>/":
        prefix = ""
    level = depth
    for part in rest.split("/"):
        if part == "..":
            level -= 1
        elif part == "link":
            level = 1  # (root/elsewhere)
        elif part not in ("", "."):
            level += 1
        if level < 0:
            return False
    return True


# Hypothesis for every canary test: deterministic (the same examples every run), no example database,
# no deadline (a command takes what it takes on a busy machine). CHARLM_CANARY_EXAMPLES multiplies every
# test's number of examples, for a longer hunt than CI's.
settings.register_profile("charlm-canaries", deadline=None, derandomize=True, database=None, print_blob=False,
                          suppress_health_check=list(HealthCheck),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
SCALE = float(os.environ.get("CHARLM_CANARY_EXAMPLES", "1"))


def canary_settings(max_examples: int) -> settings:
    return settings(settings.get_profile("charlm-canaries"), max_examples=max(1, round(max_examples * SCALE)))


# -- the sandbox ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir", "link", "other"
    mode: int
    ino: int
    data: str  # a file's sha256, a link's target

    def describe(self) -> str:
        return {"file": "a file", "dir": "a folder", "link": f"a symbolic link to {self.data}"}.get(self.kind,
                                                                                                    self.kind)


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry under ``root`` (``root`` itself as ``.``), links not followed."""
    out = {}

    def record(path: Path, rel: str) -> None:
        st_ = os.lstat(path)
        if stat.S_ISLNK(st_.st_mode):
            out[rel] = Entry("link", 0, 0, os.readlink(path))
        elif stat.S_ISDIR(st_.st_mode):
            out[rel] = Entry("dir", stat.S_IMODE(st_.st_mode), st_.st_ino, "")
        elif stat.S_ISREG(st_.st_mode):
            out[rel] = Entry("file", stat.S_IMODE(st_.st_mode), 0, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[rel] = Entry("other", stat.S_IMODE(st_.st_mode), 0, "")

    record(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            record(path, path.relative_to(root).as_posix())
    return out


def _write_tree(folder: Path, tree: dict, rel: str) -> None:
    folder.mkdir(exist_ok=True)
    for name, sub in tree.items():
        if name.endswith("/"):
            child = folder / name[:-1]
            _write_tree(child, sub, f"{rel}/{name[:-1]}")
            os.chmod(child, USER_DIR_MODE)
        else:
            path = folder / name
            path.write_text(f"the user's {rel}/{name}: a canary\n", encoding="utf-8")
            os.chmod(path, USER_FILE_MODE)


@dataclass
class Sandbox:
    root: Path
    work: Path
    charlm: set[str] = field(default_factory=set)  # entries (relative to root) that are charlm's own outputs
    before: dict[str, Entry] = field(default_factory=dict)

    def rel(self, path: Path) -> str | None:
        """``path`` (absolute, resolved) relative to the root, or None outside the sandbox."""
        try:
            rel = Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return None
        return rel or "."

    def resolve(self, typed_path: str) -> Path:
        """Where the path leads once its missing folders exist: the kernel's reading, ``..`` after a link included."""
        return Path(os.path.realpath(os.path.join(self.work, typed_path)))

    def under(self, rel: str) -> list[str]:
        """The recorded entries at and below ``rel``."""
        return [k for k in self.before if k == rel or k.startswith(rel + "/") or rel == "."]

    def whose(self, rel: str) -> str:
        return "charlm's" if rel in self.charlm else "the user's"

    def describe(self, rel: str | None) -> str:
        """What was at ``rel`` before the command, in words."""
        if rel is None:
            return "outside the sandbox"
        entry = self.before.get(rel)
        if entry is None:
            return "nothing (a new path)"
        if entry.kind == "dir":
            inside = len(self.under(rel)) - 1
            return f"{self.whose(rel)} folder holding {inside} entries" if inside else f"{self.whose(rel)} empty folder"
        return f"{self.whose(rel)} {entry.describe()[2:]}"

    @contextlib.contextmanager
    def cwd(self):
        here = os.getcwd()
        os.chdir(self.work)
        try:
            yield
        finally:
            os.chdir(here)


def build(base: Path, artifacts: Path | None = None, path: str | None = None) -> Sandbox:
    """A fresh sandbox in a new folder under ``base`` (see the module docstring); ``artifacts`` holds charlm's
    outputs to copy in (``run/``, ``web/``, ``exported.onnx``, ``exported.tokenizer.json``). With ``path``,
    the folders it does not name (docs, données, the long one, the link's target) hold only their
    ``canary.txt`` (building every standard entry everywhere takes longer than most commands)."""
    import tempfile

    root = Path(tempfile.mkdtemp(dir=base, prefix="box-")).resolve()
    work = root / "work"
    box = Sandbox(root=root, work=work)
    named = set(Path(path).parts) if path is not None else None

    def folder(where: Path, rel: str, *names: str) -> None:
        full = named is None or any(n in named for n in names)
        _write_tree(where, STANDARD if full else {"canary.txt": None}, rel)
        os.chmod(where, USER_DIR_MODE)

    _write_tree(root, STANDARD, ".")
    folder(root / "elsewhere", "elsewhere", "link", "elsewhere", "link.onnx")
    (root / "elsewhere" / "timemachine.txt").write_text("my own edited copy of the corpus\n")
    _write_tree(work, STANDARD, "work")
    for name in ("docs", "données", LONG):
        folder(work / name, f"work/{name}", name)
    _write_tree(work / "docs" / "timemachine.txt", {"canary.txt": None}, "work/docs/timemachine.txt")
    (work / "link").symlink_to("../elsewhere")
    (work / "link.onnx").symlink_to("../elsewhere/mine.onnx")
    from conftest import SENTENCE

    (work / "tiny.txt").write_text(SENTENCE * 12)
    if artifacts is not None:
        before = set(snapshot(root))
        for name in ("run", "web"):
            if (artifacts / name).is_dir():
                shutil.copytree(artifacts / name, work / name, symlinks=True)
        if (artifacts / "run" / "best").is_dir():
            shutil.copytree(artifacts / "run" / "best", work / "ckpt")
        for name in ("exported.onnx", "exported.tokenizer.json"):
            if (artifacts / name).is_file():
                shutil.copy2(artifacts / name, work / name)
        box.charlm = set(snapshot(root)) - before
    return box


def plant(box: Sandbox, what: str) -> None:
    """Put one more of the user's things into or beside charlm's outputs (``what`` is one of PLANTS)."""
    work = box.work
    made: list[Path] = []
    if what == "nothing":
        return
    if what == "run/notes.txt":
        (work / "run" / "notes.txt").write_text("the user's notes in the run\n")
        made.append(work / "run" / "notes.txt")
    elif what == "run/metrics.csv/ (a folder)":
        (work / "run" / "metrics.csv").unlink()
        _write_tree(work / "run" / "metrics.csv", {"canary.txt": None}, "work/run/metrics.csv")
        made.append(work / "run" / "metrics.csv")
    elif what == "run/last.old/ (the user's copy of last/)":
        shutil.copytree(work / "run" / "last", work / "run" / "last.old")
        made.append(work / "run" / "last.old")
    elif what == "run/best.old/ (the user's files with a checkpoint's names)":
        _write_tree(work / "run" / "best.old", {"manifest.json": None, "config.json": None, "model.pt": None},
                    "work/run/best.old")
        made.append(work / "run" / "best.old")
    elif what == "web/model.onnx/ (a folder)":
        (work / "web" / "model.onnx").unlink()
        _write_tree(work / "web" / "model.onnx", {"canary.txt": None}, "work/web/model.onnx")
        made.append(work / "web" / "model.onnx")
    elif what == "web/CNAME":
        (work / "web" / "CNAME").write_text("example.org\n")
        made.append(work / "web" / "CNAME")
    elif what == "ckpt.old/ (the user's copy of ckpt/)":
        shutil.copytree(work / "ckpt", work / "ckpt.old")
        made.append(work / "ckpt.old")
    elif what == "ckpt/notes.txt":
        (work / "ckpt" / "notes.txt").write_text("the user's notes in the checkpoint\n")
        made.append(work / "ckpt" / "notes.txt")
    elif what == "exported.tokenizer.json (the user's file)":
        (work / "exported.tokenizer.json").write_text("{}\n")
        made.append(work / "exported.tokenizer.json")
    else:
        raise ValueError(what)
    for path in made:
        rel = box.rel(path)
        box.charlm -= {k for k in box.charlm if k == rel or k.startswith(rel + "/")}


RUN_PLANTS = ["nothing", "run/notes.txt", "run/metrics.csv/ (a folder)", "run/last.old/ (the user's copy of last/)",
              "run/best.old/ (the user's files with a checkpoint's names)"]
WEB_PLANTS = ["nothing", "web/model.onnx/ (a folder)", "web/CNAME"]
CKPT_PLANTS = ["nothing", "ckpt.old/ (the user's copy of ckpt/)", "ckpt/notes.txt",
               "run/last.old/ (the user's copy of last/)"]
ONNX_PLANTS = ["nothing", "exported.tokenizer.json (the user's file)"]


# -- running a command ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    said: str  # the output, or the exception's line
    problem: str | None = None  # how it failed, when not in one line: a traceback, several lines, an exit code


def run_cli(argv: list[str]) -> Outcome:
    from click.testing import CliRunner

    from charlm.cli import main

    result = CliRunner().invoke(main, argv)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info)[-4:]) if result.exc_info else repr(result.exception)
        return Outcome(False, output, f"a traceback ({type(result.exception).__name__}):\n{tb}")
    if result.exit_code == 0:
        return Outcome(True, output)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    if result.exit_code not in (1, 2) or len(errors) != 1 or "Traceback" in output:
        return Outcome(False, output, f"exit {result.exit_code} with {len(errors)} 'Error:' lines")
    return Outcome(False, output)


def run_python(call) -> Outcome:
    from charlm.errors import CharlmError

    try:
        call()
    except CharlmError as exc:
        text = str(exc)
        return Outcome(False, text, None if "\n" not in text and text else "a message that is not one line")
    except Exception as exc:  # noqa: BLE001 - anything else is what the user would see as a traceback
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-4:])
        return Outcome(False, str(exc), f"a traceback ({type(exc).__name__}):\n{tb}")
    return Outcome(True, "")


# -- the checks -----------------------------------------------------------------------------------------

@dataclass
class Target:
    """What a command was asked to write, and what it may therefore change."""

    path: Path  # the resolved path it replaces or writes (a folder, or a file)
    own_kind: set[str]  # charlm's outputs (relative to root) the command may replace, when the path leads there
    extra: list[Path] = field(default_factory=list)  # other paths it may create (an export's vocabulary)
    owns_new: object = None  # predicate on a new entry's relative path (the token cache's entries), or None
    typed: str | None = None  # the path as typed: the folders a mkdir -p of it makes are tolerated
    kind: str = "folder"  # "folder": new, an empty folder or charlm's own; "file": new or charlm's own;
    # "shared": a folder others' things may be in too (the token cache's root), where it adds entries of its own


class CanaryLost(AssertionError):
    """A file, folder or link of the user's was changed, replaced or deleted."""


class NotOneLine(AssertionError):
    """The command failed without one clear line (a traceback, several lines, another exit code)."""


class WroteOutside(AssertionError):
    """The command succeeded but created something outside what it owns (a temporary left, a folder beside)."""


class LeftBehind(AssertionError):
    """The command failed and left something new behind (a refusal touches nothing)."""


class WroteIntoUsersThing(AssertionError):
    """The command succeeded writing a path that held something of the user's (it must refuse)."""


SURVEY = os.environ.get("CHARLM_CANARY_SURVEY", "")


def _fail(error: AssertionError) -> None:
    """Raise ``error``; or, when $CHARLM_CANARY_SURVEY names a file, append it there (one JSON line) and go on,
    so that one run lists every failing example rather than the one Hypothesis shrinks to for each kind."""
    if not SURVEY:
        raise error
    import json

    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(SURVEY, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": test, "kind": type(error).__name__, "message": str(error)}) + "\n")


def check(box: Sandbox, command: str, typed_path: str, outcome: Outcome, target: Target | None) -> None:
    """The harness's verdict on one command (see the module docstring); raises one of the errors above."""
    after = snapshot(box.root)
    if target is None:  # a read-only command: nothing may change, nothing may be new
        target = Target(path=box.work / ".nothing", own_kind=set(), kind="none")
    rel_target = box.rel(target.path)
    leads = ("which it only reads" if target.kind == "none" else
             f"it leads to {rel_target or target.path} (resolved), which held {box.describe(rel_target)}")
    said = f"{'it succeeded' if outcome.ok else 'it failed'}: {outcome.said.strip()[-600:]!r}"
    if outcome.problem:
        said += f"\n  and not in one line: {outcome.problem.strip()}"
    header = (f"{command}\n  run in {box.work} (the sandbox's current directory)\n"
              f"  the path {typed_path!r}: {leads}\n  {said}")

    replaceable = rel_target in target.own_kind
    exempt = set(box.under(rel_target)) & box.charlm if replaceable and rel_target else set()
    if replaceable and target.extra:
        exempt |= {box.rel(p) for p in target.extra} & box.charlm

    lost = []
    for rel, entry in box.before.items():
        if rel in exempt:
            continue
        now = after.get(rel)
        what = f"{rel} ({box.whose(rel)} {entry.describe()[2:]})"
        if now is None:
            lost.append(f"GONE      {what}")
        elif now.kind != entry.kind:
            lost.append(f"REPLACED  {what}: now {now.describe()}")
        elif entry.kind == "file" and now.data != entry.data:
            lost.append(f"CHANGED   {what}: its bytes differ")
        elif entry.kind == "link" and now.data != entry.data:
            lost.append(f"CHANGED   {what}: now leads to {now.data}")
        elif entry.kind == "dir" and now.ino != entry.ino:
            lost.append(f"REPLACED  {what}: another folder in its place (mode {entry.mode:o} -> {now.mode:o})")
        elif now.mode != entry.mode:
            lost.append(f"MODE      {what}: mode {entry.mode:o} -> {now.mode:o}")
    if lost:
        return _fail(CanaryLost(f"{header}\n  the user's things lost or changed:\n    " + "\n    ".join(sorted(lost))))

    if outcome.problem:
        return _fail(NotOneLine(header))

    new = sorted(set(after) - set(box.before))
    if not outcome.ok:
        if new:
            return _fail(LeftBehind(f"{header}\n  it failed but left new entries:\n    " + "\n    ".join(new)))
        return

    if rel_target is not None and rel_target in box.before and not replaceable and target.kind in ("folder", "file"):
        entry = box.before[rel_target]
        empty_folder = entry.kind == "dir" and len(box.under(rel_target)) == 1
        if not (empty_folder and target.kind == "folder"):
            return _fail(WroteIntoUsersThing(f"{header}\n  it succeeded, but {rel_target} was "
                                             f"{box.describe(rel_target)}: only a new path, an empty folder or "
                                             f"charlm's own output may be written"))

    allowed_roots = [*([] if target.kind in ("shared", "none") else [target.path]), *target.extra]
    allowed = {box.rel(p) for p in allowed_roots}
    # folders a mkdir -p of the path made (the resolved ancestors, and the path's own missing components)
    tolerated = {box.rel(p) for p in target.path.parents} if target.typed is not None else set()
    if target.kind == "shared":
        tolerated.add(rel_target)  # the cache's root, made when missing
    parts = Path(target.typed).parts if target.typed is not None else ()
    for i in range(1, len(parts)):
        tolerated.add(box.rel(Path(os.path.realpath(os.path.join(box.work, *parts[:i])))))
    stray = []
    for rel in new:
        if any(a is not None and (rel == a or rel.startswith(a + "/") or a == ".") for a in allowed):
            continue
        if target.owns_new is not None and target.owns_new(rel):
            continue
        if rel in tolerated and after[rel].kind == "dir":
            continue
        stray.append(f"{rel} ({after[rel].describe()})")
    if stray:
        return _fail(WroteOutside(f"{header}\n  it wrote outside what it owns "
                                  f"({', '.join(str(a) for a in allowed)}):\n    " + "\n    ".join(stray)))


# -- the read-only commands' sandbox --------------------------------------------------------------------

OLD_KINDS = ["a copy of a checkpoint", "the user's files", "the user's files with a checkpoint's names", "a file"]
READ_PATHS = ["bk/model", "./bk/model", "bk/model/", "bk/model/.", "bk/../bk/model", "missing/../bk/model",
              "link-bk/model", "<work>/bk/model"]


def build_read_only(base: Path, artifacts: Path, layout: str, present: bool, old: str | None, where: str) -> Sandbox:
    """A sandbox for a command that only reads ``bk/model``: a checkpoint (``layout`` "checkpoint", a copy of a
    run's best/) or a run (``layout`` "run"), there or not (``present``), with ``old`` (one of OLD_KINDS, or
    None) at ``where``: "beside" (``bk/model.old``), or inside the run ("best" or "last": ``best.old``)."""
    import tempfile

    root = Path(tempfile.mkdtemp(dir=base, prefix="box-")).resolve()
    work = root / "work"
    box = Sandbox(root=root, work=work)
    _write_tree(root, {"canary.txt": None}, ".")
    _write_tree(work, {"canary.txt": None, "bk/": {"canary.txt": None}}, "work")
    from conftest import SENTENCE

    (work / "tiny.txt").write_text(SENTENCE * 12)
    (work / "link-bk").symlink_to("bk")
    bk = work / "bk"
    if present:
        shutil.copytree(artifacts / "run" / ("best" if layout == "checkpoint" else ""), bk / "model")
    if old is not None:
        spot = bk / "model.old" if where == "beside" or not present else bk / "model" / f"{where}.old"
        if old == "a copy of a checkpoint":
            shutil.copytree(artifacts / "run" / "last", spot)
        elif old == "the user's files":
            _write_tree(spot, {"thesis.tex": None, "figures/": {"plot.png": None}}, box.rel(spot))
        elif old == "the user's files with a checkpoint's names":
            _write_tree(spot, {"manifest.json": None, "config.json": None, "model.pt": None}, box.rel(spot))
        else:
            spot.write_text("the user's file\n")
    return box
