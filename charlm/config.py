"""Typed, frozen settings and the tables of names every other module reads.

The defaults of training (``TrainConfig``), of generation (``SampleConfig``) and of evaluation
(``EVAL_*``) are defined here; the CLI and the library take them from here. ``ModelConfig``'s
defaults are those of d2l's model, and ``RNNLM``'s constructor reads them from it.

A checkpoint stores ``ModelConfig.to_dict()`` and ``TrainConfig.to_dict()`` as JSON and rebuilds
the model from the first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from charlm.errors import ConfigError

GATES = {"rnn": 1, "gru": 3, "lstm": 4, "mogrifier": 4}  # gate blocks stacked in each weight matrix, torch's layout
CELLS = tuple(GATES)
PAIR_STATE_CELLS = ("lstm", "mogrifier")  # cells whose state is a pair (h, c)
MOGRIFIER_FIELDS = ("mogrify_rounds", "mogrify_rank")  # ModelConfig's options of the mogrifier cell
IMPLS = ("torch", "scratch")
PREPROCESS_MODES = ("raw", "lower", "letters")  # see charlm.corpus.normalize
SAMPLINGS = ("random", "sequential")  # the d2l minibatch iterators (charlm.data)
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("plateau", "hold-decay", "cosine")  # see charlm.schedule.scheduled_lr
HOLD_FRACTION = 0.6  # hold-decay: the lr is held for this share of the planned steps, then falls linearly to 0
DIST_BACKENDS = ("auto", "gloo", "nccl")  # auto: nccl with CUDA, gloo otherwise
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"  # what --device takes (charlm.device.resolve_device)
# training steps: fp32, or autocast to bf16/fp16 (charlm.device.autocast); auto: bf16 where the device has it
# natively, else fp32 (charlm.device.resolve_precision)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_LR = {"sgd": 1.0, "adam": 3e-3}  # --lr by optimizer: d2l's SGD rate; Adam's measured (explanation/defaults)
# --lr by optimizer when fine-tuning a trained model (--init-from): Adam's measured (explanation/defaults,
# "Fine-tuning"), SGD's lowered in the same ratio
FINETUNE_LR = {"sgd": 0.3, "adam": 1e-3}
NEW_CHARS = ("extend", "unk", "error")  # fine-tuning: the new text's characters the parent lacks (data.load_split_onto)
# What --init-from takes from the parent model: its architecture and how it reads text (none may be given with it)
INHERITED = ("cell", "impl", "hidden_size", "num_layers", "embedding_dim", *MOGRIFIER_FIELDS, "preprocess", "min_count")
PATIENCE_AUTO = -1  # TrainConfig.patience's default: 5 under the plateau schedule, never under a planned one
REGULARISERS = ("weight_drop", "dropout_input", "dropout_hidden", "dropout_output")  # ModelConfig's AWD-style options
# Weight averaging (TrainConfig.average): "none", or "ema", an exponential moving average of the weights after each
# step (torch.optim.swa_utils.AveragedModel), which held-out evaluations read and best/ saves as the model
AVERAGES = ("none", "ema")
AVERAGE_FIELDS = ("average", "average_decay")

SMALL_CORPUS_CHARS = 500_000  # training texts shorter than this get the small-corpus defaults (resolved_* below)
# The model's size where the user sets none of it (TrainConfig.sized): three cases by the training text's length
# and the times the budget reads it, read off measured runs on four texts of 30,000 to 18,000,000 training
# characters at two or three budgets each (explanation/defaults, "Sizes from the text and the budget"). A field
# the user sets keeps the user's value; the rule fills the others.
SIZED_FIELDS = ("hidden_size", "num_layers", *REGULARISERS)
AWD_LIGHT = {"weight_drop": 0.25, "dropout_input": 0.05, "dropout_hidden": 0.15, "dropout_output": 0.25}
SIZE_FEW_READS = {"hidden_size": 192, "num_layers": 2, **dict.fromkeys(REGULARISERS, 0.0)}  # under FEW_READS
SIZE_SMALL_TEXT = {"hidden_size": 128, "num_layers": 1, **AWD_LIGHT}  # under SMALL_TEXT_CHARS, over MANY_READS
SIZE_MID_READS = {"hidden_size": 320, "num_layers": 2, **AWD_LIGHT}  # the others
FEW_READS = 2.0  # a budget reading the text fewer times is short of steps, not of text
SMALL_TEXT_CHARS = 75_000  # a text this short, read more than MANY_READS times, is short of text: a small model
MANY_READS = 30.0  # over-fits it less (at 30,000 characters; 161,000 already take the middle model)
# What a second of --time-limit is taken to train on, for the rule: about the default model's speed on one core of
# a 2-core AMD EPYC (10,000 to 15,000 characters a second in the size runs; two cores: 23,000, the README's
# quickstart), and on two cores of an AVX2-only CPU, where the LSTM step is 2.6 times slower
SIZING_CHARS_PER_S = 10_000
SMALL_CORPUS_WEIGHT_DECAY = 0.3  # measured: README, "Regularisation, planned schedules, dynamic evaluation"
EVAL_BATCH_SIZE = 64  # rows evaluated in parallel (charlm.evaluation.evaluate, charlm eval)
EVAL_NUM_STEPS = 256  # columns per chunk; the state is carried from chunk to chunk
# Dynamic evaluation (charlm eval --dynamic): per update rule, (step size, characters per segment, share of
# the way back to the trained weights after each step). "rms" divides each gradient by the root of its running
# mean square (Krause et al.'s normalisation) and pulls each weight back in proportion to that root (over the
# mean of all of them); the mean square starts from DYNAMIC_PRIOR_CHARS of the run's training text (its end,
# read at the trained weights) when the run's corpus is at hand, else from the segments read so far. Chosen on
# the first half of the quickstart model's held-out tail (lr 1e-4 to 1e-3, segments of 25 to 100, decay 0 to
# 0.03, prior 0 / 20,000 / 100,000 characters; the model trained with weight decay, where 1e-3 overshoots),
# measured on the second half and on Tiny Shakespeare (README). "sgd", the plain step: chosen on a letters Time
# Machine model.
DYNAMIC_RULES = {"rms": (5e-4, 50, 0.01), "sgd": (0.3, 100, 0.0)}
DYNAMIC_RULE = "rms"
DYNAMIC_RMS_BETA = 0.99  # the running mean square's decay per segment (bias-corrected when it starts from zero)
DYNAMIC_PRIOR_CHARS = 100_000  # of the run's training text, for the rms rule's starting mean square
# Dynamic evaluation also mixes the network with an n-gram count model of the run's training text and of the text
# read so far (charlm.ngram), the network's weight learned as the text is read. Order 6 chosen on the held-out
# tails of three models among 3 to 9 (docs/explanation/defaults.md, "Dynamic evaluation"); 0 turns it off.
DYNAMIC_COUNTS_ORDER = 6
DYNAMIC_COUNTS_CHARS = 5_000_000  # the most of the training text (its end) it counts: ~1 GB of numpy arrays at most
# Seeds (training, sampling, the server's requests): integers from 0 to SEED_MAX, the range numpy's SeedSequence
# takes (no negative seeds) and a signed 64-bit integer holds.
SEED_MAX = 2**63 - 1
EVAL_MIN_CHARS = 20_000  # periodic evaluations read at least this much of the held-out tail (when it has it)
# The largest values charlm holds (each refused above it, by the CLI's option and by these configs):
MAX_LR = 1e30  # learning rates (training's, dynamic evaluation's): float32 holds it times Adam's bias correction (10)
MAX_UNITS = 2**31 - 1  # hidden units and embedding size: a dimension torch's and cuDNN's kernels index in 32 bits
MAX_LAYERS = 1024  # stacked recurrent layers
MAX_MOGRIFY_ROUNDS = 64  # a mogrifier's rounds (the paper's best is 5 or 6; past a few hundred fp32 loses the logits)
# The vocabulary TrainConfig checks its model options with before the text is read: large, so that it limits
# nothing that the text's own vocabulary may allow (a one-hot mogrifier's rank is checked again on the text's)
PLACEHOLDER_VOCAB = 65_536
MAX_SAMPLES = 65_536  # continuations generated together (SampleConfig.num_samples, a server's slots)
MAX_STREAM_INTERVAL = 10.0  # seconds between a server's stream pieces, at most (ServeConfig.stream_interval)
MAX_SECONDS = 1e9  # a search's durations (charlm tune's budgets), at most: about 31 years, and their products fit
DIST_TIMEOUT_RANGE = (1.0, 7 * 24 * 3600.0)  # seconds, a week at most: datetime.timedelta and torch's timeouts hold it


def _times(reads: float) -> str:
    """How many times a budget reads a text, in words, to as many figures as the rule's thresholds need."""
    if math.isinf(reads):
        return "more times than a float counts"
    if reads < 0.01:
        return "less than a hundredth of once"
    if f"{reads:.3g}" == "1":
        return "about once"
    number = (f"{reads:.3g}" if reads < 10 else f"{reads:,.1f}".removesuffix(".0") if reads < 100 else
              f"{reads:,.0f}" if reads < 1e6 else f"{reads:.2g}")
    return f"about {number} times"


