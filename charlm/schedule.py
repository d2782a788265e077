"""A run's learning-rate schedule and the step time a planned one is fitted to. Library code, used by
:class:`charlm.training.Trainer`.

- :func:`scheduled_lr`: the lr of each step of a planned schedule (``hold-decay``, ``cosine``);
- :class:`Schedule`: the rules of the run's schedule: a planned one's length, fixed before the first step
  from ``--epochs`` and ``--max-steps``, checked on a resume, shortened when the time left cannot hold it and
  grown back (never past the plan ``--epochs`` and ``--max-steps`` fixed) when the steps run faster again; the
  plateau schedule's decay after held-out evaluations that did not improve;
- :class:`StepClock`: this invocation's step time, measured after the first steps and evaluations (they run
  cold) over its latest evaluation intervals, and the steps the time left can still hold.

What the schedule moves is kept in the run's :class:`~charlm.training.RunState` (saved in every
checkpoint, so a resume follows the same plan); the step time is this invocation's own. Neither class reads
the clock: the trainer passes its readings in (:meth:`charlm.training.Trainer.elapsed`,
:meth:`charlm.training.Trainer.reserve`), and neither draws a random number.
"""

from __future__ import annotations

import math

from charlm.config import HOLD_FRACTION, TrainConfig
from charlm.data import run_batches

WARM_STEPS = 10  # steps a time-limited invocation runs before its step time counts (the first ones run cold)
RECENT_INTERVALS = 4  # the step time is the mean over the latest intervals between evaluations (or the last alone,
# when slower): a machine slowed for a while by other work is not taken to stay slow to the end
GROW_MARGIN = 0.02  # a plan the time shortened grows back only by more than this share of it (or to its ceiling)


def scheduled_lr(schedule: str, base: float, step: int, planned: int | None,
                 anchor: tuple[int, float] | None = None) -> float:
    """The lr of step ``step`` (0-based) of a planned schedule ``planned`` steps long, whose last step
    (``planned - 1``) is its end, at lr 0: ``hold-decay`` holds ``base`` for the first HOLD_FRACTION of
    the steps, then falls linearly; ``cosine`` follows half a cosine from ``base``. ``anchor`` ``(step, lr)``:
    a plan shortened while the run went falls from there, from the lr it had, the same way to 0 at its
    new last step (the lr never jumps). ``base`` for the plateau schedule, before a plan is known, and
    for a plan of one step."""
    if schedule == "plateau" or not planned or planned < 2:
        return base
    last = planned - 1
    if step >= last:
        return 0.0
    start, lr0 = anchor if anchor is not None else (HOLD_FRACTION * planned if schedule == "hold-decay" else 0, base)
    if step < start:
        return base
    frac = (step - start) / (last - start)
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * frac)) if schedule == "cosine" else lr0 * (1.0 - frac)


def held_through(planned: int) -> int:
    """The last step (counted from 1) that a ``planned``-step hold-decay plan runs at its full lr: the steps
    of index up to ``HOLD_FRACTION * planned`` (:func:`scheduled_lr`; its fall starts there at the full lr),
    short of the last, which runs at 0."""
    return max(1, min(math.floor(HOLD_FRACTION * planned) + 1, planned - 1))


