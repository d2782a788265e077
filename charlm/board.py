"""TensorBoard event files from a training run's callback (``charlm train --tensorboard DIR``, ``charlm tune``).

:class:`TensorBoardLog` is a :func:`charlm.training.train` callback: it writes one run's scalars into one
folder, which TensorBoard shows as one run (``tensorboard --logdir DIR``):

- ``train/loss`` (nats per character) and ``train/bits_per_char``: the mean training loss since the last
  held-out evaluation, at every ``"step"`` event (each 10th step) and at an evaluation between them;
- ``throughput/chars_per_s``: characters trained on per second since the last evaluation, at the same steps;
- ``held_out/bits_per_char`` and ``held_out/perplexity``: each evaluation's figure (``metrics.csv``'s
  ``val_bpc`` and ``val_ppl``);
- ``lr``: the learning rate at each evaluation.

A run's folder is named by :func:`run_name`: its run folder's name and eight hex digits of that folder's
absolute path (``checkpoints/timemachine`` -> ``timemachine-1f2e3d4c``), so that two runs of the same name in
different folders are two TensorBoard runs. The step axis is the run's optimizer step. A resumed run (the same
run folder) appends to the same folder, and the events an earlier invocation wrote after the checkpoint it
resumes from are dropped by TensorBoard (a purge from the resumed step on); a run started afresh in the same run
folder replaces them the same way (a purge from step 0). charlm only adds files (``events.out.tfevents.*``) to
the folder; it deletes none. :func:`check_log_dir` refuses, before a run starts, a folder it could not write or
one inside a folder charlm owns (a run's, a search's).

Needs the ``tensorboard`` extra (torch's ``SummaryWriter`` writes the files).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

from charlm.errors import ConfigError
from charlm.outputs import check_not_inside_owned, resolve_path
from charlm.training import STEP_EVENT_EVERY

FLUSH_S = 10  # seconds between flushes of the event file: a killed run loses at most this much of its curve


def check_available(option: str = "--tensorboard") -> None:
    """One line naming the extra, unless the ``tensorboard`` package is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"{option} needs the tensorboard extra (tensorboard is missing): "
                          f"pip install 'charlm-rnn[tensorboard]'")


NAME_CHARS = 100  # of a run folder's name, at most, in its TensorBoard run's name


def run_name(out: str | os.PathLike, name: str | None = None) -> str:
    """The TensorBoard run of the run folder ``out``: ``name`` (default: the folder's own name) and eight hex
    digits of the sha256 of the folder's absolute path (``checkpoints/timemachine`` -> ``timemachine-1f2e3d4c``):
    the same for every invocation on that folder (a resume continues its curve), another for a folder of the
    same name elsewhere. Characters other than letters, digits and ``._+-`` become ``_``."""
    full = os.path.abspath(resolve_path(out))
    digest = hashlib.sha256(full.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    base = re.sub(r"[^\w.+-]", "_", name if name is not None else Path(full).name).lstrip(".")[:NAME_CHARS]
    return f"{base or 'run'}-{digest}"


def check_log_dir(log_dir: str | os.PathLike, run: str, outputs=(), option: str = "--tensorboard") -> Path:
    """Refuse (one line, before anything is written) to write a run's events into ``log_dir/run``: an empty
    ``log_dir`` (the current folder), a folder inside one of ``outputs`` (the run or search folders this command
    writes) or inside any folder charlm owns (:func:`~charlm.outputs.check_not_inside_owned`: its events would
    block that folder's --resume and --overwrite), a file where a folder goes, a folder it cannot write. Returns
    the run's events folder."""
    if str(log_dir) == "":
        raise ConfigError(f"{option} needs a folder (an empty path is the current folder); name one, e.g. "
                          f"{option} runs")
    target = resolve_path(Path(log_dir) / run)
    full = Path(os.path.abspath(target))
    for out in outputs:
        owned = Path(os.path.abspath(resolve_path(out)))
        if full == owned or owned in full.parents:
            raise ConfigError(f"{option} {log_dir} would put the events in {target}, inside {out}, which this "
                              f"command writes; choose a folder outside it")
    check_not_inside_owned(target, "tensorboard", option)
    for folder in (target, *target.parents):
        if not (folder.exists() or folder.is_symlink()):
            continue
        if not folder.is_dir():
            raise ConfigError(f"{option} {log_dir}: cannot write the events to {target}: {folder} is a file, not a "
                              f"folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {log_dir}: cannot write the events to {target}: {folder} is not writable")
        break
    return target


class TensorBoardLog:
    """A training callback that writes the run's scalars into ``log_dir`` (see the module docstring).

    The writer opens at the ``"start"`` event (nothing is written for a run that never starts) and
    closes at ``"end"``; :meth:`close` closes it after an interrupted run (call it in a ``finally``)."""

    def __init__(self, log_dir: str | os.PathLike):
        check_available()
        self.log_dir = Path(log_dir)
        self.writer = None

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            from torch.utils.tensorboard import SummaryWriter

            self.close()
            # purge_step: TensorBoard drops what this folder holds from that step on (a resume's redone steps,
            # or all of an earlier run of the same name)
            purge = info["step"] + 1 if info.get("resumed") else 0
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=FLUSH_S)
        elif self.writer is None:
            return
        elif event == "step":
            step, steps = info["step"], info["interval_steps"]
            if steps:
                loss = info["loss_sum"].item() / steps
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/bits_per_char", loss / math.log(2), step)
            if info["elapsed"] > 0 and info["tokens"]:
                self.writer.add_scalar("throughput/chars_per_s", info["tokens"] / info["elapsed"], step)
        elif event == "eval":
            step = info["step"]
            self.writer.add_scalar("held_out/bits_per_char", info["val_bpc"], step)
            self.writer.add_scalar("held_out/perplexity", info["val_ppl"], step)
            self.writer.add_scalar("lr", info["lr"], step)
            if step % STEP_EVENT_EVERY == 0:  # the "step" event of this step wrote the training figures
                return
            if info.get("train_loss") is not None:
                self.writer.add_scalar("train/loss", info["train_loss"], step)
                self.writer.add_scalar("train/bits_per_char", info["train_loss"] / math.log(2), step)
            if info.get("tokens_per_s"):
                self.writer.add_scalar("throughput/chars_per_s", info["tokens_per_s"], step)
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