def _from_dict(cls, data: dict):
    """Build dataclass ``cls`` from ``data``, refusing keys it does not know."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


def check_choice(what: str, value, choices) -> None:
    """A ``ConfigError`` naming the choices, unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check(checks) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _is_int(value, minimum: int, maximum: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum))


def _is_number(value) -> bool:
    """A real number that is no bool (NaN included: the range checks refuse it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_real(value, low: float, high: float = float("inf"), low_open: bool = False) -> bool:
    """A finite real number (no bool, no NaN, no infinity) in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    return (_is_number(value) and math.isfinite(value) and (value > low if low_open else value >= low)
            and value <= high)


def seed_error(seed) -> str | None:
    """Why ``seed`` is not a seed charlm takes (an integer from 0 to SEED_MAX), or None."""
    if _is_int(seed, 0, SEED_MAX):
        return None
    return f"seed must be an integer from 0 to {SEED_MAX} (2**63 - 1), got {seed!r}"


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of an :class:`~charlm.RNNLM`: everything needed to rebuild it."""

    vocab_size: int  # characters, <unk> included; the size of the one-hot input and of the output
    cell: str = "gru"  # "rnn" (tanh), "gru" or "lstm", with torch's gate equations; or "mogrifier" (below)
    hidden_size: int = 256  # H: units per recurrent layer
    num_layers: int = 1  # stacked recurrent layers
    embedding_dim: int = 0  # 0: one-hot inputs, as in d2l; > 0: a learned nn.Embedding of this size
    dropout: float = 0.0  # between recurrent layers and before the output layer (training only)
    impl: str = "torch"  # "torch": nn.RNN/GRU/LSTM kernels (cuDNN on GPUs); "scratch": charlm's own cells
    # AWD-LSTM-style regularisation (Merity et al., 2017, https://arxiv.org/abs/1708.02182), training only:
    weight_drop: float = 0.0  # DropConnect on each hidden-to-hidden matrix: one mask per batch, before the kernel
    dropout_input: float = 0.0  # locked dropout on the recurrent core's input: one mask per sequence, every step
    dropout_hidden: float = 0.0  # locked dropout between recurrent layers
    dropout_output: float = 0.0  # locked dropout on the last layer's output, before the head
    # The Mogrifier LSTM (Melis et al., 2019, https://arxiv.org/abs/1909.01792; charlm.models.mogrifier), "mogrifier"
    # cells only: before each LSTM step the input and the previous state gate each other for this many rounds,
    mogrify_rounds: int = 5
    mogrify_rank: int = 0  # each round's matrix a product of two of this rank; 0: full matrices

    def __post_init__(self):
        check_choice("cell", self.cell, CELLS)
        check_choice("impl", self.impl, IMPLS)
        if self.cell == "mogrifier":
            _check([(_is_int(self.mogrify_rounds, 1, MAX_MOGRIFY_ROUNDS),
                     f"mogrify-rounds must be an integer >= 1 and at most {MAX_MOGRIFY_ROUNDS:,}, "
                     f"got {self.mogrify_rounds!r}"),
                    (_is_int(self.mogrify_rank, 0, MAX_UNITS),
                     f"mogrify-rank must be an integer >= 0 (0 = full matrices) and at most {MAX_UNITS:,}, "
                     f"got {self.mogrify_rank!r}")])
        else:
            _check([(getattr(self, name) == _MOGRIFIER_DEFAULTS[name],
                     f"{name.replace('_', '-')} applies to the mogrifier cell only (cell {self.cell!r})")
                    for name in MOGRIFIER_FIELDS])
        _check([(_is_int(getattr(self, name), 1, high), f"{name} must be an integer >= 1 and at most {high:,}, "
                                                             f"got {getattr(self, name)!r}")
                for name, high in (("vocab_size", MAX_UNITS), ("hidden_size", MAX_UNITS), ("num_layers", MAX_LAYERS))])
        _check([(_is_int(self.embedding_dim, 0, MAX_UNITS),
                 f"embedding_dim must be an integer >= 0 (0 = one-hot) and at most {MAX_UNITS:,}, got "
                 f"{self.embedding_dim!r}"),
                (0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout!r}")])
        _check([(isinstance(getattr(self, name), (int, float)) and 0.0 <= getattr(self, name) < 1.0,
                 f"{name.replace('_', '-')} must lie in [0, 1), got {getattr(self, name)!r}") for name in REGULARISERS])
        if self.cell == "mogrifier" and self.mogrify_rank > mogrify_rank_limit(self):
            limit, inputs = mogrify_rank_limit(self), " or ".join(map(str, sorted(_layer_inputs(self))))
            raise ConfigError(f"mogrify-rank {self.mogrify_rank} saves no parameters: a pair of "
                              f"rank-{self.mogrify_rank} factors holds as many numbers as the matrix it stands for, "
                              f"or more, in every layer ({inputs} inputs x {self.hidden_size} units); pass "
                              + (f"a rank of at most {limit}, or 0 (full matrices)" if limit else "0 (full matrices)"))

    @property
    def regularised(self) -> bool:
        """Whether any AWD-style regulariser is on (training then runs the layers one at a time)."""
        return any(getattr(self, name) for name in REGULARISERS)

    @property
    def input_size(self) -> int:
        """What the first recurrent layer reads: the vocabulary (one-hot) or the embedding."""
        return self.embedding_dim or self.vocab_size

    def to_dict(self) -> dict:
        """The fields, less the regularisers that are off and the mogrifier's options of other cells: a
        checkpoint of a model without them is the file it was before they existed, which earlier charlm
        versions read (they refuse unknown fields)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if (k not in REGULARISERS or v) and (k not in MOGRIFIER_FIELDS or self.cell == "mogrifier")}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return _from_dict(cls, data)


