import csv
import hashlib
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from charlm import checkpoint as ck
from charlm.cli import main
from charlm.config import TrainConfig
from charlm.errors import TrainError, TrainingInterrupted
from charlm.config import SIZE_MID_READS
from charlm.rundir import METRICS_COLUMNS
from charlm.training import train


def tiny(corpus, out, **kw):
    base = {**SIZE_MID_READS,  # sizes given: these tests split runs with --max-steps, which the size rule reads
            **dict(corpus=str(corpus), out=str(out), cell="gru", hidden_size=16, embedding_dim=8, dropout=0.2,
                   batch_size=4, num_steps=10, eval_every=6, time_limit=None, patience=None, epochs=100,
                   val_fraction=0.1, lr_schedule="plateau")}  # (and no plan)
    base.update(kw)
    return TrainConfig(**base)


def weights(out, name="last"):
    return ck.load_checkpoint(Path(out) / name).model.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_tiny_end_to_end_cli(corpus, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "16",
                                  "--batch-size", "4", "--num-steps", "10", "--max-steps", "20",
                                  "--eval-every", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "20 steps" in r.output
    assert "best held-out" in r.output
    assert str(out / "best") in r.output
    assert {p.name for p in out.iterdir()} >= {"last", "best", "metrics.csv", "curve.png"}
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == METRICS_COLUMNS
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert abs(float(r["val_bpc"]) * 0.6931471805599453 - float(r["val_loss"])) < 1e-9
    c = ck.load_checkpoint(out)
    assert c.path == out / "best"
    assert c.config.hidden_size == 16
    assert c.meta["corpus"]["preprocess"] == "raw"
    assert c.meta["progress"]["step"] in (5, 10, 15, 20)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_exact_resume_across_epoch_boundary(corpus, tmp_path, sampling):
    # ~2.1k training chars / (4 x 10) -> about 50 steps per epoch... make epochs short instead:
    kw = dict(sampling=sampling, batch_size=8, num_steps=20)  # ~12 steps per epoch
    once = train(tiny(corpus, tmp_path / "once", max_steps=30, **kw))
    first = train(tiny(corpus, tmp_path / "twice", max_steps=16, **kw))
    assert first.steps == 16
    assert once.epochs_done > 1.0
    assert first.epochs_done > 1.0
    second = train(tiny(corpus, tmp_path / "twice", max_steps=30, **kw), resume=True)
    assert second.steps == 30
    assert_same_weights(weights(tmp_path / "once"), weights(tmp_path / "twice"))


def test_interrupt_saves_last_and_resumes_exactly(corpus, tmp_path):
    def kill_at_step_10(event, info):
        if event == "step" and info["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as err:
        train(tiny(corpus, tmp_path / "a", max_steps=24), callback=kill_at_step_10)
    assert err.value.result.steps == 10
    assert ck.load_checkpoint(tmp_path / "a" / "last", with_trainer_state=True).trainer_state["step"] == 10
    train(tiny(corpus, tmp_path / "a", max_steps=24), resume=True)
    train(tiny(corpus, tmp_path / "b", max_steps=24))
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    with open(tmp_path / "a" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [6, 10, 12, 18, 24]


def test_kill_between_renames_leaves_a_loadable_checkpoint(corpus, tmp_path, monkeypatch):
    train(tiny(corpus, tmp_path / "r", max_steps=6))
    before = weights(tmp_path / "r")
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)
        if len(calls) == 1:  # the old checkpoint has moved aside, the new one is not in place yet
            raise KeyboardInterrupt

    model = ck.load_checkpoint(tmp_path / "r" / "last").model
    monkeypatch.setattr(ck.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "r" / "last", model, ck.load_checkpoint(tmp_path / "r" / "last").vocab)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    left = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert_same_weights(weights(tmp_path / "r"), before)  # a load reads the marked backup in place
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == left  # and moves nothing
    assert not (tmp_path / "r" / "last").exists() and any(n.startswith(".last.old-") for n in left)
    assert not any(n.startswith(".last.tmp") for n in left)
    ck.save_checkpoint(tmp_path / "r" / "last", model, ck.load_checkpoint(tmp_path / "r" / "best").vocab)
    assert (tmp_path / "r" / "last" / "manifest.json").is_file()  # the next write finished the replacement
    assert not any(p.name.startswith((".last.old-", ".last.tmp")) for p in (tmp_path / "r").iterdir())


def test_kill_while_writing_keeps_old_checkpoint(corpus, tmp_path, monkeypatch):
    train(tiny(corpus, tmp_path / "r", max_steps=6))
    digest = tree_digest(tmp_path / "r" / "last")
    c = ck.load_checkpoint(tmp_path / "r" / "last")

    def dying_save(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.Vocab, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "r" / "last", c.model, c.vocab)
    assert tree_digest(tmp_path / "r" / "last") == digest
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".charlm", ".charlm.lock", "best", "last",
                                                                  "metrics.csv"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "pickle"])
