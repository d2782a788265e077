import math

import numpy as np
import pytest


@pytest.mark.slow
def test_compare_cells_quick(mirror, tmp_path, monkeypatch, capsys, load_script):
    monkeypatch.chdir(tmp_path)
    rows = load_script("scripts/compare_cells.py").main(["--quick"])
    assert len(rows) == 12
    assert {(r[0], r[1]) for r in rows} == {(c, i) for c in ("rnn", "gru", "lstm") for i in ("torch", "scratch")}
    for cell, impl, label, ppl, bpc, speed, params in rows:
        assert 1 < ppl < 28
        assert bpc > 0
        assert speed > 0
        assert params > 0  # better than uniform over 28 symbols
    out = capsys.readouterr().out
    assert out.count("\n| ") == 13  # header + 12 rows


def test_markov_entropy_rate_matches_a_hand_computation(load_script):
    markov = load_script("scripts/markov_corpus.py")
    # Two symbols, order 1: from 0 stay with 0.9; from 1 go either way with 0.5.
    P = np.array([[0.9, 0.1], [0.5, 0.5]])
    pi = markov.stationary(P)
    assert pi == pytest.approx([5 / 6, 1 / 6])
    h = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))  # noqa: E731
    assert markov.entropy_rate(P) == pytest.approx(5 / 6 * h(0.9) + 1 / 6 * 1.0)


def test_markov_sample_scores_near_the_rate(tmp_path, load_script):
    markov = load_script("scripts/markov_corpus.py")
    info = markov.main([str(tmp_path / "m.txt"), "--chars", "200000", "--symbols", "8", "--alpha", "0.3"])
    text = (tmp_path / "m.txt").read_text()
    assert len(text) == 200_000
    assert len(set(text)) <= 8
    # 20,000 held-out characters of the true model: within a few hundredths of a bit of the rate.
    assert info["true_model_held_out_bits"] == pytest.approx(info["entropy_rate_bits"], abs=0.05)
    assert info["entropy_rate_bits"] < info["uniform_bits"] == 3.0
    assert info["counting_model_held_out_bits"] > info["true_model_held_out_bits"] - 0.01


@pytest.mark.slow
def test_bench_train_quick_runs_both_configurations(mirror, tmp_path, monkeypatch, capsys, load_script):
    monkeypatch.chdir(tmp_path)
    rows = load_script("scripts/bench_train.py").main([str(mirror / "timemachine.txt"), "--quick"])
    assert [name for name, _ in rows] == ["d2l", "expert"]
    for _, m in rows:
        assert m["reference"] > 0
        assert m["charlm"] > 0
        assert m["eval"] >= 0
        assert m["save"] > 0
    assert capsys.readouterr().out.count("\n| ") == 3  # header + 2 rows


def test_bench_generate_small_runs_every_column(tmp_path, capsys, load_script):
    import torch

    from charlm import RNNLM, Vocab, save_checkpoint

    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "best", RNNLM(len(vocab), "lstm", 12, 2, embedding_dim=4), vocab, {})
    bench = load_script("scripts/bench_generate.py")
    rows = bench.main(["--hidden-size", "16", "--length", "200", "--num-samples", "4", "--batched-length", "10",
                       "--process", "--repeats", "1", "--process-length", "50", "--checkpoint", str(ckpt)])
    assert [r["cell"] for r in rows[:3]] == ["rnn", "gru", "lstm"]
    assert rows[3]["cell"] == "best: 2 x lstm 12, embedding 4, V=28"
    for r in rows:
        assert all(r[k] > 0 for k in ("d2l_as_written", "d2l_no_grad", "greedy", "sampling", "batched", "limit"))
        assert r["process_s"] > 0
    assert capsys.readouterr().out.count("\n| ") == 1 + 2 * 4  # header, then a row and a process row per model
    # FLOPs per character: layer 1 reads the 4-wide embedding, layer 2 the 12-wide state, then the head.
    m = RNNLM(28, "lstm", 12, 2, embedding_dim=4)
    assert bench.flops_per_char(m) == 2 * 4 * 12 * (4 + 12) + 2 * 4 * 12 * (12 + 12) + 2 * 12 * 28


def test_bench_serve_small_runs_every_client_count(tmp_path, capsys, load_script):
    import torch

    from charlm import RNNLM, Vocab, save_checkpoint

    vocab = Vocab("abcdefghijklmnopqrstuvwxyz T")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "best", RNNLM(len(vocab), "lstm", 12, 2, embedding_dim=4), vocab, {})
    out = load_script("scripts/bench_serve.py").main(["--checkpoint", str(ckpt), "--length", "60", "--clients",
                                                      "1,3", "--rounds", "2"])
    assert set(out["clients"]) == {1, 3}
    for figures in out["clients"].values():
        assert figures["rate"] > 0 and 0 < figures["p50_ms"] <= figures["p95_ms"]
    assert out["rate_local"] > 0
    assert capsys.readouterr().out.count("\n| ") == 1 + 2  # header, then a row per client count


