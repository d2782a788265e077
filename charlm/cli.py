"""The ``charlm`` command. Only this module knows click.

Exit codes: 0 success; 1 an error while running (a one-line message: bad corpus, failed download,
corrupt checkpoint, ...); 2 bad usage or a bad option value; 130 interrupted (Ctrl-C).

The library raises :class:`~charlm.errors.CharlmError` for every problem a user can fix; ``_Group``
turns it into the one-line message and exit status 1, for every command, in one place. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import math
import shlex
import sys
from pathlib import Path

import click

import charlm
from charlm import corpus as corpus_mod
from charlm.config import (AVERAGES, CELLS, D2L_PRESET, DEVICE_CHOICES, DIST_BACKENDS, DIST_TIMEOUT_RANGE, DYNAMIC_PRIOR_CHARS,
                           DEFAULT_LR, DYNAMIC_COUNTS_CHARS, DYNAMIC_COUNTS_ORDER, DYNAMIC_RULE, DYNAMIC_RULES,
                           EVAL_BATCH_SIZE, FINETUNE_LR, IMPLS, INHERITED,
                           LR_SCHEDULES, MAX_LAYERS, MAX_LR, MAX_MOGRIFY_ROUNDS, MOGRIFIER_FIELDS, MAX_SAMPLES,
                           MAX_SECONDS, MAX_STREAM_INTERVAL, MAX_UNITS, NEW_CHARS, OPTIMIZERS, PRECISIONS,
                           PREPROCESS_MODES, REGULARISERS, SAMPLINGS, SEED_MAX, SMALL_CORPUS_CHARS,
                           SMALL_CORPUS_WEIGHT_DECAY, SampleConfig, TrainConfig, with_legacy)
from charlm.errors import (CharlmError, ConfigError, ProcessGroupError, TrainingInterrupted, UnknownCharactersError,
                           os_error_line)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "corpus"}
_SAMPLE = SampleConfig()
MAX_CLI_SAMPLES = 1024  # charlm generate --num-samples: more would be one batch too large to print, or to hold
_SIZED = "by the text and budget, see above"
_PREPROCESS_HELP = "raw: the text as is; lower: lower-cased; letters: d2l's rule (letters and spaces, lower case)."


class _FloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities (which every comparison of a range lets through)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return value


def _d(name):
    """A TrainConfig default, for click (defaults are defined once, in charlm.config)."""
    return _DEFAULTS[name]


def _corpus_notice(known, path) -> None:
    click.echo(f"{path} not found: downloading the {known.name} corpus ({known.size:,} bytes) there first.", err=True)


class _Group(click.Group):
    """Every command: a ``CharlmError`` is one line and exit status 1, and so is an ``OSError`` (a path too
    long, a permission refused: the file and the system's reason); Ctrl-C is one line and exit status 130
    (click alone says "Aborted!" and exits 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CharlmError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # the machine's answer about a path (too long, no permission, I/O): not a bug of charlm's
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{os_error_line(exc)}") from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(charlm.__version__, "--version", prog_name="charlm")
def main() -> None:
    """Train character-level RNN/GRU/LSTM language models, generate text and measure perplexity."""


def run() -> None:
    """The ``charlm`` program (``main`` run as a process, as the console script and ``python -m charlm``).

    At exit, Python's last garbage collection walks every object the imports made, torch's
    included, for memory the OS frees anyway (the README's generation benchmark says how long). Freezing
    them from an atexit handler skips that walk; other atexit handlers and the flushing of stdout
    and stderr still run.
    """
    atexit.register(gc.freeze)
    main(prog_name="charlm")


@main.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="corpora",
              help="Directory to write NAME.txt into.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(name: str, directory: str, quiet: bool) -> None:
    """Download a known corpus (checksum-verified) into --dir.

    NAME is one of: timemachine, tinyshakespeare. CHARLM_CORPUS_MIRROR (a directory or a base URL) is tried
    before the official URL.
    """
    path = corpus_mod.download(name, directory, progress=not quiet)
    known = corpus_mod.KNOWN_CORPORA[name]
    click.echo(f"{path}  ({known.size:,} bytes, sha256 verified) - {known.licence}")


_MIN_COUNT_HELP = "Characters seen fewer times than this become <unk> (never generated); 1 keeps every character."


class _PrepareBar:
    """A bytes progress bar for a corpus being streamed into the token cache; shown only if that happens."""

    def __init__(self, corpus, quiet: bool):
        self.corpus, self.quiet, self.bar = corpus, quiet, None

    def __call__(self, nbytes: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            from charlm.corpus import source_files

            total = sum(f.stat().st_size for f in source_files(self.corpus))
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="preparing", leave=False, disable=self.quiet)
        self.bar.update(nbytes)
        if self.bar.n >= self.bar.total:  # read whole: gone before the training bar takes its line
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _prepare(corpus: str, preprocess: str, min_count: int, quiet: bool):
    """The corpus from the token cache, downloaded and prepared first (with progress bars) when needed;
    and the seconds the preparation took (the download excluded)."""
    import time

    from charlm.tokens import prepare

    path = corpus_mod.ensure_corpus(corpus, progress=not quiet, on_download=_corpus_notice)
    bar = _PrepareBar(path, quiet)
    t0 = time.perf_counter()
    try:
        return prepare(path, preprocess, min_count, progress=bar), time.perf_counter() - t0
    finally:
        bar.close()


@main.command()
@click.argument("corpus", type=click.Path())
@click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=_d("preprocess"), help=_PREPROCESS_HELP)
@click.option("--min-count", type=click.IntRange(min=1), default=_d("min_count"), help=_MIN_COUNT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(corpus: str, preprocess: str, min_count: int, quiet: bool) -> None:
    """Stream CORPUS once into the token cache (train and eval do this by themselves when needed).

    \b
    CORPUS is a UTF-8 text file, or a directory: every *.txt file under it, in sorted path order,
    each followed by a newline. The cache is $CHARLM_CACHE_DIR, else ~/.cache/charlm; a changed
    source is prepared again.
    """
    prepared, seconds = _prepare(corpus, preprocess, min_count, quiet)
    meta = prepared.meta
    rate = "cached" if prepared.hit else f"{meta['size'] / 1e6 / max(seconds, 1e-9):,.1f} MB/s"
    click.echo(f"{meta['tokens']:,} tokens, {meta['vocab_size']:,} symbols (with <unk>), {meta['dtype']}, "
               f"{rate}: {prepared.path}")


@main.command()
@click.argument("corpus", type=click.Path())
@click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=_d("preprocess"), help=_PREPROCESS_HELP)
@click.option("--min-count", type=click.IntRange(min=1), default=_d("min_count"), help=_MIN_COUNT_HELP)
def stats(corpus: str, preprocess: str, min_count: int) -> None:
    """Print a corpus's size and vocabulary after preprocessing (it is prepared into the token cache).

    A missing CORPUS whose file stem names a known corpus (corpora/timemachine.txt) is downloaded first.
    """
    prepared, _ = _prepare(corpus, preprocess, min_count, quiet=True)
    vocab = prepared.vocab
    sample = "".join(vocab.itos[1:41])
    click.echo(f"{corpus}: {len(prepared.ids):,} characters, {len(vocab)} symbols (with <unk>), "
               f"preprocess={preprocess}")
    click.echo(f"most frequent: {sample!r}")


@main.command()
@click.argument("corpus", type=click.Path())
@click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=_d("preprocess"), help=_PREPROCESS_HELP)
@click.option("--min-count", type=click.IntRange(min=1), default=_d("min_count"), help=_MIN_COUNT_HELP)
@click.option("--cell", type=click.Choice(CELLS), default=_d("cell"),
              help="Recurrent cell: rnn (tanh), gru, lstm, or mogrifier (an LSTM whose input and state gate each "
                   "other first: --mogrify-rounds).")
@click.option("--impl", type=click.Choice(IMPLS), default=_d("impl"),
              help="torch: PyTorch's kernels (cuDNN on GPUs; the mogrifier's fast form); scratch: charlm's own "
                   "cells (same weights).")
@click.option("--hidden-size", type=click.IntRange(1, MAX_UNITS), default=_d("hidden_size"), show_default=_SIZED,
              help="Units per recurrent layer (at most 2**31 - 1, the dimensions torch's kernels take).")
@click.option("--num-layers", type=click.IntRange(1, MAX_LAYERS), default=_d("num_layers"), show_default=_SIZED,
              help="Stacked recurrent layers.")
@click.option("--embedding-dim", type=click.IntRange(0, MAX_UNITS), default=_d("embedding_dim"),
              help="Size of the learned character embedding; 0 = one-hot inputs, as in d2l.")