class Schedule:
    """The rules of a run's lr schedule (``--lr-schedule``). What they move lives in the
    :class:`~charlm.training.RunState` each method is given, so that checkpoints hold it: a planned
    schedule's length and the anchor a shortened plan falls from, the plateau schedule's best loss and the
    evaluations since it. The plateau schedule has no plan (``planned`` is False: the plan's methods leave
    the state as it is)."""

    def __init__(self, cfg: TrainConfig, train_tokens: int):
        self.cfg, self.train_tokens = cfg, train_tokens
        self.base_lr = cfg.resolved_lr()
        self.time_shortened = False  # the time limit changed the plan (the stop reason says so)

    @property
    def planned(self) -> bool:
        return self.cfg.lr_schedule != "plateau"

    def total_steps(self) -> int:
        """Steps in ``cfg.epochs`` epochs (each epoch's own random offset may drop a batch), at most
        ``cfg.max_steps``: what a planned schedule is planned for."""
        cfg = self.cfg
        return run_batches(self.train_tokens, cfg.batch_size, cfg.num_steps, cfg.seed, cfg.epochs, cfg.max_steps)

    def fix(self, st) -> None:
        """Fix a planned schedule's length before the first step: the run's steps as ``--epochs`` and
        ``--max-steps`` bound it (:meth:`total_steps`), which is also the most a plan the time limit shortened
        grows back to (``plan_ceiling``). A resumed run keeps the plan it saved (and a run saved before the
        ceiling was, its saved plan as its ceiling)."""
        if self.planned and st.planned_steps is None:
            st.planned_steps = st.plan_ceiling = self.total_steps()
        elif st.planned_steps is not None and st.plan_ceiling is None:
            st.plan_ceiling = st.planned_steps

    def lr(self, st) -> float:
        """The planned lr of the step about to be taken."""
        return scheduled_lr(self.cfg.lr_schedule, self.base_lr, st.step, st.planned_steps, st.plan_anchor)

    def shorten(self, st, steps: int) -> bool:
        """End the plan after ``steps`` steps in all (at least one more) when that is sooner than planned,
        falling from the lr of the step about to be taken (no jump); True if it changed."""
        steps = max(st.step + 1, steps)
        if st.planned_steps is None or steps >= st.planned_steps:
            return False
        self._replan(st, steps)
        return True

    def _replan(self, st, steps: int) -> None:
        """Make the plan ``steps`` long from here, falling from the lr of the step about to be taken (anchored
        there), unless the lr is still held under both the plan and the new one: then the new one keeps its own
        shape."""
        lr_now = self.lr(st)
        held = self.cfg.lr_schedule == "hold-decay" and st.plan_anchor is None and \
            st.step < HOLD_FRACTION * min(steps, st.planned_steps)
        st.planned_steps = steps
        if not held and st.step > 0:
            st.plan_anchor = (st.step, lr_now)

    def lengthen(self, st, steps: int) -> bool:
        """Grow a plan the time limit shortened to ``steps`` steps in all (at most ``plan_ceiling``, the plan
        ``--epochs`` and ``--max-steps`` fixed), when that is more than GROW_MARGIN longer (or the whole of it);
        the lr falls from the lr of the step about to be taken, more slowly (it never jumps, never rises). True
        if it changed."""
        ceiling = st.plan_ceiling
        if st.planned_steps is None or ceiling is None or st.step >= st.planned_steps - 1:
            return False  # no plan, or at its last step (lr 0): nothing left to stretch
        steps = min(steps, ceiling)
        if steps <= st.planned_steps or (steps < ceiling and steps - st.planned_steps
                                         <= GROW_MARGIN * st.planned_steps):
            return False
        self._replan(st, steps)
        return True

    def fit(self, st, proposal: int, grow: bool = False) -> None:
        """Fit the plan to rank 0's proposal (:meth:`StepClock.time_plan`; -1: none): shorten it when the time
        left cannot hold it; with ``grow`` (at a scheduled evaluation, where the step time is re-measured, and at
        a step whose plan would end before the next one or at the step after it) grow a shortened plan back when
        the time left holds more (:meth:`lengthen`)."""
        if proposal < 0:
            return
        if self.shorten(st, proposal) or (grow and self.lengthen(st, proposal)):
            self.time_shortened = True

    def check(self, st) -> str | None:
        """On a resume: a plan longer than --epochs and --max-steps now allow is shortened from here (and so is
        the most it may grow back to); one they would extend is kept. The warning the run gives either way, or
        None."""
        cfg = self.cfg
        if not self.planned or st.planned_steps is None:
            return None
        bound = self.total_steps()
        if bound <= st.step:  # no step will be taken (--max-steps reached): the saved plan stays as it was
            return None
        ceiling = st.plan_ceiling if st.plan_ceiling is not None else st.planned_steps
        st.plan_ceiling = min(ceiling, max(bound, st.step + 1))
        if self.shorten(st, bound):
            # (steps counted from 1, as metrics.csv counts them: step n runs at the lr of index n - 1)
            if st.plan_anchor is None and cfg.lr_schedule == "hold-decay":  # still in the shorter plan's hold
                how = f"its lr held through step {held_through(st.planned_steps):,}, then falling to 0"
            else:
                how = "its lr falling from where it is now to 0"
            return (f"the {cfg.lr_schedule} schedule now ends at step {st.planned_steps:,} (--max-steps or "
                    f"--epochs), {how}")
        if cfg.max_steps and cfg.max_steps > st.plan_ceiling:
            name, planned, ceiling = cfg.lr_schedule, st.planned_steps, st.plan_ceiling
            if planned == ceiling:
                say = f"the {name} schedule's plan is {planned:,} steps; the run ends there"
            elif st.step >= planned - 1:  # (its last step, at lr 0, is all that is left: nothing to grow)
                say = (f"the {name} schedule's plan, shortened by the time limit, "
                       f"{'ended' if st.step >= planned else 'ends'} at step {planned:,}")
            elif not cfg.time_limit:
                say = (f"the {name} schedule's plan, shortened by the time limit, ends at step {planned:,} (with no "
                       f"time limit, --time-limit 0, it is not fitted to the time, so it does not grow back)")
            else:
                say = (f"the {name} schedule's plan, shortened by the time limit, ends at step {planned:,}; it may "
                       f"grow back to its bound, {ceiling:,} steps, no further")
            return f"{say} (--max-steps {cfg.max_steps:,} does not extend a plan)"
        return None

    def plateau(self, st, loss: float) -> bool:
        """After a scheduled evaluation: a new plateau best, or one more evaluation without it, after which
        the plateau schedule's lr decays by --lr-decay (True when it did). It depends on held-out losses
        only, so a resumed run repeats it."""
        if loss < st.plateau_loss:
            st.plateau_loss, st.evals_since_best = loss, 0
            return False
        st.evals_since_best += 1
        if self.cfg.lr_decay < 1.0 and not self.planned:  # a plateau: smaller steps
            st.lr *= self.cfg.lr_decay
            return True
        return False

    def done(self, st) -> str | None:
        """The stop reason once the plan's last step is taken; None before."""
        if st.planned_steps is None or st.step < st.planned_steps:
            return None
        fitted = f" (fitted to --time-limit {self.cfg.time_limit:g}s)" if self.time_shortened else ""
        return f"the {self.cfg.lr_schedule} schedule's {st.planned_steps:,} planned steps done{fitted}"


