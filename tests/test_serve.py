"""charlm serve against a real server on a free loopback port: every endpoint, every error, the limits."""

import http.client
import json
import os
import socket
import sys
import threading
import time

import pytest
from conftest import stop_process
from serving import Server, make_checkpoint

from charlm import generate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture
def server(ckpt):
    s = Server(ckpt)
    yield s
    s.close()


def test_page_health_info_models(server, ckpt):
    r, page = server.request("GET", "/")
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    assert b"charlm playground" in page
    assert "script-src 'sha256-" in r.getheader("Content-Security-Policy")
    assert "'unsafe-inline'" not in r.getheader("Content-Security-Policy")
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    assert r.getheader("Access-Control-Allow-Origin") is None
    assert server.healthy()
    status, info, _ = server.json("GET", "/info")
    assert status == 200
    assert info["model"]["cell"] == "gru"
    assert info["vocabulary"]["size"] == len(ckpt.vocab)
    assert info["vocabulary"]["chars"] == ckpt.vocab.itos[1:]
    assert info["preprocess"] == "lower"
    assert info["held_out"]["bits_per_char"] == pytest.approx(2.0 / 0.6931471805599453)
    assert info["limits"]["max_length"] == 5000
    assert info["defaults"]["length"] == 200
    status, models, _ = server.json("GET", "/v1/models")
    assert models["data"][0]["id"] == "run"
    assert models["object"] == "list"


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.9, seed=3), dict(temperature=1.2, top_k=4, top_p=0.9,
                                                                                seed=5, num_samples=3)])
def test_generate_equals_the_library_streamed_or_not(server, ckpt, options):
    body = {"prompt": "the ", "length": 70, **options}
    status, answer, _ = server.json("POST", "/generate", body)
    assert status == 200, answer
    expected = generate(ckpt.model, ckpt.vocab, "the ", 70, **{k: v for k, v in options.items()})
    n = options.get("num_samples", 1)
    want = [t[4:] for t in expected] if n > 1 else expected[4:]
    assert answer["text"] == want
    assert answer["finish_reason"] == "length"
    assert answer["chars"] == 70
    if "seed" in options:
        assert answer["seed"] == options["seed"]
    events = server.events("/generate", {**body, "stream": True})
    chunks, done = events[:-1], events[-1]
    assert done["done"] is True
    assert done["finish_reason"] == "length"
    assert len(chunks) > 1  # it streamed, in several pieces
    if n == 1:
        assert "".join(e["text"] for e in chunks) == want
    else:
        assert ["".join(e["text"][i] for e in chunks) for i in range(n)] == want


def test_generate_without_seed_reports_the_one_it_used(server, ckpt):
    status, answer, _ = server.json("POST", "/generate", {"prompt": "the", "length": 40, "temperature": 1.0})
    assert status == 200
    again = generate(ckpt.model, ckpt.vocab, "the", 40, temperature=1.0, seed=answer["seed"])
    assert answer["text"] == again[3:]


def test_normalize_applies_the_models_preprocessing(server, ckpt):
    status, answer, _ = server.json("POST", "/generate", {"prompt": "THE", "length": 10})
    assert status == 400
    assert "'T' (U+0054)" in answer["error"]["message"]
    assert "normalize" in answer["error"]["message"]
    status, answer, _ = server.json("POST", "/generate", {"prompt": "THE", "length": 10, "normalize": True})
    assert status == 200
    assert answer["text"] == generate(ckpt.model, ckpt.vocab, "the", 10)[3:]


