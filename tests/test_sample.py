import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from charlm import RNNLM, Vocab
from charlm.checkpoint import save_checkpoint
from charlm.cli import main
from charlm.evaluation import evaluate
from charlm.models.stepper import Stepper
from charlm.sample import filter_logits, generate

TEXT = "the time traveller smiled and the machine was gone\n" * 4


@pytest.fixture(scope="module")
def model_vocab():
    vocab = Vocab.from_text(TEXT)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="gru", hidden_size=24, num_layers=2, embedding_dim=6).eval()
    return model, vocab


@pytest.fixture
def ckpt_dir(tmp_path, model_vocab):
    model, vocab = model_vocab
    (tmp_path / "corpus.txt").write_text(TEXT)
    meta = {"corpus": {"path": str(tmp_path / "corpus.txt"), "preprocess": "lower", "val_fraction": 0.25},
            "progress": {"step": 7, "best_val_loss": 2.0}}
    return save_checkpoint(tmp_path / "run" / "best", model, vocab, meta)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "mogrifier", "mogrifier-rank"])
@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("emb", [0, 5])
@pytest.mark.parametrize("layers", [1, 2])
def test_fast_path_equals_plain_forward(model_vocab, cell, impl, emb, layers):
    _, vocab = model_vocab
    torch.manual_seed(1)
    # the mogrifier also at a low rank and with an odd number of rounds (its last round gates x, and h is ungated)
    options = dict(cell="mogrifier", mogrify_rounds=3, mogrify_rank=2) if cell == "mogrifier-rank" else dict(cell=cell)
    m = RNNLM(len(vocab), hidden_size=16, num_layers=layers, embedding_dim=emb, impl=impl, **options)
    for prefix in ("the ", ""):
        # one greedy sequence (ids as Python ints), a greedy batch and sampling (ids as tensors)
        assert generate(m, vocab, prefix, 60) == generate(m, vocab, prefix, 60, fast=False)
        assert (generate(m, vocab, prefix, 60, num_samples=2)
                == generate(m, vocab, prefix, 60, num_samples=2, fast=False))
        for n in (1, 3):
            a = generate(m, vocab, prefix, 60, temperature=0.9, seed=4, num_samples=n)
            assert a == generate(m, vocab, prefix, 60, temperature=0.9, seed=4, num_samples=n, fast=False)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "mogrifier"])
def test_products_split_over_threads_give_the_same_text(model_vocab, cell):
    """One sequence's wide products run as column blocks, one per thread (padded to equal blocks)."""
    _, vocab = model_vocab
    torch.manual_seed(2)
    m = RNNLM(len(vocab), cell=cell, hidden_size=400, num_layers=2, embedding_dim=8).eval()
    with torch.inference_mode():
        single, split = Stepper(m, 1, threads=1), Stepper(m, 1, threads=3)
        assert set(single.blocks) == {1}
        assert max(split.blocks) > 1
        for s in (single, split):
            s.start(m.init_state(1))
        for i in vocab.encode(TEXT[:150]).tolist():  # both read the same text: same logits all along
            torch.testing.assert_close(split.logits, single.logits)
            single.step(i)
            split.step(i)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kw in ({}, {"temperature": 1.0, "seed": 3}):
            assert generate(m, vocab, "the ", 100, **kw) == generate(m, vocab, "the ", 100, fast=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_a_few_samples_run_on_one_thread_only_for_a_small_model():
    """2-8 samples: one thread for a model whose step reads little (threads cost more than they save),
    all of them for one whose step reads megabytes of weights; the caller's count is restored after."""
    from charlm.sample import iter_generate

    vocab = Vocab.from_text(TEXT)
    small = RNNLM(len(vocab), cell="gru", hidden_size=32, embedding_dim=8).eval()
    large = RNNLM(len(vocab), cell="lstm", hidden_size=320, num_layers=2, embedding_dim=8).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}
        for name, m in (("small", small), ("large", large)):
            for _ in iter_generate(m, vocab, "the ", 40, temperature=0.8, seed=0, num_samples=4):
                seen[name] = torch.get_num_threads()  # (between yields the caller runs on the loop's threads)
            assert torch.get_num_threads() == 2
        assert seen == {"small": 1, "large": 2}
    finally:
        torch.set_num_threads(threads)


def test_greedy_deterministic_and_seeds(model_vocab):
    m, v = model_vocab
    g = generate(m, v, "the", 50)
    assert g == generate(m, v, "the", 50)
    assert g.startswith("the")
    assert len(g) == 53
    s1 = generate(m, v, "the", 50, temperature=1.0, seed=1)
    assert s1 == generate(m, v, "the", 50, temperature=1.0, seed=1)
    assert s1 != generate(m, v, "the", 50, temperature=1.0, seed=2)
    assert generate(m, v, "the", 50, temperature=1.3, top_k=1, seed=5) == g