@click.option("--mogrify-rounds", type=click.IntRange(1, MAX_MOGRIFY_ROUNDS), default=_d("mogrify_rounds"),
              help="--cell mogrifier: rounds in which the input and the previous state gate each other before "
                   "each step (Melis et al., 2019).")
@click.option("--mogrify-rank", type=click.IntRange(0, MAX_UNITS), default=_d("mogrify_rank"),
              help="--cell mogrifier: each round's matrix a product of two of this rank (fewer parameters: a rank "
                   "that saves none is refused); 0 = full matrices.")
@click.option("--dropout", type=_FloatRange(0, 1, max_open=True), default=_d("dropout"),
              help="Dropout between layers and before the output layer (the locked dropouts below replace it "
                   "by default).")
@click.option("--weight-drop", type=_FloatRange(0, 1, max_open=True), default=_d("weight_drop"), show_default=_SIZED,
              help="DropConnect on each hidden-to-hidden matrix (AWD-LSTM): one mask per batch, training only.")
@click.option("--dropout-input", type=_FloatRange(0, 1, max_open=True), default=_d("dropout_input"), show_default=_SIZED,
              help="Locked dropout on the recurrent core's input: one mask per sequence, the same at every step.")
@click.option("--dropout-hidden", type=_FloatRange(0, 1, max_open=True), default=_d("dropout_hidden"), show_default=_SIZED,
              help="Locked dropout between recurrent layers.")
@click.option("--dropout-output", type=_FloatRange(0, 1, max_open=True), default=_d("dropout_output"), show_default=_SIZED,
              help="Locked dropout on the last recurrent layer's output, before the output layer.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_d("batch_size"), help="Sequences per batch (B).")
@click.option("--num-steps", type=click.IntRange(min=1), default=_d("num_steps"),
              help="Characters per sequence (T): the truncated-BPTT length.")
@click.option("--sampling", type=click.Choice(SAMPLINGS), default=_d("sampling"),
              help="random: shuffled windows, fresh state each batch; sequential: state carried across batches.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=_d("optimizer"), help="SGD (d2l) or Adam.")
@click.option("--lr", type=_FloatRange(0, MAX_LR, min_open=True), default=None,
              show_default=", ".join(f"{DEFAULT_LR[o]:g} for {o}" for o in OPTIMIZERS) + "; with --init-from "
                           + ", ".join(f"{FINETUNE_LR[o]:g} for {o}" for o in OPTIMIZERS),
              help="Learning rate (at most 1e30: float32 holds it through Adam's first steps).")
@click.option("--clip", type=_FloatRange(min=0), default=_d("clip"),
              help="Clip the global gradient L2 norm to this; 0 = no clipping.")
@click.option("--weight-decay", type=_FloatRange(min=0), default=None,
              show_default=f"{SMALL_CORPUS_WEIGHT_DECAY:g} for a training text under {SMALL_CORPUS_CHARS:,} "
                           f"characters, else 0",
              help="Shrink each weight matrix (not the biases) by lr x this each step, apart from the gradient "
                   "(AdamW under adam; the same rule under sgd); 0 = off.")
@click.option("--lr-decay", type=_FloatRange(0, 1, min_open=True), default=_d("lr_decay"),
              help="plateau schedule: multiply the learning rate by this after each evaluation without improvement; "
                   "1 = constant.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=_d("lr_schedule"),
              help="plateau: --lr-decay after each evaluation without improvement; hold-decay: held for 60% of "
                   "the planned steps, then linear to 0; cosine: half a cosine to 0. A planned schedule takes its "
                   "length from --max-steps or --epochs; under --time-limit it is fitted to the step time as the run "
                   "goes (shorter while the steps run slow, grown back, never past that length, when they run fast "
                   "again); the plan and that length are saved, so a resume follows them, and the run stops at its "
                   "end.")
@click.option("--average", type=click.Choice(AVERAGES), default=_d("average"),
              help="ema: keep an exponential moving average of the weights, updated after every step taken; held-out "
                   "evaluations read it and best/ saves it as the model (last/ keeps the training weights, with "
                   "the average, to resume from); none: the training weights themselves.")
@click.option("--average-decay", type=_FloatRange(0, 1, min_open=True, max_open=True), default=_d("average_decay"),
              help="--average ema: the share of the average kept at each step (the rest is the new weights'), "
                   "after a warm-up: after n updates, (1 + n) / (10 + n) while that is lower (at 0.999, for "
                   "the first 8,990), so that about the last tenth of the steps weigh in, then 1 / (1 - decay).")
@click.option("--epochs", type=click.IntRange(min=1), default=_d("epochs"), help="Passes over the training text (at most).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps in all.")
@click.option("--time-limit", type=_FloatRange(min=0), default=_d("time_limit"),
              help="Stop after this many seconds of training; 0 = no limit.")
@click.option("--val-fraction", type=_FloatRange(0, 1, min_open=True, max_open=True), default=_d("val_fraction"),
              help="Fraction of the text, from its end, held out for evaluation.")
@click.option("--eval-every", type=click.IntRange(min=1), default=_d("eval_every"),
              help="Steps between held-out evaluations (each saves last/, and best/ when better).")
@click.option("--eval-chars", type=click.IntRange(min=2), default=None,
              show_default="an eighth of the characters trained on between evaluations, at least 20,000",
              help="Held-out characters each periodic evaluation reads (the tail's first ones, the same every "
                   "time); the final figure reads the whole tail.")
@click.option("--patience", type=click.IntRange(min=0), default=None,
              show_default="5 under --lr-schedule plateau, else never: a planned schedule ends the run",
              help="Stop after this many evaluations without improvement; 0 = never.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=_d("seed"),
              help="Seed for initialisation, data order and dropout (0 to 2**63 - 1).")
@click.option("--device", default=_d("device"), help=f"{DEVICE_CHOICES}; under torchrun, cuda means cuda:LOCAL_RANK.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_d("precision"),
              help="Training steps in fp32, or under autocast: bf16 (CUDA GPUs that support it, CPUs) or fp16 "
                   "(CUDA GPUs, with loss scaling); auto: bf16 where the device has native bf16 (tried first), "
                   "else fp32. Weights, optimizer state and held-out evaluation stay fp32.")
@click.option("--dist-backend", type=click.Choice(DIST_BACKENDS), default=_d("dist_backend"),
              help="Under torchrun: the process group's backend (auto: nccl with CUDA, gloo otherwise).")
@click.option("--dist-timeout", type=_FloatRange(*DIST_TIMEOUT_RANGE), default=_d("dist_timeout"),
              help="Under torchrun: seconds a process waits for another that stopped answering before the run "
                   "stops (torchrun notices one that exits within a second); at most a week.")
@click.option("--out", type=click.Path(file_okay=False), default=None, show_default="checkpoints/<corpus stem>",
              help="Run directory.")
@click.option("--init-from", type=click.Path(), default=None,
              help="Start from this trained model (a run, meaning its best/, or a checkpoint): its architecture, "
                   "vocabulary, preprocessing and weights; the optimizer, schedule and --out are new. "
                   "--cell, --impl, --hidden-size, --num-layers, --embedding-dim, --mogrify-rounds, "
                   "--mogrify-rank, --preprocess and --min-count come from it and cannot be given; the "
                   "fine-tuning defaults apply where no option is given.")
@click.option("--new-chars", type=click.Choice(NEW_CHARS), default=_d("new_chars"),
              help="With --init-from, the text's characters the model does not know: extend adds them to its "
                   "vocabulary (learned from this text; the model's other predictions start unchanged), unk reads "
                   "them as <unk>, error stops and names them.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last/ checkpoint, exactly.")
@click.option("--overwrite", is_flag=True, help="Delete the run in --out and start over.")
@click.option("--d2l", is_flag=True,
              help="The d2l book's recipe: letters, first 10,000 chars, one-hot GRU 256, batch 32 x 35, "
                   "SGD lr 1, clip 1, 500 epochs. Explicit options override it.")
@click.option("--tensorboard", "tensorboard", type=click.Path(file_okay=False), default=None,
              help="Also write TensorBoard events (training loss, held-out bits/char, lr, throughput) into "
                   "DIR/<run folder's name>-<8 hex digits of its path> (the tensorboard extra); view them with "
                   "tensorboard --logdir DIR. DIR may not lie inside a run folder.")
@click.option("--quiet", is_flag=True, help="No progress bar; only the summary line.")
@click.pass_context
def train(ctx, corpus, resume, overwrite, d2l, quiet, tensorboard, **options):
    """Train a character-level language model on CORPUS.

    \b
    CORPUS is a UTF-8 text file, or a directory: every *.txt file under it, in sorted path order,
    each followed by a newline. It is streamed once into the token cache (see charlm prepare).
    A missing CORPUS whose file stem names a known corpus (corpora/timemachine.txt) is downloaded
    first. The run directory gets last/ and best/ checkpoints, metrics.csv and curve.png.

    \b
    The options not given of --hidden-size, --num-layers and the four AWD regularisers are sized
    by the training text's length and the times the budget reads it (the least of --epochs,
    --max-steps batches, and --time-limit at 10,000 characters a second); the run's first line
    and charlm info say what was chosen and why:
      read under 2 times: 2 x 192, no regularisers;
      a text under 75,000 characters read over 30 times: 1 x 128, regularised as below;
      otherwise: 2 x 320, --weight-drop 0.25 --dropout-input 0.05
        --dropout-hidden 0.15 --dropout-output 0.25.
    """
    from charlm.rundir import default_out, saved_train_options
    from charlm.training import train as run_training

    # What the user typed wins over the preset, which wins over a resumed run's settings.
    explicit = {k: v for k, v in options.items()
                if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)}
    if options["init_from"] is not None:
        _check_init_from(explicit, resume, d2l)
    elif "new_chars" in explicit and not resume:
        raise click.UsageError("--new-chars applies to a run that starts from a trained model: pass --init-from")
    values = dict(_DEFAULTS)
    out = options["out"] or str(default_out(corpus))
    if resume:
        saved = saved_train_options(out)
        if saved:  # fields the saved run predates: what they meant then
            saved = with_legacy(saved)
        values.update({k: v for k, v in saved.items() if k in _DEFAULTS})
    if d2l:
        values.update(D2L_PRESET)
    values.update(explicit)
    values.update(corpus=corpus, out=out)
    if values.get("cell") != "mogrifier":  # (a resumed mogrifier's rounds with another --cell: the resume says so)
        for name in MOGRIFIER_FIELDS:  # (given even at its default value: it means nothing to another cell)
            if name in explicit:
                raise ConfigError(f"{name.replace('_', '-')} applies to the mogrifier cell only "
                                  f"(cell {values.get('cell')!r})")
        values.update({name: _DEFAULTS[name] for name in MOGRIFIER_FIELDS if name in _DEFAULTS})
    if values.get("average") == "none":  # (a resumed average's decay with --average none: the resume says so)
        if "average_decay" in explicit:  # (given even at its default value: it means nothing without averaging)
            raise ConfigError(f"average-decay applies to --average ema only (average {values.get('average')!r})")
        values["average_decay"] = _DEFAULTS["average_decay"]
    if values.get("time_limit") == 0:
        values["time_limit"] = None
    if values.get("patience") == 0:
        values["patience"] = None
    cfg = TrainConfig(**values)
    from charlm.distributed import from_env

    main_rank = from_env().is_main  # under torchrun only rank 0 speaks; the others exit with its status
    log_dir = None
    if tensorboard is not None and main_rank:  # (checked before anything is written: the corpus, the run)
        from charlm.board import check_available, check_log_dir, run_name

        check_available()
        log_dir = check_log_dir(tensorboard, run_name(out), outputs=(out,))
    if main_rank:
        corpus_mod.ensure_corpus(corpus, progress=not quiet, on_download=_corpus_notice)

    progress, prepare_bar = _TrainProgress(quiet, speak=main_rank), _PrepareBar(corpus, quiet or not main_rank)
    callback, board = progress, None
    if log_dir is not None:
        from charlm.board import TensorBoardLog

        board = TensorBoardLog(log_dir)
        callback = _both(progress, board)
    try:
        result = run_training(cfg, resume=resume, overwrite=overwrite, callback=callback,
                              prepare_progress=prepare_bar)
    except TrainingInterrupted as exc:
        if not main_rank:
            sys.exit(130)
        progress.close()
        _draw_curve(exc.result.out)
        if exc.complete:  # the run had ended; the signal cut its final figure only
            click.echo(f"Interrupted during the final evaluation ({exc}); the run itself is complete "
                       f"({exc.result.stop_reason}); charlm eval {exc.result.out} gives its held-out figure", err=True)
        else:
            click.echo(f"Interrupted ({exc}); saved {exc.result.out / 'last'}. Resume with: "
                       f"charlm train {corpus} --out {exc.result.out} --resume", err=True)
        sys.exit(130)
    except CharlmError as exc:
        if not main_rank:  # rank 0 says why; a lost process group, which rank 0 may not live to report, each rank
            if isinstance(exc, ProcessGroupError):
                click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        raise
    finally:
        prepare_bar.close()
        progress.close()
        if board is not None:
            board.close()
    if not main_rank:
        return
    result.save_s += _draw_curve(result.out)  # the summary's "saving": checkpoints and curve.png
    click.echo(_summary(result, cfg))


def _check_init_from(explicit: dict, resume: bool, d2l: bool) -> None:
    """--init-from takes the architecture and the reading of text from the parent: those options are refused."""
    given = [f"--{name.replace('_', '-')}" for name in INHERITED if name in explicit]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be given with --init-from: the architecture, vocabulary "
                               f"and preprocessing come from the model it starts from")
    if d2l:
        raise click.UsageError("--d2l sets an architecture; --init-from takes the model's own")
    if resume:
        raise click.UsageError("--resume continues the run in --out from its last/; --init-from starts a new run "
                               "(a fine-tuning run resumes with --resume alone)")


