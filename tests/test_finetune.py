"""Fine-tuning a trained model (``charlm train --init-from``, charlm.finetune): every --new-chars choice for every
cell and input kind, the extended model's first predictions, the refusals, exact resume, 2 processes == 1, lineage,
and a fine-tuned model through generate, eval, serve and ONNX export."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from charlm import checkpoint as ck
from charlm.cli import main
from charlm.config import TrainConfig
from charlm.errors import TrainError, TrainingInterrupted
from charlm.finetune import extend_state
from charlm.models import RNNLM
from charlm.training import train
from charlm.vocab import Vocab

PARENT_TEXT = "the time traveller smiled and the machine was gone. " * 30
NEW_TEXT = "THE TIME TRAVELLER SMILED; ÆTHER & ÉCLAT! " * 30  # new characters; some of the parent's absent
SMALL = dict(hidden_size=12, embedding_dim=4, batch_size=4, num_steps=10, eval_every=5, time_limit=None,
             weight_drop=0.0, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def make_parent(tmp_path, cell="lstm", embedding_dim=4, impl="torch", name="parent"):
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text(PARENT_TEXT)
    out = tmp_path / name
    train(TrainConfig(corpus=str(corpus), out=str(out), cell=cell, impl=impl, **{**SMALL, "embedding_dim": embedding_dim},
                      max_steps=10))
    return out


@pytest.fixture
def new_text(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text(NEW_TEXT)
    return path


def finetune_cfg(corpus, out, **kw):
    return TrainConfig(corpus=str(corpus), out=str(out), **{**SMALL, "hidden_size": TrainConfig.hidden_size,
                                                            "embedding_dim": TrainConfig.embedding_dim, **kw})


def logprobs(model, ids):
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.as_tensor(ids, dtype=torch.long).unsqueeze(0))[0], dim=-1)[0]


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "mogrifier", "mogrifier-rank"])
@pytest.mark.parametrize("embedding_dim", [0, 4])
def test_extend_keeps_every_old_characters_log_probability(cell, embedding_dim):
    """extend_state alone, on random weights of every cell and input kind: within 1e-3 nats (float rounding).
    (A one-hot mogrifier's rounds read the input character by character too: their rows grow as well.)"""
    torch.manual_seed(0)
    vocab = Vocab("abcdefg ")
    options = dict(mogrify_rounds=4, mogrify_rank=3) if cell == "mogrifier-rank" else {}
    cell = cell.split("-")[0]
    parent = RNNLM(len(vocab), cell, 16, 2, embedding_dim=embedding_dim, **options)
    with torch.no_grad():
        parent.head.bias[0] += 3.0  # a <unk> the parent gives real probability to
        for name, p in parent.rnn.named_parameters():  # rounds far from the identity: a wrong row would show
            if "_q" in name or "_r" in name:
                p.mul_(8.0)
    child = RNNLM(len(vocab) + 3, cell, 16, 2, embedding_dim=embedding_dim, **options)
    child.load_state_dict(extend_state(parent.state_dict(), parent.config, 3))
    ids = vocab.encode("bad cafe fade a bee")
    old, new = logprobs(parent, ids), logprobs(child, ids)
    assert (old[:, 1:] - new[:, 1:len(vocab)]).abs().max() < 1e-3  # every old character's log-probability
    shared = torch.logsumexp(new[:, [0, len(vocab), len(vocab) + 1, len(vocab) + 2]], dim=-1)
    assert (shared - old[:, 0]).abs().max() < 1e-3  # <unk>'s probability, shared with the new characters
    assert (new[:, len(vocab)] - new[:, 0]).abs().max() < 1e-6  # shared equally
    # a new character reads as <unk> did: the same prediction after it
    unk_then = logprobs(parent, [1, 0, 2])
    new_then = logprobs(child, [1, len(vocab) + 1, 2])
    assert (unk_then[:, 1:] - new_then[:, 1:len(vocab)]).abs().max() < 1e-3


@pytest.mark.parametrize("cell, embedding_dim", [("rnn", 0), ("gru", 4), ("lstm", 0), ("lstm", 4), ("mogrifier", 0)])
@pytest.mark.parametrize("new_chars", ["extend", "unk", "error"])
def test_every_new_chars_choice_for_every_cell_and_input_kind(tmp_path, new_text, cell, embedding_dim, new_chars):
    parent = make_parent(tmp_path, cell, embedding_dim)
    p = ck.load_checkpoint(parent)
    out = tmp_path / "child"
    r = cli("train", new_text, "--init-from", parent, "--out", out, "--new-chars", new_chars, "--max-steps", 5,
            "--batch-size", 4, "--num-steps", 10, "--eval-every", 5, "--time-limit", 0, "--quiet")
    unknown = sorted(set(NEW_TEXT) - set(PARENT_TEXT))
    if new_chars == "error":
        line = one_line_error(r, 1)
        assert f"{len(unknown)} character(s) the model does not know" in line
        assert re.search(r"\(U\+00[0-9A-F]{2}\) x \d+", line) and "--new-chars extend" in line
        assert "--new-chars unk" in line
        assert not out.exists()
        return
    assert r.exit_code == 0, r.output
    c = ck.load_checkpoint(out)
    assert (c.config.cell, c.config.embedding_dim, c.config.hidden_size) == (cell, embedding_dim, 12)
    assert c.vocab.itos[:len(p.vocab)] == p.vocab.itos  # the old ids unchanged
    if new_chars == "extend":
        assert sorted(c.vocab.itos[len(p.vocab):]) == unknown
        assert c.lineage["added"] and not c.lineage["unknown"]
    else:
        assert c.vocab == p.vocab
        assert sorted(c.lineage["unknown"]) == unknown
    assert c.preprocess == p.preprocess and c.lineage["parent"] == str(p.path.resolve())


def test_the_same_vocabulary_and_a_text_lacking_some_characters(tmp_path):
    parent = make_parent(tmp_path)
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("the time the machine the time " * 60)  # only some of the parent's characters
    train(finetune_cfg(fewer, tmp_path / "a", max_steps=5), init_from=parent, new_chars="error")
    assert ck.load_checkpoint(tmp_path / "a").vocab == ck.load_checkpoint(parent).vocab


def test_extend_gives_the_parents_figures_before_the_first_step(tmp_path):
    """Trained end to end: a fine-tuned run evaluated at step 0 (nothing learned yet) on old-vocabulary text."""
    parent = make_parent(tmp_path)
    p = ck.load_checkpoint(parent)
    child_corpus = tmp_path / "child.txt"
    child_corpus.write_text(PARENT_TEXT + "ÆÉ! " * 50)
    model_before = {}

    def grab(event, info):
        if event == "start":
            model_before.update({k: v.clone() for k, v in info["model"].state_dict().items()})

    train(finetune_cfg(child_corpus, tmp_path / "c", max_steps=1), init_from=parent, callback=grab)
    child = RNNLM.from_config(ck.load_checkpoint(tmp_path / "c").config)
    child.load_state_dict(model_before)
    ids = p.vocab.encode(PARENT_TEXT[:200])
    old, new = logprobs(p.model, ids), logprobs(child, ids)
    assert (old[:, 1:] - new[:, 1:len(p.vocab)]).abs().max() < 1e-3


@pytest.mark.parametrize("option", [["--cell", "gru"], ["--impl", "scratch"], ["--hidden-size", "64"],
                                    ["--num-layers", "1"], ["--embedding-dim", "0"], ["--mogrify-rounds", "3"],
                                    ["--mogrify-rank", "8"], ["--preprocess", "lower"],
                                    ["--min-count", "2"], ["--d2l"], ["--resume"]])
def test_architecture_and_preprocessing_options_with_init_from_are_one_line(tmp_path, new_text, option):
    parent = make_parent(tmp_path)
    line = one_line_error(cli("train", new_text, "--init-from", parent, "--out", tmp_path / "c", *option), 2)
    assert option[0] in line and "--init-from" in line
    assert not (tmp_path / "c").exists()


def test_a_python_config_that_contradicts_the_parent_is_one_line(tmp_path, new_text):
    from charlm.errors import ConfigError

    parent = make_parent(tmp_path)
    with pytest.raises(ConfigError, match="hidden-size 64 .the parent's is 12."):
        train(finetune_cfg(new_text, tmp_path / "c", hidden_size=64, max_steps=2), init_from=parent)


@pytest.mark.parametrize("damage", ["not-a-checkpoint", "tampered", "onnx", "missing"])
def test_a_parent_that_is_not_a_good_charlm_checkpoint_is_refused(tmp_path, new_text, damage):
    parent = make_parent(tmp_path)
    if damage == "not-a-checkpoint":
        target = tmp_path / "notes"
        target.mkdir()
        (target / "a.txt").write_text("x")
    elif damage == "tampered":
        target = parent
        data = bytearray((parent / "best" / "model.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (parent / "best" / "model.pt").write_bytes(bytes(data))
    elif damage == "onnx":
        target = tmp_path / "m.onnx"
        target.write_bytes(b"onnx")
    else:
        target = tmp_path / "nowhere"
    line = one_line_error(cli("train", new_text, "--init-from", target, "--out", tmp_path / "c", "--max-steps", 2), 1)
    assert "--init-from" in line
    assert {"not-a-checkpoint": "holds no checkpoint", "tampered": "does not match its checksum",
            "onnx": "exported model", "missing": "no such checkpoint"}[damage] in line
    assert not (tmp_path / "c").exists()


def test_a_finetuning_run_resumes_exactly(tmp_path, new_text):
    parent = make_parent(tmp_path)

    def stop_at_7(event, info):
        if event == "step" and info["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    kw = dict(max_steps=20, lr_schedule="hold-decay", weight_drop=0.2, dropout_output=0.1)  # dropout draws too
    train(finetune_cfg(new_text, tmp_path / "straight", **kw), init_from=parent)
    with pytest.raises(TrainingInterrupted):
        train(finetune_cfg(new_text, tmp_path / "parts", **kw), init_from=parent, callback=stop_at_7)
    train(finetune_cfg(new_text, tmp_path / "parts", **kw), init_from=parent, resume=True)
    a, b = ck.load_checkpoint(tmp_path / "straight" / "last"), ck.load_checkpoint(tmp_path / "parts" / "last")
    assert a.vocab == b.vocab and a.lineage == b.lineage
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], atol=1e-6, rtol=0, msg=k)


def test_a_finetuning_run_resumes_from_the_cli_with_resume_alone(tmp_path, new_text):
    parent = make_parent(tmp_path)
    out = tmp_path / "c"
    base = ["train", new_text, "--out", out, "--batch-size", 4, "--num-steps", 10, "--eval-every", 5, "--time-limit",
            0, "--quiet"]
    assert cli(*base, "--init-from", parent, "--max-steps", 10).exit_code == 0
    r = cli(*base, "--resume", "--max-steps", 10)
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_two_processes_equal_one_when_finetuning(tmp_path, new_text):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    parent = make_parent(tmp_path)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "TP_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp_path / "tmp")}
    common = ["-m", "charlm", "train", str(new_text), "--init-from", str(parent), "--batch-size", "8", "--num-steps",
              "10", "--eval-every", "5", "--max-steps", "10", "--time-limit", "0", "--weight-drop", "0",
              "--dropout-input", "0", "--dropout-hidden", "0", "--dropout-output", "0", "--dist-timeout", "60",
              "--quiet"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *common[1:], "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=240)
    assert two.returncode == 0, two.stderr
    a = ck.load_checkpoint(tmp_path / "one" / "last").model.state_dict()
    b = ck.load_checkpoint(tmp_path / "two" / "last").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lineage_in_info_and_in_an_export(tmp_path, new_text):
    parent = make_parent(tmp_path)
    child = tmp_path / "child"
    train(finetune_cfg(new_text, child, max_steps=5), init_from=parent)
    grandchild = tmp_path / "grandchild"
    more = tmp_path / "more.txt"
    more.write_text(NEW_TEXT + "ØØ " * 40)
    train(finetune_cfg(more, grandchild, max_steps=5), init_from=child)
    info = cli("info", grandchild).output
    assert f"started from: {(child / 'best').resolve()} (step 5" in info
    assert "which started from:" in info and str((parent / "best").resolve()) in info
    assert "new character(s) added to its vocabulary: 'Ø'" in info
    lineage = ck.load_checkpoint(grandchild).lineage
    manifest = (child / "best" / "manifest.json").read_bytes()
    import hashlib

    assert lineage["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert lineage["lineage"]["parent"] == str((parent / "best").resolve())
    assert lineage["corpus"] == str(new_text.resolve()) and lineage["step"] == 5
    pytest.importorskip("onnx")
    from charlm.export.graph import metadata

    assert metadata(ck.load_checkpoint(grandchild), "")["lineage"] == lineage


def test_an_extended_model_through_generate_eval_serve_and_onnx(tmp_path, new_text):
    parent = make_parent(tmp_path)
    child = tmp_path / "child"
    train(finetune_cfg(new_text, child, max_steps=10), init_from=parent)
    c = ck.load_checkpoint(child)
    assert len(c.vocab) > len(ck.load_checkpoint(parent).vocab)
    r = cli("generate", "ÆTHER", "--checkpoint", child, "--length", 30, "--temperature", 0.8, "--seed", 3)
    assert r.exit_code == 0 and r.output.startswith("ÆTHER"), r.output
    torch_text = r.output
    r = cli("eval", child, "--json")
    assert r.exit_code == 0, r.output
    figure = json.loads(r.output)
    assert figure["loss"] == pytest.approx(c.held_out_figure()[0], abs=1e-5)
    pytest.importorskip("fastapi")
    from serving import Server

    server = Server(c)
    try:
        status, body, _ = server.json("POST", "/generate", {"prompt": "ÆTHER", "length": 30, "temperature": 0.8,
                                                            "seed": 3})
    finally:
        server.close()
    assert status == 200 and "ÆTHER" + body["text"] + "\n" == torch_text
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "child.onnx"
    assert cli("export", child, "--out", onnx_path).exit_code == 0
    r = cli("generate", "ÆTHER", "--checkpoint", onnx_path, "--length", 30, "--temperature", 0.8, "--seed", 3)
    assert r.exit_code == 0 and r.output == torch_text, (r.output, torch_text)
    r = cli("eval", onnx_path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["loss"] == pytest.approx(figure["loss"], abs=1e-4)
    assert f"started from: {(parent / 'best').resolve()}" in cli("info", onnx_path).output


def test_finetuning_defaults_apply_where_no_option_is_given_in_the_cli_and_in_python(tmp_path, new_text):
    from charlm.config import FINETUNE_LR

    parent = make_parent(tmp_path)
    for optimizer in ("adam", "sgd"):
        out = tmp_path / f"c-{optimizer}"
        r = cli("train", new_text, "--init-from", parent, "--out", out, "--optimizer", optimizer, "--max-steps", 2,
                "--batch-size", 4, "--num-steps", 10, "--time-limit", 0, "--quiet")
        assert r.exit_code == 0, r.output
        lrs = [float(row.split(",")[8]) for row in (out / "metrics.csv").read_text().splitlines()[1:]]
        options = TrainConfig.from_dict(ck.load_checkpoint(out).train_options)
        assert options.resolved_lr() == FINETUNE_LR[optimizer] < TrainConfig(corpus="x", optimizer=optimizer).resolved_lr()
        assert lrs and max(lrs) <= FINETUNE_LR[optimizer]
    train(finetune_cfg(new_text, tmp_path / "py", max_steps=2), init_from=parent)  # the same default from Python
    assert TrainConfig.from_dict(ck.load_checkpoint(tmp_path / "py").train_options).resolved_lr() == FINETUNE_LR["adam"]
    r = cli("train", new_text, "--init-from", parent, "--out", tmp_path / "d", "--max-steps", 2, "--batch-size", 4,
            "--num-steps", 10, "--time-limit", 0, "--lr", "0.02", "--quiet")
    assert ck.load_checkpoint(tmp_path / "d").train_options["lr"] == 0.02  # an option given wins


def test_new_chars_without_init_from_is_one_line(tmp_path, new_text):
    from charlm.errors import ConfigError

    line = one_line_error(cli("train", new_text, "--out", tmp_path / "c", "--new-chars", "error"), 2)
    assert "--init-from" in line
    with pytest.raises(ConfigError, match="new chars"):
        TrainConfig(corpus="x", new_chars="unk")
    with pytest.raises(ConfigError, match="new chars must be one of"):
        train(finetune_cfg(new_text, tmp_path / "c", max_steps=2), init_from=make_parent(tmp_path), new_chars="")


def test_overwrite_never_deletes_the_model_a_run_starts_from(tmp_path, new_text):
    """The default --out of two corpora both named input.txt is one folder: --overwrite would delete the parent."""
    parent = make_parent(tmp_path)
    before = {p: p.read_bytes() for p in (parent / "best").iterdir()}
    for out in (parent, parent / "best", tmp_path):
        line = one_line_error(cli("train", new_text, "--init-from", parent, "--out", out, "--overwrite", "--max-steps",
                                  2, "--batch-size", 4, "--num-steps", 10, "--time-limit", 0), 1)
        assert "lies inside" in line or "is not a charlm run" in line, line
    assert {p: p.read_bytes() for p in (parent / "best").iterdir()} == before


def test_a_resume_with_another_new_chars_or_parent_is_refused(tmp_path, new_text):
    parent = make_parent(tmp_path)
    other = make_parent(tmp_path, name="other")
    out = tmp_path / "c"
    train(finetune_cfg(new_text, out, max_steps=4, eval_every=2), init_from=parent, new_chars="unk")
    with pytest.raises(TrainError, match="new-chars: 'unk' -> 'extend'"):
        train(finetune_cfg(new_text, out, max_steps=8), init_from=parent, new_chars="extend", resume=True)
    with pytest.raises(TrainError, match="started from .*parent/best; resume it without --init-from"):
        train(finetune_cfg(new_text, out, max_steps=8), init_from=other, new_chars="unk", resume=True)
    scratch = tmp_path / "scratch"
    train(finetune_cfg(new_text, scratch, max_steps=4, hidden_size=12, embedding_dim=4))
    with pytest.raises(TrainError, match="did not start from a trained model"):
        train(finetune_cfg(new_text, scratch, max_steps=8, hidden_size=12, embedding_dim=4), init_from=parent,
              resume=True)
    train(finetune_cfg(new_text, out, max_steps=8), init_from=parent, new_chars="unk", resume=True)  # the same: fine


def test_a_parent_read_from_a_backup_is_named_as_the_checkpoint_it_stands_for(tmp_path, new_text):
    parent = make_parent(tmp_path)
    best = parent / "best"
    (best / ".charlm-old").write_text('{"of": "best"}\n')
    backup = parent / ".best.old-1a2b3c4d"
    best.rename(backup)  # a replacement of best/ cut short between its two renames
    train(finetune_cfg(new_text, tmp_path / "c", max_steps=2), init_from=parent)
    assert ck.load_checkpoint(tmp_path / "c").lineage["parent"] == str(best.resolve())
