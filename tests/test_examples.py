"""Every example in --quick mode, checking what it claims."""

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_hello_ohlol_every_variant_learns_the_mapping(tmp_path, capsys, load_script):
    module = load_script("examples/hello_ohlol.py")
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert len(result["seeds"]) == 3
    names = set(result["epochs"])
    assert any("stepped by hand" in n for n in names)
    for cell in ("rnn", "gru", "lstm"):
        for impl in ("torch", "scratch"):
            assert f"{cell} layer, one-hot, {impl}" in names
            assert f"{cell} layer, embedding 4, {impl}" in names
    for name, epochs in result["epochs"].items():
        assert all(e is not None and 1 <= e <= module.MAX_EPOCHS for e in epochs), name
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == result["epochs"]
    assert "every variant reached 'ohlol'" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "scratch"])
def test_sine_wave_one_step_beats_free_running_and_the_naive_forecast(tmp_path, impl, load_script):
    result = load_script("examples/sine_wave.py").main(["--quick", "--impl", impl, "--out", str(tmp_path)])
    mse = result["mse"]
    assert mse["one_step"] < mse["free_running"]
    assert mse["one_step"] < mse["last_value"]
    clipped = result["clipping"]["clipped at 1.0"]
    assert clipped["max_norm_applied"] <= 1.0 + 1e-6
    assert (tmp_path / "sine_wave.png").stat().st_size > 0


@pytest.mark.slow
def test_airline_passengers_reports_all_three_methods(tmp_path, capsys, load_script):
    result = load_script("examples/airline_passengers.py").main(["--quick", "--out", str(tmp_path)])
    errors = result["mape_percent"]
    assert len(errors) == 3
    assert all(0 < e < 100 for e in errors.values())
    assert result["winner"] == min(errors, key=errors.get)
    # The two baselines are deterministic: recompute them from the CSV by hand.
    lines = (EXAMPLES / "data" / "airline_passengers.csv").read_text().splitlines()
    values = [float(line.split(",")[1]) for line in lines if line[:1].isdigit()]
    assert len(values) == 144
    assert sum(values) == 40363  # the published series G total
    y1958, y1959, y1960 = values[-36:-24], values[-24:-12], values[-12:]
    growth = sum(y1959) / sum(y1958)
    naive = 100 * sum(abs(a - b) / b for a, b in zip(y1959, y1960)) / 12
    trend = 100 * sum(abs(a * growth - b) / b for a, b in zip(y1959, y1960)) / 12
    assert errors["seasonal naive"] == pytest.approx(naive)
    assert errors["seasonal naive x last year's growth"] == pytest.approx(trend)
    out = capsys.readouterr().out
    for name in errors:
        assert name in out
    assert (tmp_path / "airline_passengers.png").stat().st_size > 0
