"""charlm serve's engine: concurrent requests stepped together, each with the text it gets alone; joins,
leaves and disconnects; stop strings; logprobs and the scoring API; /metrics."""

import json
import math
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import Server, make_checkpoint

from charlm import generate
from charlm.serve.engine import Engine, Request


@pytest.fixture(scope="module", params=["lstm", "mogrifier"])
def ckpt(tmp_path_factory, request):
    """The cells whose state is a pair (h, c): the engine regroups both parts as requests join and leave."""
    return make_checkpoint(tmp_path_factory.mktemp("serve-batch"), cell=request.param)


def _metrics(server) -> dict:
    r, data = server.request("GET", "/metrics")
    assert r.status == 200
    assert r.getheader("Content-Type").startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _requests(n: int) -> list[dict]:
    """Seeded requests that differ in every option: prompt, length, temperature, top-k, top-p, samples."""
    prompts = ["the ", "", "time traveller ", "machine was gone\n", "s"]
    return [{"prompt": prompts[i % 5], "length": 40 + 13 * i, "temperature": [0.0, 0.8, 1.0, 1.3][i % 4],
             "top_k": [None, 5][i % 2], "top_p": [None, None, 0.9][i % 3], "seed": 100 + i,
             "num_samples": 1 + (i % 3 == 0)} for i in range(n)]


def _alone(ckpt, body: dict) -> list[str]:
    texts = generate(ckpt.model, ckpt.vocab, body["prompt"], body["length"], body["temperature"], body["top_k"],
                     body["top_p"], body["seed"], body["num_samples"])
    texts = texts if isinstance(texts, list) else [texts]
    return [t[len(body["prompt"]):] for t in texts]


def _concurrently(server, bodies, path="/generate"):
    answers = [None] * len(bodies)

    def client(i):
        status, answer, _ = server.json("POST", path, bodies[i], timeout=60)
        answers[i] = (status, answer)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
        time.sleep(0.002)  # staggered: requests join a batch already running
    for t in threads:
        t.join(timeout=120)
    return answers


def test_batched_requests_get_the_text_they_get_alone(ckpt):
    bodies = _requests(24)
    expected = [_alone(ckpt, b) for b in bodies]  # before the server: its engine owns the model after
    with Server(ckpt, slots=8, queue_size=32, chunk=8) as s:
        answers = _concurrently(s, bodies)
        metrics = _metrics(s)
    for body, want, (status, answer) in zip(bodies, expected, answers):
        assert status == 200, answer
        got = answer["text"] if isinstance(answer["text"], list) else [answer["text"]]
        assert got == want, body
    ticks = metrics[("charlm_slots_active_per_tick_count", ())]
    alone = metrics[("charlm_slots_active_per_tick_bucket", (("le", "1.0"),))]
    assert ticks - alone > 0.5 * ticks  # most ticks stepped several sequences together
    assert metrics[("charlm_slots_active_per_tick_bucket", (("le", "7.0"),))] < ticks  # all 8 slots were used


def test_batched_logits_are_the_lone_ones_within_a_tolerance(ckpt):
    """The logprobs of a request generated beside others and alone: the batch's matmuls may round
    differently, so these agree to a tolerance (the texts, above, exactly)."""
    body = {"prompt": "the ", "max_tokens": 120, "temperature": 1.0, "seed": 5, "logprobs": 3}
    with Server(ckpt, slots=1) as s:
        _, alone, _ = s.json("POST", "/v1/completions", body)
    with Server(ckpt, slots=8, chunk=4) as s:
        others = [{"prompt": "s", "max_tokens": 200, "temperature": 0.9, "seed": i} for i in range(6)]
        answers = _concurrently(s, others[:3] + [body] + others[3:], path="/v1/completions")
    batched = answers[3][1]
    a, b = alone["choices"][0], batched["choices"][0]
    assert a["text"] == b["text"]
    assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"]):
        assert abs(x - y) < 1e-5


def _stream(server, body, path="/generate"):
    events = server.events(path, {**body, "stream": True})
    return [e for e in events if e != "[DONE]"]


def test_joins_and_leaves_mid_batch(ckpt):
    """A long request runs while short ones join and leave around it: every text is its lone text."""
    long = {"prompt": "the ", "length": 3000, "temperature": 1.0, "top_k": None, "top_p": None, "seed": 9,
            "num_samples": 1}
    shorts = [{**long, "length": 25 + 10 * i, "seed": i, "prompt": "time "} for i in range(6)]
    want_long, want_shorts = _alone(ckpt, long), [_alone(ckpt, b) for b in shorts]
    with Server(ckpt, slots=4, chunk=16) as s:
        got = {}
        t = threading.Thread(target=lambda: got.update(long=s.json("POST", "/generate", long, timeout=60)))
        t.start()
        while s.httpd.service.engine.ticks < 50:  # the long one is generating
            time.sleep(0.005)
        answers = []
        for b in shorts:  # one after another: each joins the running batch and leaves before it ends
            answers.append(s.json("POST", "/generate", b))
        ticks_after_shorts = s.httpd.service.engine.ticks
        t.join(timeout=60)
    assert [a[1]["text"] for a in answers] == [w[0] for w in want_shorts]
    assert got["long"][1]["text"] == want_long[0]
    assert ticks_after_shorts < 3000  # the shorts ran while the long one was still going