def test_tampered_or_truncated_checkpoint_refused(corpus, tmp_path, damage):
    train(tiny(corpus, tmp_path / "r", max_steps=6))
    model_pt = tmp_path / "r" / "best" / "model.pt"
    data = bytearray(model_pt.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        model_pt.write_bytes(bytes(data))
        match = "does not match its checksum"
    elif damage == "truncate":
        model_pt.write_bytes(bytes(data[:100]))
        match = "does not match its checksum"
    else:  # a pickle that runs code, with the manifest forged to match: weights_only refuses it
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        torch.save({"x": Evil()}, model_pt)
        import json
        manifest = json.loads((tmp_path / "r" / "best" / "manifest.json").read_text())
        manifest["model.pt"] = hashlib.sha256(model_pt.read_bytes()).hexdigest()
        (tmp_path / "r" / "best" / "manifest.json").write_text(json.dumps(manifest))
        match = "cannot load checkpoint"
    with pytest.raises(ck.CheckpointError, match=match) as err:
        ck.load_checkpoint(tmp_path / "r")
    assert "\n" not in str(err.value)


def nan_after_first_step(monkeypatch):
    """Every training loss after the first is NaN (what a diverged step gives), the weights untouched."""
    from charlm import training

    real, calls = training.F.cross_entropy, []

    def cross_entropy(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss if len(calls) == 1 else loss * float("nan")

    monkeypatch.setattr(training.F, "cross_entropy", cross_entropy)


def test_nonfinite_loss_saves_and_stops(corpus, tmp_path, monkeypatch):
    # the first step trains; every later loss is NaN: the updates are skipped, and the run stops after five in a row
    nan_after_first_step(monkeypatch)
    cfg = tiny(corpus, tmp_path / "r", max_steps=50, eval_every=100)
    with pytest.raises(TrainError, match="not finite for 5 steps in a row at step 6") as err:
        train(cfg)
    assert "saved" in str(err.value)
    assert "\n" not in str(err.value)
    c = ck.load_checkpoint(tmp_path / "r" / "last", with_trainer_state=True)
    assert c.trainer_state["step"] == 5  # the weights after step 1, which steps 2-6 never changed
    for name, value in c.model.state_dict().items():
        assert torch.isfinite(value).all(), name


def reference_loop(cfg: TrainConfig, steps: int) -> dict:
    """The d2l training loop written out by hand: what charlm's Trainer must compute, step for step."""
    from charlm.data import load_split, make_batches
    from charlm.models import RNNLM

    data = load_split(cfg.corpus, cfg.preprocess, cfg.val_fraction)
    torch.manual_seed(cfg.seed)
    model = RNNLM.from_config(cfg.model_config(len(data.vocab), len(data.train_ids)))
    decay = cfg.resolved_weight_decay(len(data.train_ids))  # decoupled, on the matrices: AdamW's rule
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.resolved_lr())
    done, epoch = 0, 0
    while done < steps:
        state = None  # every epoch starts from zeros
        for X, Y in make_batches(cfg.sampling, data.train_ids, cfg.batch_size, cfg.num_steps, seed=cfg.seed,
                                 epoch=epoch):
            if cfg.sampling == "random":
                state = None  # unrelated windows: a fresh state for every batch
            elif state is not None:
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
            logits, state = model(X, state)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return model.state_dict()


@pytest.mark.parametrize("weight_decay", [None, 0.0])  # None: this small corpus's default, 0.3
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_training_equals_the_loop_written_by_hand(corpus, tmp_path, sampling, cell, weight_decay):
    # 16 steps of ~13 per epoch cross an epoch boundary; clip 0.05 is below every gradient norm here,
    # so a loop that did not clip, or that reset or carried the state in the wrong mode, ends elsewhere.
    cfg = tiny(corpus, tmp_path / "r", cell=cell, sampling=sampling, batch_size=8, num_steps=20, dropout=0.0,
               clip=0.05, max_steps=16, eval_every=100, weight_decay=weight_decay)
    result = train(cfg)
    assert result.epochs_done > 1.0
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["grad_norm"]) > 0.05 * 2  # clipping was active
    assert_same_weights(weights(tmp_path / "r"), reference_loop(cfg, 16))


def test_lr_decays_after_each_evaluation_without_improvement(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "r", lr=0.05, eval_every=3, max_steps=60, lr_decay=0.5, weight_drop=0.0,
               dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0)  # over-fits soon: plateaus to decay on
    train(cfg)
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best, lr, decays = float("inf"), 0.05, 0
    for row in rows:
        assert float(row["lr"]) == pytest.approx(lr)  # the lr the interval before this evaluation used
        loss = float(row["val_loss"])
        if loss < best:
            best = loss
        else:
            lr, decays = lr * 0.5, decays + 1
    assert decays >= 2  # the run did meet plateaus
    saved = ck.load_checkpoint(tmp_path / "r" / "last", with_trainer_state=True).trainer_state
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)  # what the optimizer really uses