class StepClock:
    """This invocation's step time, from the elapsed seconds the trainer reads at its marks, and the steps
    that the time left under --time-limit can still hold (:meth:`time_plan`)."""

    def __init__(self, time_limit: float | None, first_step: int = 0):
        self.time_limit = time_limit
        self.first_step = first_step  # the step this invocation started from
        self.marks = []  # (step, elapsed) at this invocation's latest RECENT_INTERVALS + 1 scheduled evaluations
        self.eval_s = 0.0  # what the latest one took
        self.resumed = None  # (step, elapsed) when the steps went on after the latest one's checkpoints were written
        self.step_mark = None  # (step, elapsed) after this invocation's first WARM_STEPS steps

    def warm(self, step: int, now: float) -> None:
        """After each step: the first WARM_STEPS steps of the invocation done, the steps' own time starts."""
        if self.step_mark is None and step - self.first_step == WARM_STEPS:
            self.step_mark = (step, now)

    def mark(self, step: int, now: float, eval_s: float = 0.0) -> None:
        """At a scheduled evaluation, once it is measured (``eval_s``: what it took): the first of the invocation
        starts the step-time measurement (the first steps and the first evaluation run cold: a first evaluation
        measured at several times its later cost made the final work's reserve eat 14% of a 15-minute run); each
        later one measures the interval since the one before, from which :meth:`time_plan` estimates."""
        self.eval_s = eval_s
        if step == self.first_step:
            return
        kept = self.marks[:-1] if self.marks and self.marks[-1][0] >= step else self.marks  # (no interval of 0 steps)
        self.marks = (kept + [(step, now)])[-(RECENT_INTERVALS + 1):]

    def steps_resume(self, step: int, now: float) -> None:
        """After a scheduled evaluation's checkpoints are written: the steps of the interval under way are timed
        from here, so that the writing is not read as their time; what the evaluation and the writing took is
        added back spread over an interval's steps (:meth:`time_plan`)."""
        self.resumed = (step, now)

    def time_plan(self, step: int, now: float, reserve: float) -> int | None:
        """Under --time-limit: the steps the run can still take in all, from the time left (the final work's
        ``reserve`` kept) at the slowest of three step times, each with the evaluations and checkpoints in it:
        the mean over the latest RECENT_INTERVALS whole intervals between evaluations (since the first
        evaluation while there are fewer), the last one, and, once WARM_STEPS steps into the interval under way,
        its steps' own time (from its evaluation's checkpoints written) plus what that evaluation and its
        writing took over an interval's steps. So a run that slows down is caught within an interval, one that
        ran slow for a while is not held to it, and the writing just done is not read as slow steps. ``step``
        when the time is up; None while nothing is measured yet."""
        left = self.time_limit - now - reserve
        if left <= 0:
            return step
        if len(self.marks) >= 2:
            (s0, t0), (s1, t1), (s2, t2) = self.marks[0], self.marks[-2], self.marks[-1]
            per_step = max((t2 - t0) / (s2 - s0), (t2 - t1) / (s2 - s1))
            going = self.resumed
            if going is not None and going[0] == s2 and step - s2 >= WARM_STEPS:  # the interval under way
                overhead = self.eval_s + (going[1] - t2)  # the latest evaluation and its checkpoints
                per_step = max(per_step, (now - going[1]) / (step - s2) + overhead / (s2 - s1))
        elif self.step_mark is not None and step - self.step_mark[0] >= WARM_STEPS:
            # no two evaluations yet (a large --eval-every, a short limit): the steps' own time since the
            # warm-up, so that the plan is fitted long before the time is up rather than cut at the end
            per_step = (now - self.step_mark[1]) / (step - self.step_mark[0])
        else:
            return None
        return step + int(left / per_step)