def test_openai_completions_and_stream_format(server, ckpt):
    body = {"model": "run", "prompt": "the ", "max_tokens": 30, "temperature": 0, "echo": False, "logprobs": None,
            "stop": None, "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "user": "me"}
    status, answer, _ = server.json("POST", "/v1/completions", body)
    assert status == 200, answer
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert answer["choices"][0]["text"] == generate(ckpt.model, ckpt.vocab, "the ", 30)[4:]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 30, "total_tokens": 34}
    events = server.events("/v1/completions", {"prompt": ["the "], "max_tokens": 40, "seed": 2, "stream": True,
                                               "n": 2, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 80
    finals = events[-3]["choices"]
    assert [c["finish_reason"] for c in finals] == ["length", "length"]
    texts = ["".join(c["text"] for e in events[:-3] for c in e["choices"] if c["index"] == i) for i in range(2)]
    assert texts == [t[4:] for t in generate(ckpt.model, ckpt.vocab, "the ", 40, temperature=1.0, seed=2,
                                             num_samples=2)]
    assert all(e["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize("method, path, body, headers, status, code, message", [
    ("POST", "/generate", {"prompt": "the", "bogus": 1}, {}, 400, "unknown_field", "unknown field(s): bogus"),
    ("POST", "/generate", {"prompt": "the", "length": "ten"}, {}, 400, "invalid_type", "'length' must be an integer"),
    ("POST", "/generate", {"prompt": "the", "length": True}, {}, 400, "invalid_type", "'length' must be an integer"),
    ("POST", "/generate", {"prompt": "the", "temperature": -1}, {}, 400, "invalid_value", "'temperature' must be >= 0"),
    ("POST", "/generate", {"prompt": "the", "top_p": 1.5}, {}, 400, "invalid_value", "'top_p' must be in (0, 1]"),
    ("POST", "/generate", {"prompt": "the", "top_k": 0}, {}, 400, "invalid_value", "'top_k' must be >= 1"),
    ("POST", "/generate", {"prompt": "the", "length": 10**6}, {}, 400, "length_too_long", "over this server's limit"),
    ("POST", "/generate", {"prompt": "t" * 20_000}, {}, 400, "prompt_too_long", "at most 10,000"),
    ("POST", "/generate", {"prompt": "the", "num_samples": 50}, {}, 400, "too_many_samples", "limit of 8"),
    ("POST", "/generate", {"prompt": "q"}, {}, 400, "unknown_characters", "'q' (U+0071)"),
    ("POST", "/generate", [1, 2], {}, 400, "invalid_json", "must be a JSON object"),
    ("POST", "/generate", None, {"Content-Type": "application/json", "raw": b"{nope"}, 400, "invalid_json", "not valid JSON"),
    ("POST", "/generate", None, {"Content-Type": "text/plain", "raw": b"{}"}, 415, "unsupported_media_type", "application/json"),
    ("POST", "/generate", None, {"Content-Type": "application/json", "raw": b" " * 70_000}, 413, "body_too_large", "at most 65,536"),
    ("POST", "/generate", {}, {"Origin": "http://evil.example"}, 403, "origin_not_allowed", "http://evil.example"),
    ("GET", "/health", None, {"Host": "evil.example"}, 403, "host_not_allowed", "'evil.example'"),
    ("GET", "/nowhere", None, {}, 404, "not_found", "no such endpoint: /nowhere"),
    ("GET", "/generate", None, {}, 405, "method_not_allowed", "/generate takes POST"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, {}, 404, "model_not_found", "'gpt-4' does not exist"),
    ("POST", "/v1/completions", {"prompt": "the", "best_of": 3}, {}, 400, "unsupported_value", "'best_of'"),
    ("POST", "/v1/completions", {"prompt": "the", "logprobs": 50}, {}, 400, "invalid_value", "'logprobs' must be in [0, 20]"),
    ("POST", "/v1/completions", {"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "invalid_value", "at most 4"),
    ("POST", "/v1/completions", {"prompt": "the", "stop": 3}, {}, 400, "invalid_type", "'stop' must be a string"),
    ("POST", "/v1/completions", {"prompt": "the", "max_tokens": 10**6}, {}, 400, "length_too_long", "limit"),
])
def test_errors_have_a_status_and_one_sentence(server, method, path, body, headers, status, code, message):
    headers = dict(headers)
    raw = headers.pop("raw", None)
    r, data = server.request(method, path, body, headers=headers, raw=raw)
    assert r.status == status, data
    error = json.loads(data)["error"]
    assert error["code"] == code
    assert message in error["message"]
    assert "\n" not in error["message"]
    assert server.healthy()  # and the server goes on


def test_host_allow_list_takes_the_bound_address_and_extra_names(ckpt):
    with Server(ckpt, allow_hosts=("box.lan",)) as s:
        for host in ("localhost", f"localhost:{s.port}", "127.0.0.1", "[::1]:8000", "box.lan:8000"):
            r, _ = s.request("GET", "/health", headers={"Host": host})
            assert r.status == 200, host
        r, _ = s.request("GET", "/health", headers={"Host": "attacker.example:8000"})
        assert r.status == 403


def test_cors_only_for_the_named_origin(ckpt):
    with Server(ckpt, cors_origin="http://app.example:3000") as s:
        r, _ = s.request("OPTIONS", "/generate", headers={"Origin": "http://app.example:3000",
                                                          "Access-Control-Request-Method": "POST"})
        assert r.status == 200  # Starlette's CORSMiddleware answers the preflight
        assert r.getheader("Access-Control-Allow-Origin") == "http://app.example:3000"
        status, _, r = s.json("POST", "/generate", {"prompt": "the", "length": 3},
                              headers={"Origin": "http://app.example:3000"})
        assert status == 200
        assert r.getheader("Access-Control-Allow-Origin") == "http://app.example:3000"
        r, _ = s.request("OPTIONS", "/generate", headers={"Origin": "http://other.example"})
        assert r.status == 403


def test_api_key(ckpt):
    with Server(ckpt, api_key="sesame") as s:
        assert s.request("GET", "/")[0].status == 200  # the page itself asks for the key
        assert s.healthy()
        status, body, r = s.json("GET", "/info")
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        status, _, _ = s.json("POST", "/generate", {"prompt": "the", "length": 3},
                              headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = s.json("POST", "/generate", {"prompt": "the", "length": 3},
                              headers={"Authorization": "Bearer sesame"})
        assert status == 200


def _start_stream(server, body):
    """Open a streaming request and read until its first chunk; return the raw socket and the status."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    received = b""
    while b"data: " not in received:
        more = sock.recv(4096)
        if not more:  # answered without a stream (503 when busy)
            break
        received += more
    return sock, int(received.split(b" ", 2)[1])


def test_a_client_that_disconnects_frees_the_model_at_once(ckpt):
    with Server(ckpt, chunk=4) as s:
        sock, status = _start_stream(s, {"prompt": "the", "length": 5000, "temperature": 1.0, "seed": 1})
        assert status == 200
        sock.close()  # gone mid-stream
        t0 = time.perf_counter()
        status, answer, _ = s.json("POST", "/generate", {"prompt": "the", "length": 20})
        waited = time.perf_counter() - t0
        assert status == 200
        assert len(answer["text"]) == 20
        assert waited < 2.0  # not behind the 5,000 characters nobody reads any more
        _, health, _ = s.json("GET", "/health")
        assert health["busy"] is False


def test_queue_limit_answers_503_with_retry_after(ckpt):
    s = Server(ckpt, slots=1, queue_size=1, chunk=4, max_seconds=30)
    socks = []
    try:
        socks.append(_start_stream(s, {"prompt": "the", "length": 5000, "temperature": 1.0})[0])  # running
        waiting = threading.Thread(target=s.json, args=("POST", "/generate", {"prompt": "the", "length": 5}))
        waiting.start()  # queued behind it
        deadline = time.time() + 10
        while s.json("GET", "/health")[1]["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        status, body, r = s.json("POST", "/generate", {"prompt": "the", "length": 5})
        assert status == 503
        assert r.getheader("Retry-After") == "1"
        assert body["error"]["code"] == "busy"
        socks[0].close()
        waiting.join(timeout=20)
        assert not waiting.is_alive()
        assert s.healthy()
    finally:
        for sock in socks:
            sock.close()
        s.close()


def test_time_cap_ends_a_generation(ckpt):
    with Server(ckpt, max_seconds=0.05, chunk=4) as s:
        status, answer, _ = s.json("POST", "/generate", {"prompt": "the", "length": 5000, "temperature": 1.0})
        assert status == 200
        assert answer["finish_reason"] == "time"
        assert 0 < answer["chars"] < 5000


def test_bounded_load_every_request_answered(ckpt):
    """8 clients x 20 requests on loopback, some malformed, some leaving mid-stream: each gets an answer
    (or 503), none hangs, memory ends where it began, and the server still serves."""
    s = Server(ckpt, queue_size=4, chunk=8)

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    results, errors = [], []

    def client(c):
        for i in range(20):
            kind = (c + i) % 4
            try:
                if kind == 0:
                    r, _ = s.request("POST", "/generate", {"prompt": "the", "length": 60, "temperature": 1.0}, timeout=30)
                elif kind == 1:
                    r, _ = s.request("POST", "/generate", None, headers={"Content-Type": "application/json"},
                                     raw=b"{broken", timeout=30)
                elif kind == 2:
                    sock, status = _start_stream(s, {"prompt": "the", "length": 2000})
                    sock.close()  # leaves mid-stream
                    results.append(status)
                    continue
                else:
                    r, _ = s.request("POST", "/v1/completions", {"prompt": "the", "max_tokens": 30}, timeout=30)
                results.append(r.status)
            except Exception as exc:  # noqa: BLE001 - any hang or reset is a failure, reported below
                errors.append(repr(exc))

    before = rss_mb()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - t0
    try:
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert len(results) == 160
        assert set(results) <= {200, 400, 503}
        assert results.count(400) == 40  # the malformed ones, each answered
        deadline = time.time() + 10
        while s.json("GET", "/health")[1]["busy"] and time.time() < deadline:
            time.sleep(0.05)
        assert s.healthy()
        assert rss_mb() - before < 50
        print(f"load: 160 requests in {elapsed:.1f} s; answers {dict((k, results.count(k)) for k in set(results))}; "
              f"memory {before:.0f} -> {rss_mb():.0f} MB")
    finally:
        s.close()


def test_cli_serve_prints_the_url_serves_and_stops_on_ctrl_c(ckpt):
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(ckpt.path), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith(f"Serving {ckpt.path} at http://127.0.0.1:")
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/generate", body=json.dumps({"prompt": "the ", "length": 30}),
                     headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        assert answer["text"] == generate(ckpt.model, ckpt.vocab, "the ", 30)[4:]
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0
        assert "Stopped." in err
        assert "Traceback" not in err
    finally:
        stop_process(p)


def test_cli_serve_stops_cleanly_on_sigterm(ckpt):
    import signal
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(ckpt.path), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("Serving ")
        p.send_signal(signal.SIGTERM)  # what systemd, docker stop and kill send
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0 and "Stopped." in err and "Traceback" not in err
    finally:
        stop_process(p)


def test_cli_serve_without_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from charlm.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["serve"])
    assert r.exit_code == 1
    assert "no checkpoint found" in r.output
    assert r.output.count("\n") == 1


@pytest.mark.skipif(sys.platform != "linux", reason="tgkill is Linux's")
def test_cli_serve_stops_on_a_ctrl_c_that_another_thread_receives(ckpt):
    """The kernel may hand a process's SIGINT to any of its threads; Python then only sets a flag that the
    main thread acts on when it runs Python code again: a main thread blocked for good never stopped."""
    import ctypes
    import signal
    import subprocess

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("this C library has no tgkill")
    p = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(ckpt.path), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("Serving ")
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a generation: the main thread is
        conn.request("POST", "/generate", body=json.dumps({"prompt": "the ", "length": 3}),  # in its job loop
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        others = sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid)
        assert others, "the server runs its HTTP loop on a thread of its own"
        assert libc.tgkill(p.pid, others[0], signal.SIGINT) == 0
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0
        assert "Stopped." in err
    finally:
        stop_process(p)


def _json_endpoints(server) -> list[str]:
    """Every endpoint whose OpenAPI entry takes a JSON body."""
    _, schema, _ = server.json("GET", "/openapi.json")
    paths = [p for p, methods in schema["paths"].items() for m, op in methods.items()
             if "application/json" in op.get("requestBody", {}).get("content", {})]
    assert {"/generate", "/v1/completions"} <= set(paths)
    return paths


@pytest.mark.parametrize("raw", [
    b"[" * 60_000,  # 60 KB under the 64 KB limit: the decoder's recursion ran out (a plain-text 500)
    b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'{"logit_bias": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}",  # decodes, and would be walked by what follows
    b'{"stop": ' + b"[" * 17 + b"]" * 17 + b"}",
])
def test_a_deeply_nested_json_body_is_a_400_with_the_json_error_body(server, raw):
    """#35: a 60 KB body of "[[[[..." was a plain-text 500 (RecursionError) on /generate and /v1/completions."""
    for path in _json_endpoints(server):
        r, data = server.request("POST", path, raw=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400, (path, data[:200])
        assert r.getheader("Content-Type") == "application/json"
        error = json.loads(data)["error"]
        assert error == {"message": "the body nests arrays and objects more than 16 deep",
                         "type": "invalid_request_error", "code": "invalid_json"}
    assert server.healthy()


def test_a_body_nested_within_the_limit_is_read_and_its_field_named(server):
    raw = b'{"stop": ' + b"[" * 15 + b"]" * 15 + b"}"
    status, body, _ = server.json("POST", "/generate", raw=raw, headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["message"].startswith("'stop' must be a string or a list of strings")


@pytest.mark.parametrize("body, code, message", [
    ({"stream_options": {"include_usage": True, "extra": 1}}, "unknown_field",
     "unknown field(s) in 'stream_options': extra; known: include_usage"),
    ({"stream_options": {"include_usage": "yes"}}, "invalid_type",
     "'stream_options.include_usage' must be true or false, got 'yes'"),
    ({"stream_options": {"include_usage": None}}, "invalid_type",
     "'stream_options.include_usage' must be true or false, got None"),
    ({"stream_options": {"x": 1}, "bogus": 2}, "unknown_field", "unknown field(s): bogus; known: model, prompt, "),
    ({"stream_options": 3}, "invalid_type", "'stream_options' must be an object or null, got 3"),
    ({"prompt": ["the", 1]}, "invalid_type", "'prompt' must be a string or a list of strings, got ['the', 1]"),
    ({"stop": ["a", 1]}, "invalid_type", "'stop' must be a string or a list of strings or null, got ['a', 1]"),
    ({"logit_bias": 3}, "invalid_type", "'logit_bias' must be an object or null, got 3"),
    ({"prompt": "t" * 10_000, "max_tokens": -1}, "invalid_value", "'max_tokens' must be >= 0, got -1"),
    ({"stream_options": {"include_usage": "y" * 5000}}, "invalid_type",
     "'stream_options.include_usage' must be true or false, got 'yyyy"),  # (the value cut: the message stays short)
])
def test_errors_for_nested_fields_name_the_field_path_once(server, body, code, message):
    """#35: a field inside an object field was reported as an unknown field of the body ("unknown field(s):
    stream_options"), and a wrong type inside it as the object's ("'stream_options' must be true or false")."""
    status, answer, _ = server.json("POST", "/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert message in error["message"], error
    if code != "invalid_value":
        assert error["code"] == code
        where = message.split("'")[1] if "'" in message else None
        if where:
            assert error["message"].count(where) == 1  # named once
    assert len(error["message"]) < 400 and "\n" not in error["message"]