def test_a_client_that_disconnects_leaves_the_batch_at_the_next_tick(ckpt, monkeypatch):
    from test_serve import _start_stream

    marked, released = {}, {}
    cancel, release = Request.cancel, Engine._release

    def marking_cancel(self):
        if not self.cancelled.is_set():
            marked[id(self)] = engine.ticks
        cancel(self)

    def marking_release(self, req):
        released[id(req)] = self.ticks
        release(self, req)

    monkeypatch.setattr(Request, "cancel", marking_cancel)
    monkeypatch.setattr(Engine, "_release", marking_release)
    with Server(ckpt, slots=4, chunk=4) as s:
        engine = s.httpd.service.engine
        keep, _ = _start_stream(s, {"prompt": "the", "length": 5000, "temperature": 1.0, "seed": 1})
        leave, _ = _start_stream(s, {"prompt": "the", "length": 5000, "temperature": 1.0, "seed": 2})
        leave.close()  # gone mid-stream
        deadline = time.time() + 10
        while engine.health()["running"] > 1 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.health()["running"] == 1  # the other one goes on
        left = [released[k] - marked[k] for k in marked if k in released]
        assert left and 0 <= left[0] <= 1, (marked, released)  # freed at the tick after the disconnect
        keep.close()
        generated = _metrics(s)[("charlm_characters_generated_total", ())]
    assert generated < 2 * 5000


def _text_and_stop_index(ckpt, start: int, width: int):
    """A seeded continuation and a stop string taken from it at ``start`` (its first occurrence)."""
    for seed in range(50):
        text = _alone(ckpt, {"prompt": "the ", "length": 80, "temperature": 1.0, "top_k": None, "top_p": None,
                             "seed": seed, "num_samples": 1})[0]
        stop = text[start:start + width]
        if text.find(stop) == start:
            return seed, text, stop
    pytest.skip("no seed gives a stop string whose first occurrence is there")


@pytest.mark.parametrize("start, width", [(16, 3), (14, 4), (0, 2)], ids=["at-a-chunk-boundary", "across-chunks",
                                                                        "at-once"])
def test_stop_strings(ckpt, start, width):
    seed, text, stop = _text_and_stop_index(ckpt, start, width)
    body = {"prompt": "the ", "length": 80, "temperature": 1.0, "seed": seed, "stop": [stop, "#never#"]}
    with Server(ckpt, chunk=16) as s:
        status, answer, _ = s.json("POST", "/generate", body)
        events = _stream(s, body)
        _, completion, _ = s.json("POST", "/v1/completions", {"prompt": "the ", "max_tokens": 80,
                                                              "temperature": 1.0, "seed": seed, "stop": stop})
        _, free, _ = s.json("POST", "/generate", {**body, "stop": "#never#"})
    assert status == 200
    assert answer["text"] == text[:start]
    assert answer["finish_reason"] == "stop"
    streamed = [e["text"] for e in events if "text" in e]
    assert "".join(streamed) == text[:start]
    assert all(stop not in chunk for chunk in streamed)
    assert events[-1]["finish_reason"] == "stop"
    assert completion["choices"][0]["text"] == text[:start]
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert free["text"] == text and free["finish_reason"] == "length"


def test_logprobs_of_a_completion(ckpt):
    V = len(ckpt.vocab)
    with Server(ckpt) as s:
        _, answer, _ = s.json("POST", "/v1/completions", {"prompt": "the ", "max_tokens": 40, "temperature": 0,
                                                          "logprobs": V})
        text = answer["choices"][0]["text"]
        lp = answer["choices"][0]["logprobs"]
        _, scored, _ = s.json("POST", "/v1/completions", {"prompt": "the " + text, "max_tokens": 0, "echo": True,
                                                          "logprobs": 0})
        events = _stream(s, {"prompt": "the ", "max_tokens": 40, "temperature": 0, "logprobs": 2},
                         path="/v1/completions")
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == list(range(40))
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen == max(top.values()) == top[token]  # greedy: the most probable character
        assert abs(sum(math.exp(v) for v in top.values()) - 1) < 1e-5  # every character: the whole distribution
    # the same characters scored as a given text: the same log-probabilities, so the same sum
    tail = scored["choices"][0]["logprobs"]["token_logprobs"][4:]
    assert abs(sum(lp["token_logprobs"]) - sum(tail)) < 1e-4
    streamed = [c for e in events if "choices" in e for c in e["choices"] if c["logprobs"]]
    assert [t for c in streamed for t in c["logprobs"]["tokens"]] == lp["tokens"]
    assert all(len(top) == 2 for c in streamed for top in c["logprobs"]["top_logprobs"])


