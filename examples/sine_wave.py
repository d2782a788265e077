"""A sine wave: an RNN learns to predict the next value of sin(t), then forecasts.

What it teaches. A recurrent layer is not only for characters: here a one-layer RNN (tanh,
hidden 10, batch first; charlm's ``recurrent_layer``, ``--impl torch`` or ``scratch``) with a
linear head reads windows of 20 points of sin(t) that start at random t and predicts, at every
position, the next point. It is trained with Adam and gradient-norm clipping.

Then it forecasts a longer stretch of the curve two ways:

- one step ahead: the true values are fed in and each prediction looks one step ahead;
- free running: after a warm-up on 20 true points the model feeds its own outputs back in, so
  its errors compound.

Both are scored by mean squared error beside the naive forecast "the next value equals this one".
Finally the same training is repeated with a large learning rate, with and without clipping, to
show what clipping does: the gradient norm before clipping, and what the optimizer received.

    python examples/sine_wave.py --quick      # a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models import recurrent_layer

DT = 0.1  # spacing of the samples of sin(t)
WINDOW = 20
HIDDEN = 10


class SineRNN(nn.Module):
    """Value in, value out: a recurrent layer over (B, T, 1) inputs and a linear head per step."""

    def __init__(self, impl: str):
        super().__init__()
        self.rnn = recurrent_layer("rnn", 1, HIDDEN, impl=impl)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(out), state  # (B, T, 1)


def batch(gen: torch.Generator, size: int):
    """``size`` windows of WINDOW + 1 points starting at random t: inputs and next-step targets."""
    t0 = torch.rand(size, 1, generator=gen) * 2 * math.pi
    t = t0 + DT * torch.arange(WINDOW + 1)
    wave = torch.sin(t).unsqueeze(-1)  # (B, WINDOW + 1, 1)
    return wave[:, :-1], wave[:, 1:]


def fit(impl: str, steps: int, lr: float, clip: float | None, seed: int):
    """Train; return the model, the losses and the gradient norms before clipping, per step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SineRNN(impl)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, norms = [], []
    for _ in range(steps):
        x, y = batch(gen, 32)
        loss = F.mse_loss(model(x)[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clip_grad_norm_ returns the norm *before* clipping; max_norm=inf measures without clipping.
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    return model, losses, norms


@torch.inference_mode()
def forecast(model: SineRNN, series: torch.Tensor, warmup: int = WINDOW):
    """One-step-ahead and free-running forecasts of ``series[warmup:]``."""
    x = series.view(1, -1, 1)
    one_step = model(x[:, :-1])[0].view(-1)[warmup - 1 :]  # prediction of series[t+1] from series[..t]
    out, state = model(x[:, :warmup])  # warm up on true points
    value = out[:, -1:]  # (1, 1, 1): the prediction of series[warmup]
    free = []
    for _ in range(len(series) - warmup):
        free.append(value.item())
        value, state = model(value, state)  # feed the model its own output
    return one_step, torch.tensor(free)


def run(quick: bool = False, seed: int = 0, impl: str = "torch", out: str | Path = "runs/sine_wave",
        verbose: bool = True) -> dict:
    torch.set_num_threads(1)
    say = print if verbose else (lambda *a: None)
    steps = 600 if quick else 3000
    model, losses, _ = fit(impl, steps, lr=0.01, clip=1.0, seed=seed)
    say(f"trained a one-layer RNN ({impl}, hidden {HIDDEN}) for {steps} Adam steps (lr 0.01, clip 1.0): "
        f"final training MSE {sum(losses[-50:]) / 50:.2e}")

    t = 100.0 + DT * torch.arange(200)  # a stretch of the curve the windows never started in exactly
    series = torch.sin(t)
    truth = series[WINDOW:]
    one_step, free = forecast(model, series)
    mse = {
        "one_step": F.mse_loss(one_step, truth).item(),
        "free_running": F.mse_loss(free, truth).item(),
        "last_value": F.mse_loss(series[WINDOW - 1 : -1], truth).item(),  # naive: next = this one
    }
    say(f"forecast of {len(truth)} points after a {WINDOW}-point warm-up, mean squared error:")
    say(f"  one step ahead   {mse['one_step']:.2e}")
    say(f"  free running     {mse['free_running']:.2e}")
    say(f"  last value       {mse['last_value']:.2e}  (the naive forecast)")

    # Clipping: the same training with a learning rate large enough to make gradients spike.
    clip_steps = 300 if quick else 1000
    clipping = {}
    for label, clip in (("without clipping", None), ("clipped at 1.0", 1.0)):
        _, c_losses, c_norms = fit(impl, clip_steps, lr=0.1, clip=clip, seed=seed)
        applied = [min(n, clip) if clip else n for n in c_norms]
        clipping[label] = {
            "max_norm_before_clipping": max(c_norms),
            "median_norm_before_clipping": sorted(c_norms)[len(c_norms) // 2],
            "steps_above_1": sum(n > 1.0 for n in c_norms),
            "last_step_above_1": max((i for i, n in enumerate(c_norms) if n > 1.0), default=None),
            "max_norm_applied": max(applied),
            "final_mse": sum(c_losses[-50:]) / 50,
            "norms": c_norms,
        }
    say(f"gradient norms over {clip_steps} steps at Adam lr 0.1:")
    for label, c in clipping.items():
        say(f"  {label:17s} before clipping: max {c['max_norm_before_clipping']:8.2f}, median "
            f"{c['median_norm_before_clipping']:.3f}, {c['steps_above_1']} steps above 1 (the last at step "
            f"{c['last_step_above_1']}); largest norm the optimizer received {c['max_norm_applied']:.2f}; final training MSE {c['final_mse']:.2e}")

    say("  Clipping rescales only the steps whose norm is above the threshold and leaves the rest alone.")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = _plot(out / "sine_wave.png", t[WINDOW:], truth, one_step, free, clipping, say)
    summary = {"impl": impl, "steps": steps, "mse": mse,
               "clipping": {k: {n: v for n, v in c.items() if n != "norms"} for k, c in clipping.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "figure": figure}


def _plot(path: Path, t, truth, one_step, free, clipping, say):
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (as charlm.plot)
    except ImportError:
        say('no figure: matplotlib is not installed (pip install "charlm-rnn[plot]")')
        return None
    fig = Figure(figsize=(8, 6.5), dpi=100)
    top, bottom = fig.subplots(2, 1)
    top.plot(t, truth, color="black", lw=2, label="sin(t)")
    top.plot(t, one_step, "--", label="one step ahead")
    top.plot(t, free, ":", lw=2, label="free running")
    top.set_xlabel("t")
    top.set_title("forecasts after a 20-point warm-up")
    top.legend(loc="lower left")
    for label, c in clipping.items():
        bottom.semilogy(c["norms"], lw=0.8, label=label)
    bottom.axhline(1.0, color="gray", lw=0.8)
    bottom.set_xlabel("training step (Adam, lr 0.1)")
    bottom.set_ylabel("gradient norm before clipping")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path)
    say(f"figure: {path}")
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", choices=("torch", "scratch"), default="torch", help="whose RNN layer")
    parser.add_argument("--out", default="runs/sine_wave", help="where the figure and results.json go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.quick, args.seed, args.impl, args.out)
    print(f"({time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