_MOGRIFIER_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.name in MOGRIFIER_FIELDS}


def _layer_inputs(config: ModelConfig) -> set[int]:
    return {config.input_size} | ({config.hidden_size} if config.num_layers > 1 else set())


def mogrify_rank_limit(config: ModelConfig) -> int:
    """The largest ``mogrify_rank`` k whose factors save parameters in some layer of ``config``: a round's
    ``I x H`` matrix as ``I x k`` and ``k x H`` factors is smaller only while ``k (I + H) < I H`` (0: none does)."""
    H = config.hidden_size
    return max((i * H - 1) // (i + H) for i in _layer_inputs(config))


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``charlm train`` does. ``None`` means "chosen from the corpus, the budget or the optimizer":
    see :meth:`sized` (the model's size and regularisers), :meth:`resolved_dropout`,
    :meth:`resolved_weight_decay` and :meth:`resolved_lr`."""

    corpus: str  # path of the UTF-8 text file
    out: str | None = None  # run directory; None: checkpoints/<corpus stem>
    preprocess: str = "raw"  # raw | lower | letters (d2l's rule)
    max_chars: int | None = None  # train on the first characters of the training part only (d2l: 10,000)
    min_count: int = 1  # characters seen fewer times become <unk> (d2l's min_freq); 1 keeps every one
    # model
    cell: str = "lstm"  # on CPU torch's LSTM runs fused (oneDNN): more text per second than the GRU (README)
    impl: str = "torch"
    # None (these two and the four AWD regularisers below): sized from the training text and the budget (sized())
    hidden_size: int | None = None
    num_layers: int | None = None
    embedding_dim: int = 64  # a learned embedding instead of d2l's one-hot input
    mogrify_rounds: int = 5  # these two: cell "mogrifier" only (see ModelConfig)
    mogrify_rank: int = 0
    # Regularisation (explanation/defaults): AWD-LSTM's, lightly (AWD_LIGHT), or none where the budget reads the
    # text only a few times (sized()); plain dropout off. dropout None: the rule before these defaults
    # (0.5 for corpora under 500k characters, else 0.2), which runs saved then still resume with.
    dropout: float | None = 0.0
    weight_drop: float | None = None  # these four: see ModelConfig; None: sized()
    dropout_input: float | None = None
    dropout_hidden: float | None = None
    dropout_output: float | None = None
    # data
    batch_size: int = 32
    num_steps: int = 64  # truncated BPTT length
    sampling: str = "sequential"  # carry the state across batches: longer context for free
    val_fraction: float = 0.1  # the contiguous tail held out
    eval_chars: int | None = None  # held-out characters each periodic evaluation reads (always the tail's
    #   first ones: the same every time); None: about 3.5% of training time (resolved_eval_chars)
    # optimisation
    optimizer: str = "adam"
    lr: float | None = None  # None: 1.0 for SGD (d2l), 3e-3 for Adam
    clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    weight_decay: float | None = None  # decoupled decay of the weight matrices (AdamW's rule), not the biases;
    # None: by corpus size (resolved_weight_decay)
    lr_decay: float = 0.5  # plateau: multiply the lr by this after each evaluation without improvement; 1 = constant
    lr_schedule: str = "hold-decay"  # planned over the run's steps: hold-decay (held, then linear to 0 over the
    #   last 40%) or cosine (half a cosine to 0); or plateau (lr_decay on held-out plateaus)
    # stopping
    epochs: int = 20  # at most; with a planned schedule, the plan's length unless the time limit is shorter (README)
    max_steps: int | None = None
    time_limit: float | None = 600.0  # seconds of training
    eval_every: int = 100  # steps between held-out evaluations (and checkpoints)
    patience: int | None = PATIENCE_AUTO  # evaluations without improvement before stopping; None: never;
    #   PATIENCE_AUTO: 5 under the plateau schedule, never under a planned one (which ends the run itself)
    seed: int = 0
    device: str = "auto"
    dist_backend: str = "auto"  # under torchrun: the process group's backend
    dist_timeout: float = 300.0  # seconds a collective waits for a missing process before the run stops
    precision: str = "fp32"  # bf16/fp16: training steps under autocast (weights, optimizer, evaluation stay fp32)
    d2l: bool = False  # report training perplexity beside held-out perplexity (set by --d2l)
    # fine-tuning (charlm.finetune): start from this trained model (a run: its best/), its architecture, vocabulary
    # and preprocessing with its weights; new_chars: what becomes of the text's characters it lacks (NEW_CHARS)
    init_from: str | None = None
    new_chars: str = "extend"
    # weight averaging (AVERAGES): "ema" keeps an exponential moving average of the weights, updated after every
    # optimizer step taken: avg = decay * avg + (1 - decay) * weights (the first step's weights start it); held-out
    # evaluations read it and best/ holds it as the model, while last/ keeps the training weights to resume from
    average: str = "none"
    average_decay: float = 0.999  # average "ema" only: the share of the average kept at each step, in (0, 1)

    def __post_init__(self):
        check_choice("preprocessing", self.preprocess, PREPROCESS_MODES)
        _check([
            (self.sampling in SAMPLINGS, f"sampling must be one of {', '.join(SAMPLINGS)}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (_is_int(self.batch_size, 1), f"batch size must be an integer >= 1, got {self.batch_size}"),
            (_is_int(self.num_steps, 1), f"num steps must be an integer >= 1, got {self.num_steps}"),
            (self.lr is None or _is_real(self.lr, 0, MAX_LR, low_open=True),
             f"learning rate must be > 0 and at most {MAX_LR:g}, got {self.lr}"),
            (_is_real(self.clip, 0), f"clip must be a finite number >= 0 (0 = off), got {self.clip}"),
            (self.weight_decay is None or _is_real(self.weight_decay, 0),
             f"weight decay must be a finite number >= 0 (0 = off), got {self.weight_decay}"),
            (_is_real(self.lr_decay, 0, 1, low_open=True), f"lr decay must lie in (0, 1], got {self.lr_decay}"),
            (_is_int(self.epochs, 1), f"epochs must be an integer >= 1, got {self.epochs}"),
            (self.max_steps is None or _is_int(self.max_steps, 1),
             f"max steps must be an integer >= 1, got {self.max_steps}"),
            (self.time_limit is None or _is_real(self.time_limit, 0, low_open=True),
             f"time limit must be a finite number > 0 of seconds, got {self.time_limit}"),
            (_is_real(self.val_fraction, 0, 1, low_open=True) and self.val_fraction < 1,
             f"val fraction must lie in (0, 1), got {self.val_fraction}"),
            (_is_int(self.eval_every, 1), f"eval every must be an integer >= 1 step, got {self.eval_every}"),
            (self.patience in (None, PATIENCE_AUTO) or _is_int(self.patience, 1),
             f"patience must be an integer >= 1, got {self.patience}"),
            (self.max_chars is None or _is_int(self.max_chars, 1),
             f"max chars must be an integer >= 1, got {self.max_chars}"),
            (_is_int(self.min_count, 1), f"min count must be an integer >= 1, got {self.min_count}"),
            (self.eval_chars is None or _is_int(self.eval_chars, 2),
             f"eval chars must be an integer >= 2, got {self.eval_chars}"),
            (self.dist_backend in DIST_BACKENDS, f"dist backend must be one of {', '.join(DIST_BACKENDS)}"),
            (_is_real(self.dist_timeout, *DIST_TIMEOUT_RANGE),
             f"dist timeout must be from {DIST_TIMEOUT_RANGE[0]:g} to {DIST_TIMEOUT_RANGE[1]:,.0f} seconds (a week), "
             f"got {self.dist_timeout}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (seed_error(self.seed) is None, seed_error(self.seed)),
            (self.new_chars in NEW_CHARS, f"new chars must be one of {', '.join(NEW_CHARS)}, got {self.new_chars!r}"),
            (self.init_from or self.new_chars == "extend",
             f"new chars {self.new_chars!r} means something only when fine-tuning a trained model (init from)"),
            (self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
             f"init from must be a path, got {self.init_from!r}"),
            (self.average in AVERAGES, f"average must be one of {', '.join(AVERAGES)}, got {self.average!r}"),
            (_is_real(self.average_decay, 0, 1, low_open=True) and self.average_decay < 1,
             f"average decay must lie in (0, 1), got {self.average_decay!r}"),
            (self.average != "none" or self.average_decay == _AVERAGE_DECAY,
             f"average decay means something only with average 'ema' (average {self.average!r})"),
        ])
        self.model_config(PLACEHOLDER_VOCAB)  # validates the model options (sizes, dropout, cell, impl)

    def resolved_patience(self) -> int | None:
        if self.patience == PATIENCE_AUTO:
            return 5 if self.lr_schedule == "plateau" else None
        return self.patience

    def resolved_dropout(self, num_chars: int) -> float:
        if self.dropout is not None:
            return self.dropout
        return 0.5 if num_chars < SMALL_CORPUS_CHARS else 0.2

    def resolved_weight_decay(self, num_chars: int) -> float:
        """``weight_decay``, else by the training text's length: a small corpus is read for many epochs in
        the default budget and over-fits, and decay helps it; a big one is read a few times and decay
        only slows it down (README)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return SMALL_CORPUS_WEIGHT_DECAY if num_chars < SMALL_CORPUS_CHARS else 0.0

    def resolved_eval_chars(self, val_chars: int) -> int:
        """Held-out characters a periodic evaluation reads: ``eval_chars``, else an eighth of the characters
        trained on between two evaluations. Evaluating a character costs about a quarter to a third of
        training on one (forward only, wide batches), so this keeps evaluations near 3.5% of training
        time for any corpus and model; the Time Machine's whole tail (17k characters) is below it."""
        limit = self.eval_chars or max(EVAL_MIN_CHARS, self.eval_every * self.batch_size * self.num_steps // 8)
        return min(val_chars, limit)

    def resolved_lr(self) -> float:
        """``lr``, else the optimizer's default: from scratch (DEFAULT_LR), or fine-tuning a trained model
        (``init_from``: FINETUNE_LR, lower)."""
        if self.lr is not None:
            return self.lr
        return (FINETUNE_LR if self.init_from else DEFAULT_LR)[self.optimizer]

    def reads(self, train_chars: int) -> float:
        """Times the budget reads a training text of ``train_chars`` characters: the least of ``epochs``, of
        ``max_steps`` batches and of ``time_limit`` seconds at SIZING_CHARS_PER_S."""
        chars = [self.epochs * train_chars]
        if self.max_steps is not None:
            chars.append(self.max_steps * self.batch_size * self.num_steps)
        if self.time_limit is not None:
            chars.append(self.time_limit * SIZING_CHARS_PER_S)
        try:
            return min(chars) / max(1, train_chars)
        except OverflowError:  # (an --epochs past what a float holds)
            return math.inf

    def sized(self, train_chars: int) -> tuple["TrainConfig", str | None]:
        """This config with every SIZED_FIELDS field left at None chosen for a training text of ``train_chars``
        characters and the budget, and why (None when the user set them all). By the times the budget reads
        the text (:meth:`reads`):

        - under FEW_READS: SIZE_FEW_READS (short of steps, not of text: a smaller model takes more of them, and
          regularisation only slows it);
        - over MANY_READS, a text under SMALL_TEXT_CHARS: SIZE_SMALL_TEXT (short of text: a small model
          over-fits it less);
        - otherwise SIZE_MID_READS, *The Time Machine*'s model."""
        chosen, why = self._sizes(train_chars)
        if not chosen:
            return self, None
        what = []  # what the rule chose, and only that
        if "num_layers" in chosen and "hidden_size" in chosen:
            what.append(f"{chosen['num_layers']} x {chosen['hidden_size']}")
        else:
            what += [f"{name.replace('_', '-')} {chosen[name]}" for name in ("num_layers", "hidden_size")
                     if name in chosen]
        regs = [n for n in REGULARISERS if n in chosen]
        if len(regs) == len(REGULARISERS) and not any(chosen[n] for n in regs):
            what.append("no regularisers")
        else:
            what += [f"{n.replace('_', '-')} {chosen[n]:g}" for n in regs]
        return dataclasses.replace(self, **chosen), f"{', '.join(what)} ({why})"

    def _sizes(self, train_chars: int) -> tuple[dict, str]:
        """The values :meth:`sized` gives the fields left at None, and why."""
        unset = [name for name in SIZED_FIELDS if getattr(self, name) is None]
        if not unset:
            return {}, ""
        reads = self.reads(train_chars)
        times = _times(reads)
        if reads < FEW_READS and times == f"about {FEW_READS:g} times":  # (rounded onto a threshold it is not)
            times = f"just under {FEW_READS:g} times"
        elif reads > MANY_READS and times == f"about {MANY_READS:g} times":
            times = f"just over {MANY_READS:g} times"
        why = f"the budget reads the {train_chars:,} training characters {times}"
        if reads < FEW_READS:
            table, why = SIZE_FEW_READS, f"{why}, under {FEW_READS:g}"
        elif reads > MANY_READS and train_chars < SMALL_TEXT_CHARS:
            table, why = SIZE_SMALL_TEXT, f"{why}, over {MANY_READS:g}, and they are under {SMALL_TEXT_CHARS:,}"
        elif reads > MANY_READS:
            table, why = SIZE_MID_READS, f"{why}, over {MANY_READS:g}, but they are {SMALL_TEXT_CHARS:,} or more"
        else:
            table, why = SIZE_MID_READS, f"{why}, from {FEW_READS:g} to {MANY_READS:g}"
        return {name: table[name] for name in unset}, why

    def filled_from(self, saved: dict) -> "TrainConfig":
        """This config with every SIZED_FIELDS field left at None taken from a saved run's options (a resume)."""
        saved = with_legacy(saved)
        return dataclasses.replace(self, **{name: saved[name] for name in SIZED_FIELDS
                                            if getattr(self, name) is None and name in saved})

    def model_config(self, vocab_size: int, num_chars: int = 0) -> ModelConfig:
        """The model of this config for a vocabulary of ``vocab_size`` and a training text of ``num_chars``
        characters (sized by :meth:`sized` where fields are None; with ``num_chars`` 0, SIZE_MID_READS)."""
        chosen = (self._sizes(num_chars)[0] if num_chars else
                  {k: v for k, v in SIZE_MID_READS.items() if getattr(self, k) is None})
        size = {name: chosen.get(name, getattr(self, name)) for name in SIZED_FIELDS}
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, embedding_dim=self.embedding_dim,
                           dropout=self.resolved_dropout(num_chars), impl=self.impl, **size,
                           **{name: getattr(self, name) for name in MOGRIFIER_FIELDS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A saved run's config; a field it predates takes the value that applied then (LEGACY_TRAIN)."""
        return _from_dict(cls, with_legacy(data))


_AVERAGE_DECAY = next(f.default for f in fields(TrainConfig) if f.name == "average_decay")

# What a TrainConfig saved before a field existed meant by leaving it out (the defaults of that time),
# so that such a run resumes as it started and reads back as what it was.
LEGACY_TRAIN = {"weight_drop": 0.0, "dropout_input": 0.0, "dropout_hidden": 0.0, "dropout_output": 0.0,
                "lr_schedule": "plateau", "weight_decay": 0.0, "average": "none"}


def with_legacy(saved: dict) -> dict:
    """A saved TrainConfig's fields, with those it predates filled in as they were then (LEGACY_TRAIN)."""
    return {**{k: v for k, v in LEGACY_TRAIN.items() if k not in saved}, **saved}


# --d2l: the book's chapter (d2l.ai, "Recurrent Neural Networks" / "Gated Recurrent Units").
D2L_PRESET = dict(preprocess="letters", max_chars=10_000, cell="gru", impl="torch", hidden_size=256,
                  num_layers=1, embedding_dim=0, dropout=0.0, batch_size=32, num_steps=35,
                  sampling="sequential", optimizer="sgd", lr=1.0, clip=1.0, lr_decay=1.0, epochs=500,
                  time_limit=None, patience=None, eval_every=100, d2l=True, lr_schedule="plateau",
                  weight_drop=0.0, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, weight_decay=0.0)




@dataclass(frozen=True)
class SampleConfig:
    """How ``charlm generate`` and :func:`charlm.generate` continue a prefix."""

    length: int = 200  # characters added to the prefix
    temperature: float = 0.0  # 0: greedy (argmax); otherwise the logits are divided by it
    top_k: int | None = None  # sample among the k most probable characters only
    top_p: float | None = None  # sample from the smallest set holding this much probability (nucleus)
    seed: int | None = None  # the same seed gives the same text; None: a fresh one
    num_samples: int = 1  # continuations generated together as one batch (at most MAX_SAMPLES)

    def __post_init__(self):
        _check([
            (_is_number(self.temperature) and 0 <= self.temperature < float("inf"),
             f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"),
            (self.top_k is None or _is_int(self.top_k, 1), f"top-k must be an integer >= 1, got {self.top_k!r}"),
            (self.top_p is None or (_is_number(self.top_p) and 0 < self.top_p <= 1),
             f"top-p must lie in (0, 1], got {self.top_p!r}"),
            (_is_int(self.length, 0), f"length must be an integer >= 0, got {self.length!r}"),
            (_is_int(self.num_samples, 1, MAX_SAMPLES),
             f"num-samples must be an integer from 1 to {MAX_SAMPLES:,}, got {self.num_samples!r}"),
            (self.seed is None or seed_error(self.seed) is None, seed_error(self.seed)),
        ])
