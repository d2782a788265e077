"""charlm serve's isolation: no request's values can end another request's stream; an error the engine cannot
pin on one request ends only the requests it touched; the books (slots, queue, counters) stay right."""

import random
import threading
import time

import pytest
from click.testing import CliRunner
from serving import Server, make_checkpoint
from test_serve import _start_stream
from test_serve_batch import _alone, _metrics

import charlm
from charlm.cli import main
from charlm.config import SEED_MAX, SampleConfig
from charlm.errors import ConfigError
from charlm.serve.engine import Engine, Request


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-isolation"), cell="lstm")


REFERENCE = {"prompt": "the ", "length": 1500, "temperature": 0.9, "seed": 11}


class _Reference:
    """A seeded stream read whole in a thread of its own, begun before the test does anything else."""

    def __init__(self, server):
        self.events = None
        self.thread = threading.Thread(target=lambda: setattr(self, "events", server.events("/generate", {
            **REFERENCE, "stream": True})))
        self.thread.start()
        deadline = time.time() + 10
        while server.httpd.service.engine.health()["running"] < 1 and time.time() < deadline:
            time.sleep(0.005)

    def text(self) -> str:
        self.thread.join(60)
        assert self.events and self.events[-1].get("done") and not any("error" in e for e in self.events)
        return "".join(e.get("text", "") for e in self.events)


def _alone_reference(ckpt) -> str:
    return _alone(ckpt, {**REFERENCE, "top_k": None, "top_p": None, "num_samples": 1})[0]


@pytest.mark.parametrize("path, field", [("/generate", "seed"), ("/v1/completions", "seed")])
@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, -(2**70)])
def test_a_negative_seed_is_a_400_and_ends_no_other_stream(ckpt, path, field, seed):
    """Item 2 of #29: {"seed": -1} passed validation and raised in the engine's tick, which failed every
    running and queued request with a 500."""
    with Server(ckpt, slots=2, queue_size=4, chunk=4) as s:
        reference = _Reference(s)
        queued = threading.Thread(target=lambda: results.append(s.json("POST", "/generate", {
            "prompt": "the", "length": 300, "temperature": 1.0, "seed": 3, "num_samples": 2})))
        results = []
        queued.start()
        status, body, _ = s.json("POST", path, {"prompt": "a", "seed": seed})
        assert status == 400 and "'seed' must be" in body["error"]["message"], body
        assert str(SEED_MAX) in body["error"]["message"]
        queued.join(60)
        assert reference.text() == _alone_reference(ckpt)
        assert results and results[0][0] == 200
        assert s.httpd.service.engine.health()["running"] == 0


def test_seeds_have_one_range_everywhere(ckpt, tmp_path):
    for bad in (-1, SEED_MAX + 1, True, 1.5):
        with pytest.raises(ConfigError, match="seed must be an integer from 0 to"):
            SampleConfig(seed=bad)
        with pytest.raises(ConfigError, match="seed must be an integer from 0 to"):
            charlm.generate(ckpt.model, ckpt.vocab, "the", length=5, temperature=1.0, seed=bad)
        with pytest.raises(ConfigError, match="seed must be an integer from 0 to"):
            charlm.TrainConfig(corpus="x", seed=bad)
    assert len(charlm.generate(ckpt.model, ckpt.vocab, "the", length=5, temperature=1.0, seed=SEED_MAX)) == 8
    for command in (["generate", "the", "--checkpoint", str(ckpt.path)], ["train", "x.txt"]):
        r = CliRunner().invoke(main, [*command, "--seed", "-1"])
        assert r.exit_code == 2 and "Invalid value for '--seed'" in r.output and "Traceback" not in r.output


def test_an_error_in_one_requests_warm_up_fails_that_request_alone(ckpt, monkeypatch):
    warm = Engine._warm

    def failing_for_one_prompt(self, req):
        if self.vocab.decode(req.prompt_ids) == "machine":
            raise RuntimeError("this prompt's warm-up failed")
        return warm(self, req)

    monkeypatch.setattr(Engine, "_warm", failing_for_one_prompt)
    with Server(ckpt, slots=2, queue_size=4, chunk=4) as s:
        reference = _Reference(s)
        status, body, _ = s.json("POST", "/generate", {"prompt": "machine", "length": 10})
        assert status == 500 and "warm-up failed" in body["error"]["message"]
        assert reference.text() == _alone_reference(ckpt)
        assert s.httpd.service.engine.health() | {"served": 0} == {"busy": False, "running": 0, "waiting": 0,
                                                                   "slots": 2, "served": 0}


