"""Every sampling path at the extreme temperatures and top-p values that float32 cannot hold as given (#35):
a temperature of 1e-30 and under decodes greedily, 1e30 and over samples all but uniformly, a top-p as
small as 1e-30 (or float64's smallest) keeps the most probable character, top-p 1.0 keeps them all, top-k 1
is greedy. Each path on its own: one stream (charlm.generate and iter_generate, the fast stepper and the
plain forward), the batched draw (num_samples > 1), and the server's engine (alone and mixed in one batch).
Each text is made of the vocabulary's characters (never <unk>, never a NaN distribution's constant last
character), is the same for the same seed, and equals the greedy text wherever the settings are greedy.
"""

import threading

import pytest
import torch
from serving import Server, assert_same_text, make_checkpoint

from charlm import generate
from charlm.sample import iter_generate

PROMPT = "the "
LENGTH = 60
# (temperature, top_k, top_p): settings that decode as greedy does ...
GREEDY = [
    (1e-30, None, None), (1e-31, None, None), (1e-45, None, None), (5e-324, None, None), (-0.0, None, None),
    (1.0, None, 1e-30), (1.0, None, 5e-324), (1e30, None, 1e-30), (1e300, None, 1e-40),
    (1.0, 1, None), (1e300, 1, None), (1e-31, 1, 1.0), (3.4e38, 1, 1e-30),
]
# ... and settings that sample (the huge temperatures all but uniformly)
SAMPLED = [(1e30, None, None), (1e31, None, None), (3.4e38, None, None), (1e300, None, None), (1.7e308, None, None),
           (1.0, None, 1.0), (1e300, None, 1.0), (1e30, 2, None), (1e300, 3, 0.999999)]
ALL = GREEDY + SAMPLED


def _ids(settings):
    return [f"t={t!r},k={k},p={p!r}" for t, k, p in settings]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("extremes"), cell="lstm")


def _check_text(ckpt, text: str, settings) -> None:
    t, k, _ = settings
    assert len(text) == LENGTH, settings
    assert set(text) <= set(ckpt.vocab.itos[1:]), settings  # the model's characters, never <unk>
    if t >= 1e30 and (settings in SAMPLED) and k is None:
        assert len(set(text)) > 5, (settings, text)  # all but uniform, not one NaN-made character


def _greedy(ckpt) -> str:
    return generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH)[len(PROMPT):]


@pytest.mark.parametrize("fast", [True, False], ids=["stepper", "plain"])
@pytest.mark.parametrize("settings", ALL, ids=_ids(ALL))
def test_one_stream_at_extreme_settings(ckpt, settings, fast):
    t, k, p = settings
    texts = [generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=s, fast=fast)[len(PROMPT):]
             for s in (5, 5, 6)]
    streamed = "".join(c for (c,) in iter_generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=5,
                                                   num_samples=1, fast=fast, chunk=7))
    for text in texts:
        _check_text(ckpt, text, settings)
    assert texts[0] == texts[1] == streamed  # the same seed, the same text, streamed or whole
    if settings in GREEDY:
        assert texts[0] == texts[2] == _greedy(ckpt)


@pytest.mark.parametrize("fast", [True, False], ids=["stepper", "plain"])
@pytest.mark.parametrize("settings", ALL, ids=_ids(ALL))
def test_batched_draw_at_extreme_settings(ckpt, settings, fast):
    t, k, p = settings
    batch = [x[len(PROMPT):] for x in generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=5,
                                               num_samples=3, fast=fast)]
    again = [x[len(PROMPT):] for x in generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=5,
                                               num_samples=3, fast=fast)]
    assert batch == again
    for text in batch:
        _check_text(ckpt, text, settings)
    if settings in GREEDY:
        assert batch == [_greedy(ckpt)] * 3
    else:  # each sample its own stream: the first is the lone stream's (up to a near-tie of batched products)
        lone = generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=5, fast=fast)
        assert_same_text(ckpt, PROMPT, dict(temperature=t, top_k=k, top_p=p, seed=5), batch[0], lone[len(PROMPT):])
        if t >= 1e30 and k is None:
            assert len(set(batch)) == 3