@pytest.mark.parametrize("patience", [1, 2])
def test_patience_stops_after_exactly_that_many_evaluations_without_improvement(corpus, tmp_path, patience):
    result = train(tiny(corpus, tmp_path / "r", lr=0.05, eval_every=3, max_steps=300, patience=patience))
    assert result.stop_reason == f"no held-out improvement in {patience} evaluations"
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        losses = [float(r["val_loss"]) for r in csv.DictReader(f)]
    best_at = losses.index(min(losses))
    assert len(losses) - 1 - best_at == patience  # the evaluations after the best one
    assert all(min(losses[:i]) <= losses[i] for i in range(best_at + 1, len(losses)))


# ---- refusals through the CLI: one line, non-zero exit, nothing written or changed -----------

def invoke(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_existing_run_refused_and_untouched(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "r", max_steps=6))
    digest = tree_digest(tmp_path / "r")
    r = invoke(corpus, "--out", tmp_path / "r", "--max-steps", 3)
    assert r.exit_code == 1
    assert "--resume" in r.output
    assert "--overwrite" in r.output
    assert r.output.count("\n") == 1
    assert tree_digest(tmp_path / "r") == digest


def test_resume_with_other_model_options_names_them(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "r", max_steps=6))
    digest = tree_digest(tmp_path / "r")
    r = invoke(corpus, "--out", tmp_path / "r", "--resume", "--hidden-size", 32, "--cell", "lstm")
    assert r.exit_code == 1, r.output
    assert "hidden-size: 16 -> 32" in r.output
    assert "cell: 'gru' -> 'lstm'" in r.output
    assert tree_digest(tmp_path / "r") == digest
    # options not given again come from the saved run
    r = invoke(corpus, "--out", tmp_path / "r", "--resume", "--max-steps", 12, "--quiet")
    assert r.exit_code == 0, r.output
    assert "12 steps" in r.output


@pytest.mark.parametrize("args, code, message", [
    (["--hidden-size", "0"], 2, "--hidden-size"),
    (["--num-layers", "0"], 2, "--num-layers"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--lr", "-1"], 2, "--lr"),
    (["--val-fraction", "1.5"], 2, "--val-fraction"),
    (["--val-fraction", "0"], 2, "--val-fraction"),
    (["--dropout", "1"], 2, "--dropout"),
    (["--cell", "transformer"], 2, "--cell"),
    (["--device", "cuda:7"], 1, "not available"),
    (["--device", "tpu"], 1, "unknown device"),
    (["--batch-size", "64", "--num-steps", "64"], 1, "needs at least"),
    (["--resume"], 1, "nothing to resume"),
])
def test_bad_options_one_line_nothing_written(corpus, tmp_path, args, code, message):
    out = tmp_path / "never"
    r = invoke(corpus, "--out", out, *args)
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not out.exists()
    if code == 1:
        assert r.output.count("\n") == 1


def test_missing_corpus_one_line(tmp_path):
    r = invoke(tmp_path / "nope.txt", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "no such file" in r.output
    assert r.output.count("\n") == 1


def test_periodic_evaluations_read_a_leading_part_and_the_summary_the_whole_tail(corpus, tmp_path):
    import json

    out = tmp_path / "r"
    args = (corpus, "--out", out, "--hidden-size", 16, "--embedding-dim", 8, "--batch-size", 4, "--num-steps", 10,
            "--eval-every", 4, "--eval-chars", 60, "--time-limit", 0, "--quiet")
    r = invoke(*args, "--max-steps", 12)
    assert r.exit_code == 0, r.output
    c = ck.load_checkpoint(out / "best")
    val_chars = c.corpus_info["val_chars"]
    assert c.corpus_info["eval_chars"] == 60 < val_chars
    assert f"on all {val_chars:,} held-out characters" in r.output
    assert "of it for the final figure" in r.output
    whole = json.loads(CliRunner().invoke(main, ["eval", str(out), "--json"]).output)
    assert f"best held-out {whole['bits_per_char']:.3f} bits/char" in r.output  # the summary's figure is eval's
    with open(out / "metrics.csv", newline="") as f:
        periodic = [float(row["val_loss"]) for row in csv.DictReader(f)]
    assert min(periodic) != pytest.approx(whole["loss"], abs=1e-6)  # those read only the first 60
    r = invoke(*args, "--max-steps", 16, "--resume")  # resumed: the best weights come from best/
    assert r.exit_code == 0, r.output
    assert f"on all {val_chars:,} held-out characters" in r.output


def test_out_of_device_memory_is_one_line_with_what_to_change(corpus, tmp_path, monkeypatch):
    from charlm import training

    def oom(self, X, Y):
        if self.state.step == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, X, Y)

    real = training.Trainer.train_step
    monkeypatch.setattr(training.Trainer, "train_step", oom)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden-size", "16", "--batch-size", "4",
                                  "--num-steps", "10", "--eval-every", "5", "--max-steps", "20", "--quiet"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        f"Error: cpu ran out of memory at step 8; use a smaller --batch-size, --num-steps or --hidden-size, or "
        f"--precision bf16; resume from {out / 'last'} with --resume")
    assert ck.load_checkpoint(out / "last", with_trainer_state=True).trainer_state["step"] == 5
