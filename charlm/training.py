"""The training loop around one run state. Library code: it prints nothing and reports through
``callback(event, info)``.

Its parts: :class:`Trainer` holds the model, its optimizer, the :class:`RunState` and the step loop;
:class:`Evaluator` the held-out evaluations and the checkpoints; :mod:`charlm.schedule` the lr schedule
(:class:`~charlm.schedule.Schedule`) and the step time a plan is fitted to (:class:`~charlm.schedule.StepClock`).

Events:

- ``"start"``: the run's facts (``out``, ``device``, ``model``, ``model_config``, ``vocab``,
  ``train_chars``, ``val_chars``, ``step``, ``total_steps``, ``resumed``, ``precision``, ``world_size``,
  ``weight_decay``: the resolved --weight-decay);
- ``"step"``, every 10 steps: ``step``, ``loss_sum`` (a 0-d tensor on the training device, the
  summed loss since the last evaluation: reading it with ``.item()`` waits for the device),
  ``interval_steps``, ``tokens`` and ``elapsed`` (seconds) since the last evaluation;
- ``"eval"``: a ``metrics.csv`` row, plus ``improved`` and ``best_val_bpc``;
- ``"end"``: ``result``, the :class:`TrainResult`.

A callback may end the run from a ``"step"`` or ``"eval"`` event by raising
:class:`~charlm.errors.StopTraining`: the run stops there as after a signal (evaluated and saved, no
whole-tail figure) and :func:`train` returns its result, whose ``stop_reason`` is the exception's message.

Resuming is exact: the data order depends only on ``(seed, epoch)``; :class:`RunState` holds
everything else that moves (the step, the position in the epoch, the best loss, the evaluations
since it, the lr and its plan, the carried hidden state) and is saved whole, with the optimizer and
every RNG state, in each checkpoint. So a run stopped at any step (a signal, a crash, a time limit,
``--max-steps``) and resumed ends with the weights of the run that was never stopped, provided
the lr follows the same plan:

- under ``--lr-schedule plateau`` nothing depends on the run's length: 30 steps then a resume to 60
  equal 60 straight;
- a planned schedule (``hold-decay``, ``cosine``) is fixed before the first step, from ``--epochs``
  and ``--max-steps`` (:meth:`~charlm.schedule.Schedule.total_steps`), and saved: a resume follows it (a resume with
  a larger ``--max-steps`` still ends at the saved plan's end; a smaller one shortens the plan
  from where the run stands). So a planned run interrupted and resumed equals the straight run,
  while 30 steps planned as 30 then resumed to 60 are not the 60-step plan;
- under ``--time-limit`` the plan is shortened while the run goes, from the step time measured
  since the invocation's first evaluation, whenever the time left cannot hold it: that depends on
  the clock, so such a run is repeatable only as far as the clock allowed the same plan.

In every case the last step taken is the schedule's last step: its lr is the schedule's end (0), but
for a plan of one step (its only step trains at the base lr), and for a time limit too short to measure
(under WARM_STEPS steps in all), whose plan ends at the step where the time ran out.

Under ``--average ema`` (PyTorch's ``torch.optim.swa_utils.AveragedModel``) an exponential moving average of the
weights is updated after every optimizer step taken; held-out evaluations read it and ``best/`` holds it as its
model, while ``last/`` holds the training weights (what a resume continues) with the average in its trainer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from charlm import finetune
from charlm.checkpoint import corpus_paths, held_out_entry, load_checkpoint, save_checkpoint, update_progress
from charlm.config import PAIR_STATE_CELLS, PLACEHOLDER_VOCAB, SIZED_FIELDS, TrainConfig
from charlm.data import RunData, load_split, load_split_onto, make_batches, min_tokens
from charlm.device import autocast, check_memory, check_precision, grad_scaler, resolve_device, resolve_precision
from charlm.distributed import Dist, collective_failed, failure_line, from_env
from charlm.distributed import close as close_distributed
from charlm.distributed import init as init_distributed
from charlm.errors import CharlmError, ProcessGroupError, StopTraining, TrainError, TrainingInterrupted
from charlm.evaluation import EvalResult, evaluate
from charlm.models import RNNLM, detach_state
from charlm.rundir import RunDir, default_out
from charlm.schedule import WARM_STEPS, Schedule, StepClock, scheduled_lr  # noqa: F401 (re-exported)
from charlm.vocab import Vocab

DIVERGED = 10  # a held-out loss this many times a uniform guess's (ln of the vocabulary's size): the run diverged
MAX_NONFINITE = 5  # consecutive non-finite steps before the run saves and stops
STEP_EVENT_EVERY = 10  # steps between "step" events
FINAL_EVAL_SHARE = 0.1  # of --time-limit, at most, for the final evaluation of the best weights on the whole tail
RESERVE_MARGIN = 1.25  # the final work's estimate from earlier evaluations and saves, with room for noise


@dataclass
class TrainResult:
    """What :func:`train` returns (and ``charlm train`` summarises in its last line).

    ``out`` is the run directory; ``steps`` the optimizer steps done in all (a resumed run counts
    those before it), ``epochs_done`` the passes over the training text and ``tokens`` the characters
    trained on; ``stop_reason`` says in words why the run ended. ``best`` is the
    :class:`~charlm.evaluation.EvalResult` of the weights in ``best/`` on the held-out tail (the
    whole tail: re-read at the end when periodic evaluations read only its start), ``last`` that of
    the last evaluation, ``train_loss`` the mean training loss (nats per character) over the last
    evaluation interval. The timings are in seconds: ``elapsed_s`` is this invocation's, of which
    ``eval_s`` went to held-out evaluation (``final_eval_s`` of it to the final whole-tail figure)
    and ``save_s`` to checkpoints. ``val_chars`` is the held-out tail's length and ``eval_chars`` what
    each periodic evaluation read of it; ``precision`` is what the training steps ran in.
    """

    out: Path
    steps: int
    epochs_done: float
    tokens: int
    elapsed_s: float  # training time of this invocation, evaluations and checkpoints included
    stop_reason: str
    best: EvalResult | None
    last: EvalResult | None
    train_loss: float | None  # mean training loss over the last evaluation interval
    eval_s: float = 0.0  # of elapsed_s: seconds spent in held-out evaluations
    save_s: float = 0.0  # of elapsed_s: seconds spent writing checkpoints
    final_eval_s: float = 0.0  # of eval_s: the best weights on the whole tail (when periodic ones read a part)
    val_chars: int = 0  # the held-out tail's length
    eval_chars: int = 0  # of it, what each periodic evaluation read (its first characters)
    precision: str = "fp32"  # what the training steps ran in (--precision auto resolved)


@dataclass
class RunState:
    """Where a run stands: everything a resume must restore besides the weights and the optimizer."""

    lr: float
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on
    best_loss: float = math.inf  # lowest held-out loss of any evaluation: what best/ holds
    plateau_loss: float = math.inf  # lowest of the scheduled evaluations (every eval_every steps) only
    evals_since_best: int = 0  # scheduled evaluations since plateau_loss last fell: the lr decay and patience
    nonfinite: int = 0  # consecutive steps whose loss was not finite
    planned_steps: int | None = None  # a planned lr schedule's length, fixed at the start (saved: a resume follows it)
    plan_anchor: tuple[int, float] | None = None  # (step, lr) a shortened plan falls from (see scheduled_lr)
    plan_ceiling: int | None = None  # the plan --epochs and --max-steps fixed: a time-shortened one grows back to it
    hidden: object = None  # the state carried across sequential batches: a tensor, or (h, c) for the LSTM

    def to_dict(self, optimizer, device: torch.device, dist: Dist = Dist(), scaler=None) -> dict:
        """The trainer state of a checkpoint (``trainer.pt``): plain values and tensors only. Under
        several processes the carried state is gathered whole and every rank's RNG state kept, so
        the checkpoint does not depend on the number of processes (a collective: every rank calls it)."""
        hidden = self.hidden if isinstance(self.hidden, tuple) or self.hidden is None else (self.hidden,)
        rng = torch.get_rng_state()
        return {"optimizer": optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "best_loss": self.best_loss,
                "plateau_loss": self.plateau_loss, "evals_since_best": self.evals_since_best,
                "nonfinite": self.nonfinite, "planned_steps": self.planned_steps,
                "plan_anchor": list(self.plan_anchor) if self.plan_anchor is not None else None,
                "plan_ceiling": self.plan_ceiling, "torch_rng": rng,
                "rank_rng": [r.clone() for r in dist.gather_rows(rng.unsqueeze(0), dim=0)] if dist.enabled else None,
                "world_size": dist.world_size,
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                "state": None if hidden is None else tuple(dist.gather_rows(s.detach()).cpu() for s in hidden)}

    @classmethod
    def restore(cls, saved: dict, optimizer, device: torch.device, cell: str, dist: Dist = Dist(),
                scaler=None) -> "RunState":
        """The inverse of :meth:`to_dict`: loads the optimizer, the fp16 loss scale and the RNG states as
        a side effect; each rank takes its rows of the carried state."""
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and scaler.is_enabled() and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        same_ranks = saved.get("world_size", 1) == dist.world_size
        rank_rng = saved.get("rank_rng")
        # a tensor of its own: torch.set_rng_state of a view with a storage offset crashed the process (torch 2.13)
        torch.set_rng_state((rank_rng[dist.rank] if same_ranks and rank_rng else saved["torch_rng"]).clone())
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        hidden = saved.get("state")
        if hidden is not None:
            hidden = tuple(dist.rows(s).to(device) for s in hidden)
            hidden = hidden if cell in PAIR_STATE_CELLS else hidden[0]
        return cls(lr=optimizer.param_groups[0]["lr"], step=saved["step"], epoch=saved["epoch"],
                   batch_in_epoch=saved["batch_in_epoch"], best_loss=saved["best_loss"],
                   plateau_loss=saved.get("plateau_loss", saved["best_loss"]),  # older checkpoints: the same
                   evals_since_best=saved["evals_since_best"], nonfinite=saved.get("nonfinite", 0),
                   planned_steps=saved.get("planned_steps"),
                   plan_anchor=tuple(saved["plan_anchor"]) if saved.get("plan_anchor") is not None else None,
                   plan_ceiling=saved.get("plan_ceiling"), hidden=hidden)


def _carried(state):
    """The state the next sequential batch starts from: detached (truncated BPTT), and in fp32 whatever
    precision produced it, so checkpoints and resumes do not depend on ``--precision``."""
    state = detach_state(state)
    if isinstance(state, tuple):
        return tuple(s.float() for s in state)
    return state.float()


class _Interval:
    """Training loss and gradient norm since the last scheduled evaluation, summed on the device (no sync
    per step). Saved in checkpoints, so the first row after a resume averages the same steps as a run
    that was never stopped."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> None:
        """A step that updated the weights: its loss and gradient norm (under fp16, ``scaled``, a step the scaler
        skipped has an infinite norm: it counts as 0)."""
        self.loss_sum += loss.detach()
        if scaled:
            grad_norm = torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0)
        self.norm_sum += grad_norm.detach()

    def count(self, tokens: int) -> None:
        """One more step taken (an update or not) on ``tokens`` characters."""
        self.steps += 1
        self.tokens += tokens

    def mean(self, total: torch.Tensor) -> float | None:
        return (total / self.steps).item() if self.steps else None

    def to_dict(self, dist: Dist) -> dict:
        """The sums so far; the loss averaged over ranks (each rank restores that average as its own sum,
        and the rows average the ranks' sums: a collective, like the rest of the trainer state)."""
        return {"loss_sum": (dist.sum(self.loss_sum) / dist.world_size).item(), "norm_sum": self.norm_sum.item(),
                "steps": self.steps}

    def restore(self, saved: dict | None) -> None:
        """The sums and their step count; the tokens per second start afresh (they measure this invocation)."""
        if saved:  # checkpoints before the interval was saved start an empty one
            self.loss_sum.fill_(saved["loss_sum"])
            self.norm_sum.fill_(saved["norm_sum"])
            self.steps = saved["steps"]