def test_a_batch_error_ends_only_the_requests_in_the_batch(ckpt, monkeypatch):
    """The batched step fails once: the requests in the batch get a 500; one still queued is served."""
    tick, state = Engine._tick, {"armed": False, "fired": False}

    def failing_once_when_armed(self):
        if state["armed"] and not state["fired"]:
            state["fired"] = True
            raise RuntimeError("boom")
        tick(self)

    monkeypatch.setattr(Engine, "_tick", failing_once_when_armed)
    with Server(ckpt, slots=1, queue_size=4, chunk=4) as s:
        engine = s.httpd.service.engine
        answers = {}
        first = threading.Thread(target=lambda: answers.update(first=s.json("POST", "/generate", {
            "prompt": "the", "length": 3000, "temperature": 1.0, "seed": 1})))
        first.start()
        deadline = time.time() + 10
        while engine.health()["running"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        queued = threading.Thread(target=lambda: answers.update(queued=s.json("POST", "/generate", {
            "prompt": "the", "length": 40, "temperature": 0.5, "seed": 2})))
        queued.start()
        while engine.health()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        state["armed"] = True
        first.join(60)
        queued.join(60)
        assert answers["first"][0] == 500 and "boom" in answers["first"][1]["error"]["message"]
        status, body, _ = answers["queued"]
        assert status == 200, body
        assert body["text"] == _alone(ckpt, {"prompt": "the", "length": 40, "temperature": 0.5, "top_k": None,
                                             "top_p": None, "seed": 2, "num_samples": 1})[0]
        assert engine.health()["running"] == 0 and engine.reserved == 0


def test_the_error_path_never_holds_more_rows_than_slots(ckpt, monkeypatch):
    """Ticks fail now and then while requests keep arriving (the engine on its own, no HTTP): the batch never
    holds more rows than --slots, every request hears once (text and done, or an error), and the books end
    at zero. (The error path once freed every slot at once, so a request admitted in between went
    uncounted.)"""
    rng = random.Random(0)
    tick, update = Engine._tick, Engine._update_batch
    widest = []

    def sometimes_failing(self):
        if rng.random() < 0.08:
            raise RuntimeError("boom")
        tick(self)

    def watched(self, joining):
        update(self, joining)
        widest.append(len(self.rows))

    monkeypatch.setattr(Engine, "_tick", sometimes_failing)
    monkeypatch.setattr(Engine, "_update_batch", watched)
    engine = Engine(ckpt.model, ckpt.vocab, slots=3, queue_size=64, chunk=4)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    ends, lock = [], threading.Lock()

    def deliver(event):
        if event[0] in ("done", "error"):
            with lock:
                ends.append(event[0])

    try:
        for i in range(60):
            n = 1 + i % 2
            engine.submit(Request(ckpt.vocab.encode("the "), SampleConfig(length=30, temperature=1.0, seed=i,
                                                                          num_samples=n), deliver))
            time.sleep(0.002)
        deadline = time.time() + 60
        while len(ends) < 60 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
        thread.join(10)
    assert len(ends) == 60 and "error" in ends and "done" in ends
    assert max(widest) <= 3
    assert engine.reserved == 0 and not engine.queue and not engine.rows


def test_a_queued_request_whose_client_left_gives_up_its_place(ckpt):
    """slots 1, queue 1: a queued client that leaves must not make the next client's request a 503."""
    with Server(ckpt, slots=1, queue_size=1, chunk=4, max_seconds=30) as s:
        running, _ = _start_stream(s, {"prompt": "the", "length": 5000, "temperature": 1.0, "seed": 1})
        waiting, _ = _start_stream(s, {"prompt": "the", "length": 5, "seed": 2})  # queued: no answer yet
        deadline = time.time() + 10
        while s.json("GET", "/health")[1]["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        waiting.close()  # gone while queued
        while s.json("GET", "/health")[1]["waiting"] > 0 and time.time() < deadline:
            time.sleep(0.02)
        assert s.json("GET", "/health")[1]["waiting"] == 0
        after = threading.Thread(target=lambda: got.append(s.json("POST", "/generate", {"prompt": "a", "length": 3})))
        got = []
        after.start()
        time.sleep(0.3)
        running.close()
        after.join(30)
        assert got and got[0][0] == 200, got


def test_the_request_counter_labels_only_known_methods(ckpt):
    with Server(ckpt) as s:
        for method in ("BREW", "PROPFIND", "X" * 40):
            r, _ = s.request(method, "/generate")
            assert r.status == 405
        labels = {dict(k[1]).get("method") for k in _metrics(s) if k[0] == "charlm_http_requests_total"}
        assert labels <= {"GET", "POST", "HEAD", "OPTIONS", "other"} and "other" in labels


def test_logprobs_0_gives_empty_top_logprobs_for_prompt_and_completion(ckpt):
    with Server(ckpt) as s:
        status, body, _ = s.json("POST", "/v1/completions", {"prompt": "the", "max_tokens": 4, "echo": True,
                                                             "logprobs": 0, "temperature": 0})
        assert status == 200, body
        lp = body["choices"][0]["logprobs"]
        assert lp["tokens"][:3] == ["t", "h", "e"] and len(lp["tokens"]) == 7
        assert lp["top_logprobs"][0] is None and lp["token_logprobs"][0] is None  # nothing predicts the first
        assert lp["top_logprobs"][1:] == [{}] * 6  # prompt and completion alike
