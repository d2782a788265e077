"""The training loop. Library code: it prints nothing and reports through ``callback(event, info)``.

Events: ``"start"`` (the run's facts), ``"step"`` (every few steps: step, loss, tokens/s),
``"eval"`` (a ``metrics.csv`` row), ``"end"`` (the :class:`TrainResult`).

Resuming is exact: the data order depends only on ``(seed, epoch)``, the trainer state saved with
every checkpoint holds the optimizer, the step, the position in the epoch, the carried hidden
state and every RNG state, and nothing in the schedule depends on ``max_steps``, ``time_limit`` or
wall time. So a run stopped at step 30 and resumed to step 60 ends with the weights of one run
to step 60.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from charlm import checkpoint as ckpt_mod
from charlm.config import TrainConfig
from charlm.corpus import load_corpus
from charlm.data import make_batches, min_tokens, split
from charlm.evaluate import EvalResult, evaluate
from charlm.models import RNNLM, detach_state

METRICS_COLUMNS = ("step", "epoch", "tokens", "elapsed_s", "train_loss", "val_loss", "val_bpc",
                   "val_ppl", "lr", "grad_norm", "tokens_per_s")
MAX_NONFINITE = 5  # consecutive non-finite steps before the run saves and stops
MODEL_FIELDS = ("cell", "impl", "hidden_size", "num_layers", "embedding_dim", "dropout")
DATA_FIELDS = ("corpus", "preprocess", "max_chars", "val_fraction", "batch_size", "num_steps", "sampling", "seed")


class TrainError(Exception):
    """A run cannot start or had to stop; the message is one line for the user."""


class RunExistsError(TrainError):
    pass


class TrainingInterrupted(TrainError):
    """SIGINT/SIGTERM: ``last/`` was saved; ``result`` says where the run stands."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


@dataclass
class TrainResult:
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
    save_s: float = 0.0  # of elapsed_s: seconds spent writing checkpoints and drawing curve.png


def default_out(corpus: str | os.PathLike) -> Path:
    return Path("checkpoints") / Path(corpus).stem


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is a ``ValueError``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available: this torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} is not available: {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def config_differences(saved: dict, requested: TrainConfig, names=MODEL_FIELDS + DATA_FIELDS) -> list[str]:
    """``name: saved -> requested`` for every model or data option that differs."""
    out = []
    for name in names:
        if saved.get(name) != getattr(requested, name):
            out.append(f"{name.replace('_', '-')}: {saved.get(name)!r} -> {getattr(requested, name)!r}")
    return out


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


def _make_optimizer(cfg: TrainConfig, model: RNNLM):
    lr = cfg.resolved_lr()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, foreach=True)
    return torch.optim.Adam(model.parameters(), lr=lr, foreach=True)