@contextmanager
def _stop_on_signals():
    """Turn the first SIGINT/SIGTERM into a flag the loop checks after each step."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _make_optimizer(cfg: TrainConfig, model: RNNLM, weight_decay: float = 0.0):
    """SGD or Adam; with ``weight_decay`` (the resolved --weight-decay), the weight matrices (embedding,
    recurrent, output) in a group of their own that shrinks each step by ``lr * weight_decay`` of
    itself, decoupled from the gradient (AdamW; SGD's L2 term is the same rule), and the biases in one
    that does not. Without it, the one-group optimizer of earlier runs (their saved states load)."""
    lr = cfg.resolved_lr()
    params = list(model.parameters())
    if weight_decay:
        params = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    return (torch.optim.AdamW if weight_decay else torch.optim.Adam)(params, lr=lr, foreach=True)


def load_data(cfg: TrainConfig, progress=None, onto: Vocab | None = None) -> RunData:
    """The run's vocabulary, training ids and held-out ids, checked against the batch shape; ``onto``: numbered
    in that vocabulary (a fine-tuned model's, extended or not by ``cfg.new_chars``)."""
    if onto is None:
        data = load_split(cfg.corpus, cfg.preprocess, cfg.val_fraction, cfg.max_chars, cfg.min_count,
                          progress=progress)
    else:
        data = load_split_onto(cfg.corpus, cfg.preprocess, cfg.val_fraction, onto, cfg.new_chars, cfg.max_chars,
                               cfg.min_count, progress=progress)
    need = min_tokens(cfg.batch_size, cfg.num_steps)
    if len(data.train_ids) < need:
        raise TrainError(
            f"the training part of {cfg.corpus} has {len(data.train_ids):,} characters, but batch size "
            f"{cfg.batch_size} x {cfg.num_steps} steps needs at least {need:,}; use a smaller "
            f"--batch-size or --num-steps")
    return data


class Evaluator:
    """The held-out side of a run: the periodic evaluations (the same leading part of the tail every time),
    the best weights on the whole tail at the end, the checkpoints (``best/``, ``last/``) with their metadata,
    and what each of these costs, from which :meth:`reserve` says how long the run's final work will take."""

    def __init__(self, cfg: TrainConfig, data: RunData, run: RunDir, device: torch.device, dist: Dist = Dist()):
        self.cfg, self.data, self.run_dir, self.device, self.dist = cfg, data, run, device, dist
        self.eval_ids = data.val_ids[: cfg.resolved_eval_chars(len(data.val_ids))]  # the same part every time
        self.best_val: EvalResult | None = None
        self.last_val: EvalResult | None = None
        self.best_weights = None  # a copy, for the final evaluation on the whole tail
        self.eval_s = self.save_s = self.final_eval_s = 0.0
        self.eval_s_per_char = None  # measured by each evaluation: what the final ones will cost
        self.last_save_s = 0.0
        self.meta_base = {  # every checkpoint's metadata, its progress aside (train() adds a fine-tuned run's lineage)
            "train": cfg.to_dict(),
            "corpus": {**corpus_paths(cfg.corpus, run.path), "preprocess": cfg.preprocess,
                       "val_fraction": cfg.val_fraction,
                       "max_chars": cfg.max_chars, "min_count": cfg.min_count, "chars": data.num_chars,
                       "train_chars": len(data.train_ids), "val_chars": len(data.val_ids),
                       "eval_chars": len(self.eval_ids), "sha256": data.sha256},
        }

    @property
    def partial(self) -> bool:
        """Periodic evaluations read only the tail's first part (the best weights read all of it at the end)."""
        return len(self.eval_ids) < len(self.data.val_ids)

    def restore(self) -> None:
        """On a resume: the best weights, which may predate this invocation, when the final evaluation on the
        whole tail will read them (loading them leaves the RNG state just restored as it is: see load_checkpoint)."""
        best = self.run_dir.checkpoint("best")
        if self.partial and (best / "manifest.json").is_file():
            self.best_weights = load_checkpoint(best, device=self.device).model.state_dict()

    def measure(self, model: RNNLM, st: RunState, since: float) -> EvalResult:
        """``model`` on the periodic part of the tail, timed from ``since`` (``time.perf_counter()``); a loss that
        is not finite, or far worse than a uniform guess (the weights diverged), stops the run."""
        val = evaluate(model, self.eval_ids, device=self.device, dist=self.dist)
        if not math.isfinite(val.loss) or val.loss > DIVERGED * math.log(len(self.data.vocab)):
            # the weights diverged (not finite, or far worse than a uniform guess): nothing of them is kept
            kept = (f"{self.run_dir.checkpoint('best')} keeps the best weights so far" if not math.isinf(st.best_loss)
                    else "no checkpoint was kept")
            what = "not finite" if not math.isfinite(val.loss) else f"{val.loss:.3g} nats/char (worse than guessing)"
            raise TrainError(f"the held-out loss is {what} at step {st.step}: the weights diverged; {kept}; try "
                             f"a lower --lr, --weight-decay or --clip")
        spent = time.perf_counter() - since
        self.eval_s += spent
        self.eval_s_per_char = spent / val.tokens
        return val

    def report(self, row: dict, val: EvalResult) -> None:
        """An evaluation's ``metrics.csv`` row (rank 0 writes it); ``val`` is now the last evaluation."""
        if self.dist.is_main:
            self.run_dir.append_metrics(row)
        self.last_val = val

    def keep_best(self, model: RNNLM, val: EvalResult) -> None:
        """``val`` is the best evaluation so far: a copy of the weights, for the final one on the whole tail."""
        self.best_val = val
        self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save(self, name: str, model: RNNLM, st: RunState, val: EvalResult | None, trainer_state) -> None:
        """Checkpoint ``name`` (``best`` or ``last``) with ``trainer_state()``, the trainer state. Every rank
        takes part (the state is gathered); only rank 0 writes."""
        t0 = time.perf_counter()
        state = trainer_state()
        if not self.dist.is_main:
            return
        progress = {"step": st.step, "epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch,
                    "best_val_loss": None if math.isinf(st.best_loss) else st.best_loss,
                    "val_loss": val.loss if val else None}
        if name == "best" and val is not None and not self.partial:
            progress["held_out"] = held_out_entry(val)  # periodic evaluations read the whole tail
        if self.cfg.average != "none":  # which weights the model is: best/ the averaged ones, last/ the training ones
            progress["weights"] = "averaged" if name == "best" else "training"
        meta = {**self.meta_base, "progress": progress}
        save_checkpoint(self.run_dir.checkpoint(name), model, self.data.vocab, meta, state)
        self.last_save_s = time.perf_counter() - t0
        self.save_s += self.last_save_s

    def reserve(self, final_eval: bool) -> float:
        """Seconds the run still needs once it stops training, at the rates measured so far: the final
        evaluation (``final_eval``: the last step taken was not evaluated) and checkpoints, and the best
        weights on the whole tail (at most a tenth of the time limit, FINAL_EVAL_SHARE, is given to that:
        on a huge corpus the summary then reports a leading part of the tail)."""
        if self.eval_s_per_char is None:
            return 0.0
        final_eval_chars = len(self.eval_ids) if final_eval else 0
        whole_tail = len(self.data.val_ids) if self.partial else 0
        whole_tail_s = min(whole_tail * self.eval_s_per_char, FINAL_EVAL_SHARE * (self.cfg.time_limit or 0))
        return RESERVE_MARGIN * (final_eval_chars * self.eval_s_per_char + whole_tail_s + 2 * self.last_save_s)

    def evaluate_best_on_tail(self, model: RNNLM, elapsed: float, stepped: bool) -> None:
        """When periodic evaluations read only the tail's first part: the best weights (loaded into ``model``)
        on the whole tail, or on as much of it as fits in what is left of the time limit after ``elapsed``
        seconds, and in a tenth of it at most. Sets ``best_val``; the whole figure is kept in ``best/`` when
        this invocation ``stepped`` (a resume that took no step writes nothing)."""
        val_ids = self.data.val_ids
        if self.best_weights is None or not self.partial:
            return
        chars = len(val_ids)
        if self.cfg.time_limit is not None and self.eval_s_per_char:
            room = min(self.cfg.time_limit - elapsed, FINAL_EVAL_SHARE * self.cfg.time_limit)
            chars = min(chars, max(len(self.eval_ids), int(room / self.eval_s_per_char)))
        chars = self.dist.broadcast_int(chars, self.device)  # rank 0's clock decides for all
        model.load_state_dict(self.best_weights)
        t0 = time.perf_counter()
        self.best_val = evaluate(model, val_ids[:chars], device=self.device, dist=self.dist)
        self.final_eval_s = time.perf_counter() - t0
        self.eval_s += self.final_eval_s
        if chars == len(val_ids) and self.dist.is_main and stepped:
            # the whole figure, kept where it was measured
            update_progress(self.run_dir.checkpoint("best"), held_out=held_out_entry(self.best_val))


class Trainer:
    """One run: the model, its optimizer, the :class:`RunState`, and the step loop between them. The lr
    schedule and the step time are ``schedule`` (:class:`~charlm.schedule.Schedule`) and ``clock``
    (:class:`~charlm.schedule.StepClock`); held-out evaluations and checkpoints are ``evals`` (:class:`Evaluator`)."""

    def __init__(self, cfg: TrainConfig, data: RunData, run: RunDir, device: torch.device, emit,
                 dist: Dist = Dist()):
        self.cfg, self.data, self.run_dir, self.device, self.dist = cfg, data, run, device, dist
        self.warnings: list[str] = []  # said before the run starts (emit None): emitted with its start
        self.emit = emit or (lambda event, info: self.warnings.append(info["message"]) if event == "warning" else None)
        torch.manual_seed(cfg.seed)
        self.model_config = cfg.model_config(len(data.vocab), len(data.train_ids))
        try:
            self.model = RNNLM.from_config(self.model_config).to(device)
        except (RuntimeError, MemoryError) as exc:  # (check_memory estimated it would fit)
            raise TrainError(f"cannot build the model on {device} ({str(exc).splitlines()[0][:160]}); use a smaller "
                             f"--hidden-size, --num-layers or --embedding-dim") from None
        self.net = self.model  # what the training step calls: the model, or DDP around it (distribute())
        self.restored = False
        self.weight_decay = cfg.resolved_weight_decay(len(data.train_ids))
        self.optimizer = _make_optimizer(cfg, self.model, self.weight_decay)
        self.average, self.stepped = None, False  # --average ema: the averaged weights; the optimizer stepped
        if cfg.average == "ema":  # (a copy of the model: it draws nothing from the RNG)
            self.average = AveragedModel(self.model, multi_avg_fn=_ema_with_warmup(cfg.average_decay))
            self.optimizer.register_step_post_hook(self._stepped)
        self.autocast = lambda: autocast(cfg.precision, device)
        self.scaler = grad_scaler(cfg.precision, device)  # fp16 only; otherwise it passes everything through
        self.pin = device.type == "cuda"  # batches copied from page-locked memory, without waiting
        self.schedule = Schedule(cfg, len(data.train_ids))
        self.clock = StepClock(cfg.time_limit)
        self.evals = Evaluator(cfg, data, run, device, dist)
        self.meta_base = self.evals.meta_base  # (the same dict: train() adds a fine-tuned run's lineage to it)
        self.state = RunState(lr=self.schedule.base_lr)
        self.max_norm = cfg.clip if cfg.clip > 0 else math.inf  # clip_grad_norm_ still returns the norm
        self.tokens_per_step = cfg.batch_size * cfg.num_steps
        self.interval = _Interval(device)
        self.steps_per_epoch = 0
        self.last_eval_step = None
        self.t_start = time.perf_counter()  # reset when the loop starts

    @property
    def eval_model(self) -> RNNLM:
        """The weights held-out evaluations read and ``best/`` saves: the averaged ones under --average (once a step
        was taken: the average starts from the first step's weights), else the training weights."""
        return self.model if self.average is None or not self.average.n_averaged else self.average.module

    @property
    def first_step(self) -> int:
        """The step this invocation started from."""
        return self.clock.first_step

    def distribute(self) -> None:
        """Under torchrun, once every rank agreed to start: DDP around the model (a collective), and each rank
        its own dropout stream (a resumed run has its RNG states back already)."""
        if not self.dist.enabled:
            return
        from torch.nn.parallel import DistributedDataParallel

        device = self.device
        self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if not self.restored:
            torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank)

    # -- state ---------------------------------------------------------------------------------
    def restore(self, saved) -> None:
        """Continue from a checkpoint loaded with its trainer state (``last/``); writes nothing (the run's
        metrics rows after its step are dropped by :meth:`charlm.rundir.RunDir.create`)."""
        self.restored = True
        self.model.load_state_dict(saved.model.state_dict())
        if self.average is not None:
            self.average.load_state_dict(saved.trainer_state["average"])
        self.state = RunState.restore(saved.trainer_state, self.optimizer, self.device, self.model_config.cell,
                                      self.dist, self.scaler)
        self.interval.restore(saved.trainer_state.get("interval"))
        saved_ranks = saved.trainer_state.get("world_size", 1)
        if saved_ranks != self.dist.world_size:
            self.emit("warning", {"message": f"resuming a run saved by {saved_ranks} process(es) with "
                                             f"{self.dist.world_size}: the results will equal a run on "
                                             f"{saved_ranks} only statistically (other dropout streams)"})
        self.last_eval_step = self.state.step  # last/ was saved at an evaluation of this step
        self.evals.restore()

    def checkpoint_state(self) -> dict:
        """The trainer state of a checkpoint (``trainer.pt``): the run state, the training figures since the
        last scheduled evaluation and, under --average, the averaged weights (a collective: every rank calls it)."""
        state = {**self.state.to_dict(self.optimizer, self.device, self.dist, self.scaler),
                 "interval": self.interval.to_dict(self.dist)}
        if self.average is not None:  # (the same on every rank: the average of the same weights)
            state["average"] = {k: v.detach().cpu() for k, v in self.average.state_dict().items()}
        return state

    def save(self, name: str, val: EvalResult | None) -> None:
        """Every rank takes part (the state is gathered); only rank 0 writes. ``best/``'s model is the weights
        evaluated (the averaged ones under --average); ``last/``'s the training weights, which a resume continues."""
        model = self.eval_model if name == "best" else self.model
        self.evals.save(name, model, self.state, val, self.checkpoint_state)

    # -- the plan and the time -----------------------------------------------------------------
    def plan(self) -> None:
        """Fix a planned schedule's length before the first step (:meth:`charlm.schedule.Schedule.fix`)."""
        self.schedule.fix(self.state)

    def check_plan(self) -> None:
        """On a resume: the plan against --epochs and --max-steps now (:meth:`charlm.schedule.Schedule.check`)."""
        warning = self.schedule.check(self.state)
        if warning is not None:
            self.emit("warning", {"message": warning})

    def total_steps(self) -> int:
        """The steps ``--epochs`` and ``--max-steps`` allow (:meth:`charlm.schedule.Schedule.total_steps`)."""
        return self.schedule.total_steps()

    def apply_lr(self) -> None:
        """The planned lr of the step about to be taken."""
        self.state.lr = self.schedule.lr(self.state)
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.state.lr

    def elapsed(self) -> float:
        """Seconds since the loop started: the time every decision reads (the plan, the time limit)."""
        return time.perf_counter() - self.t_start

    def reserve(self) -> float:
        """Seconds the run still needs once it stops training (:meth:`Evaluator.reserve`)."""
        return self.evals.reserve(final_eval=self.last_eval_step != self.state.step)

    def _proposal(self) -> int:
        """Rank 0's :meth:`~charlm.schedule.StepClock.time_plan` under a planned schedule and --time-limit; -1 for
        none (other ranks too)."""
        if not (self.schedule.planned and self.cfg.time_limit is not None and self.dist.is_main):
            return -1
        steps = self.clock.time_plan(self.state.step, self.elapsed(), self.reserve())
        return -1 if steps is None else steps

    # -- the loop ------------------------------------------------------------------------------
    def run(self, stop: dict) -> str:
        """Train until a stopping rule fires; return why."""
        cfg, st = self.cfg, self.state
        self.t_start = self.interval.t0 = time.perf_counter()
        self.clock.first_step = st.step
        self.plan()  # (done already by train(); here for a Trainer run on its own)
        self.model.train()
        while st.epoch < cfg.epochs:
            for X, Y in self.batches():
                if cfg.max_steps is not None and st.step >= cfg.max_steps:
                    return f"--max-steps {cfg.max_steps} reached"
                if (done := self.schedule.done(st)) is not None:  # a resumed run already at its plan's end
                    return done
                self.train_step(X, Y)
                reason = self.after_step(stop)
                if reason is not None:
                    return reason
            st.epoch += 1
            st.batch_in_epoch = 0
            st.hidden = None  # each epoch starts from a zero state, as in d2l
        return f"{cfg.epochs} epochs done"

    def train_step(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """batch -> reset or detach the state -> forward -> loss -> zero_grad -> backward -> clip -> step -> log.

        Under fp16 the loss is scaled before the backward pass and the gradients unscaled before
        clipping; a step whose scaled gradients overflowed is skipped by the scaler (which then
        lowers the scale), not counted as non-finite: only a non-finite loss is."""
        cfg, st, scaler = self.cfg, self.state, self.scaler
        if self.pin:
            X, Y = X.pin_memory(), Y.pin_memory()
        X, Y = X.to(self.device, non_blocking=True), Y.to(self.device, non_blocking=True)
        if self.schedule.planned:
            self.apply_lr()
        # random windows are unrelated: fresh state; sequential ones continue: detach (TBPTT)
        hidden = None if cfg.sampling == "random" else st.hidden  # (stored detached: truncated BPTT)
        with self.autocast():
            logits, new_hidden = self.net(X, hidden)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))  # fp32 under autocast
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm, foreach=True)
        if self.finite(loss, grad_norm):
            st.nonfinite = 0
            scaler.step(self.optimizer)  # optimizer.step(), unless fp16 gradients overflowed
            self.update_average()
            st.hidden = _carried(new_hidden)  # the next batch continues from it, without this graph
            self.interval.add(loss, grad_norm, scaled=scaler.is_enabled())
        else:  # skip the update; give up after MAX_NONFINITE in a row
            st.nonfinite += 1
        scaler.update()  # fp16: a lower scale after an overflow (a skipped step's too), a higher one after many without
        if st.nonfinite >= MAX_NONFINITE:
            self.stop_nonfinite()
        st.step += 1
        st.batch_in_epoch += 1
        self.interval.count(self.tokens_per_step)

    def _stepped(self, optimizer, args, kwargs) -> None:
        """The optimizer's post-step hook (under --average): the weights moved."""
        self.stepped = True

    def update_average(self) -> None:
        """Under --average: the averaged weights take in the step just taken (a step fp16's scaler skipped is none:
        the hook did not run)."""
        if self.average is not None and self.stepped:
            self.average.update_parameters(self.model)
            self.stepped = False

    def batches(self):
        """The rest of the current epoch's batches."""
        cfg, st = self.cfg, self.state
        batches = make_batches(cfg.sampling, self.data.train_ids, cfg.batch_size, cfg.num_steps,
                               seed=cfg.seed, epoch=st.epoch, start=st.batch_in_epoch, rank=self.dist.rank,
                               world_size=self.dist.world_size)
        self.steps_per_epoch = batches.num_batches
        return batches

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step may update the weights: its loss is finite (and, without fp16's scaler, which skips
        an overflowed step itself, its gradient norm), on every rank. The step's one host sync."""
        ok = torch.isfinite(loss) if self.scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
        finite = bool(ok)
        if self.dist.enabled:  # one rank's non-finite loss skips the step on every rank
            finite = not self.dist.any([not finite], self.device)[0]
        return finite

    def stop_nonfinite(self) -> None:
        """MAX_NONFINITE steps in a row had no finite loss: save ``last/`` (the weights from before them), stop."""
        st = self.state
        self.save("last", self.evals.last_val)
        raise TrainError(
            f"the loss was not finite for {st.nonfinite} steps in a row at step {st.step + 1}; saved "
            f"{self.run_dir.checkpoint('last')} (weights from before those steps); try a lower --lr or --clip")

    def after_step(self, stop: dict) -> str | None:
        """Report, evaluate on schedule, fit the plan to the time left, and say whether the run must stop now.

        Under a planned schedule the plan decides the end: the time limit shortens it (so that its last
        step is still the last one taken) rather than cutting the run. One collective per step under
        torchrun: the signals every rank received, and rank 0's clock."""
        cfg, st, iv = self.cfg, self.state, self.interval
        if st.step % STEP_EVENT_EVERY == 0:
            self.emit("step", {"step": st.step, "loss_sum": iv.loss_sum, "interval_steps": iv.steps,
                               "tokens": iv.tokens, "elapsed": time.perf_counter() - iv.t0})
        reason = None
        if st.step % cfg.eval_every == 0:
            self.evaluate_and_save()
            patience = cfg.resolved_patience()
            if patience is not None and st.evals_since_best >= patience:
                reason = f"no held-out improvement in {patience} evaluations"
        timed = cfg.time_limit is not None
        if timed:
            self.clock.warm(st.step, self.elapsed())
        time_up = timed and not self.schedule.planned and self.elapsed() + self.reserve() >= cfg.time_limit
        (signalled, time_up), proposal = self.dist.agree([bool(stop["signal"]), time_up], self._proposal(),
                                                         self.device)
        if signalled:
            stop["signal"] = stop["signal"] or "SIGTERM"  # a signal another rank received
            return stop["signal"]
        # a plan cut to end before the next evaluation or just after it (a slow start of this interval) may grow
        # back at any step: no evaluation is left to grow it at (one at the plan's last step or the step before
        # it no longer may: Schedule.lengthen)
        next_eval = (st.step // cfg.eval_every + 1) * cfg.eval_every
        self.schedule.fit(st, proposal, grow=st.planned_steps is not None and st.planned_steps <= next_eval + 1)
        if reason is None:
            reason = self.schedule.done(st)
        if reason is None and time_up:
            reason = f"--time-limit {cfg.time_limit:g}s reached"
        return reason

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate_and_save(self, scheduled: bool = True) -> dict:
        """Held-out loss -> metrics row -> best/ when better -> last/.

        A scheduled evaluation (every ``eval_every`` steps) also drives the plateau schedule: the lr
        decays, and patience counts, when it did not improve on the scheduled ones before it; it then
        starts a new interval of training figures. The final evaluation of an invocation that stopped
        between two scheduled ones (a time limit, a signal, ``--max-steps`` off the schedule) only
        reports and saves, so that a resumed run takes the same decisions as one never stopped."""
        st, iv, evals = self.state, self.interval, self.evals
        now, eval_from = time.perf_counter(), self.elapsed()
        val = evals.measure(self.eval_model, st, since=now)
        row = {"step": st.step, "epoch": round(st.epoch + st.batch_in_epoch / max(1, self.steps_per_epoch), 4),
               "tokens": st.step * self.tokens_per_step, "elapsed_s": round(now - self.t_start, 3),
               "train_loss": iv.mean(self.dist.sum(iv.loss_sum) / self.dist.world_size), "val_loss": val.loss,
               "val_bpc": val.bits_per_char, "val_ppl": val.perplexity, "lr": st.lr, "grad_norm": iv.mean(iv.norm_sum),
               "tokens_per_s": round(iv.tokens / (now - iv.t0), 1) if iv.tokens else None}
        evals.report(row, val)
        if scheduled:  # before the checkpoints, which hold the interval and the schedule
            iv.reset()
            if self.schedule.plateau(st, val.loss):  # the plateau schedule's lr decayed
                self._set_lr()
            at = self.elapsed()
            self.clock.mark(st.step, at, eval_s=at - eval_from)
            if self.schedule.planned and self.cfg.time_limit is not None:  # the checkpoints below keep the plan
                self.schedule.fit(st, self.dist.broadcast_int(self._proposal(), self.device), grow=True)
        improved = val.loss < st.best_loss
        if improved:
            st.best_loss = val.loss
            evals.keep_best(self.eval_model, val)
            self.save("best", val)
        self.save("last", val)
        if scheduled:
            self.clock.steps_resume(st.step, self.elapsed())
        self.last_eval_step = st.step  # (before the event: a callback that stops the run there leaves it evaluated)
        self.emit("eval", {**row, "improved": improved, "best_val_bpc": st.best_loss / math.log(2)})
        return row

    def evaluate_best_on_tail(self) -> None:
        """The best weights on the whole tail, when periodic evaluations read a part of it
        (:meth:`Evaluator.evaluate_best_on_tail`)."""
        self.evals.evaluate_best_on_tail(self.eval_model, self.elapsed(), stepped=self.state.step > self.first_step)

    def result(self, stop_reason: str) -> TrainResult:
        st, evals = self.state, self.evals
        best = evals.best_val
        if best is None and not math.isinf(st.best_loss):  # resumed: the best came from an earlier invocation
            best = EvalResult(loss=st.best_loss, tokens=evals.last_val.tokens if evals.last_val else 0)
        return TrainResult(out=self.run_dir.path, steps=st.step,
                           epochs_done=st.epoch + st.batch_in_epoch / max(1, self.steps_per_epoch),
                           tokens=st.step * self.tokens_per_step, elapsed_s=time.perf_counter() - self.t_start,
                           stop_reason=stop_reason, best=best, last=evals.last_val,
                           train_loss=self.run_dir.last_train_loss() if self.dist.is_main else None,
                           eval_s=evals.eval_s, save_s=evals.save_s, final_eval_s=evals.final_eval_s,
                           val_chars=len(self.data.val_ids), eval_chars=len(evals.eval_ids),
                           precision=self.cfg.precision)


def ema_decay(decay: float, num_averaged: int) -> float:
    """The share of the average an EMA update keeps after ``num_averaged`` updates: ``decay``, or less early on,
    ``(1 + n) / (10 + n)``, so that the first steps' weights, far from trained, are soon forgotten (without it
    0.999 keeps a fifth of them after 1,600 steps)."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def _ema_with_warmup(decay: float):
    """AveragedModel's ``multi_avg_fn``: the exponential moving average at :func:`ema_decay`."""
    def update(averaged: list, current: list, num_averaged) -> None:
        weight = 1.0 - ema_decay(decay, int(num_averaged))
        for a, c in zip(averaged, current):
            a.lerp_(c, weight)

    return update


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callback=None,
          prepare_progress=None, init_from: str | None = None, new_chars: str | None = None) -> TrainResult:
    """Train as ``charlm train`` does and return the outcome (see the module docstring).

    ``init_from`` (a run or checkpoint; ``cfg.init_from`` too) starts from that trained model: its
    architecture, vocabulary, preprocessing and weights (:mod:`charlm.finetune`); ``new_chars`` says what
    becomes of the text's characters it lacks (``extend``, ``unk`` or ``error``).

    Everything is checked before any file is written. ``resume`` continues ``out/last`` exactly;
    ``overwrite`` deletes the run in ``out`` first. SIGINT/SIGTERM save ``last/`` and raise
    :class:`~charlm.errors.TrainingInterrupted`; every other problem is a one-line ``CharlmError``.
    ``prepare_progress(nbytes)`` follows the reading of a corpus that is not in the token cache yet.
    """
    emit = callback or (lambda event, info: None)
    if init_from is not None or new_chars is not None:
        cfg = dataclasses.replace(cfg, init_from=str(init_from) if init_from is not None else cfg.init_from,
                                  new_chars=new_chars if new_chars is not None else cfg.new_chars)
    device = resolve_device(cfg.device)
    dist = from_env()
    if dist.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parent = None
    if cfg.init_from and not resume:  # a new run from a trained model: its architecture, vocabulary, weights
        parent = finetune.load_parent(cfg.init_from, device)
        cfg = finetune.inherit(cfg, parent)
    slow_precision = check_precision(cfg.precision, device, cfg.model_config(PLACEHOLDER_VOCAB))  # tried before anything is written
    if slow_precision:
        emit("warning", {"message": slow_precision})
    precision = resolve_precision(cfg.precision, device, cfg.model_config(PLACEHOLDER_VOCAB))
    dist = init_distributed(cfg.dist_backend, cfg.dist_timeout, device)
    if cfg.precision == "auto" and dist.any([precision == "fp32"], device)[0]:
        precision = "fp32"  # every process the same: fp32 if any one of them lacks native bf16
    cfg = dataclasses.replace(cfg, precision=precision)  # saved as what ran, so a resume runs the same
    healthy = True
    try:
        return _train(cfg, resume, overwrite, emit, prepare_progress, device, dist, parent)
    except ProcessGroupError:
        healthy = False
        raise
    finally:
        close_distributed(barrier=healthy)


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, emit, prepare_progress, device, dist: Dist,
           parent=None) -> TrainResult:
    """Every check, on every rank, before anything is written (the options, the model's size against the
    device's memory, the run folder and its checkpoints, the resume's compatibility, the model built); then
    all ranks agree to go on or stop; only then does rank 0 lock, create or replace the run folder."""
    run = RunDir(cfg.out or default_out(cfg.corpus))
    trainer = saved = None

    def agree(step) -> None:  # every rank goes on, or all stop (the failing rank says why)
        error = None
        try:
            step()
        except CharlmError as exc:
            error = exc
        if dist.any([error is not None], device)[0]:
            raise error or TrainError("another process of this run could not start (rank 0 says why)")

    def prepare() -> None:
        nonlocal trainer, saved
        trainer, saved = _prepare_run(cfg, run, resume, overwrite, prepare_progress, device, dist, parent)

    def create() -> None:  # one writer per run folder: locked, (re)checked under the lock, then written
        if dist.is_main:   # (after every rank's checks: the others never see the lock, or the folder, it makes)
            run.create(overwrite, step=trainer.state.step if saved is not None else None)
            if run.unlocked:
                trainer.warnings.append(f"{run.path} is on a file system without file locks: nothing stops a second "
                                        f"process from writing the run at the same time")

    try:
        agree(prepare)
        agree(create)
        return _run(trainer, run, saved is not None, emit, device, dist)
    finally:
        run.release()


