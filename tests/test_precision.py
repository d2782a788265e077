"""--precision: bf16 autocast on CPUs, fp16 loss scaling (exercised on a CPU GRU, which has fp16
kernels, although the CLI keeps fp16 for CUDA GPUs), and what stays fp32 whatever the precision.

Which of these a CPU can do differs (AVX-512 BF16 or AMX: bf16 natively; AVX2: oneDNN refuses the LSTM
in bf16, the other cells run emulated). Each test takes its expectation from ``probe_precision``, the
check ``charlm train`` makes itself: where bf16 does not run, it checks the one-line refusal instead.
"""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from charlm import checkpoint as ck
from charlm import training
from charlm.cli import main
from charlm.config import TrainConfig
from charlm import device as device_mod
from charlm.device import EMULATED_RATIO, PrecisionProbe, autocast, check_precision, grad_scaler, probe_precision
from charlm.errors import ConfigError
from charlm.training import train

CPU = torch.device("cpu")


def tiny(corpus, out, **kw):
    base = dict(corpus=str(corpus), out=str(out), cell="lstm", hidden_size=16, embedding_dim=8, dropout=0.2,
                batch_size=4, num_steps=10, eval_every=5, time_limit=None, patience=None, epochs=100,
                sampling="sequential", lr_schedule="plateau")  # (a plan from --max-steps 10 would end a run there)
    base.update(kw)
    return TrainConfig(**base)


def saved(out, name="last"):
    return ck.load_checkpoint(Path(out) / name, with_trainer_state=True)


def bf16_here(cfg: TrainConfig) -> PrecisionProbe:
    """What this machine does with bf16 for ``cfg``'s model (the probe charlm train runs)."""
    return probe_precision("bf16", "cpu", cfg.model_config(2))


def assert_refused(cfg: TrainConfig, tmp_path) -> None:
    with pytest.raises(ConfigError, match=rf"^--precision bf16: this CPU \(.+\) has no bf16 kernel for the "
                                          rf"{cfg.cell.upper()} \(native bf16 needs AVX-512 BF16 or AMX\); "
                                          rf"use --precision fp32$"):
        train(cfg)
    assert not Path(cfg.out).exists()  # refused before the run directory was written


def test_bf16_autocast_runs_in_bf16_and_leaves_weights_state_and_optimizer_fp32(corpus, tmp_path):
    if not bf16_here(tiny(corpus, tmp_path / "bf16")).runs:
        return assert_refused(tiny(corpus, tmp_path / "bf16", max_steps=10, precision="bf16"), tmp_path)
    model = train(tiny(corpus, tmp_path / "fp32", max_steps=10))
    bf16 = train(tiny(corpus, tmp_path / "bf16", max_steps=10, precision="bf16"))
    assert bf16.steps == model.steps == 10
    a, b = saved(tmp_path / "fp32"), saved(tmp_path / "bf16")
    for k, v in b.model.state_dict().items():
        assert v.dtype == torch.float32, k
        assert not torch.equal(v, a.model.state_dict()[k]), f"{k}: bf16 steps gave fp32's weights exactly"
        torch.testing.assert_close(v, a.model.state_dict()[k], atol=0.02, rtol=0.05)  # the same training, rounded
    h, c = b.trainer_state["state"]
    assert h.dtype == c.dtype == torch.float32  # the carried state is kept in fp32
    moments = [t for s in b.trainer_state["optimizer"]["state"].values() for t in s.values() if t.dim()]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert b.trainer_state["scaler"] is None  # no loss scaling outside fp16
    assert abs(bf16.best.loss - model.best.loss) < 0.05


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bf16_resume_is_exact(corpus, tmp_path, cell):
    if not bf16_here(tiny(corpus, tmp_path, cell=cell)).runs:
        return assert_refused(tiny(corpus, tmp_path / "whole", cell=cell, max_steps=20, precision="bf16"), tmp_path)
    train(tiny(corpus, tmp_path / "whole", max_steps=20, precision="bf16", cell=cell))
    train(tiny(corpus, tmp_path / "parts", max_steps=10, precision="bf16", cell=cell))
    train(tiny(corpus, tmp_path / "parts", max_steps=20, precision="bf16", cell=cell), resume=True)
    a, b = saved(tmp_path / "whole").model.state_dict(), saved(tmp_path / "parts").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_fp16_loss_scaling_skips_overflowed_steps_lowers_the_scale_and_resumes_it(corpus, tmp_path, monkeypatch):
    # fp16 on a CPU GRU (the CLI refuses it: CPUs' LSTM has no fp16 kernel); a scale so large that the
    # first steps' fp16 gradients overflow: the scaler skips them and halves the scale, the run goes on
    monkeypatch.setattr(training, "check_precision", lambda *args: None)
    monkeypatch.setattr(training, "grad_scaler",
                        lambda precision, device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 40,
                                                                       enabled=precision == "fp16"))
    kw = dict(cell="gru", dropout=0.0, precision="fp16")
    whole = train(tiny(corpus, tmp_path / "whole", max_steps=30, **kw))
    assert whole.steps == 30 and whole.stop_reason == "--max-steps 30 reached"  # more than 5 overflows in a row
    state = saved(tmp_path / "whole").trainer_state
    scale = state["scaler"]["scale"]
    assert scale < 2.0 ** 40 / 2 ** 5  # halved once per overflowed step
    train(tiny(corpus, tmp_path / "parts", max_steps=15, **kw))
    part_scale = saved(tmp_path / "parts").trainer_state["scaler"]["scale"]
    train(tiny(corpus, tmp_path / "parts", max_steps=30, **kw), resume=True)
    assert saved(tmp_path / "parts").trainer_state["scaler"]["scale"] == scale != 2.0 ** 40
    assert part_scale <= 2.0 ** 40 / 2 ** 5
    a, b = saved(tmp_path / "whole").model.state_dict(), saved(tmp_path / "parts").model.state_dict()
    for k in a:  # a resume that restarted from the initial scale would skip the first steps again
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_fp16_loss_is_what_counts_as_non_finite(corpus, tmp_path, monkeypatch):
    """Overflowed fp16 gradients are the scaler's business; a non-finite loss still stops the run."""
    monkeypatch.setattr(training, "check_precision", lambda *args: None)
    from test_train import nan_after_first_step

    nan_after_first_step(monkeypatch)
    cfg = tiny(corpus, tmp_path / "r", max_steps=30, cell="gru", precision="fp16")
    with pytest.raises(Exception, match="not finite"):
        train(cfg)