def _both(*callbacks):
    """One training callback that calls each of ``callbacks`` in turn."""
    def callback(event, info):
        for c in callbacks:
            c(event, info)

    return callback


def _draw_curve(out: Path) -> float:
    """``curve.png`` beside ``metrics.csv``, when matplotlib is installed (the ``plot`` extra); seconds taken."""
    import time

    from charlm.rundir import RunDir

    t0 = time.perf_counter()
    run = RunDir(out)
    if not run.metrics.exists():
        return 0.0
    try:
        from charlm.plot import plot_curve
    except ImportError:
        return 0.0
    plot_curve(run.metrics, run.curve)
    return time.perf_counter() - t0


def _summary(result, cfg) -> str:
    best = result.best
    final = f" ({result.final_eval_s:.1f}s of it for the final figure)" if result.final_eval_s else ""
    parts = [f"{result.steps:,} steps ({result.epochs_done:.1f} epochs) in {result.elapsed_s:.0f}s (held-out "
             f"evaluation {result.eval_s:.1f}s{final}, saving {result.save_s:.1f}s), {result.stop_reason}"]
    if best is not None:
        scope = ""
        if result.eval_chars < result.val_chars:  # periodic evaluations read the tail's first part only
            scope = (f" on all {result.val_chars:,} held-out characters" if best.tokens >= result.val_chars - 64 else
                     f" on the first {best.tokens:,} of {result.val_chars:,} held-out characters (no time left "
                     f"for all: charlm eval {result.out} reads them all)")
        parts.append(f"best held-out {best.bits_per_char:.3f} bits/char, perplexity {best.perplexity:.2f}{scope}")
    if cfg.d2l and result.train_loss is not None:
        parts.append(f"training perplexity {math.exp(result.train_loss):.2f}")
    parts.append(f"precision {result.precision}" + (" (auto)" if cfg.precision == "auto" else ""))
    parts.append(f"checkpoint: {result.out / 'best'}")
    return "; ".join(parts)