def test_batched_samples_equal_one_by_one(model_vocab):
    m, v = model_vocab
    batch = generate(m, v, "the ", 40, temperature=1.0, top_p=0.9, seed=11, num_samples=4)
    assert len(set(batch)) > 1
    assert batch[0] == generate(m, v, "the ", 40, temperature=1.0, top_p=0.9, seed=11)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.25]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()
    assert kept(0.5) == [False, True, False, False]   # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, False, True]    # 0.5 + 0.25
    assert kept(0.75) == [False, True, False, True]   # exactly reached
    assert kept(0.76) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert torch.isfinite(filter_logits(logits, top_k=2))[0].tolist() == [False, True, False, True]


def test_unknown_prefix_and_bad_values(model_vocab):
    m, v = model_vocab
    with pytest.raises(ValueError, match="'Z' \\(U\\+005A\\)"):
        generate(m, v, "Zap", 5)
    for kw in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(length=-1)):
        with pytest.raises(ValueError):
            generate(m, v, "the", **{"length": 5, **kw})


def test_eval_equals_hand_computation(model_vocab):
    m, v = model_vocab
    ids = v.encode(TEXT[:61])  # 60 predictions
    r = evaluate(m, ids, batch_size=3, num_steps=7)
    # by hand: 3 rows of 20, each read whole from a zero state
    x = torch.as_tensor(ids[:60].astype("int64")).view(3, 20)
    y = torch.as_tensor(ids[1:61].astype("int64")).view(3, 20)
    with torch.no_grad():
        logits, _ = m(x)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, len(v)), y.reshape(-1))
    assert r.tokens == 60
    assert r.loss == pytest.approx(nll.item(), rel=1e-5)
    assert r.bits_per_char == pytest.approx(r.loss / math.log(2))
    assert r.perplexity == pytest.approx(math.exp(r.loss))


# ---- CLI ---------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_generate_and_errors(ckpt_dir):
    r = run("generate", "the ", "--checkpoint", ckpt_dir.parent, "--length", 20)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("the ")
    assert len(r.output.rstrip("\n")) == 24
    r = run("generate", "the", "--checkpoint", ckpt_dir, "--length", 10, "--num-samples", 3, "--temperature", 1, "--seed", 2)
    assert r.exit_code == 0
    assert r.output.count("\n\n") == 2
    r = run("generate", "THE", "--checkpoint", ckpt_dir)
    assert r.exit_code == 1
    assert "'T' (U+0054)" in r.output
    assert "--normalize" in r.output
    assert r.output.count("\n") == 1
    r = run("generate", "THE", "--checkpoint", ckpt_dir, "--normalize", "--length", 5)
    assert r.exit_code == 0
    assert r.output.startswith("the")
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "0"], ["--length", "-2"]):
        r = run("generate", "the", "--checkpoint", ckpt_dir, *bad)
        assert r.exit_code == 2, bad
        assert "Traceback" not in r.output, bad


