"""Hyperparameter search on Optuna: ``charlm tune``. Library code: it prints nothing and reports through
``callback(event, info)``.

A search is an Optuna study. Each trial is a real charlm training run (:func:`charlm.training.train`, in
this process) with its own folder, ``OUT/trials/NNNN`` (the trial's number), and its own budget: a number of
steps (``trial_steps``) or seconds (``trial_time``). It reports its held-out bits per character at each of
its TUNE_EVALS evaluations, and Optuna's pruner (Hyperband by default) stops the trials that fall behind
(the callback raises :class:`~charlm.errors.StopTraining`; the run saves as after a signal). The pruner's
resource is the share of the trial's budget done, in percent, whatever the budget's unit.

Storage: by default Optuna's journal file, ``OUT/study.journal``. A search stopped by Ctrl-C, SIGTERM or a
kill goes on with ``resume=True``: the trial that was running (a kill leaves it RUNNING) is marked failed and
runs again from its start with the same parameters, and only finished trials (complete or pruned) count
towards ``trials``. ``storage`` takes any database URL Optuna takes (``postgresql+psycopg://...``): several
``charlm tune`` processes, on one machine or several, then share one study, each with its own ``OUT``; a
killed worker's trial is failed by Optuna's heartbeat and run again by another worker.

The folder ``OUT`` (default ``tunes/<corpus stem>``) is owned as a run folder is (:mod:`charlm.outputs`):
marked, refused when it is not charlm's or lies inside another folder charlm owns, one process at a time (a
lock, taken before the folder is marked; every check of the folder and of the study is made again under it).
The results, rewritten after each trial (each written in the marked temporary folder ``OUT/.charlm-tune-tmp`` and
renamed into place): ``trials.csv``, ``best.json`` and ``best-command.txt`` (the ``charlm train`` command that
reproduces the best trial: to the bit when trials run by steps), and at the end ``history.png`` and
``importances.png`` (Optuna's matplotlib plots, with the ``plot`` extra); with ``final_time``, a final run of
the best configuration in ``OUT/final`` (resumed when it holds that configuration's run, replaced when the best
changed) and, once it succeeded, ``final-command.txt``. With ``tensorboard``, the TensorBoard events go into
``DIR/<study>-<8 hex digits of OUT's path>/trial-NNNN`` and ``.../final`` (:func:`charlm.board.run_name`).

Events: ``"search-start"`` (``out``, ``study``, ``storage``, ``done``, ``trials``, ``budget``, ``space``,
``resumed``, ``retried``), ``"trial-start"`` (``number``, ``params``, ``out``), ``"trial-eval"``
(``number``, ``step``, ``percent``, ``val_bpc``), ``"trial-end"`` (``number``, ``state``, ``value``,
``seconds``, ``best``, ``done``), ``"final-start"`` (``out``, ``resumed``, ``replaced``, ``trial``),
``"warning"`` (``message``); and with ``train_callback``, every trial's own training events.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import secrets
import shlex
import socket
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from charlm.config import (CELLS, DEVICE_CHOICES, GATES, IMPLS, LR_SCHEDULES, MAX_SECONDS, OPTIMIZERS,
                           PLACEHOLDER_VOCAB, PREPROCESS_MODES, PRECISIONS, SAMPLINGS, SIZE_MID_READS,
                           SMALL_CORPUS_CHARS, TrainConfig, _check, _is_int, _is_real, seed_error)
from charlm.data import min_tokens
from charlm.errors import (ConfigError, StopTraining, TrainError, TrainingInterrupted, TuneError, TuneInterrupted,
                           os_error_line)
from charlm.outputs import (FILE, LOCK, MARKER, TUNE_RESULTS, FolderLock, LockedError, check_folder, check_not_cwd,
                            check_not_inside_owned, check_parent, entry_kind, marker_kind, new_folders, remove_entries,
                            resolve_path, write_marker)

TUNE_EVALS = 10  # held-out evaluations (and pruning decisions) per trial
TRIAL_EPOCHS = 10_000  # a trial ends at its budget (steps or seconds), not after a number of epochs
TRIALS_PER_BUDGET = 10  # --time-budget without a trial budget: each trial gets a tenth of the search's time
DEFAULT_TRIAL_TIME = 60.0  # seconds per trial when neither a trial budget nor a time budget is given
MIN_TRAIN_CHARS = 1_000  # a training text shorter than this is refused: there is nothing to search on
MIN_BATCHES_PER_EPOCH = 20  # the default space's largest batch shape still cuts the text into this many batches
NOMINAL_MACS_PER_S = 1e10  # what a trial by time is assumed to compute (multiply-adds of the forward pass per
#   second) before this process has measured one: sizes the space for --trial-time and the first trial's --eval-every
MAX_RETRY = 2  # a trial stopped by a kill or Ctrl-C is run again at most this many times
ERRORS_IN_A_ROW = 3  # trials of this process that fail in a row (TrainError) before the search stops
HEARTBEAT_S = 20  # database storage: each running trial's heartbeat (Optuna's), ...
GRACE_S = 60  # ... and the silence after which another worker fails it and runs it again
CONNECT_TIMEOUT_S = 10  # database storage: seconds to wait for the server
TABLE_ATTEMPTS = 5  # database storage: tries to create Optuna's tables (workers starting together race for it)
PRUNERS = ("hyperband", "halving", "median", "none")
JOURNAL = "study.journal"

INT_FIELDS = ("hidden_size", "num_layers", "embedding_dim", "batch_size", "num_steps")
FLOAT_FIELDS = ("lr", "weight_decay", "dropout", "weight_drop", "dropout_input", "dropout_hidden", "dropout_output",
                "clip", "lr_decay")
CHOICE_FIELDS = {"cell": CELLS, "impl": IMPLS, "sampling": SAMPLINGS, "optimizer": OPTIMIZERS,
                 "lr_schedule": LR_SCHEDULES}
SPACE_NAMES = (*CHOICE_FIELDS, *INT_FIELDS, *FLOAT_FIELDS)  # the TrainConfig fields a search may set
SPACE_SYNTAX = "NAME=LOW:HIGH, NAME=LOW:HIGH:log, NAME=A,B,... or NAME=VALUE"


# -- the search space -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dim:
    """One dimension of the search space: a range (``low``..``high``, ``log`` for a log scale), a set of
    ``choices``, or a fixed value (one choice, or ``low == high``)."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple | None = None

    @property
    def fixed(self) -> bool:
        return (self.choices is not None and len(self.choices) == 1) or (self.choices is None and self.low == self.high)

    @property
    def value(self):
        """The fixed value (see :attr:`fixed`)."""
        return self.choices[0] if self.choices is not None else self.low

    def values(self) -> tuple:
        """The extremes it may take (to check the batch shape against the corpus)."""
        return self.choices if self.choices is not None else (self.low, self.high)

    def suggest(self, trial):
        """Optuna's suggestion for this dimension in ``trial``."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.name in INT_FIELDS:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.fixed:
            return f"{self.name}={_show(self.value)}"
        if self.choices is not None:
            return f"{self.name}={','.join(_show(c) for c in self.choices)}"
        return f"{self.name}={_show(self.low)}:{_show(self.high)}{':log' if self.log else ''}"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Dim":
        data = dict(data)
        if data.get("choices") is not None:
            data["choices"] = tuple(data["choices"])
        return cls(**data)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _convert(name: str, text: str):
    """A --space value as its field's type, or a ConfigError saying what it should be."""
    text = text.strip()
    if name in CHOICE_FIELDS:
        return text
    try:
        if name in INT_FIELDS:
            return int(text)
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not {'an integer' if name in INT_FIELDS else 'a number'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{text!r} is not a finite number")
    return value


def _check_value(name: str, value) -> None:
    """The value as ``charlm train`` would take it (the same checks, the same message)."""
    TrainConfig(corpus="-", **{name: value})


def parse_spec(text: str) -> Dim:
    """One ``--space`` item (SPACE_SYNTAX) as a :class:`Dim`; a ConfigError of one line naming it otherwise."""
    name, sep, rhs = text.partition("=")
    name = name.strip().replace("-", "_")
    try:
        if not sep or not name or not rhs.strip():
            raise ConfigError(f"write {SPACE_SYNTAX}")
        if name not in SPACE_NAMES:
            raise ConfigError(f"unknown name {name!r}; one of {', '.join(SPACE_NAMES)}")
        if ":" in rhs:
            parts = rhs.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
                raise ConfigError("a range is LOW:HIGH or LOW:HIGH:log")
            if name in CHOICE_FIELDS:
                raise ConfigError(f"{name} takes choices (A,B,...) or one value, not a range")
            low, high = _convert(name, parts[0]), _convert(name, parts[1])
            log = len(parts) == 3
            if low > high:
                raise ConfigError(f"LOW {_show(low)} is above HIGH {_show(high)}")
            if log and low <= 0:
                raise ConfigError("a log range needs LOW > 0")
            for value in (low, high):
                _check_value(name, value)
            return Dim(name, low, high, log=log and low < high)
        values = tuple(dict.fromkeys(_convert(name, v) for v in rhs.split(",")))
        for value in values:
            _check_value(name, value)
        return Dim(name, choices=values)
    except ConfigError as exc:
        raise ConfigError(f"--space {text}: {exc}") from None


def parse_space(specs) -> dict[str, Dim]:
    """Every ``--space`` item; all the mistakes at once, one line each (a ConfigError of several lines)."""
    dims, errors = {}, []
    for spec in specs:
        try:
            dim = parse_spec(spec)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if dim.name in dims:
            errors.append(f"--space {spec}: {dim.name} is given twice")
        dims[dim.name] = dim
    if errors:
        raise ConfigError("\n".join(errors))
    return dims


def batch_shape_ranges(train_chars: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The default space's (batch_size, num_steps) ranges for a training text of ``train_chars`` characters:
    the largest shape still cuts it into MIN_BATCHES_PER_EPOCH batches (small texts get small batches)."""
    shape_chars = max(1, train_chars // MIN_BATCHES_PER_EPOCH)
    t_high = max(8, min(128, int(math.sqrt(4 * shape_chars))))
    b_high = max(1, min(128, shape_chars // t_high))
    return (min(8, b_high), b_high), (min(32, t_high), t_high)


def default_space(train_chars: int, trial_chars: int) -> dict[str, Dim]:
    """The search space sized from the corpus and the trial budget.

    ``train_chars``: the training text's length; ``trial_chars``: the characters one trial trains on (its
    steps times the middle of the batch shape's range, or its seconds at NOMINAL_MACS_PER_S for charlm's
    default model). The text a trial learns from is the smaller, ``n``; the hidden size is searched from
    half to four times ``sqrt(n / 8)``, the size whose recurrent weights (about ``8 H^2`` per LSTM layer)
    are as many as the characters (char-rnn's rule of thumb), within 16..1024, on a log scale. The batch
    shape is bounded by :func:`batch_shape_ranges`; regularisation is searched wider on texts under
    SMALL_CORPUS_CHARS (they are read many times and over-fit). Every dimension can be narrowed, widened or
    fixed with ``--space``.
    """
    n = max(1, min(train_chars, trial_chars))
    h = math.sqrt(n / 8)
    hidden_low = max(16, min(1024, round(h / 2)))
    (b_low, b_high), (t_low, t_high) = batch_shape_ranges(train_chars)
    small = train_chars < SMALL_CORPUS_CHARS
    dims = [
        Dim("cell", choices=("lstm", "gru")),
        Dim("num_layers", 1, 3),
        Dim("hidden_size", hidden_low, max(hidden_low, min(1024, round(4 * h))), log=True),
        Dim("embedding_dim", 16, 128, log=True),
        Dim("batch_size", b_low, b_high, log=b_low < b_high),
        Dim("num_steps", t_low, t_high, log=t_low < t_high),
        Dim("lr", 5e-4, 2e-2, log=True),
        Dim("weight_decay", 0.0, 0.5 if small else 0.1),
        Dim("weight_drop", 0.0, 0.5 if small else 0.3),
        Dim("dropout_input", 0.0, 0.2 if small else 0.1),
        Dim("dropout_hidden", 0.0, 0.4 if small else 0.2),
        Dim("dropout_output", 0.0, 0.5 if small else 0.3),
    ]
    return {d.name: d for d in dims}


def trial_chars(train_chars: int, trial_steps: int | None, trial_time: float | None) -> int:
    """The characters one trial trains on, as :func:`default_space` sizes the space for."""
    (b_low, b_high), (t_low, t_high) = batch_shape_ranges(train_chars)
    if trial_steps is not None:
        return int(trial_steps * math.sqrt(b_low * b_high) * math.sqrt(t_low * t_high))
    return int(trial_time * NOMINAL_MACS_PER_S / macs_per_char(TrainConfig(corpus="-").__dict__, 100))


def macs_per_char(values: dict, vocab_size: int) -> float:
    """Multiply-adds of the model's forward pass per character (its recurrent layers and output layer; a
    mogrifier's rounds too)."""
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    d.update(values)
    d.update({name: value for name, value in SIZE_MID_READS.items() if d[name] is None})  # (the rule's middle)
    h, gates = d["hidden_size"], GATES[d["cell"]]
    first = d["embedding_dim"] or vocab_size
    macs = gates * h * (first + h) + (d["num_layers"] - 1) * gates * h * 2 * h + h * vocab_size
    if d["cell"] == "mogrifier":  # each round one product of I x H (or, at rank k, of k x (I + H)) per layer
        rank = d["mogrify_rank"]
        per_layer = [rank * (i + h) if rank else i * h for i in [first] + [h] * (d["num_layers"] - 1)]
        macs += d["mogrify_rounds"] * sum(per_layer)
    return macs


def default_trial_time(search_budget: float | None) -> float:
    """A trial's seconds when no trial budget is given: a TRIALS_PER_BUDGET-th of the search's time, else 60 s."""
    return search_budget / TRIALS_PER_BUDGET if search_budget is not None else DEFAULT_TRIAL_TIME


def sized_space(train_chars: int, steps: int | None, seconds: float | None,
                overrides: dict[str, Dim]) -> dict[str, Dim]:
    """:func:`default_space` for a trial budget of ``steps`` or ``seconds``, with the ``--space`` items over it."""
    space = default_space(train_chars, trial_chars(train_chars, steps, seconds))
    space.update(overrides)
    return space


def check_space(space: dict[str, Dim], train_chars: int, corpus) -> None:
    """The largest batch shape the space allows must fit the training text (one line otherwise)."""
    defaults = TrainConfig(corpus="-")
    b = max(space["batch_size"].values()) if "batch_size" in space else defaults.batch_size
    t = max(space["num_steps"].values()) if "num_steps" in space else defaults.num_steps
    if min_tokens(b, t) > train_chars:
        raise ConfigError(f"--space allows batches of {b} x {t} characters, which need {min_tokens(b, t):,} "
                          f"training characters; {corpus} has {train_chars:,}: lower batch_size or num_steps")


# -- settings, folder, storage ----------------------------------------------------------------------------------
STORAGE_ENV = "CHARLM_TUNE_STORAGE"  # the environment variable the command takes --storage from
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # what --study takes (a path component, safe anywhere)
STUDY_RULE = "1 to 100 letters, digits, '.', '_', '+' or '-', the first a letter or digit"
MIN_TRIAL_S = 1.0  # a trial by time trains this long at least (it evaluates TUNE_EVALS times), and so does a search


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and str(value) != ""


@dataclass(frozen=True)
class TuneConfig:
    """Everything ``charlm tune`` does. ``None``: the study's setting when it exists (a resumed or shared
    search), else the default named in the comment."""

    corpus: str  # the UTF-8 text file (or folder) the trials train on
    out: str | None = None  # the tune folder; None: tunes/<corpus stem>
    trials: int | None = None  # finished trials (complete or pruned) the study should hold, in all
    time_budget: float | None = None  # seconds this invocation searches (the final run included)
    trial_steps: int | None = None  # each trial's steps ...
    trial_time: float | None = None  # ... or seconds; None: time_budget / TRIALS_PER_BUDGET, else 60 s
    final_time: float | None = None  # seconds of a final run of the best configuration (out of time_budget)
    space: tuple[str, ...] = ()  # --space items (SPACE_SYNTAX) over the default space (a list is taken as a tuple)
    pruner: str | None = None  # hyperband | halving | median | none; None: hyperband
    storage: str | None = None  # a database URL Optuna takes; None: OUT/study.journal
    study: str | None = None  # the study's name (STUDY_RULE); None: the corpus's stem
    tensorboard: str | None = None  # a folder: one TensorBoard run per trial, DIR/<study>-<hash>/trial-NNNN
    preprocess: str | None = None  # None: raw
    min_count: int | None = None  # None: 1
    val_fraction: float | None = None  # None: 0.1
    seed: int | None = None  # the trials' training seed and the sampler's; None: 0
    device: str = "auto"  # where the trials train (a worker's own: not part of the study's settings)
    precision: str = "fp32"
    storage_from: str = "--storage"  # where ``storage`` came from, as messages name it: --storage or STORAGE_ENV

    def __post_init__(self):
        if isinstance(self.space, list):
            object.__setattr__(self, "space", tuple(self.space))
        seconds = f"must be > 0 and at most {MAX_SECONDS:g} seconds"
        _check([
            (_is_path(self.corpus), f"corpus must be a path, got {self.corpus!r}"),
            (self.out is None or _is_path(self.out), f"--out must name a folder, got {self.out!r}"),
            (self.trials is None or _is_int(self.trials, 1), f"--trials must be an integer >= 1, got {self.trials!r}"),
            (self.time_budget is None or _is_real(self.time_budget, 0, MAX_SECONDS, low_open=True),
             f"--time-budget {seconds}, got {self.time_budget!r}"),
            (self.trial_steps is None or _is_int(self.trial_steps, 1),
             f"--trial-steps must be an integer >= 1, got {self.trial_steps!r}"),
            (self.trial_time is None or _is_real(self.trial_time, 0, MAX_SECONDS, low_open=True),
             f"--trial-time {seconds}, got {self.trial_time!r}"),
            (self.final_time is None or _is_real(self.final_time, 0, MAX_SECONDS, low_open=True),
             f"--final-time {seconds}, got {self.final_time!r}"),
            (isinstance(self.space, tuple) and all(isinstance(item, str) for item in self.space),
             f"space must be a tuple of --space items (strings such as 'lr=0.001:0.01:log'), got {self.space!r}"),
            (self.pruner is None or (isinstance(self.pruner, str) and self.pruner in PRUNERS),
             f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}"),
            (self.storage_from in ("--storage", STORAGE_ENV),
             f"storage_from must be --storage or {STORAGE_ENV}, got {self.storage_from!r}"),
            (self.storage is None or (isinstance(self.storage, str) and self.storage.strip() != ""),
             f"{self.storage_from} must be a database URL, got {self.storage!r}"),
            (self.study is None or (isinstance(self.study, str) and STUDY_NAME.fullmatch(self.study) is not None),
             f"--study must be {STUDY_RULE}, got {self.study!r}"),
            (self.tensorboard != "", "--tensorboard needs a folder (an empty path is the current folder); name one, "
                                     "e.g. --tensorboard runs"),
            (self.tensorboard is None or _is_path(self.tensorboard),
             f"--tensorboard must name a folder, got {self.tensorboard!r}"),
            (self.preprocess is None or (isinstance(self.preprocess, str) and self.preprocess in PREPROCESS_MODES),
             f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess!r}"),
            (self.min_count is None or _is_int(self.min_count, 1),
             f"--min-count must be an integer >= 1, got {self.min_count!r}"),
            (self.val_fraction is None or (_is_real(self.val_fraction, 0, 1, low_open=True) and self.val_fraction < 1),
             f"--val-fraction must lie in (0, 1), got {self.val_fraction!r}"),
            (self.seed is None or seed_error(self.seed) is None, seed_error(self.seed)),
            (isinstance(self.device, str) and self.device.strip() != "",
             f"--device must be one of {DEVICE_CHOICES}, got {self.device!r}"),
            (isinstance(self.precision, str) and self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ])
        self._check_budgets()

    def _check_budgets(self) -> None:
        """The budgets together (their types checked): one line each, with what to change."""
        if self.trials is None and self.time_budget is None:
            raise ConfigError("give --trials N, --time-budget SECONDS or both")
        if self.trial_steps is not None and self.trial_time is not None:
            raise ConfigError("--trial-steps and --trial-time exclude each other")
        if self.trial_time is not None and self.trial_time < MIN_TRIAL_S:
            raise ConfigError(f"--trial-time must be at least {MIN_TRIAL_S:g}s (a trial evaluates {TUNE_EVALS} times "
                              f"in it), got {self.trial_time:g}")
        if self.time_budget is None:
            return
        if self.final_time is not None and self.final_time >= self.time_budget:
            raise ConfigError(f"--final-time {self.final_time:g} leaves no time to search in --time-budget "
                              f"{self.time_budget:g}")
        if self.search_budget < MIN_TRIAL_S:
            if self.final_time:
                raise ConfigError(f"--time-budget {self.time_budget:g}s less --final-time {self.final_time:g}s leaves "
                                  f"{self.search_budget:g}s to search, under the {MIN_TRIAL_S:g}s a trial needs: give "
                                  f"more --time-budget or less --final-time")
            raise ConfigError(f"--time-budget {self.time_budget:g}s is under the {MIN_TRIAL_S:g}s a trial needs: give "
                              f"more time")
        if self.trial_time is not None and self.search_budget < self.trial_time:
            raise ConfigError(f"--time-budget {self.time_budget:g}s{_after_final(self)} is shorter than one trial "
                              f"(--trial-time {self.trial_time:g}s); give more time or a shorter --trial-time")

    @property
    def search_budget(self) -> float | None:
        """Seconds for the trials: the time budget less the final run's."""
        if self.time_budget is None:
            return None
        return self.time_budget - (self.final_time or 0.0)


def _after_final(cfg: TuneConfig) -> str:
    return f" (after --final-time {cfg.final_time:g}s)" if cfg.final_time else ""


def check_trial_budget(cfg: TuneConfig, settings: dict, stored: bool, study: str) -> None:
    """The trial budget a search runs with (``settings``: the study's, or this invocation's for a new study)
    against ``cfg``'s time budget, before anything is written: one line with what to change."""
    trial_time, budget = settings["trial_time"], cfg.search_budget
    if trial_time is None or budget is None:
        return
    if stored and budget < trial_time:
        raise TuneError(f"--time-budget {cfg.time_budget:g}s{_after_final(cfg)} is shorter than one trial of the "
                        f"study {study!r} (its --trial-time, {trial_time:g}s): give more --time-budget")
    if not stored and cfg.trial_time is None and trial_time < MIN_TRIAL_S:  # a tenth of the time budget
        need = MIN_TRIAL_S * TRIALS_PER_BUDGET + (cfg.final_time or 0.0)
        rest = "it" if not cfg.final_time else f"the {budget:g}s left after --final-time {cfg.final_time:g}s"
        raise TuneError(f"--time-budget {cfg.time_budget:g}s gives each trial a tenth of {rest} ({trial_time:g}s), "
                        f"under the {MIN_TRIAL_S:g}s a trial needs: give --time-budget {need:g} or more, or a trial "
                        f"budget (--trial-time SECONDS or --trial-steps N)")


def no_trial_hint(reason: str, settings: dict, stored: bool, trials_csv) -> str:
    """What to change when no trial completed, by what stopped the trials: the time budget before a trial finished
    its steps or seconds (a study that existed before keeps its trial budget), else whatever ``trials_csv`` says."""
    if reason != "--time-budget spent":
        return f"see {trials_csv}"
    if settings["trial_steps"] is not None:
        what = f"its {settings['trial_steps']:,} steps"
        change = " or fewer --trial-steps" if not stored else ""
    else:
        what = f"its {settings['trial_time']:g}s"
        change = " or a shorter --trial-time" if not stored else ""
    return f"the time ran out before a trial finished {what}: give more --time-budget{change}"


def _stem(corpus: str | os.PathLike) -> str:
    """The corpus's name without its suffix (a folder's own name for ``.``), as ``charlm train`` names runs."""
    return Path(resolve_path(corpus).name).stem or "corpus"


def default_tune_out(corpus: str | os.PathLike) -> Path:
    return Path("tunes") / _stem(corpus)


def default_study(corpus: str | os.PathLike) -> str:
    return _stem(corpus)


TMP_DIR = ".charlm-tune-tmp"  # the tune folder's temporary folder (marked "tune-tmp"): results written there, renamed


class TuneFolder:
    """A search's folder: what it holds, the checks before anything is written (and again under the lock), the
    one-process lock (:class:`~charlm.outputs.FolderLock`), its result files. ``path`` is resolved
    (:func:`~charlm.outputs.resolve_path`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_path(path)
        self.journal = self.path / JOURNAL
        self.trials = self.path / "trials"
        self.final = self.path / "final"
        self.tmp = self.path / TMP_DIR
        self.lock: FolderLock | None = None

    def trial(self, number: int) -> Path:
        return self.trials / f"{number:04d}"

    def names(self) -> set[str]:
        """The names of the folder's entries (none for a missing folder)."""
        try:
            return {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()
        except OSError as exc:
            raise TuneError(f"--out {self.path}: cannot read it ({os_error_line(exc)})") from None

    def holds_search(self) -> bool:
        """Whether the folder holds anything beyond charlm's marker, lock and temporary folder."""
        return bool(self.names() - {LOCK, MARKER, TMP_DIR})

    def check(self, resume: bool, overwrite: bool, shared: bool, locked: bool = False) -> None:
        """Refuse (one line, nothing written) a folder that is not charlm's (or holds anything charlm did not
        write, in the trials' runs too), one inside a folder charlm owns as another output, a folder another
        process is writing (unless ``locked``: this process holds the lock), a search already there without
        --resume or --overwrite, or nothing to resume."""
        if resume and overwrite:
            raise TuneError("--resume and --overwrite contradict each other; pass one")
        check_parent(self.path)
        lone_lock = self.path.is_dir() and not self.path.is_symlink() and self.names() == {LOCK}
        if not lone_lock:  # (a folder holding nothing but charlm's lock is empty)
            check_folder(self.path, "tune", hint="; move them out to resume the search" if resume else "")
        check_not_inside_owned(self.path, "tune")
        if self.path.is_dir() and not locked:
            try:
                FolderLock(self.path).check_free()
            except LockedError as exc:
                raise TuneError(str(exc)) from None
        existing = self.holds_search()
        if resume and not (existing and (shared or self.journal.is_file())):
            raise TuneError(f"nothing to resume: {self.path} holds no search")
        if existing and not resume and not overwrite:
            raise TuneError(f"{self.path} already holds a search; pass --resume to continue it or --overwrite to "
                            f"start over")
        if overwrite and existing:
            check_not_cwd(self.path)

    def create(self, resume: bool, overwrite: bool, shared: bool, recheck=None) -> None:
        """The folder locked first (a second process is refused in one line naming the first), then every check
        of :meth:`check` again under the lock, and ``recheck()`` (the study's), since another process may have
        written the folder after them; only then is it marked as charlm's (never over another kind's marker),
        the earlier search's entries deleted (``overwrite``) or a killed writer's temporary files (else). A
        refused new folder is removed again."""
        fresh = not (self.path.exists() or self.path.is_symlink())
        try:
            with new_folders(self.path):
                self.lock = FolderLock(self.path).acquire()
                try:
                    self.check(resume, overwrite, shared, locked=True)
                    if recheck is not None:
                        recheck()
                except BaseException:
                    self.release()
                    if fresh and self.names() == {LOCK}:  # (ours alone: the new folder goes again)
                        (self.path / LOCK).unlink(missing_ok=True)
                    raise
            if overwrite:
                remove_entries(self.path, "tune")
            else:
                self._tidy()
            write_marker(self.path, "tune")
        except LockedError as exc:
            raise TuneError(str(exc)) from None
        except OSError as exc:
            self.release()
            raise TuneError(f"cannot write the tune folder {self.path}: {os_error_line(exc)}") from None

    def _tidy(self) -> None:
        """Under the lock: the temporary files a killed writer left in the folder's marked temporary folder."""
        if not (self.tmp.is_dir() and not self.tmp.is_symlink() and marker_kind(self.tmp) == "tune-tmp"):
            return
        for entry in self.tmp.iterdir():
            if entry.name != MARKER and entry_kind("tune-tmp", entry.name) == FILE and entry.is_file() \
                    and not entry.is_symlink():
                entry.unlink()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def write(self, name: str, data: str | bytes) -> None:
        """A result file, replaced whole (see :meth:`write_with`)."""
        body = data.encode("utf-8") if isinstance(data, str) else data
        self.write_with(name, lambda f: f.write(body))

    def write_with(self, name: str, fill) -> None:
        """The result file ``name`` (one of TUNE_RESULTS), replaced whole: ``fill(f)`` writes it into a new file
        in the marked temporary folder, which is then renamed over it (a kill leaves the old file or the new)."""
        assert name in TUNE_RESULTS, name
        if not self.tmp.is_dir():
            self.tmp.mkdir()
            write_marker(self.tmp, "tune-tmp")
        tmp = self.tmp / f"{name}.tmp-{secrets.token_hex(4)}"
        try:
            with open(tmp, "xb") as f:
                fill(f)
            os.replace(tmp, self.path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def check_storage_path(url: str, out: Path, option: str = "--storage") -> None:
    """A SQLite database file (``sqlite:///FILE``) may not lie inside the tune folder ``out`` or any other folder
    charlm owns (one line, before anything is written); other databases are not files here."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        return  # (open_storage says what is wrong with it)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return
    target = resolve_path(database)
    full, owned = Path(os.path.abspath(target)), Path(os.path.abspath(out))
    if full == owned or owned in full.parents:
        raise TuneError(f"{option} {show_url(url)} would keep the study in {target}, inside the tune folder {out}; "
                        f"keep the database outside it (e.g. sqlite:///{out.name}.db)")
    check_not_inside_owned(target, "database", option)


def has_password(url: str) -> bool:
    """Whether a database URL holds a password (never printed)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password is not None
    except Exception:  # noqa: BLE001 (not a URL: nothing to hide in it that show_url would not cut)
        return False


def show_url(url: str) -> str:
    """A database URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL: shown as given, cut)
        return url[:80]


def open_storage(url: str | None, journal: Path, option: str = "--storage"):
    """Optuna's storage: the journal file, or the database at ``url`` (connected now: a bad URL, a refused
    connection or bad credentials is one line naming ``option``, within CONNECT_TIMEOUT_S)."""
    import optuna

    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        # (a lock file, not the default symbolic link: a kill mid-write must not leave a link in the folder)
        return JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal))))
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise TuneError(f"{option} {show_url(url)!r} is not a database URL; write e.g. "
                        f"postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE or sqlite:///FILE") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    timeout = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    engine_kwargs = timeout if backend in ("postgresql", "mysql") else {}
    retry = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
             else "failed_trial_callback")  # (the name since Optuna 4.9)
    try:
        for attempt in range(TABLE_ATTEMPTS):
            try:
                with warnings.catch_warnings():  # (the heartbeat is "experimental")
                    warnings.simplefilter("ignore")
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                      grace_period=GRACE_S, **{retry: retry_callback()})
            except sa_exc.IntegrityError:  # workers that start together on an empty database both create its tables
                if attempt == TABLE_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 + 0.3 * attempt)
    except sa_exc.NoSuchModuleError:
        raise TuneError(f"{option} {shown}: no database '{parsed.drivername}' is known; write e.g. "
                        f"postgresql+psycopg://..., mysql+pymysql://... or sqlite:///FILE") from None
    except ImportError as exc:
        raise TuneError(f"{option} {shown}: the driver of '{parsed.drivername}' is not installed"
                        f"{f' ({exc.name})' if exc.name else ''}; for PostgreSQL write postgresql+psycopg://... "
                        f"(the tune extra installs psycopg)") from None
    except sa_exc.OperationalError as exc:
        raise TuneError(f"{option} {shown}: cannot connect: {_first_line(exc.orig)}") from None
    except sa_exc.DBAPIError as exc:
        raise TuneError(f"{option} {shown}: {_first_line(exc.orig)}") from None
    except (sa_exc.SQLAlchemyError, ValueError, TypeError) as exc:
        raise TuneError(f"{option} {shown}: {_first_line(exc)}") from None


def retry_callback():
    """Optuna's callback that runs a failed trial again with its parameters (at most MAX_RETRY times)."""
    import optuna

    with warnings.catch_warnings():  # (experimental, or deprecated, depending on Optuna's version)
        warnings.simplefilter("ignore")
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        return (cls or optuna.storages.RetryFailedTrialCallback)(max_retry=MAX_RETRY)


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def make_pruner(name: str):
    """The pruner by name; its resource is the share of a trial's budget done, in percent (1..100)."""
    import optuna

    first = 100 // TUNE_EVALS  # the first evaluation's share
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=100, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


# -- the command line that reproduces a trial ------------------------------------------------------------------
def train_command(cfg: TrainConfig, out: str | None = None) -> str:
    """The ``charlm train`` command line that runs ``cfg``: every option whose value differs from
    ``charlm train``'s default (which are TrainConfig's), floats written so that they read back exactly."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if cfg.max_chars is not None or cfg.d2l:  # (only --d2l sets them; charlm tune never does)
        raise ConfigError("max_chars and d2l have no charlm train option of their own")
    words = ["charlm", "train", str(cfg.corpus), "--out", str(out or cfg.out)]
    for f in dataclasses.fields(TrainConfig):
        name, value = f.name, getattr(cfg, f.name)
        if name in ("corpus", "out") or value == defaults[name]:
            continue
        if value is None and name in ("time_limit", "patience"):
            value = 0  # charlm train's way of saying "none"
        elif value is None:
            continue
        words += [f"--{name.replace('_', '-')}", repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(words)


# -- the search ------------------------------------------------------------------------------------------------
@dataclass
class TrialTiming:
    """One trial of this invocation: its time in Optuna (from its start to its end) and the part of it spent
    in :func:`~charlm.training.train` (the rest, and the time between trials, is the search's own)."""

    number: int
    wall_s: float
    train_s: float


@dataclass
class TuneResult:
    """What :func:`tune` returns. ``best_*`` describe the study's best complete trial (None before one
    finished): its number, held-out bits per character, parameters, run folder (on ``best_host``) and the
    ``charlm train`` command that reproduces it; ``final`` the final run's TrainResult (``final_time``)."""

    out: Path
    study: str
    storage: str
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    best_run: str | None = None
    best_host: str | None = None
    command: str | None = None
    final: object = None  # the final run's TrainResult
    final_config: TrainConfig | None = None
    final_command: str | None = None
    stop_reason: str = ""
    elapsed_s: float = 0.0
    timings: list[TrialTiming] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


SETTINGS_KEY = "charlm"  # the study's user attribute holding the search's settings
# Optuna makes a study, then charlm marks it with its settings: another worker may see it between the two. An
# unmarked study without trials is waited for this long before it counts as not charlm's.
MARK_WAIT_S = 15.0
SETTING_NAMES = ("preprocess", "min_count", "val_fraction", "seed", "trial_steps", "trial_time", "pruner")




def _train_config(trial) -> TrainConfig:
    """The TrainConfig a trial trained with (its user attribute ``train``)."""
    return TrainConfig.from_dict(trial.user_attrs["train"])


def _best(study):
    """The best complete trial, or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


class _Study:
    """The study's storage (OUT's journal, or a database) and what a search reads and writes there besides its
    trials: the settings it keeps, the sampler and pruner it opens the study with, the trials a kill left
    running (failed, and run again with their parameters)."""

    def __init__(self, cfg: TuneConfig, folder: TuneFolder, name: str, worker: str):
        self.cfg, self.folder, self.name, self.worker = cfg, folder, name, worker
        self.storage = None
        self.study = None

    @property
    def shared(self) -> bool:
        return self.cfg.storage is not None

    def shown(self) -> str:
        """The storage in words (a database URL without its password, or the journal's path)."""
        return show_url(self.cfg.storage) if self.shared else str(self.folder.journal)

    def connect(self) -> None:
        """The storage opened (afresh: a journal another process replaced is read anew)."""
        self.storage = open_storage(self.cfg.storage, self.folder.journal, self.cfg.storage_from)

    def stored_settings(self) -> dict | None:
        """The settings of the study as the storage holds it now (None: no such study)."""
        import optuna

        deadline = time.monotonic() + MARK_WAIT_S
        while True:
            try:
                study = optuna.load_study(study_name=self.name, storage=self.storage)
            except KeyError:
                return None
            settings = study.user_attrs.get(SETTINGS_KEY)
            if settings is not None or study.get_trials(deepcopy=False):
                break
            if not self.shared:  # this folder's own journal, which only this process writes: a start stopped
                return None      # between making the study and marking it (:meth:`open` marks it)
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)  # (made by another worker a moment ago, and not marked yet)
        if not isinstance(settings, dict) or settings.get("format") != 1:
            where = self.cfg.storage_from if self.shared else self.shown()
            raise TuneError(f"the study {self.name!r} in {where} was not made by charlm tune; "
                            f"choose another --study")
        return settings

    def open(self, settings: dict, stored: bool):
        """The study (created with ``settings`` when it is new), with this worker's sampler and pruner; then the
        trials this folder left RUNNING failed and run again. Under the folder's lock."""
        import optuna

        if self.storage is None:
            self.connect()
        pruner = make_pruner(settings["pruner"])
        study = optuna.create_study(storage=self.storage, study_name=self.name, direction="minimize", pruner=pruner,
                                    load_if_exists=True)
        if SETTINGS_KEY not in study.user_attrs:
            study.set_user_attr(SETTINGS_KEY, settings)
        elif study.user_attrs[SETTINGS_KEY].get("space") != settings["space"] and not stored:
            raise TuneError(f"another charlm tune started the study {self.name!r} at the same time with other "
                            f"settings; run this one again to join it")
        # the sampler: seeded by the study's size, so that a resumed search does not repeat its first proposals;
        # under a shared database each worker its own (and the others' running trials counted as pending)
        seed = None if self.shared else settings["seed"] + len(study.get_trials(deepcopy=False))
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=self.shared)
        self.study = optuna.load_study(study_name=self.name, storage=self.storage, sampler=sampler,
                                       pruner=make_pruner(settings["pruner"]))
        return self.study

    def fail_stale(self) -> list[int]:
        """The trials this folder left RUNNING (a kill): failed, and run again with the same parameters."""
        from optuna.trial import TrialState

        journal = not self.shared  # this process alone writes the journal (the folder's lock)
        stale = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if journal or t.user_attrs.get("worker") == self.worker]
        return [n for n in stale if self.fail_and_retry(n)]

    def fail_and_retry(self, number: int) -> bool:
        from optuna.trial import TrialState

        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        trials = self.study.get_trials(deepcopy=False)
        trial = next(t for t in trials if t.number == number)
        if trial.state != TrialState.FAIL or any(number in t.system_attrs.get("retry_history", ()) for t in trials):
            return False  # (finished after all, or run again already: by Optuna's heartbeat under a database)
        retry_callback()(self.study, trial)
        return True

    def done(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class _Report:
    """What a search tells about its study: trials.csv, best.json and best-command.txt (rewritten after each
    trial), the plots, and the :class:`TuneResult`."""

    def __init__(self, cfg: TuneConfig, folder: TuneFolder, store: _Study, emit):
        self.cfg, self.folder, self.store, self.emit = cfg, folder, store, emit
        self.space: dict[str, Dim] = {}

    def best_command(self, trial) -> str:
        return train_command(_train_config(trial), out=str(default_best_out(self.cfg.corpus)))

    def write_tables(self) -> None:
        """trials.csv, best.json and best-command.txt from the study as it stands."""
        study = self.store.study
        trials = study.get_trials(deepcopy=False)
        names = list(self.space)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["number", "state", "value", "seconds", "steps", "pruned_at", "host", "run", "note", *names])
        for t in trials:
            a = t.user_attrs
            params = {**{n: a.get("train", {}).get(n, "") for n in names}, **t.params}
            writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else repr(t.value),
                             "" if t.duration is None else round(t.duration.total_seconds(), 3), a.get("steps", ""),
                             a.get("pruned_at", ""), a.get("host", ""), a.get("run", ""),
                             a.get("error") or a.get("stop_reason", ""), *[params[n] for n in names]])
        self.folder.write("trials.csv", buffer.getvalue())
        best = _best(study)
        if best is None:
            return
        command = self.best_command(best)
        body = {"study": self.store.name, "trial": best.number, "value": best.value, "params": best.params,
                "run": best.user_attrs.get("run"), "host": best.user_attrs.get("host"), "command": command,
                "train": best.user_attrs["train"]}
        self.folder.write("best.json", json.dumps(body, indent=2) + "\n")
        self.folder.write("best-command.txt", command + "\n")

    def result(self, reason: str, timings: list[TrialTiming], elapsed_s: float) -> TuneResult:
        """The results written (the tables, the plots) and returned."""
        from optuna.trial import TrialState

        study = self.store.study
        self.write_tables()
        files = ["trials.csv"]
        files += self.plots()
        trials = study.get_trials(deepcopy=False)
        count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
        result = TuneResult(out=self.folder.path, study=self.store.name, storage=self.store.shown(),
                            complete=count(TrialState.COMPLETE), pruned=count(TrialState.PRUNED),
                            failed=count(TrialState.FAIL), stop_reason=reason, timings=timings, elapsed_s=elapsed_s)
        best = _best(study)
        if best is not None:
            files += ["best.json", "best-command.txt"]
            result.best_number, result.best_value, result.best_params = best.number, best.value, dict(best.params)
            result.best_run, result.best_host = best.user_attrs.get("run"), best.user_attrs.get("host")
            result.command = self.best_command(best)
        result.files = files
        return result

    def plots(self) -> list[str]:
        """history.png and importances.png (Optuna's matplotlib plots), where matplotlib is installed and the
        study has what each needs; the names written."""
        from optuna.trial import TrialState

        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from optuna.visualization import matplotlib as ovm
        except ImportError:
            return []
        study = self.store.study
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        written = []
        jobs = [("history.png", ovm.plot_optimization_history, 1)]
        if any(not d.fixed for d in self.space.values()):
            jobs.append(("importances.png", ovm.plot_param_importances, 2))
        for name, plot, need in jobs:
            if len(complete) < need:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ax = plot(study)
                except (ValueError, RuntimeError) as exc:
                    self.emit("warning", {"message": f"{name} not drawn: {_first_line(exc)}"})
                    continue
                self.folder.write_with(name, lambda f: ax.figure.savefig(f, format="png", dpi=100,
                                                                          bbox_inches="tight"))
                plt.close(ax.figure)
            written.append(name)
        return written