class _TrainProgress:
    """A tqdm bar fed by the training callback."""

    def __init__(self, quiet: bool, speak: bool = True):
        self.quiet, self.speak, self.bar, self.val_bpc = quiet, speak, None, None

    def __call__(self, event, info):
        if not self.speak or (self.quiet and event != "warning"):  # warnings print even with --quiet
            return
        from tqdm.auto import tqdm

        if event == "start":
            self.bar = tqdm(total=info["total_steps"], initial=info["step"], unit="step", dynamic_ncols=True,
                            desc=f"{info['model_config'].cell} {info['model_config'].hidden_size}")
            where = f"device {info['device']}"
            if info.get("precision", "fp32") != "fp32":
                where += f" ({info['precision']} autocast)"
            if info.get("world_size", 1) > 1:
                where += f" x {info['world_size']} processes"
            if info.get("weight_decay"):
                where += f", weight decay {info['weight_decay']:g}"
            if info.get("sizing") and not info["resumed"]:
                tqdm.write(f"sized for the text and the budget: {info['sizing']}; options given win "
                           f"(charlm train --help)", file=sys.stderr)
            tqdm.write(f"{'resuming' if info['resumed'] else 'training'} {info['model'].num_parameters():,}-parameter "
                       f"{info['model_config'].cell.upper()} on {info['train_chars']:,} characters "
                       f"({info['val_chars']:,} held out, {len(info['vocab'])} symbols), {where}, "
                       f"into {info['out']}", file=sys.stderr)
            lineage = info.get("lineage")
            if lineage and not info["resumed"]:
                tqdm.write(_started_from(lineage, info.get("new_chars") or ()), file=sys.stderr)
        elif event == "step" and self.bar is not None:
            self.bar.update(info["step"] - self.bar.n)
            if info["interval_steps"]:
                loss = info["loss_sum"].item() / info["interval_steps"]
                post = {"loss": f"{loss:.3f}", "tok/s": f"{info['tokens'] / max(info['elapsed'], 1e-9):,.0f}"}
                if self.val_bpc is not None:
                    post["val_bpc"] = f"{self.val_bpc:.3f}"
                self.bar.set_postfix(post, refresh=False)
        elif event == "warning":
            tqdm.write(f"Warning: {info['message']}", file=sys.stderr)
        elif event == "eval" and self.bar is not None:
            self.val_bpc = info["val_bpc"]
            self.bar.update(info["step"] - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _started_from(lineage: dict, new_chars) -> str:
    """The start line's second line for a fine-tuning run: its parent, and what became of the new characters."""
    figure = lineage.get("held_out_bits_per_char")
    line = (f"starting from {lineage['parent']} (step {lineage.get('step', '?')}"
            + (f", {figure:.4f} bits/char held out" if isinstance(figure, (int, float)) else "") + ")")
    if new_chars:
        shown = ", ".join(f"{c!r} x {n:,}" for c, n in new_chars[:5]) + (" ..." if len(new_chars) > 5 else "")
        what = {"extend": "added to its vocabulary", "unk": "read as <unk>"}.get(lineage.get("new_chars"), "")
        line += f"; {len(new_chars)} character(s) it did not know {what}: {shown}"
    return line


_PRUNERS = ("hyperband", "halving", "median", "none")  # charlm.tune.PRUNERS (not imported: optuna loads late)


@main.command()
@click.argument("corpus", type=click.Path())
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Finished trials (complete or pruned) the study should hold in all, across resumes and workers; "
                   "with --time-budget, whichever ends first.")
@click.option("--time-budget", type=_FloatRange(0, MAX_SECONDS, min_open=True), default=None,
              help="Seconds this invocation searches, --final-time included (a resumed search gets a new budget).")
@click.option("--trial-steps", type=click.IntRange(min=1), default=None,
              help="Each trial's training steps: its command line then reproduces it to the bit.")
@click.option("--trial-time", type=_FloatRange(0, MAX_SECONDS, min_open=True), default=None,
              show_default="without --trial-steps: a tenth of --time-budget, else 60",
              help="Each trial's seconds of training.")
@click.option("--final-time", type=_FloatRange(0, MAX_SECONDS, min_open=True), default=None,
              help="After the search, train the best configuration for this many seconds into OUT/final (out of "
                   "--time-budget).")
@click.option("--space", "space", multiple=True, metavar="NAME=SPEC",
              help="Narrow, widen or fix one dimension of the search space: NAME=LOW:HIGH, NAME=LOW:HIGH:log, "
                   "NAME=A,B,... or NAME=VALUE; repeat for several. NAME is a charlm train option (hidden_size, "
                   "cell, lr, ...); --show-space prints the space.")
@click.option("--pruner", type=click.Choice(_PRUNERS), default=None, show_default="hyperband, or a resumed study's",
              help="What stops the trials that fall behind, at their evaluations: Optuna's Hyperband, successive "
                   "halving, the median rule, or none.")
@click.option("--out", type=click.Path(file_okay=False), default=None, show_default="tunes/<corpus stem>",
              help="The tune folder: the study's journal, a run folder per trial (trials/NNNN), the results.")
@click.option("--resume", is_flag=True,
              help="Continue the search in --out; a trial stopped by Ctrl-C or a kill runs again from its start.")
@click.option("--overwrite", is_flag=True, help="Delete the search in --out and start over.")
@click.option("--storage", default=None, envvar="CHARLM_TUNE_STORAGE", show_envvar=True,
              show_default="OUT/study.journal",
              help="A database URL Optuna takes, e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/DB: tune "
                   "processes on several machines share its study, each with its own --out. sqlite:///FILE is "
                   "for one process only.")
@click.option("--study", default=None, show_default="the corpus's file stem",
              help="The study's name in the storage: 1 to 100 letters, digits, '.', '_', '+' or '-', the first a "
                   "letter or digit.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Also write TensorBoard events of each trial into DIR/<study>-<8 hex digits of --out's "
                   "path>/trial-NNNN (and of the final run into .../final): the tensorboard extra. DIR may not lie "
                   "inside the tune folder or another charlm folder.")
@click.option("--preprocess", type=click.Choice(PREPROCESS_MODES), default=None,
              show_default="raw, or a resumed study's", help=_PREPROCESS_HELP)
@click.option("--min-count", type=click.IntRange(min=1), default=None, show_default="1, or a resumed study's",
              help=_MIN_COUNT_HELP)
@click.option("--val-fraction", type=_FloatRange(0, 1, min_open=True, max_open=True), default=None,
              show_default="0.1, or a resumed study's",
              help="Fraction of the text, from its end, held out: what the trials are compared on.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None, show_default="0, or a resumed study's",
              help="Every trial's training seed, and the sampler's (with the journal).")
@click.option("--device", default="auto", help=f"Where the trials train: {DEVICE_CHOICES}.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", help="The trials' training precision.")
@click.option("--show-space", is_flag=True,
              help="Print the search space sized for CORPUS and the trial budget (with --space applied) and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar; only the summary.")
@click.pass_context
def tune(ctx, corpus, trials, time_budget, trial_steps, trial_time, final_time, space, pruner, out, resume, overwrite,
         storage, study, tensorboard, preprocess, min_count, val_fraction, seed, device, precision, show_space,
         quiet):
    """Search hyperparameters for CORPUS with Optuna: each trial a charlm training run.

    \b
    Each trial trains for --trial-steps or --trial-time and reports its held-out bits/char at each of its
    ten evaluations; the pruner stops the trials that fall behind. The search stops after --trials
    finished trials or --time-budget seconds, and writes into --out: trials.csv, the best trial's charlm
    train command (best-command.txt, printed), its run folder (trials/NNNN) and the plots.
    A stopped search goes on with --resume. Needs the tune extra.
    """
    try:
        from charlm import tune as tune_mod
    except ModuleNotFoundError as exc:  # (charlm.tune imports optuna late; this is torch or the like)
        raise click.ClickException(f"charlm tune: {exc.name} is missing") from None
    try:
        overrides = tune_mod.parse_space(space)
    except CharlmError as exc:
        raise click.UsageError(str(exc)) from None
    if show_space:
        from charlm.data import load_split

        corpus_mod.ensure_corpus(corpus, progress=not quiet, on_download=_corpus_notice)
        data = load_split(corpus, preprocess or "raw", val_fraction or 0.1, None, min_count or 1)
        seconds = None if trial_steps else (trial_time or tune_mod.default_trial_time(
            None if time_budget is None else time_budget - (final_time or 0)))
        sized = tune_mod.sized_space(len(data.train_ids), trial_steps, seconds, overrides)
        tune_mod.check_space(sized, len(data.train_ids), corpus)
        budget = f"{trial_steps:,} steps" if trial_steps else f"{seconds:g}s"
        click.echo(f"search space for {corpus} ({len(data.train_ids):,} training characters, {budget} per trial):")
        click.echo("\n".join(f"  --space {d.describe()}" + ("  (fixed)" if d.fixed else "") for d in sized.values()))
        return
    from_env = ctx.get_parameter_source("storage") == click.core.ParameterSource.ENVIRONMENT
    storage_from = tune_mod.STORAGE_ENV if from_env else "--storage"
    try:
        cfg = tune_mod.TuneConfig(corpus=corpus, out=out, trials=trials, time_budget=time_budget,
                                  trial_steps=trial_steps, trial_time=trial_time, final_time=final_time,
                                  space=tuple(space), pruner=pruner, storage=storage, study=study,
                                  tensorboard=tensorboard, preprocess=preprocess, min_count=min_count,
                                  val_fraction=val_fraction, seed=seed, device=device, precision=precision,
                                  storage_from=storage_from)
    except CharlmError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        import optuna
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"charlm tune needs the tune extra ({exc.name} is missing): "
                                   f"pip install 'charlm-rnn[tune]'") from None
    corpus_mod.ensure_corpus(corpus, progress=not quiet, on_download=_corpus_notice)
    import signal

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress lines and the summary say what happens
    signal.signal(signal.SIGTERM, _interrupt)  # between trials too (a trial's training handles its own)
    progress = _TuneProgress(quiet, time_budget)
    try:
        result = tune_mod.tune(cfg, resume=resume, overwrite=overwrite, callback=progress,
                               train_callback=progress.train_event)
    except CharlmError as exc:
        progress.close()
        if not hasattr(exc, "result"):
            raise
        click.echo(_tune_summary(exc.result), err=True)
        click.echo(f"Interrupted: {exc}. Resume with: {_resume_command(cfg, exc.result.out)}", err=True)
        sys.exit(130)
    finally:
        progress.close()
    click.echo(_tune_summary(result))
    click.echo(f"The best trial as a charlm train command (also in {result.out / 'best-command.txt'}):")
    click.echo(result.command)
    if result.final is not None:
        click.echo(f"Final run ({result.out / 'final-command.txt'}): {_summary(result.final, result.final_config)}")