def test_the_scoring_api_equals_charlm_eval(ckpt, tmp_path):
    from click.testing import CliRunner

    from charlm.cli import main

    text = "the machine was gone and the time traveller smiled\nthe time machine"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = CliRunner().invoke(main, ["eval", str(ckpt.path), str(tmp_path / "t.txt"), "--batch-size", "1", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output.splitlines()[-1])
    with Server(ckpt) as s:
        status, answer, _ = s.json("POST", "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True,
                                                               "logprobs": 1})
    assert status == 200
    choice = answer["choices"][0]
    assert choice["text"] == text
    lps = choice["logprobs"]["token_logprobs"]
    assert lps[0] is None and choice["logprobs"]["top_logprobs"][0] is None  # the first character: no context
    assert len(lps) - 1 == ev["tokens"]
    assert abs(-sum(lps[1:]) / (len(lps) - 1) - ev["loss"]) < 1e-5
    assert answer["usage"]["completion_tokens"] == 0


def test_echo_without_logprobs_and_a_long_prompt_warmed_up_in_pieces(ckpt):
    prompt = ("the time traveller smiled " * 40)[:1000]  # longer than one warm-up piece (256)
    want = _alone(ckpt, {"prompt": prompt, "length": 30, "temperature": 0.0, "top_k": None, "top_p": None,
                         "seed": 1, "num_samples": 1})[0]
    with Server(ckpt) as s:
        _, answer, _ = s.json("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 30, "temperature": 0,
                                                          "echo": True})
    assert answer["choices"][0]["text"] == prompt + want


def test_metrics_parse_and_move(ckpt):
    with Server(ckpt) as s:
        before = _metrics(s)
        status, answer, _ = s.json("POST", "/generate", {"prompt": "the ", "length": 50})
        s.json("POST", "/generate", {"prompt": "the ", "length": "x"})
        after = _metrics(s)
    assert status == 200
    key = ("charlm_characters_generated_total", ())
    assert after[key] - before.get(key, 0) == 50
    ok = ("charlm_http_requests_total", (("method", "POST"), ("path", "/generate"), ("status", "200")))
    bad = ("charlm_http_requests_total", (("method", "POST"), ("path", "/generate"), ("status", "400")))
    assert after[ok] - before.get(ok, 0) == 1 and after[bad] - before.get(bad, 0) == 1
    for name in ("charlm_time_to_first_character_seconds_count", "charlm_generation_duration_seconds_count"):
        assert after[(name, ())] - before.get((name, ()), 0) == 1
    assert after[("charlm_requests_running", ())] == 0 and after[("charlm_slots", ())] == 16


def test_keep_alive_chunked_streams_and_the_api_page(ckpt):
    import http.client

    with Server(ckpt) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        for _ in range(3):  # one connection, several requests
            conn.request("POST", "/generate", body=json.dumps({"prompt": "the", "length": 20, "stream": True}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.getheader("Transfer-Encoding") == "chunked"
            assert b'"done": true' in r.read()
        conn.close()
        r, page = s.request("GET", "/docs")
        assert r.status == 200 and b"swagger" in page.lower()
        _, schema, _ = s.json("GET", "/openapi.json")
    assert {"/generate", "/v1/completions", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"stop", "logprobs", "echo", "max_tokens"} <= set(body["properties"])


def test_an_engine_error_is_reported_and_the_engine_goes_on(ckpt, monkeypatch):
    tick, calls = Engine._tick, []

    def failing_once(self):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        tick(self)

    monkeypatch.setattr(Engine, "_tick", failing_once)
    with Server(ckpt, slots=2, queue_size=4) as s:
        status, body, _ = s.json("POST", "/generate", {"prompt": "the", "length": 50})
        assert status == 500 and body["error"]["code"] == "generation_failed" and "boom" in body["error"]["message"]
        assert s.httpd.service.engine.health()["running"] == 0  # its slots are free again
        answers = _concurrently(s, [{"prompt": "the", "length": 20}] * 4)
        assert [a[0] for a in answers] == [200] * 4 and s.httpd.service.engine.health()["running"] == 0


def test_info_names_the_cell_and_a_mogrifiers_rounds_and_rank(ckpt):
    server = Server(ckpt)
    try:
        status, info, _ = server.json("GET", "/info")
    finally:
        server.close()
    assert status == 200 and info["model"]["cell"] == ckpt.config.cell
    if ckpt.config.cell == "mogrifier":
        assert (info["model"]["mogrify_rounds"], info["model"]["mogrify_rank"]) == (
            ckpt.config.mogrify_rounds, ckpt.config.mogrify_rank)
    else:
        assert "mogrify_rounds" not in info["model"]