class _Objective:
    """One trial, as Optuna calls it: its configuration from the space, its training run in OUT/trials/NNNN
    (with TensorBoard events in ``log_dir``/trial-NNNN), its reports to the pruner, the time budget's cut.
    Keeps what the search asks after a trial: the one running, the errors in a row, the seconds in training."""

    def __init__(self, search: "_Search"):
        self.cfg, self.folder, self.emit = search.cfg, search.folder, search.emit
        self.train_callback, self.deadline, self.worker = search.train_callback, search.deadline, search.worker
        self.settings, self.space, self.vocab_size = search.settings, search.space, search.vocab_size
        self.log_dir = search.log_dir
        self.rate = NOMINAL_MACS_PER_S
        self.train_s: dict[int, float] = {}  # seconds each trial of this process spent in train()
        self.errors: list[str] = []  # this process's trials that failed in a row
        self.running = None  # the trial number this process runs now

    def trial_config(self, values: dict, out: Path) -> TrainConfig:
        s = self.settings
        base = dict(corpus=self.cfg.corpus, out=str(out), preprocess=s["preprocess"], min_count=s["min_count"],
                    val_fraction=s["val_fraction"], seed=s["seed"], device=self.cfg.device,
                    precision=self.cfg.precision, epochs=TRIAL_EPOCHS, max_steps=s["trial_steps"],
                    time_limit=s["trial_time"], dropout=0.0)
        base.update(values)
        base["eval_every"] = self.eval_every(base)
        return TrainConfig(**base)

    def eval_every(self, values: dict) -> int:
        """TUNE_EVALS evaluations per trial: by steps exactly; by time at the rate measured so far."""
        steps = self.settings["trial_steps"]
        if steps is None:
            chars_per_s = self.rate / macs_per_char(values, self.vocab_size)
            steps = self.settings["trial_time"] * chars_per_s / (values["batch_size"] * values["num_steps"])
        return max(1, int(steps) // TUNE_EVALS)

    def percent(self, row: dict) -> int:
        """A trial's progress through its budget at an evaluation: the pruner's resource."""
        s = self.settings
        done = row["step"] / s["trial_steps"] if s["trial_steps"] else row["elapsed_s"] / s["trial_time"]
        return max(1, min(100, round(100 * done)))

    def __call__(self, trial) -> float:
        import optuna

        from charlm.training import train

        self.running = trial.number
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("host", socket.gethostname())
        values = {name: dim.value for name, dim in self.space.items() if dim.fixed}
        values.update({name: dim.suggest(trial) for name, dim in self.space.items() if not dim.fixed})
        out = self.folder.trial(trial.number)
        try:
            tcfg = self.trial_config(values, out)
        except ConfigError as exc:  # settings that do not go together (a space widened past what train takes)
            return self.bad_trial(trial, exc)
        trial.set_user_attr("run", str(out.resolve()))
        trial.set_user_attr("train", tcfg.to_dict())
        self.emit("trial-start", {"number": trial.number, "params": dict(trial.params), "out": out})
        state = {"pruned": None, "cut": False, "reported": 0}
        board = None
        if self.log_dir is not None:
            from charlm.board import TensorBoardLog

            board = TensorBoardLog(self.log_dir / f"trial-{trial.number:04d}")

        def callback(event, info):
            if board is not None:
                board(event, info)
            if self.train_callback is not None:
                self.train_callback(event, info)
            if event == "eval" and self.percent(info) > state["reported"]:  # (one report per percent)
                percent = state["reported"] = self.percent(info)
                trial.report(info["val_bpc"], percent)
                self.emit("trial-eval", {"number": trial.number, "step": info["step"], "percent": percent,
                                         "val_bpc": info["val_bpc"]})
                if trial.should_prune():
                    state["pruned"] = percent
                    raise StopTraining(f"pruned by Optuna's {self.settings['pruner']} pruner at {percent}% of "
                                       f"the trial's budget")
            if event in ("step", "eval") and self.deadline is not None and time.monotonic() > self.deadline:
                state["cut"] = True
                raise StopTraining("the search's --time-budget ran out")

        t_train = time.perf_counter()
        try:
            result = train(tcfg, callback=callback)
        except TrainingInterrupted:
            raise  # Optuna fails the trial; the search stops, and --resume runs it again
        except TrainError as exc:  # this configuration cannot train (e.g. its loss diverged): a bad trial
            return self.bad_trial(trial, exc)
        finally:
            if board is not None:
                board.close()
            self.train_s[trial.number] = time.perf_counter() - t_train
        self.errors.clear()
        self.measure_rate(values, result)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("stop_reason", result.stop_reason)
        if state["pruned"] is not None or state["cut"]:
            trial.set_user_attr("pruned_at", state["pruned"] or self.percent({"step": result.steps,
                                                                              "elapsed_s": result.elapsed_s}))
            raise optuna.TrialPruned(result.stop_reason)
        return result.best.bits_per_char

    def bad_trial(self, trial, exc: Exception):
        """A trial whose settings cannot train: pruned, with the reason (ERRORS_IN_A_ROW of them stop the search)."""
        import optuna

        self.errors.append(str(exc))
        trial.set_user_attr("error", str(exc))
        raise optuna.TrialPruned(str(exc)) from None

    def measure_rate(self, values: dict, result) -> None:
        """The multiply-adds per second this trial trained at (for the next trials' --eval-every by time)."""
        train_s = result.elapsed_s - result.eval_s - result.save_s
        if train_s > 0 and result.tokens:
            self.rate = macs_per_char(values, self.vocab_size) * result.tokens / train_s


class _Search:
    """One invocation of a search: every check before anything is written (and the study's again under the
    folder's lock), then the trials this process runs (:class:`_Objective`) on the study (:class:`_Study`), the
    results after each (:class:`_Report`), and the final run of the best configuration."""

    def __init__(self, cfg: TuneConfig, resume: bool, overwrite: bool, emit, train_callback):
        self.cfg, self.resume, self.overwrite, self.emit = cfg, resume, overwrite, emit
        self.train_callback = train_callback
        self.t0 = time.monotonic()
        self.deadline = None if cfg.search_budget is None else self.t0 + cfg.search_budget
        self.folder = TuneFolder(cfg.out or default_tune_out(cfg.corpus))
        self.study_name = cfg.study or default_study(cfg.corpus)
        self.worker = f"{socket.gethostname()}:{self.folder.path.resolve()}"
        self.store = _Study(cfg, self.folder, self.study_name, self.worker)
        self.report = _Report(cfg, self.folder, self.store, emit)
        self.log_dir: Path | None = None  # DIR/<study>-<hash>: the TensorBoard runs of the trials and the final run
        self.stored: dict | None = None  # the study's settings as the storage held them (None: a new study)
        self.timings: list[TrialTiming] = []  # this process's finished trials
        self.durations: list[float] = []  # this process's finished trials, seconds each

    @property
    def shared(self) -> bool:
        return self.cfg.storage is not None

    # -- before anything is written --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Every check that needs no lock: the options, the folder, the outputs' places, the device and
        precision, the storage and the study's settings, the corpus, the space, the budgets."""
        from charlm.device import resolve_device

        cfg = self.cfg
        self.overrides = parse_space(cfg.space)
        if self.overwrite and self.shared:
            raise TuneError(f"--overwrite with {cfg.storage_from}: the study's trials stay in the database; delete "
                            f"the study ({self.delete_command()}) or choose another --study and --out")
        self.folder.check(self.resume, self.overwrite, self.shared)
        if cfg.tensorboard is not None:
            from charlm.board import check_available, check_log_dir, run_name

            check_available()
            self.log_dir = check_log_dir(cfg.tensorboard, run_name(self.folder.path, self.study_name),
                                         outputs=(self.folder.path,))
        if self.shared:
            check_storage_path(cfg.storage, self.folder.path, cfg.storage_from)
        self.device = resolve_device(cfg.device)
        self.stored = self.read_stored() if self.shared or self.resume else None
        self.settle(self.stored)

    def delete_command(self) -> str:
        """Optuna's command that deletes the study, as this invocation's storage was given (no password shown)."""
        words = shlex.join(["optuna", "delete-study", "--study-name", self.study_name])
        if self.cfg.storage_from == STORAGE_ENV:
            return f'{words} --storage "${STORAGE_ENV}"'
        if has_password(self.cfg.storage):
            return f"{words} --storage with the URL of --storage"
        return f"{words} --storage {shlex.quote(self.cfg.storage)}"

    def read_stored(self) -> dict | None:
        """The study's settings from the storage (opened afresh), or None for a new study."""
        self.store.connect()
        stored = self.store.stored_settings()
        if self.resume and not self.shared and stored is None:
            raise TuneError(f"nothing to resume: {self.folder.journal} holds no study {self.study_name!r}")
        return stored

    def recheck(self) -> None:
        """Under the folder's lock: the study read again and every check of its settings made again (another
        process may have started, replaced or changed the search since :meth:`prepare`)."""
        if self.shared or self.resume:
            self.stored = self.read_stored()
            self.settle(self.stored)

    def settle(self, stored: dict | None) -> None:
        """The search's settings: the study's (``stored``; an option given must agree) or this invocation's,
        and every check that depends on them: the corpus, the space, the trial budget, the precision."""
        from charlm.data import load_split

        cfg, name = self.cfg, self.study_name
        settings = dict(stored or {})
        for key in SETTING_NAMES:
            given = getattr(cfg, key)
            if stored is None:
                settings[key] = given
            elif given is not None and given != stored.get(key):
                raise TuneError(f"the study {name!r} was started with --{key.replace('_', '-')} "
                                f"{_show_setting(stored.get(key))}, not {_show_setting(given)}: leave it out, or "
                                f"start another study (--study, --out)")
        if stored is None:
            settings.update(preprocess=settings["preprocess"] or "raw", min_count=settings["min_count"] or 1,
                            val_fraction=settings["val_fraction"] or 0.1, seed=settings["seed"] or 0,
                            pruner=settings["pruner"] or "hyperband")
            if settings["trial_steps"] is None and settings["trial_time"] is None:
                settings["trial_time"] = default_trial_time(cfg.search_budget)
        check_trial_budget(cfg, settings, stored is not None, name)
        data = load_split(cfg.corpus, settings["preprocess"], settings["val_fraction"], None, settings["min_count"])
        train_chars = len(data.train_ids)
        if train_chars < MIN_TRAIN_CHARS:
            raise TuneError(f"{cfg.corpus} has {train_chars:,} training characters (after holding out "
                            f"{settings['val_fraction']:g}); charlm tune needs at least {MIN_TRAIN_CHARS:,}")
        if stored is not None and stored.get("corpus", {}).get("sha256") != data.sha256:
            raise TuneError(f"{cfg.corpus} is not the text the study {name!r} searches on (sha256 "
                            f"{stored.get('corpus', {}).get('sha256', '?')[:12]}..., this one {data.sha256[:12]}...)")
        if stored is None:
            space = sized_space(train_chars, settings["trial_steps"], settings["trial_time"], self.overrides)
            settings.update(corpus={"name": Path(cfg.corpus).name, "sha256": data.sha256, "train_chars": train_chars},
                            space={key: dim.to_dict() for key, dim in space.items()}, format=1)
        else:
            space = {key: Dim.from_dict(d) for key, d in stored["space"].items()}
            changed = [d.describe() for key, d in self.overrides.items() if space.get(key) != d]
            if changed:
                raise TuneError(f"the study {name!r} searches another space than --space {' '.join(changed)}: leave "
                                f"--space out, or start another study (--study, --out)")
        check_space(space, train_chars, cfg.corpus)
        self.warnings = self.check_precision(space)
        self.settings, self.space, self.vocab_size = settings, space, len(data.vocab)
        self.report.space = space

    def check_precision(self, space: dict[str, Dim]) -> list[str]:
        """--precision on this worker's device for every cell and implementation the space holds, as ``charlm
        train`` checks it (one line where it cannot run); the warnings (a precision that runs only emulated)."""
        from charlm.device import check_precision

        defaults = TrainConfig(corpus="-")
        cells = space["cell"].values() if "cell" in space else (defaults.cell,)
        impls = space["impl"].values() if "impl" in space else (defaults.impl,)
        found = [check_precision(self.cfg.precision, self.device,
                                 TrainConfig(corpus="-", cell=cell, impl=impl).model_config(PLACEHOLDER_VOCAB))
                 for cell in dict.fromkeys(cells) for impl in dict.fromkeys(impls)]
        return list(dict.fromkeys(w for w in found if w))

    # -- the search ------------------------------------------------------------------------------------------
    def after_trial(self, study, trial) -> None:
        """Optuna's callback after each trial of this process: results rewritten, progress, and whether the
        time left holds another trial."""
        from optuna.trial import TrialState

        self.objective.running = None
        if trial.duration is not None:
            self.timings.append(TrialTiming(trial.number, trial.duration.total_seconds(),
                                            self.objective.train_s.get(trial.number, 0.0)))
        if trial.duration is not None and trial.state == TrialState.COMPLETE:
            self.durations.append(trial.duration.total_seconds())
        self.report.write_tables()
        best = _best(study)
        self.emit("trial-end", {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                                "seconds": trial.duration.total_seconds() if trial.duration else None,
                                "best": best.value if best else None, "done": self.store.done(),
                                "note": trial.user_attrs.get("error") or trial.user_attrs.get("stop_reason")})
        if len(self.objective.errors) >= ERRORS_IN_A_ROW:
            study.stop()
        elif self.deadline is not None:
            expected = self.settings["trial_time"] or (statistics.median(self.durations) if self.durations else 0)
            if self.deadline - time.monotonic() < expected:
                study.stop()

    def run(self) -> TuneResult:
        import optuna
        from optuna.trial import TrialState

        cfg = self.cfg
        self.prepare()
        self.folder.create(self.resume, self.overwrite, self.shared, recheck=self.recheck)
        study = self.store.open(self.settings, self.stored is not None)
        retried = self.store.fail_stale()
        self.objective = _Objective(self)
        done = self.store.done()
        for warning in self.warnings:
            self.emit("warning", {"message": warning})
        self.emit("search-start", {"out": self.folder.path, "study": self.study_name, "storage": self.store.shown(),
                                   "done": done, "trials": cfg.trials, "time_budget": cfg.time_budget,
                                   "budget": _budget_words(self.settings), "space": [d.describe() for d in
                                                                                      self.space.values()],
                                   "resumed": self.resume, "joined": self.stored is not None and not self.resume,
                                   "retried": retried})
        callbacks = [self.after_trial]
        if cfg.trials is not None:
            callbacks.append(optuna.study.MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE,
                                                                                  TrialState.PRUNED)))
        left = None if cfg.trials is None else cfg.trials - done
        reason = f"{cfg.trials} trials done" if cfg.trials is not None else "--time-budget spent"
        try:
            if left is None or left > 0:
                timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                study.optimize(self.objective, n_trials=left, timeout=timeout, callbacks=callbacks)
                errors = self.objective.errors
                if len(errors) >= ERRORS_IN_A_ROW:
                    raise TuneError(f"{len(errors)} trials in a row failed; the last: {errors[-1]}")
                if cfg.trials is None or self.store.done() < cfg.trials:
                    reason = "--time-budget spent"
        except (TrainingInterrupted, KeyboardInterrupt) as exc:
            running = self.objective.running
            if running is not None:
                self.store.fail_and_retry(running)
            signal = str(exc).split(":")[0] or "SIGINT"
            during = f" during trial {running} (it runs again on --resume)" if running is not None else ""
            raise TuneInterrupted(f"{signal}{during}", self.results(f"{signal}{during}")) from None
        result = self.results(reason)
        if result.best_number is None:
            hint = no_trial_hint(reason, self.settings, self.stored is not None, self.folder.path / "trials.csv")
            raise TuneError(f"no trial completed ({result.pruned} pruned, {result.failed} failed): {hint}")
        if cfg.final_time:
            try:
                result.final, result.final_config, result.final_command = self.final_run()
            except TrainingInterrupted as exc:
                signal = str(exc).split(":")[0]
                result.stop_reason = f"{signal} during the final run (it goes on with --resume)"
                raise TuneInterrupted(result.stop_reason, result) from None
        return result

    def results(self, reason: str) -> TuneResult:
        return self.report.result(reason, self.timings, time.monotonic() - self.t0)

    def final_run(self):
        """The best configuration trained for --final-time seconds into OUT/final: resumed when final/ holds that
        configuration's run (stopped earlier), replaced when it holds another's (the best changed since; charlm's
        own run). final-command.txt is written once it succeeded (and removed before final/ is replaced)."""
        from charlm.rundir import RunDir, config_differences, saved_train_options
        from charlm.training import train

        best = _best(self.store.study)
        cfg = dataclasses.replace(_train_config(best), out=str(self.folder.final), time_limit=self.cfg.final_time,
                                  max_steps=None, eval_every=TrainConfig(corpus="-").eval_every,
                                  device=self.cfg.device, precision=self.cfg.precision)
        resume = replace = False
        if RunDir(self.folder.final).holds_run():
            saved = saved_train_options(self.folder.final)
            resume = bool(saved) and not config_differences(saved, cfg)
            replace = not resume
        if replace:  # (the command of the configuration being replaced no longer says what final/ holds)
            (self.folder.path / "final-command.txt").unlink(missing_ok=True)
        self.emit("final-start", {"out": self.folder.final, "resumed": resume, "replaced": replace,
                                  "trial": best.number})
        board = None
        if self.log_dir is not None:
            from charlm.board import TensorBoardLog

            board = TensorBoardLog(self.log_dir / "final")

        def callback(event, info):
            if board is not None:
                board(event, info)
            if self.train_callback is not None:
                self.train_callback(event, info)

        try:
            result = train(cfg, resume=resume, overwrite=replace, callback=callback)
        finally:
            if board is not None:
                board.close()
        command = train_command(cfg)
        self.folder.write("final-command.txt", command + "\n")
        return result, cfg, command