def _resume_command(cfg, out) -> str:
    """The command that continues an interrupted search, as it can be run: the options that say which search
    and how to go on; the storage as it was given (CHARLM_TUNE_STORAGE named, never a password printed)."""
    words = ["charlm", "tune", str(cfg.corpus), "--out", str(out), "--resume"]
    device, precision = (None if cfg.device == "auto" else cfg.device), (None if cfg.precision == "fp32" else
                                                                          cfg.precision)
    for option, value in (("--trials", cfg.trials), ("--time-budget", cfg.time_budget),
                          ("--final-time", cfg.final_time), ("--study", cfg.study), ("--tensorboard", cfg.tensorboard),
                          ("--device", device), ("--precision", precision)):
        if value is not None:
            words.append(f"{option}={value:g}" if isinstance(value, float) else f"{option}={value}")
    note = ""
    if cfg.storage is not None and cfg.storage_from != "--storage":
        note = f" (with {cfg.storage_from} set as now)"
    elif cfg.storage is not None:
        from charlm.tune import STORAGE_ENV, has_password

        if has_password(cfg.storage):
            note = (f" (and the --storage URL given, whose password is not printed here; or set {STORAGE_ENV} to "
                    f"it)")
        else:
            words.append(f"--storage={cfg.storage}")
    return shlex.join(words) + note


def _tune_summary(result) -> str:
    import socket

    parts = [f"study {result.study}: {result.complete} complete, {result.pruned} pruned, {result.failed} failed "
             f"trials ({result.stop_reason}; {len(result.timings)} run now in {result.elapsed_s:.0f}s)"]
    if result.best_number is not None:
        where = f"{result.best_run}/best"
        if result.best_host and result.best_host != socket.gethostname():
            where = f"{result.best_host}:{where}"
        parts.append(f"best: trial {result.best_number}, {result.best_value:.4f} bits/char held out; checkpoint: "
                     f"{where}")
    parts.append(f"results in {result.out}")
    return "; ".join(parts)


class _TuneProgress:
    """A tqdm bar of trials fed by the search's callback; the final run's own bar (a _TrainProgress)."""

    def __init__(self, quiet: bool, time_budget: float | None):
        import time

        self.quiet, self.bar, self.best, self.final = quiet, None, None, None
        self.deadline = None if time_budget is None else time.monotonic() + time_budget

    def __call__(self, event, info):
        if self.quiet and event != "warning":
            return
        from tqdm.auto import tqdm

        if event == "search-start":
            what = "resuming" if info["resumed"] else "joining" if info["joined"] else "starting"
            retried = (f"; trial(s) {', '.join(map(str, info['retried']))} stopped by a kill run again"
                       if info["retried"] else "")
            tqdm.write(f"{what} study {info['study']} ({info['storage']}, {info['done']} trials done), "
                       f"{info['budget']}, into {info['out']}{retried}", file=sys.stderr)
            tqdm.write("space: " + " ".join(info["space"]), file=sys.stderr)
            self.bar = tqdm(total=info["trials"], initial=info["done"], unit="trial", desc="tune", dynamic_ncols=True,
                            file=sys.stderr)
        elif event == "trial-start" and self.bar is not None:
            self.post(f"trial {info['number']}")
        elif event == "trial-eval" and self.bar is not None:
            self.post(f"trial {info['number']} {info['percent']}% {info['val_bpc']:.3f}")
        elif event == "trial-end" and self.bar is not None:
            self.best = info["best"]
            if info["state"] in ("complete", "pruned"):
                self.bar.update(1)
            value = f"{info['value']:.4f} bits/char" if info["value"] is not None else ""
            if info["state"] != "complete":  # a pruned trial's value is its last evaluation's
                value = f"{info.get('note') or ''}" + (f" ({value} then)" if value else "")
            seconds = f" in {info['seconds']:.0f}s" if info["seconds"] is not None else ""
            tqdm.write(f"trial {info['number']} {info['state']}{seconds}: {value}", file=sys.stderr)
            self.post("")
        elif event == "final-start":
            self.close()
            what = "resuming" if info["resumed"] else "starting"
            replaced = " (it held the run of an earlier best: replaced)" if info.get("replaced") else ""
            tqdm.write(f"{what} the final run of the best configuration (trial {info['trial']}) into "
                       f"{info['out']}{replaced}", file=sys.stderr)
            self.final = _TrainProgress(self.quiet)
        elif event == "warning":
            tqdm.write(f"Warning: {info['message']}", file=sys.stderr)

    def post(self, running: str) -> None:
        import time

        post = {}
        if self.best is not None:
            post["best"] = f"{self.best:.4f}"
        if running:
            post["now"] = running
        if self.deadline is not None:
            left = max(0, int(self.deadline - time.monotonic()))
            post["left"] = f"{left // 60}:{left % 60:02d}"
        self.bar.set_postfix(post)

    def train_event(self, event, info):
        """The trials' training events: only the final run's are shown (as charlm train shows them)."""
        if self.final is not None:
            self.final(event, info)

    def close(self):
        for bar in (self.bar, self.final):
            if bar is not None:
                bar.close()
        self.bar = None


def _load(checkpoint: str | None, device: str = "cpu"):
    """Load --checkpoint (run or checkpoint directory; default: the newest run under ./checkpoints)."""
    from charlm.checkpoint import load_checkpoint
    from charlm.device import resolve_device
    from charlm.rundir import newest_run

    return load_checkpoint(checkpoint if checkpoint is not None else newest_run(), device=resolve_device(device))


def _onnx_model(path: str | None):
    """``--engine onnx``: the exported model at ``path``, or one line saying what is missing."""
    if path is None:
        raise click.ClickException("--engine onnx needs --checkpoint MODEL.onnx (made by charlm export)")
    try:
        from charlm.export import OnnxModel
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"--engine onnx needs the onnx extra ({exc.name} is missing): "
                                   f"pip install 'charlm-rnn[onnx]'") from None
    return OnnxModel(path)


def _is_onnx(path: str) -> bool:
    """Whether a CHECKPOINT argument names an exported model (a file ending in .onnx) rather than a run."""
    return str(path).lower().endswith(".onnx") and not Path(path).is_dir()


def _prefix_error(exc: UnknownCharactersError, prefix: str, ckpt) -> click.ClickException:
    """An unknown-character error, saying when the checkpoint's preprocessing would map them."""
    message = f"the prefix has {exc}"
    if ckpt.preprocess != "raw" and not ckpt.vocab.unknown_chars(corpus_mod.normalize(prefix, ckpt.preprocess)):
        message += (f"; this model was trained with --preprocess {ckpt.preprocess}, which maps them: "
                    f"pass --normalize to apply it to the prefix")
    return click.ClickException(message)


@main.command()
@click.argument("prefix", default="")
@click.option("--checkpoint", type=click.Path(), default=None, show_default="the newest run under ./checkpoints",
              help="A run directory (its best/) or a checkpoint directory.")
@click.option("--length", type=click.IntRange(min=0), default=_SAMPLE.length, help="Characters to add to the prefix.")
@click.option("--temperature", type=_FloatRange(min=0), default=_SAMPLE.temperature,
              help="0 = greedy (argmax); higher = more random.")
@click.option("--top-k", type=click.IntRange(min=1), default=_SAMPLE.top_k,
              help="Sample only among the k most probable characters.")
@click.option("--top-p", type=_FloatRange(0, 1, min_open=True), default=_SAMPLE.top_p,
              help="Sample only from the smallest set with this much probability.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=_SAMPLE.seed,
              help="Seed for sampling (0 to 2**63 - 1): the same seed gives the same text.")
