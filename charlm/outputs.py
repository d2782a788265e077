"""Output paths: charlm writes, replaces or deletes only what it wrote itself.

One rule for every writer (``charlm train --out``, ``charlm export``, ``charlm download``, the token
cache, :func:`charlm.save_checkpoint`): a path that does not exist, or an empty folder, may be
written; anything else is replaced only when charlm recognises it as its own, and then only the
entries it would write itself. A folder or file charlm did not write is refused in one line that
names it, and nothing is touched.

A folder charlm owns says so with a marker file, ``.charlm`` (JSON: ``{"kind": ..., "files": [...]}``).
What charlm wrote before markers existed is recognised by its contents: a run directory by a
checkpoint's ``manifest.json`` in ``last/`` or ``best/``, a checkpoint by its manifest, a web export
by its ``charlm.json``, an ONNX model by the ``charlm`` entry of its metadata.

Each kind names the entries it may hold (``KINDS``); a folder holding anything else (the
user's notes beside a run, a ``docs/`` folder) is not replaced, even when it has a marker.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from charlm.errors import CharlmError, os_error_line

MARKER = ".charlm"

# The entries a folder of each kind may hold: names, or fnmatch patterns of a writer's temporary names.
KINDS = {
    "run": ("last", "best", "last.old", "best.old", ".last.tmp-*", ".best.tmp-*", "metrics.csv", "curve.png",
            MARKER),
    "checkpoint": ("model.pt", "trainer.pt", "config.json", "tokenizer.json", "manifest.json"),
    "web": ("index.html", "app.js", "model.onnx", "model.tokenizer.json", "tokenizer.json", "charlm.json",
            "ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm", MARKER),
    "token-cache": ("tokens.bin", "tokenizer.json", "meta.json", "meta.json.part", "provisional.bin"),
    # charlm tune's folder (charlm.tune): the Optuna journal, the trials' runs, the results
    "tune": ("study.journal", "study.journal.lock", "tune.lock", "trials", "final", "best.json", "best-command.txt",
             "final-command.txt", "trials.csv", "history.png", "importances.png", MARKER),
    "trials": ("[0-9][0-9][0-9][0-9]*",),  # a search's trials/: one run folder per Optuna trial number
}
# The folders inside a folder of a kind, and the kind each must be (what their entries may be).
NESTED = {"run": {name: "checkpoint" for name in ("last", "best", "last.old", "best.old", ".last.tmp-*", ".best.tmp-*")}}
NESTED["tune"] = {"final": "run", "trials": "trials"}
_WHAT = {"run": "a charlm run", "checkpoint": "a charlm checkpoint", "web": "a charlm web export",
         "token-cache": "a charlm token cache entry", "tune": "a charlm tune folder", "trials": "a search's trials"}


class NotOwnedError(CharlmError):
    """A path charlm was asked to write holds something charlm did not write; nothing was touched."""


def write_marker(directory: str | os.PathLike, kind: str, files: list[str] | None = None) -> None:
    """Mark ``directory`` as charlm's own (of ``kind``; ``files``: what it holds, when that is fixed)."""
    body = {"kind": kind, **({"files": sorted(files)} if files is not None else {})}
    (Path(directory) / MARKER).write_text(json.dumps(body) + "\n", encoding="utf-8")


def marker_kind(directory: Path) -> str | None:
    """The kind a folder's marker names, or None (no marker, or not one charlm wrote)."""
    try:
        body = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = body.get("kind") if isinstance(body, dict) else None
    return kind if kind in KINDS else None


def _recognised(directory: Path, kind: str) -> bool:
    """Whether ``directory`` is charlm's, by its marker or (for what predates markers) its contents."""
    if marker_kind(directory) == kind:
        return True
    if kind == "run":
        return any((directory / name / "manifest.json").is_file() for name in ("last", "best", "last.old", "best.old"))
    if kind == "checkpoint":
        return (directory / "manifest.json").is_file()
    if kind == "web":
        try:
            return "onnxruntime_web" in json.loads((directory / "charlm.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False
    if kind == "token-cache":
        return (directory / "meta.json").is_file() or (directory / "meta.json.part").is_file()
    return False


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
    patterns = KINDS[kind]
    foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for name in names:  # the folders inside (a run's checkpoints): their entries too, named by their path here
        inner = next((k for p, k in NESTED.get(kind, {}).items() if fnmatch.fnmatchcase(name, p)), None)
        if inner is not None and (directory / name).is_dir() and not (directory / name).is_symlink():
            foreign += [f"{name}/{e.name}" for e in sorted((directory / name).iterdir(), key=lambda e: e.name)
                        if not any(fnmatch.fnmatchcase(e.name, q) for q in KINDS[inner])]
        elif inner is not None and (directory / name).is_symlink():
            foreign.append(name)  # a link where charlm keeps a checkpoint: not charlm's to delete through
    return foreign


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


def check_not_cwd(path: str | os.PathLike, option: str = "--out") -> None:
    """A folder replaced whole cannot be the current directory or one above it."""
    resolved, here = Path(path).resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        example = f" (e.g. {option} site)" if option.startswith("--") else ""
        raise NotOwnedError(f"{option} {path} is the current directory{'' if resolved == here else ' or above it'}; "
                            f"name a folder of its own{example}")


def remove_entries(directory: Path, kind: str) -> None:
    """Delete what charlm wrote in ``directory`` (checked with :func:`check_folder` first), keeping the folder."""
    import shutil

    patterns = KINDS[kind]
    for entry in directory.iterdir():
        if any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def check_file(path: Path, owned: bool, what: str, option: str = "--out") -> None:
    """Refuse (one line) to replace the file ``path`` unless it is missing or ``owned`` (charlm wrote it)."""
    if path.is_symlink() and not path.exists():
        raise NotOwnedError(f"{option} {path} is a broken symbolic link; charlm does not write through it")
    if path.is_dir():
        raise NotOwnedError(f"{option} {path} is a folder; charlm writes {what} there only as a new file or over "
                            f"one it wrote")
    if path.exists() and not owned:
        raise NotOwnedError(f"{path} exists and is not {what} charlm wrote; nothing was touched; move it or "
                            f"choose another {option}")
