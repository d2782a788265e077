"""Output paths: charlm writes, replaces or deletes only what it wrote itself.

One rule for every writer (``charlm train --out``, ``charlm export``, ``charlm download``, the token
cache, :func:`charlm.save_checkpoint`): a path that does not exist, or an empty folder, may be
written; anything else is replaced only when charlm recognises it as its own, and then only the
entries it would write itself. A folder or file charlm did not write is refused in one line that
names it, and nothing is touched.

Every writer first resolves its path (:func:`resolve_path`): ``missing/../mine`` is ``mine``, whatever
exists yet, so the path checked is the path written. A symbolic link as the last component is refused.

A folder charlm owns says so with a marker file, ``.charlm`` (JSON: ``{"kind": ..., "files": [...]}``).
What charlm wrote before markers existed is recognised by its contents: a run directory by a
checkpoint's ``manifest.json`` in ``last/`` or ``best/``, a checkpoint by its manifest, a web export
by its ``charlm.json``, an ONNX model by the ``charlm`` entry of its metadata.

Each kind names the entries it may hold and what each must be (``KINDS``: a file, or a folder of
another kind); a folder holding anything else (the user's notes beside a run, a ``docs/`` folder, a
folder named like a file charlm writes, a symbolic link) is not replaced, even when it has a marker.

One process at a time writes a run folder: :class:`FolderLock` (an ``flock`` on ``.charlm.lock``,
which names its holder; the system releases it when the process ends, so a stale one is taken over).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from charlm.errors import CharlmError, os_error_line

MARKER = ".charlm"
LOCK = ".charlm.lock"
FILE = "file"
CHECKPOINT_FILES = ("model.pt", "trainer.pt", "config.json", "tokenizer.json")  # what a manifest lists
# A writer's temporary and backup entries are charlm's only when they say so, whatever their names: a checkpoint
# being written (TMP) or moved aside by a replacement (OLD) holds a mark file naming what it is of; a metrics file
# being rewritten (METRICS_TMP) starts with the metrics header. Anything else of such a name is the user's.
OLD, TMP, METRICS_TMP = "checkpoint-old", "checkpoint-tmp", "metrics-tmp"
OLD_MARK, TMP_MARK = ".charlm-old", ".charlm-tmp"
METRICS_HEADER = b"step,epoch,tokens,"
TEMP_NAME_BYTES = 100  # of a name, at most, in the temporary names made from it (a name may take 255 bytes)
TUNE_RESULTS = ("best.json", "best-command.txt", "final-command.txt", "trials.csv", "history.png", "importances.png")
# The entries a folder of each kind may hold (names, or fnmatch patterns of a writer's temporary names), and
# what each must be: a regular file (FILE) or a real folder of the kind named.
KINDS = {
    "run": {"last": "checkpoint", "best": "checkpoint", ".last.old-*": OLD, ".best.old-*": OLD,
            ".last.tmp-*": TMP, ".best.tmp-*": TMP, "metrics.csv": FILE, ".metrics.csv.tmp-*": METRICS_TMP,
            "curve.png": FILE, MARKER: FILE, LOCK: FILE},
    "checkpoint": {"model.pt": FILE, "trainer.pt": FILE, "config.json": FILE, "tokenizer.json": FILE,
                   "manifest.json": FILE, OLD_MARK: FILE, TMP_MARK: FILE, MARKER: FILE},
    "web": {name: FILE for name in ("index.html", "app.js", "model.onnx", "model.tokenizer.json", "tokenizer.json",
                                    "charlm.json", "ort.wasm.min.js", "ort-wasm-simd-threaded.mjs",
                                    "ort-wasm-simd-threaded.wasm", MARKER)},
    "token-cache": {name: FILE for name in ("tokens.bin", "tokenizer.json", "meta.json", "meta.json.part",
                                            "provisional.bin")},
    # charlm tune's folder (charlm.tune): Optuna's journal, one run per trial, the results, and the marked folder
    # the results are written in before they are renamed into place (their temporary files, charlm's by where they are)
    "tune": {"trials": "trials", "final": "run", ".charlm-tune-tmp": "tune-tmp", MARKER: FILE, LOCK: FILE,
             **{name: FILE for name in ("study.journal", "study.journal.lock", *TUNE_RESULTS)}},
    "tune-tmp": {MARKER: FILE, **{f"{name}.tmp-*": FILE for name in TUNE_RESULTS}},
    "trials": {"[0-9][0-9][0-9][0-9]*": "run"},  # a search's trials/: one run folder per Optuna trial number
}
_WHAT = {"run": "a charlm run", "checkpoint": "a charlm checkpoint", "web": "a charlm web export",
         "token-cache": "a charlm token cache entry", "tune": "a charlm tune folder", "trials": "a search's trials",
         "tune-tmp": "charlm tune's temporary folder"}


class NotOwnedError(CharlmError):
    """A path charlm was asked to write holds something charlm did not write; nothing was touched."""


class LockedError(CharlmError):
    """Another process is writing the folder (its lock is held)."""


def resolve_path(path: str | os.PathLike) -> Path:
    """The path the system will write for ``path``, whatever exists yet: its folder resolved (symbolic links
    followed, ``..`` taken after them, as the system takes them; ``missing/../mine`` is ``mine`` even before
    ``missing`` exists), its last component kept as named (a symbolic link there is the writer's to refuse).
    Relative to the current directory when inside it (so messages stay short), else absolute."""
    path = Path(path)
    try:
        full = path.resolve() if path.name in ("", "..") else path.parent.resolve() / path.name
    except (OSError, RuntimeError) as exc:  # a loop of symbolic links, an unreadable folder on the way
        raise NotOwnedError(f"{path}: cannot tell where it leads ({exc})") from None
    here = Path.cwd().resolve()
    try:
        relative = full.relative_to(here)
    except ValueError:
        return full
    return relative if relative.parts else full


def temp_prefix(name: str) -> str:
    """``.NAME.`` for the temporary names a writer makes beside ``NAME``, its name cut (on a character) to
    TEMP_NAME_BYTES, so that they fit the system's 255 bytes whatever ``NAME``'s length."""
    short = name.encode("utf-8", "surrogateescape")[:TEMP_NAME_BYTES].decode("utf-8", "ignore")
    return f".{short}."


@contextlib.contextmanager
def new_folders(path: Path):
    """Create the folder ``path`` and its missing ancestors; if the block then fails, remove those it created
    (empty ones only), so that a refused or failed write leaves nothing new behind."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def move_into_empty(tmp: Path, dest: Path, kind: str, last: str) -> None:
    """Fill the existing empty folder ``dest`` with the finished entries of ``tmp`` by renames, keeping the folder
    itself (its inode, mode and owner are the user's): charlm's marker first, so that a kill half-way leaves a
    folder charlm recognises and replaces, then every entry, ``last`` last; ``tmp`` is then removed."""
    write_marker(dest, kind)
    for entry in sorted(tmp.iterdir(), key=lambda e: e.name == last):
        if entry.name != MARKER:
            os.replace(entry, dest / entry.name)
    if (tmp / MARKER).exists():
        os.replace(tmp / MARKER, dest / MARKER)
    tmp.rmdir()


def default_folder_mode() -> int:
    """The mode the umask gives a new folder (``tempfile.mkdtemp`` makes 0700 whatever the umask). Read from
    ``/proc/self/status`` where Linux gives it, so that no thread of the process sees the umask changed."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, ValueError, IndexError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
    return 0o777 & ~mask


def write_marker(directory: str | os.PathLike, kind: str, files: list[str] | None = None) -> None:
    """Mark ``directory`` as charlm's own (of ``kind``; ``files``: what it holds, when that is fixed)."""
    body = {"kind": kind, **({"files": sorted(files)} if files is not None else {})}
    (Path(directory) / MARKER).write_text(json.dumps(body) + "\n", encoding="utf-8")


def marker_kind(directory: Path) -> str | None:
    """The kind a folder's marker names, or None (no marker, or not one charlm wrote)."""
    try:
        if not (directory / MARKER).is_file():
            return None
        body = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = body.get("kind") if isinstance(body, dict) else None
    return kind if kind in KINDS else None


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def is_manifest(path: Path) -> bool:
    """Whether ``path`` is a checkpoint's ``manifest.json`` as charlm writes it (a JSON object of its files'
    sha256 digests): a file of that name with other contents is not charlm's."""
    try:
        if not _is_file(path) or path.stat().st_size > 4096:
            return False
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(body, dict) and set(body) == set(CHECKPOINT_FILES)
            and all(isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
                    for v in body.values()))