def test_precision_checks_name_the_device(tmp_path, corpus):
    check_precision("fp32", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="fp16 is not supported on CPUs; use bf16 or fp32"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="not supported on mps devices; use fp32"):
        check_precision("bf16", torch.device("mps"))
    with pytest.raises(ConfigError, match="unknown precision"):
        check_precision("fp8", torch.device("cpu"))
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "r"), "--precision", "fp16",
                                  "--max-steps", "2", "--quiet"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == ("Error: --precision fp16 is not supported on CPUs; use bf16 or fp32 "
                                                 "(fp16 needs a CUDA GPU)")
    assert not (tmp_path / "r").exists()


def test_autocast_and_scaler_per_precision():
    cpu = torch.device("cpu")
    with autocast("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not grad_scaler("bf16", cpu).is_enabled() and grad_scaler("fp16", cpu).is_enabled()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_cli_shows_the_precision_or_refuses_it_in_one_line(corpus, tmp_path, cell):
    out = tmp_path / "r"
    args = ["train", str(corpus), "--out", str(out), "--precision", "bf16", "--cell", cell, "--hidden-size", "16",
            "--batch-size", "4", "--num-steps", "10", "--max-steps", "5", "--eval-every", "5"]
    r = CliRunner().invoke(main, args)
    if bf16_here(tiny(corpus, out, cell=cell)).runs:
        assert r.exit_code == 0, r.output
        assert "device cpu (bf16 autocast)" in r.output
        assert ck.load_checkpoint(out).train_options["precision"] == "bf16"
    else:
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.output.strip().splitlines() == [f"Error: --precision bf16: this CPU ({device_mod.cpu_capability()}) "
                                                 f"has no bf16 kernel for the {cell.upper()} (native bf16 needs "
                                                 f"AVX-512 BF16 or AMX); use --precision fp32"]
        assert not out.exists()


def test_emulated_bf16_is_a_one_line_warning(corpus, tmp_path):
    """Where bf16 runs only emulated (a GRU on an AVX2 CPU: about 10x slower than fp32), the run goes on
    after one warning line; whether bf16 is emulated here is the probe's word."""
    cfg = tiny(corpus, tmp_path / "r", cell="gru", hidden_size=160, max_steps=2, eval_every=2)
    probe = bf16_here(cfg)
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "r"), "--precision", "bf16",
                                  "--cell", "gru", "--hidden-size", "160", "--embedding-dim", "8", "--batch-size", "4",
                                  "--num-steps", "10", "--max-steps", "2", "--eval-every", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    warned = [line for line in r.output.splitlines() if line.startswith("Warning: --precision bf16")]
    assert len(warned) == int(probe.emulated), (probe, r.output)
    if probe.emulated:
        assert warned[0].endswith("x an fp32 step (emulated); --precision fp32 is faster")