def test_bench_generate_onnx_compares_both_engines(capsys, load_script):
    pytest.importorskip("onnxruntime")
    rows = load_script("scripts/bench_generate.py").main(["--onnx", "--cells", "gru", "--hidden-size", "8",
                                                          "--length", "100", "--batched-length", "10",
                                                          "--onnx-batch", "4", "--process-length", "50",
                                                          "--repeats", "1"])
    (row,) = rows
    assert row["best_exporter"] in ("torchscript", "dynamo")
    for key in ("torch_greedy", "torchscript_greedy", "dynamo_greedy", "int8_greedy", "torch_process", "onnx_process",
                "int8_process", "torch_batched", "onnx_batched"):
        assert row[key] > 0
    assert row["int8_bytes"] < row["fp32_bytes"]
    assert capsys.readouterr().out.count("\n| ") == 1 + 1


def test_bench_models_small_runs_every_row(capsys, load_script):
    rows = load_script("scripts/bench_models.py").main(["--hidden-size", "8", "--batch-size", "2", "--num-steps", "3",
                                                        "--embedding-dim", "4", "--repeats", "1"])
    # 4 cells x 2 inputs x 2 impls, plus the LSTM and the mogrifier with oneDNN off for each input
    assert len(rows) == 20
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert capsys.readouterr().out.count("\n| ") == 1 + 20


def test_bench_cells_quick_times_every_cell(capsys, load_script):
    rows = load_script("scripts/bench_cells.py").main(["--quick", "--cells", "lstm", "mogrifier", "mogrifier:3:4"])
    assert [r["cell"] for r in rows] == ["lstm", "mogrifier", "mogrifier:3:4"]
    assert rows[0]["step_ratio"] == rows[0]["greedy_ratio"] == 1.0
    assert all(r["step_s"] > 0 and r["greedy"] > 0 and r["batch"] > 0 for r in rows)
    assert rows[2]["parameters"] < rows[1]["parameters"]  # 3 rounds of rank 4: fewer than 5 full ones
    assert capsys.readouterr().out.count("\n| ") == 1 + 3


def test_bench_encode_takes_its_options(mirror, capsys, load_script):
    rates = load_script("scripts/bench_encode.py").main([str(mirror / "timemachine.txt"), "--repeats", "1"])
    assert set(rates) == {"load_corpus", "encode", "tokenizers"}
    assert all(v > 0 for v in rates.values())
    assert "MB/s" in capsys.readouterr().out


def test_perplexity_table_equals_charlm_eval(tmp_path, capsys, load_script):
    import json

    import torch
    from click.testing import CliRunner

    from charlm import RNNLM, Vocab, save_checkpoint
    from charlm.cli import main as cli

    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "best", RNNLM(len(vocab), "gru", 12), vocab,
                           {"corpus": {"preprocess": "lower"}})
    text = tmp_path / "t.txt"
    text.write_text("The Quick brown fox, jumps over the lazy dog!\n" * 20)  # ',', '!' and '\n' are unknown
    rows = load_script("scripts/perplexity.py").main([str(ckpt), "--files", str(text)])
    assert len(rows) == 1
    assert rows[0]["preprocess"] == "lower"
    assert rows[0]["skipped"] == 60
    r = CliRunner().invoke(cli, ["eval", str(ckpt), str(text), "--errors", "skip", "--json"])
    row = json.loads(r.output.splitlines()[-1])
    assert rows[0]["tokens"] == row["tokens"]
    assert rows[0]["loss"] == round(row["loss"], 4)
    assert rows[0]["skipped"] == row["skipped"]
    lines = capsys.readouterr().out.splitlines()
    assert [line[:2] for line in lines] == ["| ", "|-", "| "]  # header, rule, one row
    with pytest.raises(SystemExit) as err:
        load_script("scripts/perplexity.py").main([str(tmp_path / "nowhere"), "--files", str(text)])
    assert err.value.code == 1


@pytest.mark.slow
def test_bench_corpus_quick_runs_its_parts(mirror, tmp_path, capsys, load_script):
    bench = load_script("scripts/bench_corpus.py")
    r = bench.main(["--workdir", str(tmp_path), "--size-mb", "3", "--quick", "--train-steps", "20",
                    "--train-time-limit", "300", "--only", "prepare", "train_big", "token_file"])  # (a bound, not a figure)
    for mode in ("raw", "lower", "letters"):
        assert r["prepare"][f"prepare_{mode}"]["mb_per_s"] > 0
        assert r["prepare"][f"prepare_{mode}"]["peak_mb"] >= r["import_torch_peak_mb"] * 0.5
    assert r["train_big"]["steps"] == 20
    assert r["train_big"]["rss_last"] > 0
    assert r["token_file_vs_memory"]["ratio"] > 0
    out = capsys.readouterr().out
    assert "| raw |" in out


@pytest.mark.slow
def test_bench_distributed_quick_reports_every_layout(mirror, tmp_path, load_script):
    results = load_script("scripts/bench_distributed.py").main([str(mirror / "timemachine.txt"), "--quick",
                                                                 "--workdir", str(tmp_path)])
    assert list(results) == ["1x2", "2x1", "1x1"]
    for name, r in results.items():
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert len(r["peak_rss_mb"]) == int(name[0])  # one figure per rank
        assert (r["allreduce_ms"] is not None) == (name == "2x1")
