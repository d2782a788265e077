"""A run directory: what ``charlm train`` leaves behind, and what a resume or a command reads back.

::

    checkpoints/timemachine/      --out (default: checkpoints/<corpus stem>)
      last/  best/                complete checkpoints (charlm.checkpoint)
      metrics.csv                 one row per held-out evaluation
      curve.png                   drawn from metrics.csv by whoever asks (the CLI)
      .charlm                     the marker that says charlm made this folder (charlm.outputs)

Only this module knows the names above and the columns of ``metrics.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

from charlm import checkpoint as ckpt_mod
from charlm.config import REGULARISERS, with_legacy
from charlm.errors import CheckpointError, RunExistsError, TrainError, os_error_line
from charlm.outputs import check_folder, remove_entries, write_marker

METRICS_COLUMNS = ("step", "epoch", "tokens", "elapsed_s", "train_loss", "val_loss", "val_bpc",
                   "val_ppl", "lr", "grad_norm", "tokens_per_s")
MODEL_FIELDS = ("cell", "impl", "hidden_size", "num_layers", "embedding_dim", "dropout", *REGULARISERS)
OPTIMIZER_FIELDS = ("optimizer", "weight_decay")  # the optimizer state saved must fit the one rebuilt
DATA_FIELDS = ("corpus", "preprocess", "max_chars", "min_count", "val_fraction", "batch_size", "num_steps", "sampling",
               "seed", "eval_chars")


def default_out(corpus: str | os.PathLike) -> Path:
    return Path("checkpoints") / Path(corpus).stem


def config_differences(saved: dict, requested, names=MODEL_FIELDS + DATA_FIELDS + OPTIMIZER_FIELDS) -> list[str]:
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
    """One run's directory: checks before anything is written, checkpoints' places, metrics rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = self.path / "metrics.csv"
        self.curve = self.path / "curve.png"

    def checkpoint(self, name: str) -> Path:
        """``last`` or ``best``."""
        return self.path / name

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse a start that would clobber or misread a run; writes nothing. A folder that is not a
        charlm run, or a run that also holds files charlm did not write, is never overwritten
        (:mod:`charlm.outputs`); a resume writes only the run's own entries."""
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"--out {self.path} is a file, not a directory")
        if resume and overwrite:
            raise TrainError("--resume and --overwrite contradict each other; pass one")
        try:
            existing = self.path.is_dir() and any(self.path.iterdir())
        except OSError as exc:
            raise TrainError(f"--out {self.path}: cannot read it ({os_error_line(exc)})") from None
        if not existing or resume:
            return
        check_folder(self.path, "run")
        if not overwrite:
            raise RunExistsError(f"{self.path} already holds a run; pass --resume to continue it or "
                                 f"--overwrite to start over")

    def load_last(self, device, requested) -> ckpt_mod.Checkpoint:
        """``last/`` with its trainer state, refused when ``requested``'s model or data options differ."""
        last = self.checkpoint("last")
        ckpt_mod.recover(last)
        if not last.is_dir():
            raise TrainError(f"nothing to resume: {last} does not exist")
        try:
            saved = ckpt_mod.load_checkpoint(last, device=device, with_trainer_state=True)
        except CheckpointError as exc:
            raise TrainError(str(exc)) from None
        diffs = config_differences(saved.train_options, requested)
        if diffs:
            raise TrainError("--resume with different model, data or optimizer options: " + "; ".join(diffs))
        return saved

    def create(self, overwrite: bool) -> None:
        """The run's folder, marked as charlm's; with ``overwrite``, the earlier run's entries deleted first
        (:meth:`check` made sure it holds nothing else)."""
        try:
            if overwrite and self.path.is_dir():
                remove_entries(self.path, "run")
            self.path.mkdir(parents=True, exist_ok=True)
            write_marker(self.path, "run")
        except OSError as exc:
            raise TrainError(f"cannot create the run directory {self.path}: {os_error_line(exc)}") from None

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
        rows = [r for r in self.metrics_rows() if int(r["step"]) <= step]
        with open(self.metrics, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def last_train_loss(self) -> float | None:
        """Mean training loss over the last evaluation interval that had one."""
        rows = [r for r in self.metrics_rows() if r["train_loss"]]
        return float(rows[-1]["train_loss"]) if rows else None


def saved_train_options(out: str | os.PathLike) -> dict:
    """The training options ``out/last`` was saved with, without loading its weights ({} if unreadable).

    ``--resume`` starts from these; the resume itself then verifies the checkpoint in full.
    """
    last = Path(out) / "last"
    ckpt_mod.recover(last)
    try:
        return dict(json.loads((last / "config.json").read_text(encoding="utf-8"))["train"])
    except (OSError, ValueError, KeyError, TypeError):
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