@click.option("--num-samples", type=click.IntRange(1, MAX_CLI_SAMPLES), default=_SAMPLE.num_samples,
              help="Samples, generated as one batch (each is printed whole; the Python API takes more).")
@click.option("--normalize", is_flag=True, help="Apply the checkpoint's preprocessing to the prefix first.")
@click.option("--device", default="cpu", help=f"{DEVICE_CHOICES}.")
@click.option("--engine", type=click.Choice(["auto", "torch", "onnx"]), default="auto",
              help="torch: a checkpoint on PyTorch; onnx: a model from charlm export (--checkpoint MODEL.onnx, "
                   "fp32 or int8, its NAME.tokenizer.json beside it) on onnxruntime: the same text for the same "
                   "seed (an int8 model's: close to it); auto: onnx for a .onnx file, else torch.")
def generate(prefix, checkpoint, length, temperature, top_k, top_p, seed, num_samples, normalize, device, engine):
    """Continue PREFIX with a trained model, streaming the text as it comes."""
    if engine == "auto":
        engine = "onnx" if checkpoint is not None and _is_onnx(checkpoint) else "torch"
    if engine == "onnx":
        if device != "cpu":
            raise click.UsageError(f"--device {device}: an exported model runs on onnxruntime's CPU")
        ckpt = _onnx_model(checkpoint)
        make_stream = ckpt.iter_generate
    else:
        from charlm.sample import iter_generate

        if checkpoint is not None and _is_onnx(checkpoint):
            raise click.UsageError(f"{checkpoint} is an exported model: pass --engine onnx (or auto)")
        ckpt = _load(checkpoint, device)
        make_stream = lambda *a: iter_generate(ckpt.model, ckpt.vocab, *a)  # noqa: E731
    if normalize:
        prefix = corpus_mod.normalize(prefix, ckpt.preprocess)
    try:
        ckpt.vocab.encode(prefix)
    except UnknownCharactersError as exc:
        raise _prefix_error(exc, prefix, ckpt) from None
    stream = make_stream(prefix, length, temperature, top_k, top_p, seed, num_samples)
    out = sys.stdout
    if num_samples == 1:
        out.write(prefix)
        for (text,) in stream:
            out.write(text)
            out.flush()
        out.write("\n")
    else:  # samples are generated together; each is printed whole, a blank line between them
        parts = [[prefix] for _ in range(num_samples)]
        for chars in stream:
            for p, c in zip(parts, chars):
                p.append(c)
        out.write("\n\n".join("".join(p) for p in parts) + "\n")
    out.flush()


def _rule_defaults(i: int) -> str:
    """An option's default in --help: the value each --dynamic-rule gives it."""
    return ", ".join(f"{rule} {values[i]:g}" for rule, values in DYNAMIC_RULES.items())


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--errors", type=click.Choice(["strict", "skip"]), default="strict",
              help="strict: characters outside the vocabulary are an error; skip: drop them and say how many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, a line each.")
@click.option("--batch-size", type=click.IntRange(min=1), default=EVAL_BATCH_SIZE, help="Rows evaluated in parallel.")
@click.option("--dynamic", is_flag=True,
              help="Also dynamic evaluation: each segment scored, then learned from (one gradient step), as the "
                   "text is read in order, mixed with a count model (--dynamic-counts). The checkpoint is not "
                   "changed.")
@click.option("--dynamic-rule", type=click.Choice(sorted(DYNAMIC_RULES)), default=DYNAMIC_RULE, show_default=True,
              help="Dynamic evaluation's step: rms divides each gradient by the root of its running mean square "
                   "(Krause et al.), sgd is the plain step.")
@click.option("--dynamic-lr", type=_FloatRange(0, MAX_LR, min_open=True), default=None,
              show_default=_rule_defaults(0), help="Dynamic evaluation's step size (at most 1e30; a step that makes "
                                                   "the loss infinite is one line).")
@click.option("--dynamic-decay", type=_FloatRange(0, 1), default=None, show_default=_rule_defaults(2),
              help="Dynamic evaluation: the share of the way back to the trained weights after each step (rms: "
                   "times each weight's root mean square over their mean, at most all the way).")
@click.option("--dynamic-steps", type=click.IntRange(min=1), default=None, show_default=_rule_defaults(1),
              help="Dynamic evaluation: characters per segment (one step each).")
@click.option("--dynamic-prior", type=click.IntRange(min=0), default=DYNAMIC_PRIOR_CHARS, show_default=True,
              help="Dynamic evaluation, rms rule: the gradients' mean square starts from this many characters "
                   "at the end of the run's training text (when its corpus is at hand); 0 = from the text "
                   "read only.")
@click.option("--dynamic-counts", type=click.IntRange(min=0), default=None, metavar="CHARS",
              show_default=f"{DYNAMIC_COUNTS_ORDER}, or the most a large vocabulary allows",
              help="Dynamic evaluation also mixes the network with a count model of the run's training text (when "
                   "its corpus is at hand) and of the text as it is read, with contexts of up to CHARS characters "
                   "(a (CHARS+1)-gram), the network's weight learned as the text is read; 0 = the network alone. "
                   "Give FILES outside the run's training text: the counts hold it.")
@click.option("--device", default="cpu", help=f"{DEVICE_CHOICES}.")
@click.pass_context
def eval_(ctx, checkpoint, files, errors, as_json, batch_size, dynamic, dynamic_rule, dynamic_lr, dynamic_decay,
          dynamic_steps, dynamic_prior, dynamic_counts, device):
    """Held-out loss (nats/char), bits per char and perplexity of CHECKPOINT on FILES.

    With no FILES, the run's own held-out split, re-read from the corpus its config names. Files
    are read with the checkpoint's preprocessing. --dynamic adds the figure of dynamic evaluation
    (Krause et al., 2018), with a count model of the training text mixed in, beside the static one
    read the same way, and each part's figure. CHECKPOINT may also be a model from charlm export
    (MODEL.onnx, fp32 or int8): it is then read on onnxruntime the same way.
    """
    import json

    from charlm.evaluation import dynamic_settings, evaluate, file_ids, held_out_ids

    given = [f"--{name.replace('_', '-')}" for name in ("dynamic_rule", "dynamic_lr", "dynamic_decay", "dynamic_steps",
                                                         "dynamic_prior", "dynamic_counts")
             if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)]
    if _is_onnx(checkpoint):
        if dynamic or given:
            raise click.UsageError(f"{'--dynamic' if dynamic else given[0]} needs the checkpoint (dynamic evaluation "
                                   f"learns from the text): an exported model has no gradients")
        if device != "cpu":
            raise click.UsageError(f"--device {device}: an exported model is evaluated on onnxruntime's CPU")
        from charlm.export import evaluate_onnx

        ckpt = _onnx_model(checkpoint)
        evaluate = lambda model, ids, batch_size: evaluate_onnx(ckpt, ids, batch_size)  # noqa: E731
    elif given and not dynamic:  # not read without it: refused rather than ignored
        raise click.UsageError(f"{given[0]} is a setting of dynamic evaluation: add --dynamic")
    elif "--dynamic-prior" in given and dynamic_rule != "rms":
        raise click.UsageError(f"--dynamic-prior is a setting of the rms rule: --dynamic-rule {dynamic_rule} has no "
                               f"prior")
    else:
        ckpt = _load(checkpoint, device)
    dynamic_lr, dynamic_steps, dynamic_decay = dynamic_settings(dynamic_rule, dynamic_lr, dynamic_steps,
                                                                dynamic_decay)
    jobs = []
    if not files:
        ids = held_out_ids(ckpt)  # (first: it finds which of the run's corpus places holds its text)
        jobs.append((f"{ckpt.corpus_path} (held-out {ckpt.val_fraction:.0%})", ids, 0))
    for f in files:
        try:
            jobs.append((f, *file_ids(f, ckpt.vocab, ckpt.preprocess, skip_unknown=errors == "skip")))
        except UnknownCharactersError as exc:
            raise click.ClickException(f"{f}: {exc}; pass --errors skip to drop them") from None
    prior_ids = _dynamic_prior(ckpt, dynamic_prior) if dynamic and dynamic_rule == "rms" else None
    order, count_ids = _dynamic_counts(ckpt, dynamic_counts) if dynamic else (0, None)
    for name, ids, skipped in jobs:
        try:
            r = evaluate(getattr(ckpt, "model", None), ids, batch_size=batch_size)
        except CharlmError as exc:
            raise click.ClickException(f"{name}: {exc}") from None
        parts = {}
        if dynamic:  # beside the static figure of the text read the same way: one row, in order
            parts = _dynamic(ckpt, ids, dict(rule=dynamic_rule, lr=dynamic_lr, decay=dynamic_decay,
                                             num_steps=dynamic_steps, prior_ids=prior_ids), order, count_ids, name)
        if as_json:
            extra = {**({"skipped": skipped} if skipped else {}),
                     **{key: value.to_dict() for key, value in parts.items()}}
            click.echo(json.dumps({"file": str(name), **r.to_dict(), **extra}))
        else:
            note = f" ({skipped:,} unknown characters skipped)" if skipped else ""
            click.echo(f"{name}: {r.tokens:,} chars, loss {r.loss:.4f} nats/char, "
                       f"{r.bits_per_char:.4f} bits/char, perplexity {r.perplexity:.3f}{note}")
            if parts:
                s, d = parts["static_one_row"], parts["dynamic"]
                counts = (f", mixed with counts of contexts up to {order} character{'s' if order > 1 else ''} in "
                          f"{len(count_ids):,} training chars and the text read" if order else "")
                click.echo(f"{name}: read in order, {d.tokens:,} chars: static {s.bits_per_char:.4f} bits/char, "
                           f"dynamic {d.bits_per_char:.4f} ({d.bits_per_char - s.bits_per_char:+.4f}; loss "
                           f"{d.loss:.4f} nats/char, perplexity {d.perplexity:.3f}; {dynamic_rule} lr "
                           f"{dynamic_lr:g}, decay {dynamic_decay:g}, {dynamic_steps}-char segments"
                           + (f", mean square from {len(prior_ids):,} training chars" if prior_ids is not None
                              else "") + counts + ")")
                if order:
                    w, c = parts["dynamic_network"], parts["static_counts"]
                    click.echo(f"{name}: its parts: the network's steps without the counts {w.bits_per_char:.4f} "
                               f"({w.bits_per_char - s.bits_per_char:+.4f}), the counts with the static network "
                               f"{c.bits_per_char:.4f} ({c.bits_per_char - s.bits_per_char:+.4f})")