def _recognised(directory: Path, kind: str) -> bool:
    """Whether ``directory`` is charlm's, by its marker or (for what predates markers) its contents."""
    if marker_kind(directory) == kind:
        return True
    if kind == "run":
        return any(is_manifest(directory / name / "manifest.json") for name in ("last", "best"))
    if kind == "checkpoint":
        return is_manifest(directory / "manifest.json")
    if kind == "web":
        try:
            return "onnxruntime_web" in json.loads((directory / "charlm.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False
    if kind == "token-cache":
        return _is_file(directory / "meta.json") or _is_file(directory / "meta.json.part")
    return False


def entry_kind(kind: str, name: str) -> str | None:
    """What the entry ``name`` of a folder of ``kind`` must be (FILE or a kind), or None: not charlm's."""
    return next((what for pattern, what in KINDS[kind].items() if fnmatch.fnmatchcase(name, pattern)), None)


def write_mark(folder: Path, mark: str, of: str) -> None:
    """Mark ``folder`` (a checkpoint being written, TMP_MARK, or moved aside, OLD_MARK) as charlm's, of ``of``."""
    (folder / mark).write_text(json.dumps({"of": of}) + "\n", encoding="utf-8")


def mark_of(folder: Path, mark: str) -> str | None:
    """The name a folder's mark (TMP_MARK or OLD_MARK) says it is of, or None: not marked by charlm."""
    try:
        if not _is_file(folder / mark):
            return None
        body = json.loads((folder / mark).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    of = body.get("of") if isinstance(body, dict) else None
    return of if isinstance(of, str) else None


def _temporary_is_ours(entry: Path, what: str) -> bool:
    """Whether a temporary or backup entry (OLD, TMP, METRICS_TMP) carries charlm's mark."""
    if what == METRICS_TMP:
        try:
            with open(entry, "rb") as f:
                return _is_file(entry) and f.read(len(METRICS_HEADER)) == METRICS_HEADER
        except OSError:
            return False
    if what == TMP and _is_dir(entry) and _holds_nothing(entry):
        return True  # (a writer killed between making its temporary and marking it: nothing in it to lose)
    return _is_dir(entry) and mark_of(entry, OLD_MARK if what == OLD else TMP_MARK) is not None


def _holds_nothing(folder: Path) -> bool:
    """Whether a folder is empty, or holds only an empty TMP_MARK (a mark cut short as it was written)."""
    try:
        names = [e.name for e in folder.iterdir()]
        return not names or (names == [TMP_MARK] and _is_file(folder / TMP_MARK)
                             and (folder / TMP_MARK).stat().st_size == 0)
    except OSError:
        return False


def _foreign_inside(directory: Path, kind: str, prefix: str = "") -> list[str]:
    """The entries of a folder of ``kind`` (known to be charlm's) that charlm's writer did not write: unknown
    names, and known names of the wrong kind (a folder named like a file, a file or link where a folder
    goes); the folders inside are checked the same way. Named by their path below the first folder."""
    foreign = []
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        what, shown = entry_kind(kind, entry.name), prefix + entry.name
        if what in (OLD, TMP, METRICS_TMP):
            if not _temporary_is_ours(entry, what):
                foreign.append(shown)
            elif what != METRICS_TMP:
                foreign += _foreign_inside(entry, "checkpoint", shown + "/")
        elif what is None or entry.is_symlink():
            foreign.append(shown)
        elif what == FILE:
            if not entry.is_file():
                foreign.append(shown + "/")
        elif not entry.is_dir():
            foreign.append(shown)
        else:
            foreign += _foreign_inside(entry, what, shown + "/")
    return foreign


def foreign_entries(directory: str | os.PathLike, kind: str) -> list[str]:
    """The entries of the folder ``directory`` that charlm's writer of ``kind`` did not write: none for a
    missing or empty folder or one of charlm's own; every entry for a folder charlm does not recognise."""
    directory = Path(directory)
    try:
        names = sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []
    if not names:
        return []
    if not _recognised(directory, kind):
        return names
    return _foreign_inside(directory, kind)


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_folder(path: str | os.PathLike, kind: str, option: str = "--out", hint: str = "") -> None:
    """Refuse (one line) to write the folder ``path`` as ``kind`` unless it is missing, empty or charlm's
    own of that kind holding only that kind's entries; a file where the folder should be is refused too."""
    path = Path(path)
    if path.is_symlink():
        raise NotOwnedError(f"{option} {path} is a symbolic link; charlm replaces a folder of its own only "
                            f"(name the folder itself)")
    if path.exists() and not path.is_dir():
        raise NotOwnedError(f"{option} {path} is a file, not a folder; charlm writes {_WHAT[kind]} there "
                            f"only into a new, empty or earlier charlm folder{hint}")
    try:
        foreign = foreign_entries(path, kind)
    except OSError as exc:
        raise NotOwnedError(f"{option} {path}: cannot read it ({os_error_line(exc)})") from None
    if foreign:
        known = _recognised(path, kind)
        what = f"is {_WHAT[kind]} but also holds" if known else f"is not empty and is not {_WHAT[kind]}: it holds"
        raise NotOwnedError(f"{option} {path} {what} {_listing(foreign)}, which charlm did not write; nothing was "
                            f"touched{hint or '; choose another ' + option}")


def owning_folder(path: str | os.PathLike) -> tuple[Path, str] | None:
    """The nearest folder above ``path`` (not ``path`` itself) that charlm owns as a folder of some kind (its
    marker says so, or a checkpoint's manifest), with that kind; None when there is none."""
    path = Path(path)
    for folder in path.parents:
        kind = marker_kind(folder) if _is_dir(folder) else None
        if kind is None and is_manifest(folder / "manifest.json"):
            kind = "checkpoint"
        if kind is not None:
            return folder, kind
    return None


def check_not_inside_owned(path: str | os.PathLike, kind: str, option: str = "--out") -> None:
    """Refuse (one line) to write ``path`` (an output of ``kind``: "run", "checkpoint", "web", "tune", or any other
    word for a file or a folder no kind holds) inside a folder charlm owns as another output (a run, a checkpoint,
    a web export, a search): written there, it would be a foreign entry that blocks that folder's own --resume
    and --overwrite. Only where that folder's kind holds such an entry (KINDS: a run's ``last``, a search's
    ``trials/0007``) is it written."""
    target = Path(os.path.abspath(resolve_path(path)))
    found = owning_folder(target)
    if found is None:
        return
    folder, owner = found
    try:
        parts = target.relative_to(folder).parts
    except ValueError:
        return
    current = owner
    for i, part in enumerate(parts):
        what = entry_kind(current, part) if current in KINDS else None
        if what is None or what == FILE or (i == len(parts) - 1 and what != kind):
            what = _WHAT.get(owner, "a charlm folder")
            raise NotOwnedError(f"{option} {path} lies inside {folder}, which is {what}; charlm keeps each output in "
                                f"a folder of its own: choose another {option}")
        current = what


def check_parent(path: Path, option: str = "--out") -> None:
    """Refuse (one line) a path whose nearest existing ancestor is not a folder (a file where a folder goes)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NotOwnedError(f"{option} {path}: cannot write there, {parent} is a file, not a directory")
            return


def check_not_cwd(path: str | os.PathLike, option: str = "--out") -> None:
    """A folder replaced whole cannot be the current directory or one above it."""
    resolved, here = Path(path).resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        example = f" (e.g. {option} site)" if option.startswith("--") else ""
        raise NotOwnedError(f"{option} {path} is the current directory{'' if resolved == here else ' or above it'}; "
                            f"name a folder of its own{example}")


def remove_entries(directory: Path, kind: str) -> None:
    """Delete what charlm wrote in ``directory`` (checked with :func:`check_folder` first), keeping the folder
    and its lock. Only entries of the right kind go: a folder where a file belongs is left (and refused by
    the check before)."""
    import shutil

    for entry in directory.iterdir():
        what = entry_kind(kind, entry.name)
        if what is None or entry.name == LOCK or entry.is_symlink():
            continue
        if what in (OLD, TMP, METRICS_TMP):
            if not _temporary_is_ours(entry, what):
                continue
            what = FILE if what == METRICS_TMP else "checkpoint"
        if what == FILE and _is_file(entry):
            entry.unlink()
        elif what != FILE and _is_dir(entry) and not _foreign_inside(entry, what):
            shutil.rmtree(entry)


def remove_temporaries(directory: Path, kind: str) -> None:
    """Delete the temporary and backup entries that charlm marked in ``directory`` (a killed writer's leftovers);
    only those that say they are charlm's."""
    import shutil

    for entry in directory.iterdir():
        what = entry_kind(kind, entry.name)
        if what in (TMP, METRICS_TMP) and not entry.is_symlink() and _temporary_is_ours(entry, what):
            if what == TMP and not _foreign_inside(entry, "checkpoint"):
                shutil.rmtree(entry)
            elif what == METRICS_TMP:
                entry.unlink()


def check_file(path: Path, owned: bool, what: str, option: str = "--out") -> None:
    """Refuse (one line) to replace the file ``path`` unless it is missing or ``owned`` (charlm wrote it)."""
    if path.is_symlink():
        raise NotOwnedError(f"{option} {path} is a symbolic link; charlm does not write through it")
    if path.is_dir():
        raise NotOwnedError(f"{option} {path} is a folder; charlm writes {what} there only as a new file or over "
                            f"one it wrote")
    if path.exists() and not owned:
        raise NotOwnedError(f"{path} exists and is not {what} charlm wrote; nothing was touched; move it or "
                            f"choose another {option}")


_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's answers when another process holds the lock
PROBE_GRACE_S = 1.0  # a writer's lock is retried this long: another process's check_free holds it for a moment


def _flock_through_probes(fd: int) -> None:
    """The exclusive lock on ``fd``, retried for PROBE_GRACE_S while it is held (a probe lets go at once; a writer
    holds on, and the last OSError says so)."""
    import fcntl

    deadline = time.monotonic() + PROBE_GRACE_S
    while True:
        try:
            return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _HELD or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class FolderLock:
    """One writer at a time for a folder charlm owns: an ``flock`` on ``DIR/.charlm.lock`` (which names the
    holder: pid, host, command, since when). The system drops it when its process ends, however that ends,
    so a lock left by a killed process is simply taken over. Use as a context manager, or
    :meth:`acquire` / :meth:`release`."""

    def __init__(self, directory: str | os.PathLike, option: str = "--out"):
        self.directory, self.option, self.fd = Path(directory), option, None

    @property
    def path(self) -> Path:
        return self.directory / LOCK

    def holder(self) -> str:
        """Who holds the lock, in words (from the lock file; "another process" when it says nothing)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"process {int(info['pid'])} on {info['host']} ({info['command']}, since {since})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def check_free(self) -> None:
        """Refuse (one line) when another process holds the lock; reads only (a probe on the existing file)."""
        import fcntl

        if not _is_file(self.path):
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (shared: probes at the same moment never see each other)
        except OSError as exc:
            if exc.errno not in _HELD:
                return
            raise LockedError(f"{self.option} {self.directory} is being written by {self.holder()}; wait for it to "
                              f"end, or choose another {self.option}") from None
        finally:
            os.close(fd)  # (closing drops the probe's lock)

    def acquire(self) -> "FolderLock":
        import fcntl

        lock = self.path
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise NotOwnedError(f"{self.option} {self.directory}: {LOCK} is not a file charlm wrote; move it")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise NotOwnedError(f"{self.option} {self.directory}: cannot lock it ({os_error_line(exc)})") from None
        try:
            _flock_through_probes(fd)
        except OSError as exc:
            if exc.errno not in _HELD:  # a file system without locks: written unlocked, as before locks existed
                os.close(fd)
                return self
            os.close(fd)
            raise LockedError(f"{self.option} {self.directory} is being written by {self.holder()}; wait for it to "
                              f"end, or choose another {self.option}") from None
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command or "python",
                           "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (body + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # (closing drops the flock; the file stays, naming the last holder)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def folder_mode(path: Path) -> int | None:
    """The permission bits of an existing folder (so that a replacement keeps them), else None."""
    try:
        return stat.S_IMODE(path.stat().st_mode) if _is_dir(path) else None
    except OSError:
        return None