def test_python_m_charlm_is_the_command(ckpt_dir, model_vocab):
    """The program as a process (``charlm.cli.run``): its output, and a one-line error with exit 1."""
    cmd = [sys.executable, "-m", "charlm", "generate", "the ", "--checkpoint", str(ckpt_dir), "--length", "30"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip("\n") == generate(*model_vocab, "the ", 30)
    p = subprocess.run(cmd[:-4] + ["--checkpoint", str(ckpt_dir.parent / "nowhere")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr


def test_cli_ctrl_c_exits_130_without_a_traceback(ckpt_dir, monkeypatch):
    import charlm.sample

    def interrupted(*args, **kwargs):
        yield ["the"]
        raise KeyboardInterrupt

    monkeypatch.setattr(charlm.sample, "iter_generate", interrupted)
    r = run("generate", "the ", "--checkpoint", ckpt_dir, "--length", 100)
    assert r.exit_code == 130
    assert r.output.startswith("the the")
    assert r.output.rstrip().endswith("Interrupted.")
    assert "Traceback" not in r.output
    assert "Aborted" not in r.output


def test_cli_generate_without_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("generate", "the")
    assert r.exit_code == 1
    assert "charlm train" in r.output
    assert r.output.count("\n") == 1


def test_cli_corrupt_checkpoint(ckpt_dir):
    (ckpt_dir / "model.pt").write_bytes(b"garbage")
    for args in (["generate", "the", "--checkpoint", ckpt_dir], ["eval", ckpt_dir], ["info", ckpt_dir]):
        r = run(*args)
        assert r.exit_code == 1
        assert "checksum" in r.output
        assert r.output.count("\n") == 1


def test_cli_eval(ckpt_dir, tmp_path, model_vocab):
    m, v = model_vocab
    (tmp_path / "a.txt").write_text(TEXT)
    r = run("eval", ckpt_dir, tmp_path / "a.txt", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert set(row) == {"file", "tokens", "loss", "bits_per_char", "perplexity"}
    assert row["loss"] == pytest.approx(evaluate(m, v.encode(TEXT), batch_size=64).loss, rel=1e-6)
    r = run("eval", ckpt_dir)  # the run's own held-out split
    assert r.exit_code == 0
    assert "held-out 25%" in r.output
    (tmp_path / "b.txt").write_text("the QUIZ")  # lower-cased: 'q', 'u', 'z' unknown
    r = run("eval", ckpt_dir, tmp_path / "b.txt")
    assert r.exit_code == 1
    assert "'q'" in r.output
    assert "--errors skip" in r.output
    r = run("eval", ckpt_dir, tmp_path / "b.txt", "--errors", "skip")
    assert r.exit_code == 0
    assert "3 unknown characters skipped" in r.output
    (tmp_path / "empty-dir").mkdir()
    for bad, msg in ((tmp_path / "missing.txt", "no such file"), (tmp_path / "empty-dir", "no *.txt file")):
        r = run("eval", ckpt_dir, bad)
        assert r.exit_code == 1
        assert msg in r.output
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in run("eval", ckpt_dir, tmp_path / "empty.txt").output
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    assert "not UTF-8" in run("eval", ckpt_dir, tmp_path / "bin.txt").output
    (tmp_path / "corpus.txt").unlink()
    r = run("eval", ckpt_dir)
    assert r.exit_code == 1
    assert "is gone" in r.output


def test_cli_info(ckpt_dir):
    r = run("info", ckpt_dir.parent)
    assert r.exit_code == 0, r.output
    for part in ("2 x GRU 24", "embedding 6", "parameters:", "symbols", "preprocess lower", "7 steps",
                 f"torch {torch.__version__}", "2.8854 bits/char"):
        assert part in r.output, part


def _fixed_logits_model(vocab, bias):
    """A model whose every prediction is ``bias``: zero head weights, so the state does not matter."""
    m = RNNLM(len(vocab), cell="gru", hidden_size=4).eval()
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return m


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    vocab = Vocab("abc")
    bias = [0.0, 0.0, 1.0, 2.0]  # <unk>, a, b, c
    m = _fixed_logits_model(vocab, bias)
    n = 3000
    texts = generate(m, vocab, "", 1, temperature=temperature, seed=0, num_samples=n)
    freq = torch.tensor([sum(t == c for t in texts) / n for c in "abc"])
    expected = (torch.tensor(bias[1:]) / temperature).softmax(0)  # <unk> is never drawn
    # 3000 draws: each frequency within ~4 standard errors (<= 0.037) of its probability; the
    # mistake of multiplying by T instead (T=0.5: 0.67 for 'c' instead of 0.87) is far outside that.
    torch.testing.assert_close(freq, expected, atol=0.04, rtol=0)


def test_unk_is_never_generated():
    vocab = Vocab("ab")
    m = _fixed_logits_model(vocab, [5.0, 0.0, -1.0])  # <unk> by far the most probable
    assert generate(m, vocab, "a", 20) == "a" + "a" * 20  # greedy: the best id that is not <unk>
    for fast in (True, False):
        texts = generate(m, vocab, "", 200, temperature=1.5, seed=1, num_samples=3, fast=fast)
        for text in texts:
            assert set(text) <= {"a", "b"}
            assert len(text) == 200


def test_cli_generate_seed_gives_the_library_text(ckpt_dir, model_vocab):
    m, v = model_vocab
    args = ("generate", "the ", "--checkpoint", ckpt_dir, "--length", 40, "--temperature", 0.9, "--top-k", 5)
    first = run(*args, "--seed", 7)
    assert first.exit_code == 0, first.output
    assert first.output.rstrip("\n") == generate(m, v, "the ", 40, temperature=0.9, top_k=5, seed=7)
    assert run(*args, "--seed", 8).output != first.output


def test_settings_past_float32s_range_decode_as_their_limits(tmp_path):
    """Temperatures and top-p are held in float32: a temperature under 1e-30 decodes greedily (its limit,
    instead of dividing by an underflowed 0), a huge one samples (no NaN from -inf / inf), and a top-p too
    small for float32 keeps the most probable character (instead of dropping all of them)."""
    from charlm import RNNLM, Vocab, generate

    vocab = Vocab.from_text("the quick brown fox jumps over the lazy dog\n")
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="gru", hidden_size=16)
    greedy = generate(model, vocab, "the ", 40)
    assert generate(model, vocab, "the ", 40, temperature=1e-300, seed=3) == greedy
    assert generate(model, vocab, "the ", 40, temperature=0.7, top_p=1e-50, seed=3) == greedy
    hot = generate(model, vocab, "the ", 300, temperature=1e300, seed=3)[4:]
    assert len(set(hot)) > 10 and set(hot) <= set(vocab.itos[1:])  # all but uniform, never <unk>
