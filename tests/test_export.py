"""charlm export: the one-step ONNX graph equals the PyTorch model (every cell, input kind, implementation,
layer count), onnxruntime generation gives the PyTorch path's text, and bad input is one line."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from charlm import RNNLM, Vocab, generate, load_checkpoint, save_checkpoint
from charlm.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from charlm.export import ExportError, export_onnx, read_metadata  # noqa: E402
from charlm.export import OnnxModel  # noqa: E402

TEXT = "the time traveller smiled and the machine was gone\n" * 4
VARIANTS = [("rnn", "torch", 0, 2), ("rnn", "scratch", 6, 1), ("gru", "torch", 6, 2), ("gru", "scratch", 0, 3),
            ("lstm", "torch", 6, 2), ("lstm", "scratch", 0, 2), ("lstm", "torch", 0, 1), ("mogrifier", "torch", 6, 2),
            ("mogrifier", "scratch", 0, 1)]


def _checkpoint(tmp_path, cell, impl, embedding_dim, layers, hidden=32, **options):
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(1)
    model = RNNLM(len(vocab), cell=cell, hidden_size=hidden, num_layers=layers, embedding_dim=embedding_dim,
                  impl=impl, **options)
    with torch.no_grad():  # weights of a trained model's size, so that the logits are far from ties
        for p in model.parameters():
            p.mul_(2.0)
    meta = {"corpus": {"path": "tiny.txt", "preprocess": "lower"}, "progress": {"step": 3, "best_val_loss": 2.5}}
    return load_checkpoint(save_checkpoint(tmp_path / "run" / "best", model, vocab, meta))


@pytest.mark.parametrize("cell, impl, embedding_dim, layers", VARIANTS,
                         ids=[f"{c}-{i}-{'emb' if e else 'onehot'}-{n}layer" for c, i, e, n in VARIANTS])
def test_the_graph_equals_the_model_at_every_step_of_a_greedy_run(tmp_path, cell, impl, embedding_dim, layers):
    ckpt = _checkpoint(tmp_path, cell, impl, embedding_dim, layers)
    path = export_onnx(ckpt, tmp_path / "out" / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    engine = OnnxModel(path)
    model = ckpt.model.eval()
    ids = ckpt.vocab.encode("the ")
    state, worst, text = None, 0.0, []
    onnx_state = engine.init_state(1)
    with torch.no_grad():
        for t in range(500 + len(ids)):
            i = int(ids[t]) if t < len(ids) else nxt
            logits, state = model(torch.tensor([[i]]), state)
            onnx_logits, onnx_state = engine.step(np.array([i], dtype=np.int64), onnx_state)
            worst = max(worst, float(np.abs(onnx_logits[0] - logits[0, -1].numpy()).max()))
            nxt = int(logits[0, -1, 1:].argmax()) + 1  # greedy, never <unk>
            if t >= len(ids) - 1:
                text.append(ckpt.vocab.itos[nxt])
    assert worst < 1e-5
    greedy = "".join(text[:500])
    assert generate(model, ckpt.vocab, "the ", 500) == "the " + greedy  # the PyTorch path's own loop agrees
    assert "".join(c for (c,) in engine.iter_generate("the ", 500)) == greedy


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "mogrifier"])
def test_seeded_sampling_gives_the_pytorch_text(tmp_path, cell):
    ckpt = _checkpoint(tmp_path, cell, "torch", 6, 2)
    engine = OnnxModel(export_onnx(ckpt, tmp_path / "model.onnx"))
    for options in [dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=5, seed=4),
                    dict(temperature=1.2, top_p=0.9, seed=5, num_samples=3), dict(temperature=1.0, seed=6)]:
        want = generate(ckpt.model, ckpt.vocab, "the " if "top_k" not in options else "", 300, **options)
        prefix = "the " if "top_k" not in options else ""
        parts = [[prefix] for _ in range(options.get("num_samples", 1))]
        for chunk in engine.iter_generate(prefix, 300, **options):
            for p, c in zip(parts, chunk):
                p.append(c)
        got = ["".join(p) for p in parts]
        assert got == (want if isinstance(want, list) else [want]), options


def test_metadata_and_the_vocabulary_beside_the_model(tmp_path):
    ckpt = _checkpoint(tmp_path, "lstm", "torch", 6, 2)
    path = export_onnx(ckpt, tmp_path / "model.onnx")
    meta = read_metadata(path)
    assert (meta["cell"], meta["num_layers"], meta["hidden_size"], meta["embedding_dim"], meta["preprocess"]) == \
        ("lstm", 2, 32, 6, "lower")
    assert meta["inputs"] == ["ids", "h", "c"] and meta["outputs"] == ["logits", "h_out", "c_out"]
    assert Vocab.load(tmp_path / "model.tokenizer.json").itos == ckpt.vocab.itos
    session = meta["session"]
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["ids"][0] == shapes["h"][1]  # N is dynamic, one name for it
    (tmp_path / "model.tokenizer.json").write_text(Vocab.from_text("abc").to_json())
    with pytest.raises(ExportError, match="not the vocabulary"):
        OnnxModel(path)


def test_the_cli_exports_and_generates_the_same_text(tmp_path):
    ckpt = _checkpoint(tmp_path, "gru", "torch", 6, 2)
    r = CliRunner().invoke(main, ["export", str(ckpt.path), "--out", str(tmp_path / "m" / "model.onnx")])
    assert r.exit_code == 0, r.output
    args = ["generate", "the ", "--length", "80", "--temperature", "0.9", "--seed", "2", "--checkpoint"]
    onnx_out = CliRunner().invoke(main, [*args, str(tmp_path / "m" / "model.onnx"), "--engine", "onnx"])
    torch_out = CliRunner().invoke(main, [*args, str(ckpt.path)])
    assert onnx_out.exit_code == 0, onnx_out.output
    assert onnx_out.output == torch_out.output
    r = CliRunner().invoke(main, ["generate", "THE", "--engine", "onnx", "--checkpoint",
                                  str(tmp_path / "m" / "model.onnx")])
    assert r.exit_code == 1 and "--normalize" in r.output  # the preprocessing travels in the metadata


def _one_line_error(result):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    ckpt = _checkpoint(tmp_path, "rnn", "torch", 0, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint" in _one_line_error(CliRunner().invoke(main, ["export", str(empty), "--out",
                                                                         str(tmp_path / "a.onnx")]))
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder would be")
    line = _one_line_error(CliRunner().invoke(main, ["export", str(ckpt.path), "--out", str(blocked / "m.onnx")]))
    assert "cannot write" in line or "not a directory" in line
    _one_line_error(CliRunner().invoke(main, ["export", str(ckpt.path), "--out", str(tmp_path / "model.txt")]))
    r = CliRunner().invoke(main, ["export", str(ckpt.path), "--format", "pdf", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "Invalid value for '--format'" in r.output  # click's usage error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "empty", "run"]  # nothing half-written
    # an ONNX model that is not charlm's, and a file that is no model at all
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    foreign = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for name, expected in [("foreign.onnx", "not one charlm exported"), ("junk.onnx", "not an ONNX model")]:
        line = _one_line_error(CliRunner().invoke(main, ["generate", "the", "--engine", "onnx", "--checkpoint",
                                                         str(tmp_path / name)]))
        assert expected in line


def test_an_export_replaces_an_earlier_one_whole(tmp_path):
    a = _checkpoint(tmp_path / "a", "gru", "torch", 6, 1)
    b = _checkpoint(tmp_path / "b", "lstm", "torch", 6, 1)
    out = tmp_path / "out" / "model.onnx"
    export_onnx(a, out)
    export_onnx(b, out)
    assert read_metadata(out)["cell"] == "lstm"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.tokenizer.json"]
    assert json.loads((out.parent / "model.tokenizer.json").read_text())["model"]["type"] == "WordLevel"


def test_a_web_export_without_onnxruntime_web_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from charlm.export import web as webexport

    ckpt = _checkpoint(tmp_path, "gru", "torch", 6, 1)
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(webexport, "ORT_WEB_URL", "http://127.0.0.1:9/onnxruntime-web.tgz")  # nothing listens
    line = _one_line_error(CliRunner().invoke(main, ["export", str(ckpt.path), "--format", "web", "--out",
                                                     str(tmp_path / "site"), "--quiet"]))
    assert "cannot fetch onnxruntime-web 1.30.0" in line and "CHARLM_ORT_WEB" in line
    (tmp_path / "wrong.tgz").write_bytes(b"not the package")
    monkeypatch.setenv("CHARLM_ORT_WEB", str(tmp_path / "wrong.tgz"))
    line = _one_line_error(CliRunner().invoke(main, ["export", str(ckpt.path), "--format", "web", "--out",
                                                     str(tmp_path / "site"), "--quiet"]))
    assert "sha256 differs" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run", "wrong.tgz"]  # no site, nothing partial
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_bound_loop_step_equals_a_plain_run_and_the_sampler_restores_torch_threads(tmp_path):
    ckpt = _checkpoint(tmp_path, "lstm", "torch", 6, 2)
    engine = OnnxModel(export_onnx(ckpt, tmp_path / "model.onnx"))
    run, state = engine.stepper(3), engine.init_state(3)
    rng = np.random.default_rng(0)
    for _ in range(40):  # the two bound state buffers are used in turn: an even and an odd step each time
        ids = rng.integers(1, len(ckpt.vocab), 3)
        want, state = engine.step(ids, state)
        np.testing.assert_allclose(run.step(ids), want, rtol=0, atol=1e-6)
    threads = torch.get_num_threads()
    for _ in engine.iter_generate("the ", 40, temperature=0.8, seed=0, num_samples=2):
        pass
    assert torch.get_num_threads() == threads


def test_threads_follow_the_weights_a_step_reads():
    from charlm.export import step_threads

    small = {"cell": "lstm", "num_layers": 1, "hidden_size": 64, "vocab_size": 40}
    large = {"cell": "lstm", "num_layers": 2, "hidden_size": 320, "vocab_size": 40}
    assert step_threads(small) == 1
    assert step_threads(large) == min(torch.get_num_threads(), 9)  # 4.9 MB of weights: 9 blocks of 512 KiB
    # a mogrifier's step also reads layer 0's W_ih and its rounds' matrices: 2 x 320, embedding 64, 5 rounds
    # read 5.0 MB + 4 x (4 x 320 x 64 + 5 x 320 x (64 + 320)) bytes = 7.8 MB: 14 blocks
    mogrifier = {**large, "cell": "mogrifier", "embedding_dim": 64, "mogrify_rounds": 5}
    assert step_threads(mogrifier) == min(torch.get_num_threads(), 14)