def _body(settings, seed=5):
    t, k, p = settings
    return {"prompt": PROMPT, "length": LENGTH, "temperature": t, "top_k": k, "top_p": p, "seed": seed}


@pytest.fixture(scope="module")
def server(ckpt):
    with Server(ckpt, slots=32, queue_size=64) as s:
        yield s


@pytest.mark.parametrize("settings", ALL, ids=_ids(ALL))
def test_the_servers_engine_at_extreme_settings(ckpt, server, settings):
    t, k, p = settings
    answers = []
    for seed in (5, 5, 6):
        status, answer, _ = server.json("POST", "/generate", _body(settings, seed))
        assert status == 200, answer
        answers.append(answer["text"])
        _check_text(ckpt, answer["text"], settings)
    assert answers[0] == answers[1]
    if settings in GREEDY:
        assert answers[0] == answers[2] == _greedy(ckpt)
    lone = generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=5)[len(PROMPT):]
    assert_same_text(ckpt, PROMPT, _body(settings), answers[0], lone)
    status, completion, _ = server.json("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": LENGTH,
                                                                     "temperature": t, "top_k": k, "top_p": p,
                                                                     "seed": 5, "n": 2})
    assert status == 200, completion
    assert completion["choices"][0]["text"] == answers[0]
    _check_text(ckpt, completion["choices"][1]["text"], settings)


def test_the_servers_engine_with_every_extreme_setting_in_one_batch(ckpt, server):
    """All the settings at once, so that each row of one batched draw has its own: each gets its lone text."""
    bodies = [_body(s, seed=10 + i) for i, s in enumerate(ALL)]
    answers = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i):
        barrier.wait()
        answers[i] = server.json("POST", "/generate", bodies[i], timeout=60)[:2]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for settings, body, (status, answer) in zip(ALL, bodies, answers):
        assert status == 200, answer
        _check_text(ckpt, answer["text"], settings)
        t, k, p = settings
        lone = generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=body["seed"])[len(PROMPT):]
        assert_same_text(ckpt, PROMPT, body, answer["text"], lone)
        if settings in GREEDY:
            assert answer["text"] == _greedy(ckpt)


def test_no_nan_reaches_the_draw_at_extreme_settings(ckpt):
    """The distributions themselves: finite cumulative sums that end at a positive mass, for every row."""
    from charlm.sample import DrawParams, _filter_rows

    logits = torch.randn(len(ALL), len(ckpt.vocab)) * 5
    logits[:, 0] = float("-inf")  # <unk>, as generation has it
    params = DrawParams(ALL, logits.shape[-1], "cpu")
    scaled = _filter_rows((logits - logits.amax(-1, keepdim=True)) / params.temps, params)
    cdf = scaled.softmax(-1).double().cumsum(-1)
    assert not torch.isnan(cdf).any() and (cdf[:, -1] > 0.99).all()


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from charlm.export import OnnxModel, export_onnx

    return OnnxModel(export_onnx(ckpt, tmp_path_factory.mktemp("extremes-onnx") / "model.onnx"))


@pytest.mark.parametrize("settings", ALL, ids=_ids(ALL))
def test_an_exported_model_on_onnxruntime_at_extreme_settings(ckpt, exported, settings):
    """The fourth path: charlm generate --engine onnx (its draw is charlm.sample's, on onnxruntime's logits)."""
    t, k, p = settings
    for n in (1, 2):
        texts = ["".join(c[i] for c in exported.iter_generate(PROMPT, LENGTH, t, k, p, 5, n)) for i in range(n)]
        again = ["".join(c[i] for c in exported.iter_generate(PROMPT, LENGTH, t, k, p, 5, n)) for i in range(n)]
        assert texts == again
        for text in texts:
            _check_text(ckpt, text, settings)
        lone = generate(ckpt.model, ckpt.vocab, PROMPT, LENGTH, t, k, p, seed=5)[len(PROMPT):]
        assert_same_text(ckpt, PROMPT, dict(temperature=t, top_k=k, top_p=p, seed=5), texts[0], lone)
        if settings in GREEDY:  # (onnxruntime's products may part from torch's at a near-tie: tie_margin)
            for text in texts:
                assert_same_text(ckpt, PROMPT, {}, text, _greedy(ckpt))
