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
marked, refused when it is not charlm's, one process at a time (a lock). The results, rewritten after each
trial: ``trials.csv``, ``best.json`` and ``best-command.txt`` (the ``charlm train`` command that reproduces
the best trial: to the bit when trials run by steps), and at the end ``history.png`` and ``importances.png``
(Optuna's matplotlib plots, with the ``plot`` extra); with ``final_time``, a final run of the best
configuration in ``OUT/final``.

Events: ``"search-start"`` (``out``, ``study``, ``storage``, ``done``, ``trials``, ``budget``, ``space``,
``resumed``, ``retried``), ``"trial-start"`` (``number``, ``params``, ``out``), ``"trial-eval"``
(``number``, ``step``, ``percent``, ``val_bpc``), ``"trial-end"`` (``number``, ``state``, ``value``,
``seconds``, ``best``, ``done``), ``"final-start"`` (``out``), ``"warning"`` (``message``); and with
``train_callback``, every trial's own training events.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shlex
import socket
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from charlm.config import (CELLS, GATES, IMPLS, LR_SCHEDULES, OPTIMIZERS, PREPROCESS_MODES, PRECISIONS, SAMPLINGS,
                           SMALL_CORPUS_CHARS, TrainConfig, seed_error)
from charlm.data import min_tokens
from charlm.errors import (ConfigError, StopTraining, TrainError, TrainingInterrupted, TuneError, TuneInterrupted,
                           os_error_line)
from charlm.outputs import (LOCK, FolderLock, LockedError, check_folder, check_not_cwd, check_parent, remove_entries,
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
    space: tuple[str, ...] = ()  # --space items (SPACE_SYNTAX) over the default space
    pruner: str | None = None  # hyperband | halving | median | none; None: hyperband
    storage: str | None = None  # a database URL Optuna takes; None: OUT/study.journal
    study: str | None = None  # the study's name; None: the corpus's stem
    tensorboard: str | None = None  # a folder: one TensorBoard run per trial, DIR/<study>/trial-NNNN
    preprocess: str | None = None  # None: raw
    min_count: int | None = None  # None: 1
    val_fraction: float | None = None  # None: 0.1
    seed: int | None = None  # the trials' training seed and the sampler's; None: 0
    device: str = "auto"  # where the trials train (a worker's own: not part of the study's settings)
    precision: str = "fp32"

    def __post_init__(self):
        checks = [
            (self.trials is not None or self.time_budget is not None,
             "give --trials N, --time-budget SECONDS or both"),
            (self.trials is None or self.trials >= 1, f"--trials must be >= 1, got {self.trials}"),
            (self.time_budget is None or self.time_budget > 0, f"--time-budget must be > 0, got {self.time_budget}"),
            (self.trial_steps is None or self.trial_time is None, "--trial-steps and --trial-time exclude each other"),
            (self.trial_steps is None or self.trial_steps >= 1, f"--trial-steps must be >= 1, got {self.trial_steps}"),
            (self.trial_time is None or self.trial_time > 0, f"--trial-time must be > 0, got {self.trial_time}"),
            (self.final_time is None or self.final_time > 0, f"--final-time must be > 0, got {self.final_time}"),
            (self.final_time is None or self.time_budget is None or self.final_time < self.time_budget,
             f"--final-time {_show_setting(self.final_time)} leaves no time to search in --time-budget "
             f"{_show_setting(self.time_budget)}"),
            (self.pruner is None or self.pruner in PRUNERS, f"--pruner must be one of {', '.join(PRUNERS)}"),
            (self.preprocess is None or self.preprocess in PREPROCESS_MODES,
             f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}"),
            (self.min_count is None or self.min_count >= 1, f"--min-count must be >= 1, got {self.min_count}"),
            (self.val_fraction is None or 0 < self.val_fraction < 1,
             f"--val-fraction must lie in (0, 1), got {self.val_fraction}"),
            (self.seed is None or seed_error(self.seed) is None, seed_error(self.seed)),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def search_budget(self) -> float | None:
        """Seconds for the trials: the time budget less the final run's."""
        if self.time_budget is None:
            return None
        return self.time_budget - (self.final_time or 0.0)


def _stem(corpus: str | os.PathLike) -> str:
    """The corpus's name without its suffix (a folder's own name for ``.``), as ``charlm train`` names runs."""
    return Path(resolve_path(corpus).name).stem or "corpus"


def default_tune_out(corpus: str | os.PathLike) -> Path:
    return Path("tunes") / _stem(corpus)


def default_study(corpus: str | os.PathLike) -> str:
    return _stem(corpus)


class TuneFolder:
    """A search's folder: what it holds, the checks before anything is written, the one-process lock
    (:class:`~charlm.outputs.FolderLock`). ``path`` is resolved (:func:`~charlm.outputs.resolve_path`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_path(path)
        self.journal = self.path / JOURNAL
        self.trials = self.path / "trials"
        self.final = self.path / "final"
        self.lock: FolderLock | None = None

    def trial(self, number: int) -> Path:
        return self.trials / f"{number:04d}"

    def check(self, resume: bool, overwrite: bool, shared: bool) -> None:
        """Refuse (one line, nothing written) a folder that is not charlm's (or holds anything charlm did not
        write, in the trials' runs too), a folder another process is writing, a search already there without
        --resume or --overwrite, or nothing to resume."""
        if resume and overwrite:
            raise TuneError("--resume and --overwrite contradict each other; pass one")
        if overwrite and shared:
            raise TuneError("--overwrite with --storage: the study's trials stay in the database; delete the study "
                            "(optuna delete-study --study-name NAME --storage URL) or choose another --study and --out")
        check_parent(self.path)
        check_folder(self.path, "tune")
        if self.path.is_dir():
            try:
                FolderLock(self.path).check_free()
            except LockedError as exc:
                raise TuneError(str(exc)) from None
        existing = self.path.is_dir() and any(p.name != LOCK for p in self.path.iterdir())
        if resume and not (existing and (shared or self.journal.is_file())):
            raise TuneError(f"nothing to resume: {self.path} holds no search")
        if existing and not resume and not overwrite:
            raise TuneError(f"{self.path} already holds a search; pass --resume to continue it or --overwrite to "
                            f"start over")
        if overwrite and existing:
            check_not_cwd(self.path)

    def create(self, overwrite: bool) -> None:
        """The folder, marked as charlm's, and its lock taken (a second process is refused in one line naming the
        first); with ``overwrite``, the earlier search's entries deleted, under the lock, after a last check."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(self.path).acquire()
            if overwrite:
                check_folder(self.path, "tune")
                remove_entries(self.path, "tune")
            write_marker(self.path, "tune")
        except LockedError as exc:
            raise TuneError(str(exc)) from None
        except OSError as exc:
            raise TuneError(f"cannot create the tune folder {self.path}: {os_error_line(exc)}") from None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def write(self, name: str, text: str) -> None:
        """A result file, replaced whole (a temporary file renamed over it)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / name)


def show_url(url: str) -> str:
    """A database URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL: shown as given, cut)
        return url[:80]


def open_storage(url: str | None, journal: Path):
    """Optuna's storage: the journal file, or the database at ``url`` (connected now: a bad URL, a refused
    connection or bad credentials is one line, within CONNECT_TIMEOUT_S)."""
    import optuna

    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        from optuna.storages.journal import JournalFileOpenLock

        # (a lock file, not the default symbolic link: a kill mid-write must not leave a link in the folder)
        return JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal))))
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise TuneError(f"--storage {url!r} is not a database URL; write e.g. "
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
        raise TuneError(f"--storage {shown}: no database '{parsed.drivername}' is known; write e.g. "
                        f"postgresql+psycopg://..., mysql+pymysql://... or sqlite:///FILE") from None
    except ImportError as exc:
        raise TuneError(f"--storage {shown}: the driver of '{parsed.drivername}' is not installed"
                        f"{f' ({exc.name})' if exc.name else ''}; for PostgreSQL write postgresql+psycopg://... "
                        f"(the tune extra installs psycopg)") from None
    except sa_exc.OperationalError as exc:
        raise TuneError(f"--storage {shown}: cannot connect: {_first_line(exc.orig)}") from None
    except sa_exc.DBAPIError as exc:
        raise TuneError(f"--storage {shown}: {_first_line(exc.orig)}") from None
    except (sa_exc.SQLAlchemyError, ValueError, TypeError) as exc:
        raise TuneError(f"--storage {shown}: {_first_line(exc)}") from None


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
SETTING_NAMES = ("preprocess", "min_count", "val_fraction", "seed", "trial_steps", "trial_time", "pruner")


class _Search:
    """One invocation of a search: the study, its settings and space, the trials this process runs."""

    def __init__(self, cfg: TuneConfig, resume: bool, overwrite: bool, emit, train_callback):
        self.cfg, self.resume, self.overwrite, self.emit = cfg, resume, overwrite, emit
        self.train_callback = train_callback
        self.t0 = time.monotonic()
        self.deadline = None if cfg.search_budget is None else self.t0 + cfg.search_budget
        self.folder = TuneFolder(cfg.out or default_tune_out(cfg.corpus))
        self.study_name = cfg.study or default_study(cfg.corpus)
        self.worker = f"{socket.gethostname()}:{self.folder.path.resolve()}"
        self.rate = NOMINAL_MACS_PER_S
        self.timings: list[TrialTiming] = []  # this process's finished trials
        self.train_s: dict[int, float] = {}  # seconds each trial of this process spent in train()
        self.durations: list[float] = []  # this process's finished trials, seconds each
        self.errors: list[str] = []  # this process's trials that failed in a row
        self.running = None  # the trial number this process runs now

    # -- before anything is written --------------------------------------------------------------------------
    def prepare(self):
        import optuna

        from charlm.data import load_split

        cfg = self.cfg
        overrides = parse_space(cfg.space)
        if cfg.tensorboard:
            from charlm.board import check_available

            check_available()
        self.folder.check(self.resume, self.overwrite, shared=cfg.storage is not None)
        self.storage = None
        if cfg.storage is not None or self.resume:
            self.storage = open_storage(cfg.storage, self.folder.journal)
        stored = self._stored_settings(optuna) if self.storage is not None else None
        if self.resume and cfg.storage is None and stored is None:
            raise TuneError(f"nothing to resume: {self.folder.journal} holds no study {self.study_name!r}")
        settings = dict(stored or {})
        for name in SETTING_NAMES:
            given = getattr(cfg, name)
            if stored is None:
                settings[name] = given
            elif given is not None and given != stored.get(name):
                raise TuneError(f"the study {self.study_name!r} was started with --{name.replace('_', '-')} "
                                f"{_show_setting(stored.get(name))}, not {_show_setting(given)}: leave it out, or "
                                f"start another study (--study, --out)")
        if stored is None:
            settings.update(preprocess=settings["preprocess"] or "raw", min_count=settings["min_count"] or 1,
                            val_fraction=settings["val_fraction"] or 0.1, seed=settings["seed"] or 0,
                            pruner=settings["pruner"] or "hyperband")
        data = load_split(cfg.corpus, settings["preprocess"], settings["val_fraction"], None, settings["min_count"])
        train_chars = len(data.train_ids)
        if train_chars < MIN_TRAIN_CHARS:
            raise TuneError(f"{cfg.corpus} has {train_chars:,} training characters (after holding out "
                            f"{settings['val_fraction']:g}); charlm tune needs at least {MIN_TRAIN_CHARS:,}")
        if stored is not None and stored.get("corpus", {}).get("sha256") != data.sha256:
            raise TuneError(f"{cfg.corpus} is not the text the study {self.study_name!r} searches on (sha256 "
                            f"{stored.get('corpus', {}).get('sha256', '?')[:12]}..., this one "
                            f"{data.sha256[:12]}...)")
        if stored is None:
            if settings["trial_steps"] is None and settings["trial_time"] is None:
                settings["trial_time"] = default_trial_time(cfg.search_budget)
            space = sized_space(train_chars, settings["trial_steps"], settings["trial_time"], overrides)
            settings.update(corpus={"name": Path(cfg.corpus).name, "sha256": data.sha256, "train_chars": train_chars},
                            space={name: dim.to_dict() for name, dim in space.items()}, format=1)
        else:
            space = {name: Dim.from_dict(d) for name, d in stored["space"].items()}
            changed = [d.describe() for name, d in overrides.items() if space.get(name) != d]
            if changed:
                raise TuneError(f"the study {self.study_name!r} searches another space than --space "
                                f"{' '.join(changed)}: leave --space out, or start another study (--study, --out)")
        check_space(space, train_chars, cfg.corpus)
        trial_time = settings["trial_time"]
        if trial_time is not None and cfg.search_budget is not None and cfg.search_budget < trial_time:
            final = f" (after --final-time {cfg.final_time:g})" if cfg.final_time else ""
            raise TuneError(f"--time-budget {cfg.time_budget:g}s{final} is shorter than one trial (--trial-time "
                            f"{trial_time:g}s); give more time or a shorter --trial-time")
        self.settings, self.space, self.vocab_size, self.stored = settings, space, len(data.vocab), stored is not None

    def _stored_settings(self, optuna) -> dict | None:
        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:
            return None
        settings = study.user_attrs.get(SETTINGS_KEY)
        if not isinstance(settings, dict) or settings.get("format") != 1:
            raise TuneError(f"the study {self.study_name!r} in --storage was not made by charlm tune; choose "
                            f"another --study")
        return settings

    # -- the study -------------------------------------------------------------------------------------------
    def open_study(self):
        import optuna

        cfg = self.cfg
        self.folder.create(self.overwrite)
        if self.storage is None:
            self.storage = open_storage(None, self.folder.journal)
        study = optuna.create_study(storage=self.storage, study_name=self.study_name, direction="minimize",
                                    pruner=make_pruner(self.settings["pruner"]), load_if_exists=True)
        if SETTINGS_KEY not in study.user_attrs:
            study.set_user_attr(SETTINGS_KEY, self.settings)
        elif study.user_attrs[SETTINGS_KEY].get("space") != self.settings["space"] and not self.stored:
            raise TuneError(f"another charlm tune started the study {self.study_name!r} at the same time with other "
                            f"settings; run this one again to join it")
        # the sampler: seeded by the study's size, so that a resumed search does not repeat its first proposals;
        # under a shared database each worker its own (and the others' running trials counted as pending)
        shared = cfg.storage is not None
        seed = None if shared else self.settings["seed"] + len(study.get_trials(deepcopy=False))
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=shared)
        self.study = optuna.load_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                       pruner=make_pruner(self.settings["pruner"]))
        self.retried = self._fail_stale()
        return self.study

    def _fail_stale(self) -> list[int]:
        """The trials this folder left RUNNING (a kill): failed, and run again with the same parameters."""
        from optuna.trial import TrialState

        journal = self.cfg.storage is None  # this process alone writes the journal (the folder's lock)
        stale = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if journal or t.user_attrs.get("worker") == self.worker]
        return [n for n in stale if self._fail_and_retry(n)]

    def _fail_and_retry(self, number: int) -> bool:
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

    # -- one trial -------------------------------------------------------------------------------------------
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

    def objective(self, trial) -> float:
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
        if self.cfg.tensorboard:
            from charlm.board import TensorBoardLog

            board = TensorBoardLog(Path(self.cfg.tensorboard) / self.study_name / f"trial-{trial.number:04d}")

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

    def after_trial(self, study, trial) -> None:
        """Optuna's callback after each trial of this process: results rewritten, progress, and whether the
        time left holds another trial."""
        from optuna.trial import TrialState

        self.running = None
        if trial.duration is not None:
            self.timings.append(TrialTiming(trial.number, trial.duration.total_seconds(),
                                            self.train_s.get(trial.number, 0.0)))
        if trial.duration is not None and trial.state == TrialState.COMPLETE:
            self.durations.append(trial.duration.total_seconds())
        self.write_tables()
        best = _best(study)
        self.emit("trial-end", {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
                                "seconds": trial.duration.total_seconds() if trial.duration else None,
                                "best": best.value if best else None, "done": self.done(),
                                "note": trial.user_attrs.get("error") or trial.user_attrs.get("stop_reason")})
        if len(self.errors) >= ERRORS_IN_A_ROW:
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
        study = self.open_study()
        done = self.done()
        self.emit("search-start", {"out": self.folder.path, "study": self.study_name,
                                   "storage": show_url(cfg.storage) if cfg.storage else str(self.folder.journal),
                                   "done": done, "trials": cfg.trials, "time_budget": cfg.time_budget,
                                   "budget": _budget_words(self.settings), "space": [d.describe() for d in
                                                                                      self.space.values()],
                                   "resumed": self.resume, "joined": self.stored and not self.resume,
                                   "retried": self.retried})
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
                if len(self.errors) >= ERRORS_IN_A_ROW:
                    raise TuneError(f"{len(self.errors)} trials in a row failed; the last: {self.errors[-1]}")
                if cfg.trials is None or self.done() < cfg.trials:
                    reason = "--time-budget spent"
        except (TrainingInterrupted, KeyboardInterrupt) as exc:
            if self.running is not None:
                self._fail_and_retry(self.running)
            signal = str(exc).split(":")[0] or "SIGINT"
            during = f" during trial {self.running} (it runs again on --resume)" if self.running is not None else ""
            result = self.results(f"{signal}{during}")
            raise TuneInterrupted(f"{signal}{during}", result) from None
        result = self.results(reason)
        if result.best_number is None:
            hint = ("the time ran out before a trial finished its --trial-steps: give more --time-budget or fewer "
                    "--trial-steps" if reason == "--time-budget spent" else f"see {self.folder.path / 'trials.csv'}")
            raise TuneError(f"no trial completed ({result.pruned} pruned, {result.failed} failed): {hint}")
        if cfg.final_time:
            try:
                result.final, result.final_config, result.final_command = self.final_run()
            except TrainingInterrupted as exc:
                signal = str(exc).split(":")[0]
                result.stop_reason = f"{signal} during the final run (it goes on with --resume)"
                raise TuneInterrupted(result.stop_reason, result) from None
        return result

    # -- results ---------------------------------------------------------------------------------------------
    def best_config(self, trial) -> TrainConfig:
        return TrainConfig.from_dict(trial.user_attrs["train"])

    def write_tables(self) -> None:
        """trials.csv, best.json and best-command.txt from the study as it stands."""
        study = self.study
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
        command = train_command(self.best_config(best), out=str(default_best_out(self.cfg.corpus)))
        body = {"study": self.study_name, "trial": best.number, "value": best.value, "params": best.params,
                "run": best.user_attrs.get("run"), "host": best.user_attrs.get("host"), "command": command,
                "train": best.user_attrs["train"]}
        self.folder.write("best.json", json.dumps(body, indent=2) + "\n")
        self.folder.write("best-command.txt", command + "\n")

    def results(self, reason: str) -> TuneResult:
        from optuna.trial import TrialState

        study = self.study
        self.write_tables()
        files = ["trials.csv"]
        files += self.plots()
        trials = study.get_trials(deepcopy=False)
        count = lambda s: sum(t.state == s for t in trials)  # noqa: E731
        result = TuneResult(out=self.folder.path, study=self.study_name,
                            storage=show_url(self.cfg.storage) if self.cfg.storage else str(self.folder.journal),
                            complete=count(TrialState.COMPLETE), pruned=count(TrialState.PRUNED),
                            failed=count(TrialState.FAIL), stop_reason=reason, timings=self.timings,
                            elapsed_s=time.monotonic() - self.t0)
        best = _best(study)
        if best is not None:
            files += ["best.json", "best-command.txt"]
            result.best_number, result.best_value, result.best_params = best.number, best.value, dict(best.params)
            result.best_run, result.best_host = best.user_attrs.get("run"), best.user_attrs.get("host")
            result.command = train_command(self.best_config(best), out=str(default_best_out(self.cfg.corpus)))
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
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
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
                    ax = plot(self.study)
                except (ValueError, RuntimeError) as exc:
                    self.emit("warning", {"message": f"{name} not drawn: {_first_line(exc)}"})
                    continue
                tmp = self.folder.path / f".{name}.tmp"
                ax.figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
                plt.close(ax.figure)
                os.replace(tmp, self.folder.path / name)
            written.append(name)
        return written

    def final_run(self):
        """The best configuration trained for --final-time seconds into OUT/final (a run stopped earlier
        resumes)."""
        from charlm.training import train

        best = _best(self.study)
        cfg = dataclasses.replace(self.best_config(best), out=str(self.folder.final), time_limit=self.cfg.final_time,
                                  max_steps=None, eval_every=TrainConfig(corpus="-").eval_every,
                                  device=self.cfg.device, precision=self.cfg.precision)
        resume = (self.folder.final / "last").is_dir()
        self.emit("final-start", {"out": self.folder.final, "resumed": resume})
        command = train_command(cfg)
        self.folder.write("final-command.txt", command + "\n")
        board = None
        if self.cfg.tensorboard:
            from charlm.board import TensorBoardLog

            board = TensorBoardLog(Path(self.cfg.tensorboard) / self.study_name / "final")

        def callback(event, info):
            if board is not None:
                board(event, info)
            if self.train_callback is not None:
                self.train_callback(event, info)

        try:
            return train(cfg, resume=resume, callback=callback), cfg, command
        finally:
            if board is not None:
                board.close()