def prepare_data(cfg: TrainConfig):
    """Corpus, train ids and held-out ids, checked against the batch shape."""
    corpus = load_corpus(cfg.corpus, preprocess=cfg.preprocess)
    try:
        train_ids, val_ids = split(corpus.ids, cfg.val_fraction)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if cfg.max_chars is not None:
        train_ids = train_ids[: cfg.max_chars]
    need = min_tokens(cfg.batch_size, cfg.num_steps)
    if len(train_ids) < need:
        raise TrainError(
            f"the training part of {cfg.corpus} has {len(train_ids):,} characters, but batch size "
            f"{cfg.batch_size} x {cfg.num_steps} steps needs at least {need:,}; use a smaller "
            f"--batch-size or --num-steps"
        )
    return corpus, train_ids, val_ids


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callback=None) -> TrainResult:
    """Train as ``charlm train`` does and return the outcome. See the module docstring."""
    emit = callback or (lambda event, info: None)
    out = Path(cfg.out) if cfg.out else default_out(cfg.corpus)
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise TrainError(str(exc)) from None

    # ---- everything is checked before any file is written ---------------------------------
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not (resume or overwrite):
        raise RunExistsError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    if resume and overwrite:
        raise TrainError("--resume and --overwrite contradict each other; pass one")
    saved = None
    if resume:
        ckpt_mod.recover(out / "last")
        if not (out / "last").is_dir():
            raise TrainError(f"nothing to resume: {out / 'last'} does not exist")
        try:
            saved = ckpt_mod.load_checkpoint(out / "last", device=device, with_trainer_state=True)
        except ckpt_mod.CheckpointError as exc:
            raise TrainError(str(exc)) from None
        diffs = config_differences(saved.meta["train"], cfg)
        if diffs:
            raise TrainError("--resume with different model or data options: " + "; ".join(diffs))

    corpus, train_ids, val_ids = prepare_data(cfg)
    model_cfg = cfg.model_config(len(corpus.vocab), len(train_ids))
    if saved is not None and saved.vocab != corpus.vocab:
        raise TrainError(f"{cfg.corpus} no longer gives the vocabulary the run was trained with")

    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- model, optimizer, position ------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = RNNLM.from_config(model_cfg).to(device)
    optimizer = _make_optimizer(cfg, model)
    lr = cfg.resolved_lr()
    step, epoch, batch_in_epoch = 0, 0, 0
    best_loss, evals_since_best = math.inf, 0
    state = None
    if saved is not None:
        model.load_state_dict(saved.model.state_dict())
        ts = saved.trainer_state
        optimizer.load_state_dict(ts["optimizer"])
        lr = optimizer.param_groups[0]["lr"]
        step, epoch, batch_in_epoch = ts["step"], ts["epoch"], ts["batch_in_epoch"]
        best_loss, evals_since_best = ts["best_loss"], ts["evals_since_best"]
        torch.set_rng_state(ts["torch_rng"])
        if device.type == "cuda" and ts.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ts["cuda_rng"], device)
        if ts.get("state") is not None:
            state = tuple(s.to(device) for s in ts["state"])
            state = state if model_cfg.cell == "lstm" else state[0]
        _truncate_metrics(out / "metrics.csv", step)

    meta_base = {
        "train": cfg.to_dict(),
        "corpus": {"path": str(Path(cfg.corpus)), "preprocess": cfg.preprocess, "val_fraction": cfg.val_fraction,
                   "max_chars": cfg.max_chars, "chars": len(corpus), "train_chars": len(train_ids),
                   "val_chars": len(val_ids)},
    }
    tokens_per_step = cfg.batch_size * cfg.num_steps
    emit("start", {"out": out, "device": device, "model": model, "model_config": model_cfg,
                   "train_chars": len(train_ids), "val_chars": len(val_ids), "vocab": corpus.vocab,
                   "step": step, "total_steps": _total_steps(cfg, train_ids),
                   "resumed": saved is not None})

    def trainer_state():
        st = None if state is None else (state if isinstance(state, tuple) else (state,))
        return {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "best_loss": best_loss, "evals_since_best": evals_since_best,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "state": None if st is None else tuple(s.detach().cpu() for s in st)}

    overhead = {"eval_s": 0.0, "save_s": 0.0}

    def save(name, val: EvalResult | None):
        t0 = time.perf_counter()
        meta = {**meta_base, "progress": {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                          "best_val_loss": None if math.isinf(best_loss) else best_loss,
                                          "val_loss": val.loss if val else None}}
        ckpt_mod.save_checkpoint(out / name, model, corpus.vocab, meta, trainer_state())
        overhead["save_s"] += time.perf_counter() - t0

    # ---- the loop ------------------------------------------------------------------------
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    norm_sum = torch.zeros((), device=device)
    interval_steps, interval_tokens = 0, 0
    last_val = None
    best_val = None
    nonfinite = 0
    t_start = time.perf_counter()
    t_interval = t_start
    stop_reason = None
    max_norm = cfg.clip if cfg.clip > 0 else math.inf

    def run_eval():
        nonlocal lr, best_loss, evals_since_best, last_val, best_val, interval_steps, interval_tokens, t_interval
        now = time.perf_counter()
        val = evaluate(model, val_ids, device=device)
        overhead["eval_s"] += time.perf_counter() - now
        train_loss = (loss_sum / interval_steps).item() if interval_steps else None
        row = {"step": step, "epoch": round(epoch + batch_in_epoch / max(1, steps_per_epoch), 4),
               "tokens": step * tokens_per_step, "elapsed_s": round(now - t_start, 3),
               "train_loss": train_loss, "val_loss": val.loss, "val_bpc": val.bits_per_char,
               "val_ppl": val.perplexity, "lr": lr,
               "grad_norm": (norm_sum / interval_steps).item() if interval_steps else None,
               "tokens_per_s": round(interval_tokens / (now - t_interval), 1) if interval_steps else None}
        _append_metrics(out / "metrics.csv", row)
        last_val = val
        improved = val.loss < best_loss
        if improved:
            best_loss, evals_since_best, best_val = val.loss, 0, val
            save("best", val)
        else:
            evals_since_best += 1
            if cfg.lr_decay < 1.0:  # a plateau: smaller steps (depends on held-out loss only, so resumable)
                lr *= cfg.lr_decay
                for group in optimizer.param_groups:
                    group["lr"] = lr
        save("last", val)
        emit("eval", {**row, "improved": improved, "best_val_bpc": best_loss / math.log(2)})
        loss_sum.zero_(), norm_sum.zero_()
        interval_steps, interval_tokens = 0, 0
        t_interval = time.perf_counter()
        return row

    steps_per_epoch = 0
    last_row = None
    model.train()
    with _stop_on_signals() as stop_flag:
        while stop_reason is None:
            if epoch >= cfg.epochs:
                stop_reason = f"{cfg.epochs} epochs done"
                break
            batches = make_batches(cfg.sampling, train_ids, cfg.batch_size, cfg.num_steps,
                                   seed=cfg.seed, epoch=epoch, start=batch_in_epoch)
            steps_per_epoch = batches.num_batches
            for X, Y in batches:
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stop_reason = f"--max-steps {cfg.max_steps} reached"
                    break
                X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
                # random windows are unrelated: fresh state; sequential ones continue: detach (TBPTT)
                state = None if cfg.sampling == "random" else detach_state(state)
                logits, new_state = model(X, state)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
                if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # one sync per step
                    nonfinite += 1
                    if nonfinite >= MAX_NONFINITE:
                        save("last", last_val)
                        raise TrainError(
                            f"the loss was not finite for {nonfinite} steps in a row at step {step + 1}; "
                            f"saved {out / 'last'} (weights from before those steps); try a lower --lr "
                            f"or --clip")
                else:
                    nonfinite = 0
                    optimizer.step()
                    state = new_state
                    loss_sum += loss.detach()
                    norm_sum += grad_norm.detach()
                step += 1
                batch_in_epoch += 1
                interval_steps += 1
                interval_tokens += tokens_per_step
                if step % 10 == 0:
                    emit("step", {"step": step, "loss_sum": loss_sum, "interval_steps": interval_steps,
                                  "tokens": interval_tokens, "elapsed": time.perf_counter() - t_interval})
                if step % cfg.eval_every == 0:
                    last_row = run_eval()
                    if cfg.patience is not None and evals_since_best >= cfg.patience:
                        stop_reason = f"no held-out improvement in {cfg.patience} evaluations"
                if stop_flag["signal"]:
                    stop_reason = stop_flag["signal"]
                elif stop_reason is None and cfg.time_limit is not None and time.perf_counter() - t_start >= cfg.time_limit:
                    stop_reason = f"--time-limit {cfg.time_limit:g}s reached"
                if stop_reason is not None:
                    break
            else:  # the epoch ran out
                epoch += 1
                batch_in_epoch = 0
                state = None  # each epoch starts from a zero state, as in d2l

        if last_row is None or last_row["step"] != step:
            run_eval()  # the final evaluation and checkpoint
        t0 = time.perf_counter()
        try:
            from charlm.plot import plot_curve

            plot_curve(out / "metrics.csv", out / "curve.png")
        except ImportError:
            pass
        overhead["save_s"] += time.perf_counter() - t0
        result = TrainResult(out=out, steps=step, epochs_done=epoch + batch_in_epoch / max(1, steps_per_epoch),
                             tokens=step * tokens_per_step, elapsed_s=time.perf_counter() - t_start,
                             stop_reason=stop_reason, best=best_val or _best_from_saved(best_loss, last_val),
                             last=last_val, train_loss=_last_train_loss(out / "metrics.csv"), **overhead)
        if stop_flag["signal"]:
            raise TrainingInterrupted(f"{stop_flag['signal']}: stopped at step {step}", result)
    emit("end", {"result": result})
    return result


def _total_steps(cfg: TrainConfig, train_ids) -> int:
    """Steps in ``cfg.epochs`` epochs (an estimate: each epoch's random offset may drop a batch)."""
    per_epoch = len(make_batches(cfg.sampling, train_ids, cfg.batch_size, cfg.num_steps, seed=cfg.seed))
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def _best_from_saved(best_loss: float, last: EvalResult | None) -> EvalResult | None:
    if math.isinf(best_loss):
        return None
    return EvalResult(loss=best_loss, tokens=last.tokens if last else 0)


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in METRICS_COLUMNS})


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows written after the checkpoint being resumed (a kill between writes)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _last_train_loss(path: Path) -> float | None:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    return float(rows[-1]["train_loss"]) if rows else None