def _dynamic_prior(ckpt, chars: int):
    """The end of the run's training text for the rms rule's prior, or None (0 asked, or the corpus gone:
    then said on standard error, and the mean square starts from the text read)."""
    from charlm.evaluation import training_tail_ids

    if chars == 0:
        return None
    try:
        return training_tail_ids(ckpt, chars)
    except CharlmError as exc:
        click.echo(f"note: {exc}: dynamic evaluation's mean square starts from the text read", err=True)
        return None


def _dynamic_counts(ckpt, order):
    """(order, training ids) of dynamic evaluation's count model (the last DYNAMIC_COUNTS_CHARS of the run's
    training text): ``order`` None takes the default, lowered to what the vocabulary allows; an order given that it
    does not allow is a usage error. (0, None) when off; no training text (said on standard error) when the run's
    corpus is not at hand."""
    from charlm.evaluation import training_tail_ids, whole
    from charlm.ngram import max_order

    top = max_order(len(ckpt.vocab))
    if order is None:
        order = min(DYNAMIC_COUNTS_ORDER, top)
    elif order > top:
        raise click.UsageError(f"--dynamic-counts {order}: at most {top} for a vocabulary of {len(ckpt.vocab)} "
                               f"characters")
    if order == 0:
        return 0, None
    try:
        return order, whole(training_tail_ids(ckpt, DYNAMIC_COUNTS_CHARS))
    except CharlmError as exc:
        click.echo(f"note: {exc}: dynamic evaluation's count model counts the text read only", err=True)
        return order, whole([])


def _dynamic(ckpt, ids, options: dict, order: int, count_ids, name) -> dict:
    """Dynamic evaluation with a progress bar (on standard error, gone when done): the figures, by name, of the
    static network read in one row, dynamic evaluation, and with a count model of ``order`` its parts (the
    network's steps alone, the counts mixed with the static network)."""
    from tqdm.auto import tqdm

    from charlm.evaluation import EvalResult, counts_in_order, dynamic_losses, losses_in_order, mixed_with_counts

    with tqdm(desc="dynamic evaluation", unit="segment", leave=False, disable=None, file=sys.stderr) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        try:
            counts = counts_in_order(ids, count_ids, len(ckpt.vocab), order) if order else None  # before the steps
            static = losses_in_order(ckpt.model, ids)
            steps = dynamic_losses(ckpt.model, ids, **options, on_segment=progress)
            if counts is None:
                return {"static_one_row": EvalResult.of(static), "dynamic": EvalResult.of(steps)}
            return {"static_one_row": EvalResult.of(static), "dynamic": mixed_with_counts(steps, counts),
                    "dynamic_network": EvalResult.of(steps), "static_counts": mixed_with_counts(static, counts)}
        except CharlmError as exc:
            raise click.ClickException(f"{name}: {exc}") from None


@main.command()
@click.argument("checkpoint", type=click.Path())
def info(checkpoint):
    """Architecture, vocabulary, corpus and progress of CHECKPOINT (a run, a checkpoint, or MODEL.onnx)."""
    if _is_onnx(checkpoint):
        click.echo(_onnx_info(_onnx_model(checkpoint)))
        return
    ckpt = _load(checkpoint)
    cfg, corpus, progress = ckpt.config, ckpt.corpus_info, ckpt.progress
    inputs = "one-hot" if cfg.embedding_dim == 0 else f"embedding {cfg.embedding_dim}"
    sample = "".join(ckpt.vocab.itos[1:41])
    lines = [
        f"checkpoint:   {ckpt.path}",
        f"model:        {cfg.num_layers} x {cfg.cell.upper()} {cfg.hidden_size}, {inputs}, dropout {cfg.dropout:g}, "
        f"impl {cfg.impl}" + _mogrifier_info(cfg.to_dict())
        + "".join(f", {name.replace('_', '-')} {getattr(cfg, name):g}" for name in REGULARISERS if getattr(cfg, name)),
        *([f"sized:        {ckpt.sizing}"] if ckpt.sizing else []),
        f"parameters:   {ckpt.model.num_parameters():,}",
        f"vocabulary:   {len(ckpt.vocab)} symbols (with <unk>), most frequent: {sample!r}",
        f"corpus:       {corpus.get('path', '?')} (preprocess {corpus.get('preprocess', '?')}, "
        f"{corpus.get('val_fraction', 0):.0%} held out)",
        f"trained:      {progress.get('step', '?')} steps",
        *_average_lines(ckpt.train_options, progress),
        *_held_out_lines(progress, corpus),
        *_lineage_lines(ckpt.lineage),
        f"saved with:   torch {ckpt.meta.get('torch_version', '?')}",
    ]
    click.echo("\n".join(lines))


def _average_lines(train: dict, progress: dict) -> list[str]:
    """``charlm info``'s line for a run trained with weight averaging (none without): which weights this is."""
    if train.get("average", "none") == "none" or not isinstance(train.get("average"), str):
        return []
    which = {"averaged": "this checkpoint holds the averaged weights",
             "training": "this checkpoint holds the training weights (the average is in its trainer state)"}
    return [f"averaging:    {train['average'].upper()} of the weights, decay {train.get('average_decay', '?')}"
            + (f"; {which[progress['weights']]}" if isinstance(progress.get("weights"), str)
               and progress["weights"] in which else "")]


def _lineage_lines(lineage: dict | None) -> list[str]:
    """``charlm info``'s lines for where a fine-tuned model started (none for a model trained from scratch)."""
    from charlm.finetune import describe

    if not isinstance(lineage, dict):
        return []
    first, *rest = describe(lineage)
    return [f"started from: {first}", *(f"              {line}" for line in rest)]


def _held_out_lines(progress: dict, corpus: dict) -> list[str]:
    """``charlm info``'s held-out figures, each named for what it is: the whole held-out text's (what ``charlm
    eval`` measures), and the best of the periodic evaluations, when those read only the tail's first part."""
    def figure(loss: float) -> str:
        return f"{loss / math.log(2):.4f} bits/char, perplexity {math.exp(min(loss, 700)):.3f}"

    held_out, best = progress.get("held_out"), progress.get("best_val_loss")
    val_chars, eval_chars = corpus.get("val_chars"), corpus.get("eval_chars")
    lines = []
    if isinstance(held_out, dict) and held_out.get("loss") is not None:
        lines.append(f"held-out:     {figure(held_out['loss'])} (the whole held-out text, {held_out.get('chars', 0):,} "
                     f"characters scored: charlm eval's figure)")
    if best is not None and not (lines and val_chars and eval_chars and eval_chars >= val_chars):
        scope = (f"on the first {eval_chars:,} of {val_chars:,} held-out characters" if val_chars and eval_chars
                 and eval_chars < val_chars else "on the held-out characters")
        lines.append(f"best eval:    {figure(best)} {scope} (the best periodic evaluation during training)")
    return lines or ["held-out:     n/a"]