def _prepare_run(cfg: TrainConfig, run: RunDir, resume: bool, overwrite: bool, prepare_progress, device,
                 dist: Dist, parent):
    """The checks of :func:`_train` and the trainer they lead to (the model built, a resume's state restored,
    the plan fixed), writing nothing; ``(trainer, saved)``."""
    if cfg.batch_size % dist.world_size:
        raise TrainError(f"--batch-size {cfg.batch_size} does not split evenly over {dist.world_size} processes; "
                         f"use a multiple of {dist.world_size}")
    run.check(resume, overwrite)
    if parent is not None:
        finetune.check_apart(parent, run.path)
    saved = None
    if resume:
        saved = run.load_last(device)
        if cfg.init_from:  # a fine-tuning run: the architecture it took from its parent is in its checkpoints
            finetune.check_same_parent(saved, cfg.init_from)
            cfg = finetune.inherit(cfg, saved)
        # the sizes the run was started with, where none are given (its model's, where its options lack them)
        cfg = cfg.filled_from({**{name: getattr(saved.config, name) for name in SIZED_FIELDS},
                               **{k: v for k, v in saved.train_options.items() if v is not None}})
        run.check_resume(saved, cfg)
    onto = saved.vocab if saved is not None and cfg.init_from else parent.vocab if parent is not None else None
    data = load_data(cfg, prepare_progress, onto)
    if saved is not None:
        was = saved.corpus_info.get("sha256")
        if was is not None and was != data.sha256:
            raise TrainError(f"{cfg.corpus} changed since the run started (sha256 {was[:12]}..., now "
                             f"{data.sha256[:12]}...); --resume needs the same text, or start over with --overwrite")
        if saved.vocab != data.vocab:
            raise TrainError(f"{cfg.corpus} no longer gives the vocabulary the run was trained with")
        sizing = saved.sizing
    else:  # the sizes the user left open, chosen for the text and the budget (TrainConfig.sized)
        cfg, sizing = cfg.sized(len(data.train_ids))
    model_config = cfg.model_config(len(data.vocab), len(data.train_ids))
    if saved is not None:
        differ = [f"{name.replace('_', '-')} {getattr(saved.config, name)!r} (its options say "
                  f"{getattr(model_config, name)!r})"
                  for name in SIZED_FIELDS if getattr(model_config, name) != getattr(saved.config, name)]
        if differ:  # (an edited config.json: the options and the model it holds disagree)
            raise TrainError(f"{run.checkpoint('last')} holds a model its saved options do not describe: "
                             + "; ".join(differ) + "; it cannot resume (start over with --overwrite)")
    decay, lr = cfg.resolved_weight_decay(len(data.train_ids)), cfg.resolved_lr()
    if lr * decay >= 1:
        raise TrainError(f"--lr {lr:g} with --weight-decay {decay:g} would shrink every weight by lr x decay = "
                         f"{lr * decay:g} of itself each step (at least all of it); their product must be under 1")
    check_memory(model_config, cfg.batch_size // dist.world_size, cfg.num_steps, cfg.optimizer, device)
    trainer = Trainer(cfg, data, run, device, None, dist)
    if sizing is not None:
        trainer.meta_base["sizing"] = sizing
    if parent is not None:
        added = len(data.vocab) - len(parent.vocab)
        trainer.model.load_state_dict(finetune.extend_state(parent.model.state_dict(), parent.config, added))
        trainer.meta_base["lineage"] = finetune.lineage(parent, cfg.new_chars, data.new_chars)
    elif saved is not None and saved.lineage is not None:
        trainer.meta_base["lineage"] = saved.lineage
    if saved is not None:
        trainer.restore(saved)
    trainer.plan()
    if saved is not None:
        trainer.check_plan()
    return trainer, saved


def _run(trainer: Trainer, run: RunDir, resumed: bool, emit, device, dist: Dist) -> TrainResult:
    """The run itself, once the folder is locked and written: the start event, the loop, the final
    evaluation and checkpoint, the whole-tail figure."""
    trainer.emit, cfg, data = emit, trainer.cfg, trainer.data
    for warning in trainer.warnings:
        emit("warning", {"message": warning})
    trainer.distribute()
    st = trainer.state
    emit("start", {"out": run.path, "device": device, "model": trainer.model, "model_config": trainer.model_config,
                   "train_chars": len(data.train_ids), "val_chars": len(data.val_ids), "vocab": data.vocab,
                   "step": st.step, "total_steps": st.planned_steps or trainer.total_steps(),
                   "resumed": resumed,
                   "precision": cfg.precision, "world_size": dist.world_size, "weight_decay": trainer.weight_decay,
                   "lineage": trainer.meta_base.get("lineage"), "new_chars": data.new_chars,
                   "sizing": trainer.meta_base.get("sizing")})
    with _stop_on_signals() as stop:
        try:
            stopped = False
            try:
                stop_reason = trainer.run(stop)
            except StopTraining as exc:  # the callback's stop: ends the run as a signal does
                stop_reason, stopped = str(exc), True
            done = not stop["signal"]  # the loop ended by its own rule: a signal from here on cuts the final work only
            if trainer.last_eval_step != st.step:
                with contextlib.suppress(StopTraining):  # (the run ends here anyway)
                    trainer.evaluate_and_save(scheduled=False)  # the final evaluation and checkpoint
            if not stop["signal"] and not stopped:
                trainer.evaluate_best_on_tail()
            result = trainer.result(stop_reason)
        except torch.OutOfMemoryError:
            raise TrainError(f"{device} ran out of memory at step {st.step + 1}; use a smaller --batch-size, "
                             f"--num-steps or --hidden-size, or --precision bf16; resume from "
                             f"{run.checkpoint('last')} with --resume") from None
        except RuntimeError as exc:
            if not (dist.enabled and collective_failed(exc)):
                raise
            raise ProcessGroupError(
                f"rank {dist.rank} lost the other processes after step {st.step} ({failure_line(exc)}): one "
                f"died or did not answer within --dist-timeout {cfg.dist_timeout:g}s; resume from "
                f"{run.checkpoint('last')} with --resume") from None
        if stop["signal"]:
            raise TrainingInterrupted(f"{stop['signal']}: stopped at step {st.step}", result, complete=done)
    emit("end", {"result": result})
    return result