def test_the_probe_verdict_decides_refusal_warning_or_silence(monkeypatch):
    model = TrainConfig(corpus="x", cell="gru").model_config(2)
    verdicts = {"none": PrecisionProbe("bf16", "cpu", "gru", error="could not create a primitive descriptor"),
                "slow": PrecisionProbe("bf16", "cpu", "gru", ratio=EMULATED_RATIO * 7.5),
                "native": PrecisionProbe("bf16", "cpu", "gru", ratio=0.6),
                "even": PrecisionProbe("bf16", "cpu", "gru", ratio=EMULATED_RATIO)}
    for name, verdict in verdicts.items():
        monkeypatch.setattr(device_mod, "probe_precision", lambda *args, v=verdict: v)
        if name == "none":
            with pytest.raises(ConfigError, match="has no bf16 kernel for the GRU"):
                check_precision("bf16", CPU, model)
        elif name == "slow":
            assert check_precision("bf16", CPU, model).endswith(
                "a bf16 step of a GRU 256 took 22.5x an fp32 step (emulated); --precision fp32 is faster")
        else:
            assert check_precision("bf16", CPU, model) is None, name
    assert check_precision("fp32", CPU, model) is None  # fp32 is never probed


def test_the_probe_runs_the_cell_and_times_it_on_this_cpu():
    for cell in ("rnn", "gru", "lstm"):
        probe = probe_precision("bf16", "cpu", TrainConfig(corpus="x", cell=cell, hidden_size=32).model_config(2))
        assert probe.cell == cell and probe.precision == "bf16"
        if probe.runs:
            assert probe.error is None and probe.ratio > 0
        else:
            assert probe.error and probe.ratio is None
    assert probe_precision("fp32", "cpu", TrainConfig(corpus="x").model_config(2)).runs


def test_auto_is_bf16_where_native_and_fp32_elsewhere(corpus, tmp_path, monkeypatch):
    cfg = tiny(corpus, tmp_path / "r", cell="gru", max_steps=5, precision="auto")
    probe = bf16_here(cfg)
    expected = "bf16" if probe.runs and not probe.emulated else "fp32"
    assert device_mod.resolve_precision("auto", CPU, cfg.model_config(2)) == expected
    assert device_mod.resolve_precision("fp32", CPU, cfg.model_config(2)) == "fp32"
    r = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "r"), "--precision", "auto",
                                  "--cell", "gru", "--hidden-size", "16", "--batch-size", "4", "--num-steps", "10",
                                  "--max-steps", "5", "--eval-every", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"; precision {expected} (auto); checkpoint: " in r.output  # the summary says what ran
    assert ck.load_checkpoint(tmp_path / "r").train_options["precision"] == expected  # and a resume runs it again
    for verdict, resolved in ((PrecisionProbe("bf16", "cpu", "gru", ratio=0.7), "bf16"),
                              (PrecisionProbe("bf16", "cpu", "gru", ratio=9.0), "fp32"),
                              (PrecisionProbe("bf16", "cpu", "lstm", error="no kernel"), "fp32")):
        monkeypatch.setattr(device_mod, "probe_precision", lambda *args, v=verdict: v)
        assert device_mod.resolve_precision("auto", CPU, cfg.model_config(2)) == resolved


def test_auto_on_a_gpu_counts_native_bf16_only(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulated bf16 (a V100, a T4) unless told not to: there auto
    must stay fp32, and --precision bf16 is refused. Checked without a GPU: the check is all that is asked."""
    asked = []

    def emulated_only(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # bf16 "supported" only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    gpu = torch.device("cuda", 0)
    assert device_mod.resolve_precision("auto", gpu, TrainConfig(corpus="x").model_config(2)) == "fp32"
    with pytest.raises(ConfigError, match="Tesla T4 has no bf16 support"):
        check_precision("bf16", gpu)
    assert asked and not any(asked)