def default_best_out(corpus) -> Path:
    """Where the best trial's command line trains: checkpoints/<corpus stem>-tuned."""
    return Path("checkpoints") / f"{_stem(corpus)}-tuned"


def _best(study):
    """The best complete trial, or None."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


def _show_setting(value) -> str:
    return "(none)" if value is None else _show(value)


def _budget_words(settings: dict) -> str:
    if settings["trial_steps"] is not None:
        return f"{settings['trial_steps']:,} steps per trial"
    return f"{settings['trial_time']:g}s per trial"


def tune(cfg: TuneConfig, resume: bool = False, overwrite: bool = False, callback=None,
         train_callback=None) -> TuneResult:
    """Search with Optuna as ``charlm tune`` does and return the outcome (see the module docstring).

    Every option, the folder, the storage, the corpus and the space are checked before anything is
    written. ``resume`` continues the search in ``cfg.out``; ``overwrite`` deletes it first. SIGINT or
    SIGTERM stops the running trial and raises :class:`~charlm.errors.TuneInterrupted` (the trial runs again
    on resume); every other problem is a one-line ``CharlmError``. ``train_callback(event, info)`` receives
    every trial's training events (:mod:`charlm.training`).
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
           "TuneFolder", "open_storage", "make_pruner", "train_command"]