def default_best_out(corpus) -> Path:
    """Where the best trial's command line trains: checkpoints/<corpus stem>-tuned."""
    return Path("checkpoints") / f"{_stem(corpus)}-tuned"


def _show_setting(value) -> str:
    return "(none)" if value is None else _show(value)


def _budget_words(settings: dict) -> str:
    if settings["trial_steps"] is not None:
        return f"{settings['trial_steps']:,} steps per trial"
    return f"{settings['trial_time']:g}s per trial"


def tune(cfg: TuneConfig, resume: bool = False, overwrite: bool = False, callback=None,
         train_callback=None) -> TuneResult:
    """Search with Optuna as ``charlm tune`` does and return the outcome (see the module docstring).

    Every option, the folder, the outputs' places, the device and precision, the storage, the corpus, the
    space and the budgets are checked before anything is written, and the folder and the study again once the
    folder is locked. ``resume`` continues the search in ``cfg.out``; ``overwrite`` deletes it first. SIGINT
    or SIGTERM stops the running trial and raises :class:`~charlm.errors.TuneInterrupted` (the trial runs
    again on resume); every other problem is a one-line ``CharlmError``. ``train_callback(event, info)``
    receives every trial's training events (:mod:`charlm.training`).
    """
    try:
        import optuna  # noqa: F401
    except ModuleNotFoundError as exc:
        raise TuneError(f"charlm tune needs the tune extra ({exc.name} is missing): "
                        f"pip install 'charlm-rnn[tune]'") from None
    emit = callback or (lambda event, info: None)
    search = _Search(cfg, resume, overwrite, emit, train_callback)
    try:
        return search.run()
    finally:
        search.folder.release()


__all__ = ["tune", "TuneConfig", "TuneResult", "TrialTiming", "Dim", "parse_spec", "parse_space", "default_space",
           "batch_shape_ranges", "trial_chars", "macs_per_char", "sized_space", "default_trial_time", "check_space",
           "check_trial_budget", "no_trial_hint", "TuneFolder", "open_storage", "make_pruner", "train_command",
           "STORAGE_ENV", "MIN_TRIAL_S"]
