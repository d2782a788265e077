"""int8 exports (charlm export --quantize int8) and charlm eval / info of an exported model.

How close an int8 model must stay to its fp32 export: along the fp32 model's greedy 200-character text,
the int8 model (fed the same characters) has log-probabilities within 0.1 nats of the fp32 model's
everywhere, and picks the same next character wherever the fp32 model's choice led the runner-up by
more than 0.05 nats (from 1% of the positions, for an untrained from-scratch LSTM whose outputs are
nearly uniform, to all of them; a near-tie may go either way). Both are measured teacher-forced, on the same
text: free-running greedy texts part for good at the first near-tie, so comparing them would measure
luck, not quantization.

That closeness depends on the CPU: without VNNI (AVX2-only CPUs), onnxruntime sums pairs of uint8 x int8
products in saturating 16-bit arithmetic, and full-range weights made these models' log-probabilities
1.2 nats off there while a VNNI CPU saw nothing wrong. So the weights' range (at most 64, where no pair
can saturate) is checked too, which holds or fails the same on every machine.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from charlm import Vocab
from charlm.cli import main
from charlm.config import TrainConfig
from charlm.training import train

pytest.importorskip("onnxruntime")

from charlm.export import OnnxModel, export_onnx, read_metadata  # noqa: E402
from charlm.export.graph import ExportError  # noqa: E402
from charlm.export.quantize import WEIGHT_LIMIT, int8_weight_range  # noqa: E402
from test_export import VARIANTS, _checkpoint  # noqa: E402


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return z - np.logaddexp.reduce(z)


CLEAR = 0.05  # nats by which a's greedy choice leads its runner-up for b's choice to have to be the same


def _teacher_forced(a: OnnxModel, b: OnnxModel, ids: np.ndarray, skip: int) -> tuple[float, float, float]:
    """Along ``ids``: (share of positions where a's choice is clear, share of those where b's greedy choice is
    a's, largest |log p_a - log p_b|)."""
    sa, sb, clear, same, worst = a.init_state(1), b.init_state(1), [], [], 0.0
    for t in range(len(ids) - 1):
        la, sa = a.step(ids[t:t + 1], sa)
        lb, sb = b.step(ids[t:t + 1], sb)
        if t >= skip:
            pa, pb = _log_softmax(la[0]), _log_softmax(lb[0])
            second, first = np.sort(pa[1:])[-2:]  # never <unk>, as generation
            clear.append(first - second > CLEAR)
            if clear[-1]:
                same.append(int(pa[1:].argmax()) == int(pb[1:].argmax()))
            worst = max(worst, float(np.abs(pa - pb).max()))
    return float(np.mean(clear)), float(np.mean(same)) if same else 0.0, worst


@pytest.mark.parametrize("cell, impl, embedding_dim, layers", VARIANTS,
                         ids=[f"{c}-{i}-{'emb' if e else 'onehot'}-{n}layer" for c, i, e, n in VARIANTS])
def test_an_int8_export_of_every_cell_and_input_kind_stays_close_to_fp32(tmp_path, cell, impl, embedding_dim, layers):
    ckpt = _checkpoint(tmp_path, cell, impl, embedding_dim, layers)
    fp32 = OnnxModel(export_onnx(ckpt, tmp_path / "fp32.onnx"))
    int8 = OnnxModel(export_onnx(ckpt, tmp_path / "int8.onnx", quantize="int8"))
    assert (fp32.quantization, int8.quantization) == (None, "int8")
    assert read_metadata(int8.path)["quantization"] == "int8"
    assert int8.path.stat().st_size < fp32.path.stat().st_size
    assert WEIGHT_LIMIT // 2 < int8_weight_range(int8.path) <= WEIGHT_LIMIT  # 7 bits used, and no more
    assert int8_weight_range(fp32.path) == 0
    greedy = "".join(c for (c,) in fp32.iter_generate("the ", 200))
    clear, agree, worst = _teacher_forced(fp32, int8, ckpt.vocab.encode("the " + greedy).astype(np.int64), skip=3)
    assert clear >= 0.01 and agree == 1.0 and worst <= 0.1, (clear, agree, worst)
    sampled = "".join(c for (c,) in int8.iter_generate("the ", 100, temperature=0.9, seed=3))
    assert len(sampled) == 100 and set(sampled) <= set(ckpt.vocab.itos[1:])  # the engine runs it, <unk> never


def test_an_onnxruntime_that_writes_full_range_weights_is_refused(tmp_path, monkeypatch):
    """Full-range int8 weights give wrong figures on CPUs without VNNI: such an export is refused, not written."""
    import onnxruntime.quantization as q

    real = q.quantize_dynamic
    monkeypatch.setattr(q, "quantize_dynamic", lambda *a, reduce_range=False, **kw: real(*a, **kw))
    ckpt = _checkpoint(tmp_path, "lstm", "torch", 6, 2)
    with pytest.raises(ExportError, match="only weights up to 64 give the same figures on every CPU"):
        export_onnx(ckpt, tmp_path / "out" / "int8.onnx", quantize="int8")
    assert not (tmp_path / "out").exists()  # nothing written, and the folder the export made removed again


def test_int8_weight_range_raises_export_error_for_every_file_it_cannot_check(tmp_path):
    """#35: a MatMulInteger without stored weights was a ValueError (the project's user errors are CharlmErrors),
    and a file that is not ONNX a protobuf DecodeError."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2])])
    onnx.save(helper.make_model(graph), tmp_path / "unstored.onnx")
    (tmp_path / "text.onnx").write_text("not a model\n" * 10)
    (tmp_path / "folder.onnx").mkdir()
    for name, message in (("unstored.onnx", "MatMulInteger 'mm' multiplies by 'b', not a stored weight"),
                          ("text.onnx", "is not an ONNX model"), ("folder.onnx", "cannot read it"),
                          ("missing.onnx", "cannot read it")):
        with pytest.raises(ExportError, match=message):
            int8_weight_range(tmp_path / name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mirror):
    """A small model trained for a few hundred steps on the Time Machine, and its fp32 and int8 exports."""
    root = tmp_path_factory.mktemp("quantize")
    corpus = root / "timemachine.txt"
    corpus.write_bytes((mirror / "timemachine.txt").read_bytes())
    train(TrainConfig(corpus=str(corpus), out=str(root / "run"), hidden_size=96, embedding_dim=16, batch_size=16,
                      num_steps=32, max_steps=300, eval_every=150, time_limit=None))
    for name, extra in (("fp32.onnx", []), ("int8.onnx", ["--quantize", "int8"])):
        r = CliRunner().invoke(main, ["export", str(root / "run"), "--out", str(root / name), *extra])
        assert r.exit_code == 0, r.output
    return root


def _eval_json(*args) -> list[dict]:
    r = CliRunner().invoke(main, ["eval", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.splitlines()]


def test_charlm_eval_of_an_fp32_export_is_the_checkpoints_figure(trained):
    """The same held-out text (the run's, re-read from its corpus) and any file, read the same way."""
    other = trained / "other.txt"
    other.write_text((trained / "timemachine.txt").read_text()[5000:25000])
    for args in ((), (other,)):
        (run,), (onnx,) = _eval_json(trained / "run", *args), _eval_json(trained / "fp32.onnx", *args)
        assert onnx["tokens"] == run["tokens"] and onnx["file"] == run["file"]
        assert onnx["loss"] == pytest.approx(run["loss"], abs=1e-4)


def test_an_int8_export_keeps_the_held_out_figure_within_a_hundredth_of_a_bit(trained):
    (run,), (int8,) = _eval_json(trained / "run"), _eval_json(trained / "int8.onnx")
    assert run["tokens"] == int8["tokens"]
    assert abs(int8["bits_per_char"] - run["bits_per_char"]) <= 0.01, (run, int8)
    assert run["bits_per_char"] < 3.5  # a model that learned something: the comparison means something


def test_info_and_generate_take_an_exported_model(trained):
    r = CliRunner().invoke(main, ["info", str(trained / "int8.onnx")])
    assert r.exit_code == 0, r.output
    assert "weights:      int8" in r.output and "2 x LSTM 96, embedding 16" in r.output
    assert "int8.tokenizer.json" in r.output
    r = CliRunner().invoke(main, ["info", str(trained / "fp32.onnx")])
    assert "weights:      fp32" in r.output
    auto = CliRunner().invoke(main, ["generate", "The ", "--length", "50", "--checkpoint", str(trained / "int8.onnx")])
    explicit = CliRunner().invoke(main, ["generate", "The ", "--length", "50", "--engine", "onnx", "--checkpoint",
                                         str(trained / "int8.onnx")])
    assert auto.exit_code == 0 and auto.output == explicit.output and len(auto.output) == 55


def _one_line(result, code=1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_every_refusal_is_one_line(trained, tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])),
         str(tmp_path / "foreign.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for command in ("eval", "info"):
        assert "not one charlm exported" in _one_line(CliRunner().invoke(main, [command, str(tmp_path / "foreign.onnx")]))
        assert "not an ONNX model" in _one_line(CliRunner().invoke(main, [command, str(tmp_path / "junk.onnx")]))
    copy = tmp_path / "m.onnx"
    copy.write_bytes((trained / "int8.onnx").read_bytes())
    (tmp_path / "m.tokenizer.json").write_text(Vocab.from_text("abc").to_json())  # not this model's vocabulary
    for command in (["eval", str(copy)], ["info", str(copy)], ["generate", "a", "--checkpoint", str(copy)]):
        assert "not the vocabulary m.onnx was exported with" in _one_line(CliRunner().invoke(main, command))
    (tmp_path / "m.tokenizer.json").unlink()
    assert "m.tokenizer.json is missing" in _one_line(CliRunner().invoke(main, ["eval", str(copy)]))
    line = _one_line(CliRunner().invoke(main, ["export", str(trained / "run"), "--out", str(tmp_path / "q.onnx"),
                                               "--quantize", "int4"]), code=2)
    assert "Invalid value for '--quantize'" in line
    assert "--dynamic needs the checkpoint" in _one_line(CliRunner().invoke(
        main, ["eval", str(trained / "int8.onnx"), "--dynamic"]), code=2)
    assert "--dynamic-counts needs the checkpoint" in _one_line(CliRunner().invoke(
        main, ["eval", str(trained / "int8.onnx"), "--dynamic-counts", "3"]), code=2)  # not "add --dynamic"
    assert "--dynamic needs the checkpoint" in _one_line(CliRunner().invoke(
        main, ["eval", str(trained / "int8.onnx"), "--dynamic-lr", "0.1", "--dynamic"]), code=2)
    assert "onnxruntime's CPU" in _one_line(CliRunner().invoke(
        main, ["eval", str(trained / "int8.onnx"), "--device", "cuda"]), code=2)


@pytest.mark.parametrize("raw", ["{not json", "[1]", '{"format": 2}', '{"format": 1}'])
def test_metadata_that_is_not_this_charlms_is_one_line(trained, tmp_path, raw):
    import onnx

    model = onnx.load(str(trained / "fp32.onnx"))
    next(p for p in model.metadata_props if p.key == "charlm").value = raw
    onnx.save(model, str(tmp_path / "m.onnx"))
    (tmp_path / "m.tokenizer.json").write_bytes((trained / "fp32.tokenizer.json").read_bytes())
    for command in ("info", "eval"):
        _one_line(CliRunner().invoke(main, [command, str(tmp_path / "m.onnx")]))
