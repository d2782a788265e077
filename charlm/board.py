"""TensorBoard event files from a training run's callback (``charlm train --tensorboard DIR``, ``charlm tune``).

:class:`TensorBoardLog` is a :func:`charlm.training.train` callback: it writes one run's scalars into one
folder, which TensorBoard shows as one run (``tensorboard --logdir DIR``):

- ``train/loss`` (nats per character) and ``train/bits_per_char``: the mean training loss since the last
  held-out evaluation, at every ``"step"`` event (each 10th step) and at an evaluation between them;
- ``throughput/chars_per_s``: characters trained on per second since the last evaluation, at the same steps;
- ``held_out/bits_per_char`` and ``held_out/perplexity``: each evaluation's figure (``metrics.csv``'s
  ``val_bpc`` and ``val_ppl``);
- ``lr``: the learning rate at each evaluation.

The step axis is the run's optimizer step. A resumed run appends to the same folder, and the events an
earlier invocation wrote after the checkpoint it resumes from are dropped by TensorBoard (a purge from the
resumed step on); a run started afresh in a folder that holds events replaces them the same way (a purge
from step 0). charlm only adds files (``events.out.tfevents.*``) to the folder; it deletes none.

Needs the ``tensorboard`` extra (torch's ``SummaryWriter`` writes the files).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

from charlm.errors import ConfigError
from charlm.training import STEP_EVENT_EVERY

FLUSH_S = 10  # seconds between flushes of the event file: a killed run loses at most this much of its curve


def check_available(option: str = "--tensorboard") -> None:
    """One line naming the extra, unless the ``tensorboard`` package is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"{option} needs the tensorboard extra (tensorboard is missing): "
                          f"pip install 'charlm-rnn[tensorboard]'")


def run_name(out: str | os.PathLike) -> str:
    """The TensorBoard run of a run folder: its name (``checkpoints/timemachine`` -> ``timemachine``)."""
    name = Path(os.path.abspath(out)).name
    return re.sub(r"[^\w.+-]", "_", name) or "run"


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
