"""Planned learning-rate schedules (hold-decay, cosine): the lr at each step, the plan's length from
--max-steps, --epochs or the measured step time under --time-limit, and exact resume of a planned run."""

import csv
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from charlm import checkpoint as ck
from charlm.config import HOLD_FRACTION, TrainConfig
from charlm.errors import ConfigError, TrainingInterrupted
from charlm.training import Trainer, scheduled_lr, train


def config(corpus, out, **kw):
    base = dict(corpus=str(corpus), out=str(out), cell="gru", hidden_size=16, embedding_dim=8, batch_size=4,
                num_steps=10, eval_every=10, time_limit=None, patience=None, epochs=100, dropout=0.2,
                optimizer="sgd", lr=0.5, lr_schedule="hold-decay")
    return TrainConfig(**{**base, **kw})


def lrs(out) -> dict[int, float]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def trainer_state(out):
    return ck.load_checkpoint(Path(out) / "last", with_trainer_state=True).trainer_state


def assert_same_weights(a, b):
    wa, wb = (ck.load_checkpoint(Path(o) / "last").model.state_dict() for o in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_the_lr_at_each_step():
    """Step ``planned - 1``, the last one taken, is the schedule's end (lr 0)."""
    assert [scheduled_lr("hold-decay", 1.0, s, 10) for s in range(11)] == pytest.approx(
        [1.0] * 7 + [2 / 3, 1 / 3, 0.0, 0.0])
    assert HOLD_FRACTION == 0.6
    cos = [scheduled_lr("cosine", 2.0, s, 4) for s in range(5)]
    assert cos == pytest.approx([2.0, 1.5, 0.5, 0.0, 0.0])
    assert scheduled_lr("hold-decay", 0.3, 7, None) == scheduled_lr("plateau", 0.3, 7, 10) == 0.3  # no plan yet
    assert scheduled_lr("cosine", 1.0, 12, 10) == 0.0  # past the plan: its end
    assert scheduled_lr("hold-decay", 0.3, 0, 1) == 0.3  # one step: nothing to decay
    # a plan shortened at step 5 (when the lr was 0.8) falls from there to 0 at its new last step, 9
    assert [scheduled_lr("hold-decay", 1.0, s, 10, (5, 0.8)) for s in range(4, 10)] == pytest.approx(
        [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    with pytest.raises(ConfigError, match="lr schedule must be one of plateau, hold-decay, cosine"):
        TrainConfig(corpus="x", lr_schedule="linear")


@pytest.mark.parametrize("schedule", ["hold-decay", "cosine"])
def test_a_plan_from_max_steps_reaches_the_optimizer_and_ends_the_run(corpus, tmp_path, schedule):
    result = train(config(corpus, tmp_path / "r", max_steps=40, lr_schedule=schedule))
    assert result.steps == 40 and trainer_state(tmp_path / "r")["planned_steps"] == 40
    # each row shows the lr of the step just taken (step - 1, 0-based)
    assert lrs(tmp_path / "r") == pytest.approx({s: scheduled_lr(schedule, 0.5, s - 1, 40) for s in (10, 20, 30, 40)})
    assert trainer_state(tmp_path / "r")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        scheduled_lr(schedule, 0.5, 39, 40))


def test_a_planned_schedule_ignores_plateaus_but_patience_still_stops(corpus, tmp_path):
    result = train(config(corpus, tmp_path / "r", max_steps=200, eval_every=2, patience=1, lr=50.0, lr_decay=0.5,
                          weight_decay=0))
    assert result.stop_reason == "no held-out improvement in 1 evaluations"  # lr 50: the loss gets worse
    assert all(lr == 50.0 for lr in lrs(tmp_path / "r").values())  # held: no plateau decay under a plan


def test_a_planned_run_resumes_exactly(corpus, tmp_path):
    """Stopped at step 20 of a 60-step plan (a signal), then resumed: the same lr at every step, the same
    weights, as a run never stopped."""
    def stop_at_20(event, info):
        if event == "step" and info["step"] == 20:
            os.kill(os.getpid(), signal.SIGINT)

    train(config(corpus, tmp_path / "straight", max_steps=60))
    with pytest.raises(TrainingInterrupted):
        train(config(corpus, tmp_path / "parts", max_steps=60), callback=stop_at_20)
    assert trainer_state(tmp_path / "parts")["planned_steps"] == 60
    train(config(corpus, tmp_path / "parts", max_steps=60), resume=True)
    assert lrs(tmp_path / "parts") == lrs(tmp_path / "straight")
    assert_same_weights(tmp_path / "parts", tmp_path / "straight")


def test_a_time_limited_plan_is_measured_once_and_a_resume_follows_it(corpus, tmp_path, monkeypatch):
    """Under --time-limit the plan is shortened from the step time measured between the first two evaluations.
    The clock is faked: 0.25 s of start-up, then 1/64 s a step, nothing reserved; so at step 20 the
    0.4375 s left make 28 more steps: a plan of 48 (measured from the start, the start-up would have
    made it 24). Stopped at step 20 and resumed without a time limit (nothing to fit the plan to), the saved
    plan ends the run at 48, as a straight run."""
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 0.25 + (self.state.step - self.first_step) / 64)
    monkeypatch.setattr(Trainer, "reserve", lambda self: 0.0)
    warnings = []

    def stop_at_20(event, info):  # the second evaluation's step: the plan must be in the checkpoint it saves
        if event == "warning":
            warnings.append(info["message"])
        if event == "step" and info["step"] == 20:
            os.kill(os.getpid(), signal.SIGINT)

    straight = train(config(corpus, tmp_path / "straight", time_limit=1.0))
    assert straight.steps == 48 and trainer_state(tmp_path / "straight")["planned_steps"] == 48
    with pytest.raises(TrainingInterrupted):
        train(config(corpus, tmp_path / "parts", time_limit=1.0), callback=stop_at_20)
    assert trainer_state(tmp_path / "parts")["step"] == 20 and trainer_state(tmp_path / "parts")["planned_steps"] == 48
    ceiling = trainer_state(tmp_path / "parts")["plan_ceiling"]
    assert ceiling > 100  # what 100 epochs hold: the most the plan may grow back to
    resumed = train(config(corpus, tmp_path / "parts", time_limit=None), resume=True, callback=stop_at_20)
    assert resumed.steps == 48 and resumed.stop_reason == "the hold-decay schedule's 48 planned steps done"
    assert straight.stop_reason == "the hold-decay schedule's 48 planned steps done (fitted to --time-limit 1s)"
    assert lrs(tmp_path / "straight")[48] == 0.0  # the last step taken is the schedule's end
    assert warnings == []
    assert lrs(tmp_path / "parts") == lrs(tmp_path / "straight")
    assert_same_weights(tmp_path / "parts", tmp_path / "straight")


def fake_clock(monkeypatch, clock):
    """The trainer reads ``clock(steps this invocation has taken)`` as its elapsed seconds, and reserves nothing
    for its final work."""
    monkeypatch.setattr(Trainer, "elapsed", lambda self: clock(self.state.step - self.first_step))
    monkeypatch.setattr(Trainer, "reserve", lambda self: 0.0)


def recorded_lrs(monkeypatch) -> list[float]:
    """The lr of every step taken, in order, as the optimizer gets it."""
    seen = []
    apply = Trainer.apply_lr

    def record(self):
        apply(self)
        seen.append(self.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(Trainer, "apply_lr", record)
    return seen


@pytest.mark.parametrize("max_steps, eval_every", [(30, 100), (30, 15), (31, 15), (31, 100)])
@pytest.mark.parametrize("schedule", ["hold-decay", "cosine"])
def test_short_runs_follow_their_schedule_from_the_first_step(corpus, tmp_path, monkeypatch, max_steps, eval_every,
                                                             schedule):
    """--max-steps bounds the plan before the first step, whatever the evaluations and the time limit
    (600 s, the default: no time is measured in so few steps); the plan is as long as the run, never a
    step more, and its last step, the last one taken, has the schedule's end."""
    seen = recorded_lrs(monkeypatch)
    result = train(config(corpus, tmp_path / "r", max_steps=max_steps, eval_every=eval_every, time_limit=600.0,
                          lr_schedule=schedule))
    assert result.steps == max_steps and trainer_state(tmp_path / "r")["planned_steps"] == max_steps
    assert seen == pytest.approx([scheduled_lr(schedule, 0.5, s, max_steps) for s in range(max_steps)])
    assert seen[0] == 0.5 and seen[-1] == 0.0 and 0 < seen[-2] < 0.5
    assert result.stop_reason == f"the {schedule} schedule's {max_steps} planned steps done"


def test_epochs_bound_the_plan_exactly(corpus, tmp_path, monkeypatch):
    """--epochs alone: the plan counts each epoch's batches at its own random offset, so the run's last
    step is the plan's last."""
    seen = recorded_lrs(monkeypatch)
    result = train(config(corpus, tmp_path / "r", epochs=7, eval_every=1000))
    assert result.stop_reason.startswith("the hold-decay schedule's")
    assert result.steps == trainer_state(tmp_path / "r")["planned_steps"] == len(seen) and seen[-1] == 0.0


def test_a_plan_shortened_late_by_the_time_limit_never_jumps(corpus, tmp_path, monkeypatch):
    """The steps slow down threefold after step 40 of a 100-step plan: the plan is shortened as the time
    left shrinks, each time falling from the lr the step would have had (the old rule fixed the plan
    late, and its lr jumped from the base to 0.83x of it in one step), and the run ends on the shortened
    plan's last step, at lr 0, within the time limit."""
    def clock(step):
        return 0.1 + min(step, 40) / 64 + max(0, step - 40) * 3 / 64

    fake_clock(monkeypatch, clock)
    plans, apply = [], Trainer.apply_lr

    def record(self):
        apply(self)
        plans.append((self.state.planned_steps, self.state.plan_anchor, self.optimizer.param_groups[0]["lr"]))

    monkeypatch.setattr(Trainer, "apply_lr", record)
    limit = 0.1 + 100 / 64  # what the 100 steps would take at the first speed
    result = train(config(corpus, tmp_path / "r", max_steps=100, time_limit=limit))
    assert 40 < result.steps < 100 and result.steps == len(plans) and plans[-1][2] == 0.0
    assert result.stop_reason.endswith("planned steps done (fitted to --time-limit 1.6625s)")
    assert clock(result.steps) <= limit
    assert len({p for p, _, _ in plans}) > 2  # shortened more than once
    for step in range(1, len(plans)):
        (old_plan, old_anchor, _), (plan, _, lr) = plans[step - 1], plans[step]
        assert lr == pytest.approx(scheduled_lr("hold-decay", 0.5, step, old_plan, old_anchor)), step  # no jump
        assert lr <= plans[step - 1][2]  # never rises


def test_a_time_limit_too_short_to_measure_still_ends_on_the_schedule(corpus, tmp_path, monkeypatch):
    """The time is up before the step time is measured: the next step is the plan's last (lr 0)."""
    monkeypatch.setattr(Trainer, "elapsed", lambda self: (self.state.step - self.first_step) / 64)
    monkeypatch.setattr(Trainer, "reserve", lambda self: 0.0)
    seen = recorded_lrs(monkeypatch)
    result = train(config(corpus, tmp_path / "r", max_steps=1000, time_limit=5 / 64))
    assert result.steps == 6 and seen == [0.5] * 5 + [0.0]


def test_a_resume_that_cannot_step_leaves_the_plan_as_it_was(corpus, tmp_path):
    """Stopped at step 20 of a 40-step plan, resumed by mistake with --max-steps 10 (already passed): no step is
    taken, the plan is saved as it was, and the right resume then equals the run never stopped."""
    def stop_at_20(event, info):
        if event == "step" and info["step"] == 20:
            os.kill(os.getpid(), signal.SIGINT)

    train(config(corpus, tmp_path / "straight", max_steps=40, lr_schedule="cosine"))
    with pytest.raises(TrainingInterrupted):
        train(config(corpus, tmp_path / "parts", max_steps=40, lr_schedule="cosine"), callback=stop_at_20)
    mistaken = train(config(corpus, tmp_path / "parts", max_steps=10, lr_schedule="cosine"), resume=True)
    assert mistaken.steps == 20 and mistaken.stop_reason == "--max-steps 10 reached"
    assert trainer_state(tmp_path / "parts")["planned_steps"] == 40
    assert trainer_state(tmp_path / "parts")["plan_anchor"] is None
    train(config(corpus, tmp_path / "parts", max_steps=40, lr_schedule="cosine"), resume=True)
    assert lrs(tmp_path / "parts") == lrs(tmp_path / "straight")
    assert_same_weights(tmp_path / "parts", tmp_path / "straight")


def test_resuming_a_finished_plan_takes_no_step(corpus, tmp_path, monkeypatch):
    seen = recorded_lrs(monkeypatch)
    train(config(corpus, tmp_path / "r", max_steps=20))
    rows = lrs(tmp_path / "r")
    again = train(config(corpus, tmp_path / "r", max_steps=30), resume=True)
    assert again.steps == 20 and again.stop_reason == "the hold-decay schedule's 20 planned steps done"
    assert len(seen) == 20 and lrs(tmp_path / "r") == rows


def test_a_time_limit_without_two_evaluations_fits_the_plan_from_the_steps_time(corpus, tmp_path, monkeypatch):
    """No evaluation before the limit (--eval-every huge): the plan is fitted from the steps' own time after
    the warm-up, so the lr falls smoothly to 0 at the last step instead of dropping to 0 at the deadline."""
    monkeypatch.setattr(Trainer, "elapsed", lambda self: (self.state.step - self.first_step) / 64)
    monkeypatch.setattr(Trainer, "reserve", lambda self: 0.0)
    seen = recorded_lrs(monkeypatch)
    result = train(config(corpus, tmp_path / "r", max_steps=10_000, eval_every=10**6, time_limit=100 / 64,
                          lr_schedule="cosine"))
    assert 95 <= result.steps <= 100 and seen[-1] == 0.0
    assert max(a - b for a, b in zip(seen, seen[1:])) < 0.5 / 10  # no cliff


@pytest.mark.parametrize("planned", [2, 3, 7, 11, 50, 101, 300])
def test_held_through_is_the_last_step_at_the_full_lr(planned):
    """Step n (counted from 1, as metrics.csv counts) runs at the lr of index n - 1."""
    from charlm.schedule import held_through
    lr = [scheduled_lr("hold-decay", 1.0, i, planned) for i in range(planned)]
    n = held_through(planned)
    assert lr[n - 1] == 1.0 and (n == planned or lr[n] < 1.0) and all(x == 1.0 for x in lr[:n])


@pytest.mark.parametrize("step, held", [(10, True), (40, False)])
def test_a_shortened_plan_says_how_its_lr_falls(corpus, tmp_path, step, held):
    """A 100-step hold-decay plan resumed with --max-steps 50: from step 10 the shorter plan still holds the lr
    through its own 60% (the step named); from step 40 it falls at once, from the lr it has."""
    from types import SimpleNamespace

    from charlm.schedule import Schedule, held_through
    schedule = Schedule(config(corpus, tmp_path / "r", max_steps=50), train_tokens=10**7)
    st = SimpleNamespace(step=step, planned_steps=100, plan_anchor=None, plan_ceiling=100)
    lr_before = schedule.lr(st)
    warning = schedule.check(st)
    assert st.planned_steps == st.plan_ceiling == 50 and "ends at step 50" in warning

    def lr_at(n):  # the lr of step n, counted from 1
        return schedule.lr(SimpleNamespace(step=n - 1, planned_steps=st.planned_steps, plan_anchor=st.plan_anchor))
    if held:
        n = held_through(50)
        assert f"held through step {n}," in warning
        assert lr_at(step + 1) == lr_at(n) == schedule.base_lr > lr_at(n + 1)
    else:
        assert "falling from where it is now" in warning
        assert lr_at(step + 1) == lr_before > lr_at(step + 2)


def plans_and_lrs(monkeypatch) -> list:
    """(planned steps, anchor, lr) of every step taken, in order."""
    plans, apply = [], Trainer.apply_lr

    def record(self):
        apply(self)
        plans.append((self.state.planned_steps, self.state.plan_anchor, self.optimizer.param_groups[0]["lr"]))

    monkeypatch.setattr(Trainer, "apply_lr", record)
    return plans


def assert_no_jump_and_never_rises(plans, base=0.5, first_step=0):
    for i in range(1, len(plans)):
        (old_plan, old_anchor, old_lr), (_, _, lr) = plans[i - 1], plans[i]
        step = first_step + i
        assert lr == pytest.approx(scheduled_lr("hold-decay", base, step, old_plan, old_anchor)), step
        assert lr <= old_lr + 1e-12, step


def slow_spell(start: int, times: float, steps: int):
    """A faked clock (for fake_clock): each step takes 1/64 s, ``times`` as long for ``steps`` steps from ``start``."""
    return lambda step: 0.1 + step / 64 + (times - 1) / 64 * min(max(step - start, 0), steps)


slow_then_fast = slow_spell(10, 4, 30)  # a slow spell (4x) from the 10th step to the 40th, then the steps' own speed


@pytest.mark.parametrize("slow_from", [30, 110])  # in the plan's hold, and into its fall
def test_a_plan_shortened_by_a_slow_spell_grows_back_when_the_steps_run_fast_again(corpus, tmp_path, monkeypatch,
                                                                                 slow_from):
    """Other work slows the steps fourfold for 30 steps, then leaves: the plan shrinks while they run slow and
    grows back once they run at their speed again, so the run still takes about the steps its time holds (200;
    a plan held to the slow spell's step time ends far sooner), its lr never jumping or rising, its last step
    at lr 0, within the time limit."""
    clock = slow_spell(slow_from, 4, 30)

    fake_clock(monkeypatch, clock)
    plans = plans_and_lrs(monkeypatch)
    limit = clock(200)
    result = train(config(corpus, tmp_path / "r", max_steps=400, time_limit=limit))
    sizes = [p for p, _, _ in plans]
    assert min(sizes[slow_from:slow_from + 40]) < 0.9 * 200  # shortened in the slow spell
    assert 190 <= result.steps <= 200 and clock(result.steps) <= limit  # and grown back to what the time holds
    assert result.steps == len(plans) and plans[-1][2] == 0.0
    assert_no_jump_and_never_rises(plans)
    assert result.stop_reason.endswith(f"planned steps done (fitted to --time-limit {limit:g}s)")


def test_a_plan_never_grows_past_the_one_the_run_started_with(corpus, tmp_path, monkeypatch):
    """A slow start shortens a 100-step plan; the steps then run fast enough for far more than 100: the plan
    grows back to its 100 steps, no further, and the run ends there as planned (not fitted to the time)."""
    clock = slow_then_fast

    fake_clock(monkeypatch, clock)
    plans = plans_and_lrs(monkeypatch)
    result = train(config(corpus, tmp_path / "r", max_steps=100, time_limit=clock(118)))
    sizes = [p for p, _, _ in plans]
    assert min(sizes) < 90 and max(sizes) == 100 and sizes[-1] == 100
    assert result.steps == 100  # the time changed the plan on the way: the lr's path is not the 100-step plan's
    assert result.stop_reason == "the hold-decay schedule's 100 planned steps done (fitted to --time-limit 3.35s)"
    assert plans[-1][2] == 0.0
    assert_no_jump_and_never_rises(plans)




def test_a_run_stopped_after_its_plan_grew_resumes_the_grown_plan_and_may_grow_to_its_ceiling(corpus, tmp_path,
                                                                                               monkeypatch):
    """Stopped right after the plan grew: the checkpoint holds the grown plan, the step and lr it falls from, and
    the 100-step ceiling --max-steps fixed. The resumed invocation starts on that plan (its first lr is the one the
    plan gives, no jump), grows it to the ceiling as its own time allows, and ends there at lr 0. Resumed with a
    larger --max-steps, it warns that the plan may grow back to 100, no further."""
    clock = {"f": slow_then_fast}
    monkeypatch.setattr(Trainer, "elapsed", lambda self: clock["f"](self.state.step - self.first_step))
    monkeypatch.setattr(Trainer, "reserve", lambda self: 0.0)
    plans = plans_and_lrs(monkeypatch)
    warnings = []

    def stop_after_a_grow(event, info):
        if event == "warning":
            warnings.append(info["message"])
        sizes = [p for p, _, _ in plans]
        if event == "step" and len(sizes) > 1 and sizes[-1] > min(sizes) and not warnings and not clock.get("sent"):
            clock["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)

    cfg = dict(max_steps=100, time_limit=slow_then_fast(118))
    for name in ("a", "b"):
        clock.pop("sent", None)
        plans.clear()
        with pytest.raises(TrainingInterrupted):
            train(config(corpus, tmp_path / name, **cfg), callback=stop_after_a_grow)
        saved = trainer_state(tmp_path / name)
        assert saved["plan_ceiling"] == 100 and saved["plan_anchor"] is not None
        assert min(p for p, _, _ in plans) < saved["planned_steps"] < 100  # grown, not yet to the ceiling
    stopped_at, grown, anchor = saved["step"], saved["planned_steps"], tuple(saved["plan_anchor"])
    plans.clear()
    clock["f"] = lambda step: 0.1 + step / 64  # the resumed invocation runs at the steps' own speed throughout
    result = train(config(corpus, tmp_path / "a", **cfg), resume=True)
    assert plans[0][:2] == (grown, anchor)
    assert plans[0][2] == pytest.approx(scheduled_lr("hold-decay", 0.5, stopped_at, grown, anchor))
    assert result.steps == 100 and max(p for p, _, _ in plans) == 100 and plans[-1][2] == 0.0
    assert_no_jump_and_never_rises(plans, first_step=stopped_at)
    assert warnings == []
    train(config(corpus, tmp_path / "b", **{**cfg, "max_steps": 400}), resume=True, callback=stop_after_a_grow)
    assert warnings == [f"the hold-decay schedule's plan, shortened by the time limit, ends at step {grown}; it may "
                        f"grow back to its bound, 100 steps, no further (--max-steps 400 does not extend a plan)"]
    assert trainer_state(tmp_path / "b")["planned_steps"] <= 100


def test_the_step_time_is_the_latest_intervals_and_the_one_under_way():
    """Evaluations every 10 steps, each taking 0.05 s, then 0.1 s of checkpoints: one interval of slow steps (4/64 s)
    then four at 1/64 s. The step time is the mean over the last four whole intervals (1/64 s + 0.15 s over 10 steps:
    the slow one no longer counts), right after the evaluation and still after the checkpoints (the writing just
    done is not read as slow steps). Then the interval under way runs slow: once WARM_STEPS steps into it, its steps'
    own time plus the evaluation and writing over the interval is the step time; one step before, not yet."""
    from charlm.schedule import RECENT_INTERVALS, WARM_STEPS, StepClock

    assert WARM_STEPS == 10
    clock, t, step = StepClock(time_limit=100.0), 0.0, 10
    clock.mark(step, t)
    clock.steps_resume(step, t)
    for per_step in [4 / 64] + [1 / 64] * RECENT_INTERVALS:
        t, step = t + 10 * per_step + 0.05, step + 10
        clock.mark(step, t, eval_s=0.05)
        t += 0.1
        clock.steps_resume(step, t)
    mean = 1 / 64 + 0.015

    def holds(step, now, rate):  # the plan at a step time of rate, give or take float rounding
        return abs(clock.time_plan(step, now, 0.0) - (step + int((100.0 - now) / rate))) <= 1

    assert holds(step, t - 0.1, mean)  # at the last evaluation, before its checkpoints
    assert holds(step, t, mean)  # after them: the same rate
    assert (t - 0.1) / (step - 10) > 1.2 * mean  # the mean since the first evaluation, which the slow interval holds
    assert holds(step + WARM_STEPS - 1, t + (WARM_STEPS - 1) * 4 / 64, mean)
    assert holds(step + WARM_STEPS, t + WARM_STEPS * 4 / 64, 4 / 64 + 0.015)
    assert holds(step + WARM_STEPS, t + WARM_STEPS / 64, mean)


@pytest.mark.parametrize("schedule", ["hold-decay", "cosine"])
def test_a_plan_grows_by_more_than_its_margin_or_to_its_ceiling_and_falls_from_where_it_is(corpus, tmp_path,
                                                                                           schedule):
    from types import SimpleNamespace

    from charlm.schedule import GROW_MARGIN, Schedule

    sched = Schedule(config(corpus, tmp_path / "r", lr_schedule=schedule), train_tokens=10**7)
    base = sched.base_lr
    st = SimpleNamespace(step=70, planned_steps=100, plan_anchor=(65, 0.8 * base), plan_ceiling=200)
    lr_now = sched.lr(st)
    assert not sched.lengthen(st, 100 + int(GROW_MARGIN * 100))  # within the margin: noise, not a change
    assert st.planned_steps == 100
    assert sched.lengthen(st, 100 + int(GROW_MARGIN * 100) + 1) and st.planned_steps == 103
    assert st.plan_anchor == (70, pytest.approx(lr_now)) and sched.lr(st) == pytest.approx(lr_now)
    assert sched.lengthen(st, 10_000) and st.planned_steps == 200  # never past the ceiling
    assert sched.lr(st) == pytest.approx(lr_now)  # at the step about to be taken: the same lr
    later = [sched.lr(SimpleNamespace(**{**vars(st), "step": s})) for s in range(70, 200)]
    assert all(a >= b for a, b in zip(later, later[1:])) and later[-1] == 0.0
    st = SimpleNamespace(step=70, planned_steps=199, plan_anchor=(65, 0.8 * base), plan_ceiling=200)
    assert sched.lengthen(st, 250) and st.planned_steps == 200  # the last step to the ceiling counts, margin or not
    st = SimpleNamespace(step=99, planned_steps=100, plan_anchor=(65, 0.8 * base), plan_ceiling=200)
    assert not sched.lengthen(st, 200)  # at the plan's last step (lr 0): nothing to stretch


def test_the_time_checkpoints_take_does_not_shrink_and_regrow_the_plan(corpus, tmp_path, monkeypatch):
    """Steady steps, and each checkpoint written at an evaluation costs as much as three steps: the writing counts
    in each interval's time, not as slow steps (neither right after it is done nor ten steps into the next
    interval), so once the step time is measured the plan is fitted and kept: no plan cut after every evaluation
    and regrown at the next, and the lr falls along one plan's shape to 0."""
    saves = []
    monkeypatch.setattr(Trainer, "elapsed",
                        lambda self: 0.1 + (self.state.step - self.first_step) / 64 + 3 / 64 * len(saves))
    monkeypatch.setattr(Trainer, "reserve", lambda self: 0.0)
    save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, *a, **k: (saves.append(1), save(self, *a, **k))[1])
    plans = plans_and_lrs(monkeypatch)
    result = train(config(corpus, tmp_path / "r", max_steps=5000, eval_every=50, time_limit=8.0))
    sizes = [p for p, _, _ in plans[101:]]  # from the second evaluation on: the step time is measured
    assert max(sizes) - min(sizes) <= 2, sorted(set(sizes))  # (the last step may be cut by one: the time is up)
    assert result.steps == len(plans) and plans[-1][2] == 0.0
    assert_no_jump_and_never_rises(plans)


@pytest.mark.parametrize("step, planned, time_limit, says", [
    (30, 100, 5.0, "the hold-decay schedule's plan is 100 steps; the run ends there"),
    (30, 59, 5.0, "the hold-decay schedule's plan, shortened by the time limit, ends at step 59; it may grow back to "
                  "its bound, 100 steps, no further"),
    (30, 59, None, "the hold-decay schedule's plan, shortened by the time limit, ends at step 59 (with no time "
                   "limit, --time-limit 0, it is not fitted to the time, so it does not grow back)"),
    (58, 59, 5.0, "the hold-decay schedule's plan, shortened by the time limit, ends at step 59"),
    (59, 59, 5.0, "the hold-decay schedule's plan, shortened by the time limit, ended at step 59"),
])
def test_a_resume_with_a_larger_max_steps_says_what_the_plan_will_do(corpus, tmp_path, step, planned, time_limit,
                                                                     says):
    from types import SimpleNamespace

    from charlm.schedule import Schedule

    schedule = Schedule(config(corpus, tmp_path / "r", max_steps=400, time_limit=time_limit), train_tokens=10**7)
    st = SimpleNamespace(step=step, planned_steps=planned, plan_anchor=(20, 0.4), plan_ceiling=100)
    assert schedule.check(st) == f"{says} (--max-steps 400 does not extend a plan)"
    assert (st.planned_steps, st.plan_ceiling) == (planned, 100)


def test_a_plan_cut_by_a_slow_start_of_its_last_interval_grows_back_before_it_ends(corpus, tmp_path, monkeypatch):
    """Right after the evaluation at step 250, twelve steps run ten times slower, then the steps run at their speed
    again. Ten steps in, the interval under way cuts the plan to end before the next evaluation (300), where it
    could not be grown back: it grows step by step as the interval's steps run fast, and the run goes past that
    evaluation (a plan grown only at evaluations ended at step 268). After it the slow interval, the last one,
    still holds the step time for an interval, so the run ends short of the 330 steps its time holds."""
    clock = slow_spell(250, 10, 12)

    fake_clock(monkeypatch, clock)
    plans = plans_and_lrs(monkeypatch)
    limit = clock(330)
    result = train(config(corpus, tmp_path / "r", max_steps=1000, eval_every=50, time_limit=limit))
    sizes = [p for p, _, _ in plans]
    assert min(sizes[255:275]) < 300  # cut to end before the next evaluation
    assert 300 < result.steps < 330 and clock(result.steps) <= limit
    assert plans[-1][2] == 0.0
    assert_no_jump_and_never_rises(plans)


def test_a_plan_grown_to_end_at_the_next_evaluation_still_grows_past_it(corpus, tmp_path, monkeypatch):
    """Eight slow steps right after the evaluation at 250; the plan, cut short, grows back by steps until it ends
    at the next evaluation (300): there an evaluation may no longer grow it (its last step is next), so it must
    grow before, and the run goes on to about the steps its time holds (339)."""
    clock = slow_spell(250, 6, 8)

    fake_clock(monkeypatch, clock)
    plans = plans_and_lrs(monkeypatch)
    limit = clock(339)
    result = train(config(corpus, tmp_path / "r", max_steps=1000, eval_every=50, time_limit=limit))
    assert 320 <= result.steps <= 339 and clock(result.steps) <= limit
    assert plans[-1][2] == 0.0
    assert_no_jump_and_never_rises(plans)
