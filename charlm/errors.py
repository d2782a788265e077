"""charlm's errors: one root, :class:`CharlmError`, for every problem a user can cause or fix.

Each message is one line written for the user. The CLI catches ``CharlmError`` in one place and
prints it (exit status 1); anything else that escapes is a bug and keeps its traceback.

Errors about a bad value also derive from ``ValueError``, so ``except ValueError`` in code written
against earlier versions keeps working.
"""

from __future__ import annotations


class CharlmError(Exception):
    """The root of charlm's user-facing errors; the message is one line."""


class ConfigError(CharlmError, ValueError):
    """A setting or argument is out of range or unknown (a cell, a device, a batch shape, ...)."""


class CorpusError(CharlmError):
    """A corpus could not be read or fetched."""


class UnknownCharactersError(CharlmError, ValueError):
    """Text holds characters outside a vocabulary; ``chars`` lists them in order of appearance."""

    def __init__(self, message: str, chars: list[str]):
        super().__init__(message)
        self.chars = chars


class CheckpointError(CharlmError):
    """A checkpoint is missing, corrupt, of another format, or cannot be written."""


class TrainError(CharlmError):
    """A run cannot start or had to stop."""


class RunExistsError(TrainError):
    """``--out`` already holds a run and neither resuming nor overwriting was asked for."""


class ProcessGroupError(TrainError):
    """Under torchrun: a collective failed (another process died, or did not answer within
    ``--dist-timeout``); the run stops on every rank that is still alive."""


class TrainingInterrupted(TrainError):
    """SIGINT/SIGTERM: ``last/`` was saved; ``result`` says where the run stands. ``complete``: the signal came
    after the run had ended by its own rule (during the final evaluation): there is nothing to resume."""

    def __init__(self, message: str, result, complete: bool = False):
        super().__init__(message)
        self.result = result
        self.complete = complete


class StopTraining(CharlmError):
    """Raised by a :func:`charlm.training.train` callback from a ``"step"`` or ``"eval"`` event to end the
    run there, as a signal would (``last/`` saved, ``best/`` when better); ``train`` then returns its
    result with this message as ``stop_reason``. ``charlm tune`` stops the trials Optuna prunes this way."""


class TuneError(CharlmError):
    """A search (``charlm tune``) cannot start or had to stop: its options, its folder, its storage."""


class TuneInterrupted(TuneError):
    """SIGINT/SIGTERM during a search: the running trial was stopped (it runs again on ``--resume``);
    ``result`` is the search as it stands."""

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result


def os_error_line(exc: OSError) -> str:
    """``strerror`` of an ``OSError`` (e.g. "No space left on device"), else its text."""
    return exc.strerror or str(exc) or type(exc).__name__
