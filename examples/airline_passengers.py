"""Airline passengers: a GRU forecasts a year of a seasonal series, beside two simple baselines.

What it teaches. The monthly international airline passenger totals of 1949-1960 (Box & Jenkins'
series G, ``examples/data/airline_passengers.csv``) grow and swing with the seasons. The last 12
months are held out. The rest is scaled to [-1, 1] with the minimum and maximum of the training
part only (the held-out year must not leak into the scaling), cut into windows of 12 months, and a
GRU (charlm's ``recurrent_layer``, ``--impl torch`` or ``scratch``) learns to predict the month
after each window. It then forecasts the held-out year autoregressively: each forecast month is
fed back in as the newest input.

A network this size fits 120 windows in a few hundred epochs and then overfits, and how far it
goes wrong depends on the seed. So the hidden size and the number of epochs are chosen the honest way, without looking
at the held-out year: forecast the last *training* year (1959) from the years before it for each
candidate, keep the best, then train on all training years. The forecast is the mean of several
seeds (an ensemble), which also tames the variance.

A forecast means little without the baselines any forecaster checks first:

- seasonal naive: each month equals the same month a year earlier;
- seasonal naive with trend: the same, scaled by the growth of the last year (the total of the
  last 12 known months over the total of the 12 before them).

It prints the mean absolute percentage error (MAPE) of all three and says which wins.

    python examples/airline_passengers.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from charlm.models import recurrent_layer

DATA = Path(__file__).resolve().parent / "data" / "airline_passengers.csv"
HORIZON = 12  # months held out and forecast
WINDOW = 12  # months the GRU reads to predict the next one


def load(path: Path = DATA):
    """(months, passengers) from the CSV; lines starting with '#' are comments."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return [r["month"] for r in rows], torch.tensor([float(r["passengers"]) for r in rows], dtype=torch.float64)


class Forecaster(nn.Module):
    """A GRU over a window of scaled values; a linear head reads the last state."""

    def __init__(self, impl: str, hidden: int):
        super().__init__()
        self.rnn = recurrent_layer("gru", 1, hidden, impl=impl)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, WINDOW, 1) -> (B,)
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def mape(forecast: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean absolute percentage error, in percent."""
    return float(((forecast - truth).abs() / truth).mean() * 100)


def gru_forecast(train: torch.Tensor, impl: str, hidden: int, epochs: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    lo, hi = train.min(), train.max()  # statistics of the training part only

    def scale(v):
        return (2 * (v - lo) / (hi - lo) - 1).float()

    def unscale(v):
        return (v.double() + 1) / 2 * (hi - lo) + lo

    s = scale(train)
    windows = s.unfold(0, WINDOW, 1)[:-1]  # (N, WINDOW): every window that has a next month
    x, y = windows.unsqueeze(-1), s[WINDOW:]  # (N, WINDOW, 1), (N,)
    model = Forecaster(impl, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):  # full batch: 120 windows
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    history = list(s[-WINDOW:])
    with torch.inference_mode():
        for _ in range(HORIZON):  # autoregressive: each forecast becomes the newest input
            window = torch.stack(history[-WINDOW:]).view(1, WINDOW, 1)
            history.append(model(window)[0])
    return unscale(torch.stack(history[WINDOW:]))


def ensemble_forecast(train: torch.Tensor, impl: str, hidden: int, epochs: int, seeds) -> torch.Tensor:
    return torch.stack([gru_forecast(train, impl, hidden, epochs, s) for s in seeds]).mean(0)


def run(quick: bool = False, seed: int = 0, impl: str = "torch", out: str | Path = "runs/airline_passengers",
        verbose: bool = True) -> dict:
    torch.set_num_threads(1)
    say = print if verbose else (lambda *a: None)
    months, series = load()
    train, truth = series[:-HORIZON], series[-HORIZON:]
    seeds = list(range(seed, seed + (2 if quick else 5)))
    grid = [(16, 100), (16, 200)] if quick else [(h, e) for h in (8, 16, 32) for e in (100, 200, 400, 800)]
    # Choose the size and the epochs on the last training year, never on the held-out one.
    validation = {(h, e): mape(ensemble_forecast(train[:-HORIZON], impl, h, e, seeds), train[-HORIZON:])
                  for h, e in grid}
    hidden, epochs = min(validation, key=validation.get)
    say(f"choosing hidden size and epochs on {months[-2 * HORIZON]}..{months[-HORIZON - 1]} (GRU {impl}, mean of "
        f"seeds {seeds}), MAPE: " + ", ".join(f"{h}/{e}: {v:.1f} %" for (h, e), v in validation.items())
        + f" -> hidden {hidden}, {epochs} epochs")
    forecasts = {
        f"GRU ({impl}, hidden {hidden}, {epochs} epochs, {len(seeds)} seeds)":
            ensemble_forecast(train, impl, hidden, epochs, seeds),
        "seasonal naive": train[-12:].clone(),
        "seasonal naive x last year's growth": train[-12:] * (train[-12:].sum() / train[-24:-12].sum()),
    }
    errors = {name: mape(f, truth) for name, f in forecasts.items()}
    say(f"forecast of {months[-HORIZON]}..{months[-1]} from {len(train)} months, MAPE:")
    for name, e in errors.items():
        say(f"  {name:46s} {e:5.2f} %")
    ranking = sorted(errors, key=errors.get)
    winner = ranking[0]
    say(f"best: {winner}; from best to worst: " + " < ".join(f"{n} ({errors[n]:.1f} %)" for n in ranking))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure = _plot(out / "airline_passengers.png", series, forecasts, errors, say)
    summary = {"impl": impl, "seeds": seeds, "hidden": hidden, "epochs": epochs,
               "validation_mape_percent": {f"hidden {h}, {e} epochs": v for (h, e), v in validation.items()},
               "mape_percent": errors, "winner": winner,
               "forecasts": {k: [round(v, 1) for v in f.tolist()] for k, f in forecasts.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "figure": figure}


def _plot(path: Path, series, forecasts, errors, say):
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (as charlm.plot)
    except ImportError:
        say('no figure: matplotlib is not installed (pip install "charlm-rnn[plot]")')
        return None
    years = 1949 + torch.arange(len(series)) / 12
    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(years[:-HORIZON], series[:-HORIZON], color="black", label="history")
    ax.plot(years[-HORIZON:], series[-HORIZON:], color="black", lw=2.5, alpha=0.35, label="held-out truth")
    for (name, f), style in zip(forecasts.items(), ("-", "--", ":")):
        ax.plot(years[-HORIZON:], f, style, lw=1.8, label=f"{name}: MAPE {errors[name]:.1f} %")
    ax.set_xlabel("year")
    ax.set_ylabel("passengers (thousands)")
    ax.set_title("international airline passengers, 1960 forecast")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    say(f"figure: {path}")
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds and 2 candidate settings instead of 5 and 12")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the ensemble")
    parser.add_argument("--impl", choices=("torch", "scratch"), default="torch", help="whose GRU layer")
    parser.add_argument("--out", default="runs/airline_passengers", help="where the figure and results.json go")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.quick, args.seed, args.impl, args.out)
    print(f"({time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
