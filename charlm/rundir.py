"""A run directory: what ``charlm train`` leaves behind, and what a resume or a command reads back.

::

    checkpoints/timemachine/      --out (default: checkpoints/<corpus stem>)
      last/  best/                complete checkpoints (charlm.checkpoint)
      metrics.csv                 one row per held-out evaluation
      curve.png                   drawn from metrics.csv by whoever asks (the CLI)
      .charlm                     the marker that says charlm made this folder (charlm.outputs)
      .charlm.lock                held by the one process writing the run (charlm.outputs.FolderLock)

Only this module knows the names above and the columns of ``metrics.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import tempfile
from pathlib import Path

from charlm import checkpoint as ckpt_mod
from charlm.config import AVERAGE_FIELDS, MOGRIFIER_FIELDS, REGULARISERS, with_legacy
from charlm.errors import CharlmError, CheckpointError, RunExistsError, TrainError, os_error_line
from charlm.outputs import (LOCK, MARKER, FolderLock, LockedError, check_folder, check_not_inside_owned, check_parent,
                            new_folders, remove_entries, remove_temporaries, resolve_path, write_marker)

METRICS_COLUMNS = ("step", "epoch", "tokens", "elapsed_s", "train_loss", "val_loss", "val_bpc",
                   "val_ppl", "lr", "grad_norm", "tokens_per_s")
MODEL_FIELDS = ("cell", "impl", "hidden_size", "num_layers", "embedding_dim", "dropout", *REGULARISERS,
                *MOGRIFIER_FIELDS)
OPTIMIZER_FIELDS = ("optimizer", "weight_decay")  # the optimizer state saved must fit the one rebuilt
SCHEDULE_FIELDS = ("lr", "lr_schedule")  # the lr plan a resume follows is the one the run started with
FINETUNE_FIELDS = ("new_chars",)  # how a fine-tuning run reads its text's characters its parent lacked
# (the corpus is compared by its contents, the sha256 each checkpoint keeps: a path typed from another folder is
# the same corpus)
DATA_FIELDS = ("preprocess", "max_chars", "min_count", "val_fraction", "batch_size", "num_steps", "sampling",
               "seed", "eval_chars")
RESUME_FIELDS = MODEL_FIELDS + DATA_FIELDS + OPTIMIZER_FIELDS + SCHEDULE_FIELDS + FINETUNE_FIELDS + AVERAGE_FIELDS


def default_out(corpus: str | os.PathLike) -> Path:
    """``checkpoints/<the corpus's name without its suffix>``, named after the file or folder the corpus path
    resolves to (``charlm train ..`` trains into ``checkpoints/<the parent's name>``, never ``checkpoints/..``)."""
    return Path("checkpoints") / (Path(resolve_path(corpus).name).stem or "corpus")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def config_differences(saved: dict, requested, names=RESUME_FIELDS) -> list[str]:
    """``name: saved -> requested`` for every model, data or optimizer option that differs (an option a run saved
    by an earlier charlm does not name had its default then: LEGACY_TRAIN, else today's)."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(requested))}
    saved = with_legacy(saved)
    out = []
    for name in names:
        was = saved.get(name, defaults.get(name))
        if was != getattr(requested, name):
            out.append(f"{name.replace('_', '-')}: {was!r} -> {getattr(requested, name)!r}")
    return out


class RunDir:
    """One run's directory: checks before anything is written, the one-writer lock, checkpoints' places,
    metrics rows. ``path`` is resolved (:func:`~charlm.outputs.resolve_path`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_path(path)
        self.metrics = self.path / "metrics.csv"
        self.curve = self.path / "curve.png"
        self.lock: FolderLock | None = None

    def checkpoint(self, name: str) -> Path:
        """``last`` or ``best``."""
        return self.path / name

    def holds_run(self) -> bool:
        """Whether the folder holds anything beyond charlm's marker and lock (a run started, or other files)."""
        try:
            return self.path.is_dir() and any(p.name not in (MARKER, LOCK) for p in self.path.iterdir())
        except OSError as exc:
            raise TrainError(f"--out {self.path}: cannot read it ({os_error_line(exc)})") from None

    def check(self, resume: bool, overwrite: bool, locked: bool = False) -> None:
        """Refuse a start that would clobber or misread a run; writes nothing. A folder that is not a
        charlm run, or a run that also holds files charlm did not write (in ``last/`` and ``best/`` too),
        is never written (:mod:`charlm.outputs`); a resume writes only the run's own entries. Run again
        under the lock (``locked``) by :meth:`create`: another process may have written the folder since."""
        if resume and overwrite:
            raise TrainError("--resume and --overwrite contradict each other; pass one")
        check_parent(self.path)
        check_not_inside_owned(self.path, "run")
        if self.path.exists() and not self.path.is_dir() and not self.path.is_symlink():
            raise TrainError(f"--out {self.path} is a file, not a directory")
        if overwrite:
            here, out = Path.cwd().resolve(), Path(os.path.abspath(self.path))
            if out in here.parents:
                raise TrainError(f"the current directory is inside --out {self.path}, which --overwrite empties; "
                                 f"run the command from another folder")
        if self.path.is_dir() and not self.path.is_symlink() and not locked:
            try:
                FolderLock(self.path).check_free()
            except LockedError as exc:
                raise TrainError(str(exc)) from None
        existing = self.path.is_symlink() or self.holds_run()
        if not existing:
            if resume:
                raise TrainError(f"nothing to resume: {self.path} holds no run")
            return
        check_folder(self.path, "run", hint="; move them out to resume the run" if resume else "")
        if not (resume or overwrite):
            raise RunExistsError(f"{self.path} already holds a run; pass --resume to continue it or "
                                 f"--overwrite to start over")

    def acquire(self) -> None:
        """Take the run's lock, creating the folder when it is missing; a second process on the same folder is
        refused in one line naming the first. Nothing else is written: :meth:`create` re-checks the folder
        under the lock before it writes."""
        if self.lock is not None:
            return
        try:
            with new_folders(self.path):  # (removed again if the lock cannot be had)
                self.lock = FolderLock(self.path).acquire()
        except OSError as exc:
            raise TrainError(f"cannot create the run directory {self.path}: {os_error_line(exc)}") from None
        except LockedError as exc:
            raise TrainError(str(exc)) from None

    @property
    def unlocked(self) -> bool:
        """The lock was taken on a file system without locks: nothing stops a second writer."""
        return self.lock is not None and self.lock.fd is None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def load_last(self, device, requested=None) -> ckpt_mod.Checkpoint:
        """``last/`` with its trainer state, refused when ``requested``'s model or data options differ (when
        given; else see :meth:`check_resume`). Reads only: a replacement of ``last/`` cut short is read from
        its backup."""
        last = self.checkpoint("last")
        try:
            saved = ckpt_mod.load_checkpoint(last, device=device, with_trainer_state=True)
            self.resumed_from = (saved.path / "manifest.json").read_bytes()  # create() checks it is still the same
        except CheckpointError as exc:
            if not last.exists() and "no such" in str(exc):
                raise TrainError(f"nothing to resume: {last} does not exist") from None
            raise TrainError(str(exc)) from None
        if requested is not None:
            self.check_resume(saved, requested)
        return saved

    @staticmethod
    def check_resume(saved: ckpt_mod.Checkpoint, requested) -> None:
        """Refuse a resume whose model, data, optimizer, schedule or averaging options differ from the run's."""
        fields = RESUME_FIELDS
        if saved.train_options.get("cell") != getattr(requested, "cell", None):  # (the cell says it: a mogrifier's
            fields = tuple(f for f in fields if f not in MOGRIFIER_FIELDS)        # rounds mean nothing to the other)
        if with_legacy(saved.train_options).get("average") != getattr(requested, "average", None):  # (the same:
            fields = tuple(f for f in fields if f != "average_decay")                # a decay means nothing then)
        diffs = config_differences(saved.train_options, requested, fields)
        if diffs:
            raise TrainError("--resume with different model, data, optimizer or schedule options: " + "; ".join(diffs)
                             + "; a run resumes with the options it started with")

    def create(self, overwrite: bool, step: int | None = None) -> None:
        """Once every check passed: the run's folder locked (:meth:`acquire`), every check of :meth:`check` made
        again under the lock (and, on a resume, ``last/`` still the one read), then marked as charlm's; with
        ``overwrite``, the earlier run's entries deleted first; on a resume (``step``), a replacement a kill
        cut short finished, the temporary entries a kill left deleted, and the metrics rows written after
        ``step`` dropped. A refusal here leaves nothing of this process behind."""
        created = not self.path.exists()
        self.acquire()
        try:
            self.check(resume=step is not None, overwrite=overwrite, locked=True)
            if step is not None and self._last_manifest() != getattr(self, "resumed_from", None):
                raise TrainError(f"the run in {self.path} changed while this resume was starting (another process "
                                 f"wrote it); resume again")
            if overwrite:
                remove_entries(self.path, "run")
            else:
                self._tidy()
            write_marker(self.path, "run")
            if step is not None:
                self.truncate_metrics(step)
        except OSError as exc:
            self._undo(created)
            raise TrainError(f"cannot write the run directory {self.path}: {os_error_line(exc)}") from None
        except CharlmError:
            self._undo(created)
            raise

    def _last_manifest(self) -> bytes | None:
        try:
            return (ckpt_mod.resolve_checkpoint_dir(self.checkpoint("last")) / "manifest.json").read_bytes()
        except (CheckpointError, OSError):
            return None

    def _undo(self, created: bool) -> None:
        """A refusal under the lock: the lock given back, and the lock file and folder removed when this process
        made them and they hold nothing else."""
        self.release()
        if created:
            with contextlib.suppress(OSError):
                (self.path / LOCK).unlink()
                self.path.rmdir()

    def _tidy(self) -> None:
        """Under the lock: finish or undo what a killed writer of this run left (only the entries it marked)."""
        for name in ("last", "best"):
            ckpt_mod.recover(self.checkpoint(name))
        remove_temporaries(self.path, "run")

    # -- metrics.csv ------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        try:
            new = not self.metrics.exists()
            with open(self.metrics, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow({k: ("" if row[k] is None else row[k]) for k in METRICS_COLUMNS})
        except OSError as exc:
            raise TrainError(f"cannot write {self.metrics}: {os_error_line(exc)}") from None

    def metrics_rows(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint being resumed (a kill between writes)."""
        if not self.metrics.exists():
            return
        rows = self.metrics_rows()
        kept = [r for r in rows if int(r["step"]) <= step]
        if len(kept) == len(rows):
            return
        fd, tmp = tempfile.mkstemp(prefix=".metrics.csv.tmp-", dir=self.path)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
                writer.writeheader()
                writer.writerows(kept)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, self.metrics)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def last_train_loss(self) -> float | None:
        """Mean training loss over the last evaluation interval that had one."""
        rows = [r for r in self.metrics_rows() if r["train_loss"]]
        return float(rows[-1]["train_loss"]) if rows else None


def saved_train_options(out: str | os.PathLike) -> dict:
    """The training options ``out/last`` was saved with, without loading its weights ({} if unreadable).

    ``--resume`` starts from these; the resume itself then verifies the checkpoint in full.
    """
    try:
        last = ckpt_mod.resolve_checkpoint_dir(resolve_path(out) / "last")
        return dict(json.loads((last / "config.json").read_text(encoding="utf-8"))["train"])
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return {}


def newest_run(root: str | os.PathLike = "checkpoints") -> Path:
    """The run (or checkpoint) directory under ``root`` whose checkpoint was written last."""
    root = Path(root)
    manifests = [m for pattern in ("*/best/manifest.json", "*/last/manifest.json", "*/manifest.json")
                 for m in root.glob(pattern)] if root.is_dir() else []
    if not manifests:
        raise CheckpointError(f"no checkpoint found under {root}/; train one first "
                              f"(charlm train corpora/timemachine.txt) or pass --checkpoint")
    newest = max(manifests, key=lambda m: m.stat().st_mtime).parent
    return newest.parent if newest.name in ("best", "last") else newest