def _mogrifier_info(fields: dict) -> str:
    """``charlm info``'s words for a mogrifier's rounds and rank (none for other cells), from its config or the
    metadata of its export."""
    if fields.get("cell") != "mogrifier":
        return ""
    rank = fields.get("mogrify_rank") or 0
    return f", {fields.get('mogrify_rounds')} mogrifier rounds" + (f" of rank {rank}" if rank else "")


def _onnx_info(model) -> str:
    meta, corpus = model.meta, model.corpus_info
    inputs = "one-hot" if meta["embedding_dim"] == 0 else f"embedding {meta['embedding_dim']}"
    best = meta.get("held_out_bits_per_char")
    size = model.path.stat().st_size
    parameters = meta.get("parameters")
    return "\n".join([
        f"model file:   {model.path} ({size:,} bytes), vocabulary {model.vocab_path.name}",
        f"model:        {meta['num_layers']} x {meta['cell'].upper()} {meta['hidden_size']}, {inputs}, impl {meta['impl']}"
        + _mogrifier_info(meta),
        f"weights:      {model.quantization or 'fp32'}" + (f", {parameters:,} parameters" if parameters else ""),
        f"vocabulary:   {len(model.vocab)} symbols (with <unk>), most frequent: {''.join(model.vocab.itos[1:41])!r}",
        f"corpus:       {corpus.get('path', '?')} (preprocess {model.preprocess}, {corpus.get('val_fraction', 0):.0%} "
        f"held out)" if corpus else f"corpus:       ? (preprocess {model.preprocess})",
        f"trained:      {meta['step']:,} steps" if meta.get("step") is not None else "trained:      ?",
        "held-out:     " + (f"{best:.4f} bits/char on {meta['held_out_chars']:,} held-out characters"
                             if best and meta.get("held_out_chars") else f"{best:.4f} bits/char" if best else "n/a")
        + (" (the checkpoint's; charlm eval measures this file's)" if best else ""),
        *_lineage_lines(model.lineage),
        f"exported by:  charlm {meta.get('charlm_version', '?')}",
    ])


@main.command(name="env")
def env_() -> None:
    """What this machine can do: torch, oneDNN, CPU instructions, threads, bf16 per cell (tried), GPUs.

    bf16 is tried with one small training step of each cell (about a second): "native" runs at fp32's
    speed or better, "emulated" runs far slower (no bf16 instructions), "refused" does not run at all;
    charlm train --precision bf16 makes the same check before it starts.
    """
    from charlm.device import describe_machine

    rows = [("charlm", charlm.__version__), *describe_machine()]
    width = max(len(label) for label, _ in rows) + 2
    click.echo("\n".join(f"{label + ':':<{width}}{value}" for label, value in rows))


@main.command()
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "web"]), default="onnx",
              help="onnx: a one-step ONNX model (ids and state in; logits and state out), NAME.tokenizer.json "
                   "beside it; web: a static folder that generates in the browser (onnxruntime-web, no CDN).")
@click.option("--out", type=click.Path(), required=True,
              help="onnx: the model's file (NAME.onnx); web: a folder. Only a new path, an empty folder or an earlier "
                   "charlm export is written: anything else is refused, untouched.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, show_default="none: fp32 weights",
              help="int8: the weight matrices in 8-bit integers (7 bits used, so that no CPU's integer sums "
                   "saturate), one scale per output column (onnxruntime's dynamic quantization): a model file about a third the size, and faster single-stream generation "
                   "where the weights do not fit in the CPU's cache; both formats take it.")
@click.option("--quiet", is_flag=True, help="No download progress bar.")
def export(run, fmt, out, quantize, quiet):
    """Export RUN (a run or checkpoint directory; its best/) for use without PyTorch.

    \b
    charlm export checkpoints/timemachine --out model.onnx
    charlm export checkpoints/timemachine --out model-int8.onnx --quantize int8
    charlm generate --checkpoint model.onnx "The "
    charlm eval model-int8.onnx
    charlm export checkpoints/timemachine --format web --out site/   # then: python -m http.server -d site
    """
    try:
        from charlm.export import export_onnx, export_web
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"charlm export needs the onnx extra ({exc.name} is missing): "
                                   f"pip install 'charlm-rnn[onnx]'") from None
    ckpt = _load(run)
    path = (export_onnx(ckpt, out, quantize=quantize) if fmt == "onnx"
            else export_web(ckpt, out, progress=not quiet, quantize=quantize))
    if fmt == "onnx":
        from charlm.export import tokenizer_path

        click.echo(f"Exported {ckpt.path} to {path} (and {tokenizer_path(path)})")
    else:
        click.echo(f"Exported {ckpt.path} to {path}: serve it with python -m http.server -d {path}")


@main.command()
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--host", default="127.0.0.1", help="Address to listen on; 0.0.0.0 exposes the server to your network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="Port to listen on; 0 picks a free one.")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Another Host name to answer (besides localhost and --host), e.g. a name on your network.")
@click.option("--cors-origin", default=None, help="The one web origin (scheme://host:port) allowed to call the API.")
@click.option("--api-key", default=None, envvar="CHARLM_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every API call.")
@click.option("--max-length", type=click.IntRange(min=1), default=5000, help="Most characters one request may ask for.")
@click.option("--max-seconds", type=_FloatRange(min=0, min_open=True), default=60.0,
              help="Time cap of one generation.")
@click.option("--slots", type=click.IntRange(1, MAX_SAMPLES), default=16,
              help="Sequences generated together, one batched step per character (a request for N samples "
                   "takes N).")
@click.option("--queue-size", type=click.IntRange(min=0), default=16,
              help="Requests that may wait for a slot; more are answered 503.")
@click.option("--stream-interval", type=_FloatRange(0, MAX_STREAM_INTERVAL), default=0.05,
              help="Seconds between a stream's pieces, at least (the first character is sent at once): fewer, "
                   "larger pieces leave more of the CPU to generation.")
@click.option("--device", default="cpu", help=f"{DEVICE_CHOICES}.")
def serve(checkpoint, host, port, allow_hosts, cors_origin, api_key, max_length, max_seconds, slots, queue_size,
          stream_interval, device):
    """A local web page and a streaming HTTP API on CHECKPOINT (default: the newest run under ./checkpoints).

    \b
    Endpoints: GET / (the page), GET /health, GET /info, GET /metrics (Prometheus), POST /generate (JSON
    or Server-Sent Events), POST /v1/completions and GET /v1/models (the OpenAI completions API:
    max_tokens counts characters; stop, logprobs and echo work), and the API's own page at /docs.
    Concurrent requests are generated together, up to --slots sequences at a time.
    """
    from charlm.rundir import newest_run

    try:
        from charlm.serve import ServeConfig, make_server
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"charlm serve needs the serve extra ({exc.name} is missing): "
                                   f"pip install 'charlm-rnn[serve]'") from None
    path = checkpoint if checkpoint is not None else newest_run()
    ckpt = _load(str(path), device)
    config = ServeConfig(host=host, port=port, allow_hosts=tuple(allow_hosts), cors_origin=cors_origin,
                         api_key=api_key, max_length=max_length, max_seconds=max_seconds, slots=slots,
                         queue_size=queue_size, stream_interval=stream_interval)
    run_dir = ckpt.path.parent if ckpt.path.name in ("best", "last") else ckpt.path
    try:
        server = make_server(ckpt, config, model_id=run_dir.name, command_checkpoint=str(path), engine_thread=False)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::", ""):
        click.echo(f"Warning: listening on every interface ({host}): anyone who can reach this machine can use "
                   f"the model{'' if api_key else ' (set --api-key)'}", err=True)
        shown = "127.0.0.1"
    import signal
    import threading

    # Ctrl-C stops the server even where it was started with SIGINT ignored (a background job of a script),
    # and a service manager's SIGTERM the same way; both set before the URL is printed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    threading.Thread(target=server.serve_forever, name="charlm-http", daemon=True).start()
    try:
        click.echo(f"Serving {ckpt.path} at http://{shown}:{server.server_address[1]}/  (Ctrl-C stops)")
        server.service.engine.run()  # the model on the main thread (see charlm.serve.engine)
    except KeyboardInterrupt:
        click.echo("\nStopped.", err=True)
    finally:
        server.shutdown()
        server.server_close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    run()
