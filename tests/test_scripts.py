import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_cells_quick(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = load("compare_cells").main(["--quick"])
    assert len(rows) == 12
    assert {(r[0], r[1]) for r in rows} == {(c, i) for c in ("rnn", "gru", "lstm") for i in ("torch", "scratch")}
    for cell, impl, label, ppl, bpc, speed, params in rows:
        assert 1 < ppl < 28 and bpc > 0 and speed > 0 and params > 0  # better than uniform over 28 symbols
    out = capsys.readouterr().out
    assert out.count("\n| ") == 13  # header + 12 rows
