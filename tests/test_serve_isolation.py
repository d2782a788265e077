"""charlm serve's isolation: no request's values can end another request's stream; an error the engine cannot
pin on one request ends only the requests it touched; the books (slots, queue, counters) stay right."""

import json
import random
import socket
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from serving import Server, assert_same_text, make_checkpoint
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
        assert_same_text(ckpt, REFERENCE["prompt"], REFERENCE, reference.text(), _alone_reference(ckpt))
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
        assert_same_text(ckpt, REFERENCE["prompt"], REFERENCE, reference.text(), _alone_reference(ckpt))
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


class _SwitchingLock:
    """The engine's lock, with a switch to a waiting client forced at every release on the engine's thread: a
    submit waiting to run takes the lock right then, the engine waits for it (the worst interleaving, at every
    place the engine lets go of the lock)."""

    def __init__(self):
        self.lock, self.waiting, self.engine = threading.Lock(), [], None

    def __enter__(self):
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()
        if threading.get_ident() == self.engine and self.waiting:
            client = threading.Thread(target=self.waiting.pop(0))
            client.start()
            client.join()


def test_the_error_path_never_holds_more_rows_than_slots(ckpt, monkeypatch):
    """Every fourth tick fails, and a client submits at every place the engine lets go of its lock (the engine on
    its own, no HTTP): the batch never holds more rows than --slots, every request hears exactly once (done or
    an error), and the books end at zero. (The error path once freed every slot at once after collecting the
    failed requests, so a request admitted in between went uncounted and the engine held more rows than slots.)"""
    tick, update, ticks = Engine._tick, Engine._update_batch, [0]
    widest = []

    def every_fourth_failing(self):
        ticks[0] += 1
        if ticks[0] % 4 == 0:
            raise RuntimeError("boom")
        tick(self)

    def watched(self, joining):
        update(self, joining)
        widest.append(len(self.rows))

    monkeypatch.setattr(Engine, "_tick", every_fourth_failing)
    monkeypatch.setattr(Engine, "_update_batch", watched)
    engine = Engine(ckpt.model, ckpt.vocab, slots=3, queue_size=1000, chunk=4)
    engine.lock = lock = _SwitchingLock()
    heard, total = {}, 120

    def request(i):
        def deliver(event):
            if event[0] in ("done", "error"):
                heard.setdefault(i, []).append(event[0])

        return Request(ckpt.vocab.encode("the "), SampleConfig(length=2, temperature=1.0, seed=i, num_samples=1 + i % 2),
                       deliver)

    lock.waiting = [lambda i=i: engine.submit(request(i)) for i in range(1, total)]

    def run():
        lock.engine = threading.get_ident()
        engine.run()

    thread = threading.Thread(target=run, daemon=True)
    engine.submit(request(0))
    thread.start()
    deadline = time.time() + 60
    while (len(heard) < total or lock.waiting) and time.time() < deadline:
        time.sleep(0.01)
        if lock.waiting and len(heard) == total - len(lock.waiting):  # all ended, the engine idle: the next one
            lock.waiting.pop(0)()
    engine.stop()
    thread.join(10)
    assert sorted(heard) == list(range(total)) and all(len(v) == 1 for v in heard.values()), heard
    assert {"done", "error"} <= {v[0] for v in heard.values()}
    assert max(widest) <= 3
    assert engine.reserved == 0 and not engine.queue and not engine.rows


def _send_stream_request(server, body) -> socket.socket:
    """A streaming request sent without waiting for any answer (it may be queued): the open socket."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_a_queued_request_whose_client_left_gives_up_its_place(ckpt):
    """slots 1, queue 1: a queued client that leaves must not make the next client's request a 503."""
    with Server(ckpt, slots=1, queue_size=1, chunk=4, max_seconds=60, max_length=10**7) as s:
        running = _send_stream_request(s, {"prompt": "the", "length": 10**7, "temperature": 1.0, "seed": 1})
        deadline = time.time() + 10
        while s.json("GET", "/health")[1]["running"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        waiting = _send_stream_request(s, {"prompt": "the", "length": 5, "seed": 2})
        while s.json("GET", "/health")[1]["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert s.json("GET", "/health")[1]["waiting"] == 1
        waiting.close()  # gone while queued
        while s.json("GET", "/health")[1]["waiting"] > 0 and time.time() < deadline:
            time.sleep(0.01)
        assert s.json("GET", "/health")[1] | {"served": 0, "chars_per_s": 0} == {
            "status": "ok", "busy": True, "running": 1, "waiting": 0, "slots": 1, "served": 0, "chars_per_s": 0}
        got = []
        after = threading.Thread(target=lambda: got.append(s.json("POST", "/generate", {"prompt": "a", "length": 3})))
        after.start()
        time.sleep(0.3)
        running.close()  # the long one leaves: the new request gets the slot
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


def test_a_stream_cut_by_shutdown_says_cancelled(ckpt):
    events, done = [], threading.Event()

    def deliver(event):
        events.append(event)
        if event[0] in ("done", "error"):
            done.set()

    engine = Engine(ckpt.model, ckpt.vocab, slots=2)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    engine.submit(Request(ckpt.vocab.encode("the "), SampleConfig(length=10**7, temperature=1.0, seed=1), deliver))
    time.sleep(0.3)
    engine.stop()
    assert done.wait(10)
    thread.join(10)
    info = events[-1][1]
    assert events[-1][0] == "done" and info["finish_reason"] == "cancelled" and info["finish_reasons"] == ["cancelled"]
    with pytest.raises(Exception, match="stopping"):
        engine.submit(Request(ckpt.vocab.encode("a"), SampleConfig(length=1), deliver))


def test_a_mailbox_whose_loop_closed_is_dropped(ckpt):
    import asyncio

    from charlm.serve import ServeConfig
    from charlm.serve.server import Job, Service

    service = Service(ckpt, ServeConfig(), "run", "run")
    loop = asyncio.new_event_loop()
    req, _ = service.submit(Job("the", SampleConfig(length=3)), loop)
    loop.close()
    assert len(service.engine.flushers) == 1
    req.deliver(("text", ["x"], None))
    service.engine._flush_all()
    assert service.engine.flushers == [] and service.mailboxes == {} and req.cancelled.is_set()
