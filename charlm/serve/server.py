"""``charlm serve``: one checkpoint behind a local page and a small streaming HTTP API.

Built on the standard library's threading HTTP server: each connection has a thread, and one
generation thread owns the model. ``iter_generate`` keeps ``torch.inference_mode()`` (thread-local)
open across its yields and writes into buffers made under it, so every step of a generation must
run on the thread that started it: request threads only queue a job and relay its chunks. One job
runs at a time; ``queue_size`` more may wait; past that a request gets 503 with ``Retry-After``.
A client that goes away (a failed write, or a closed socket seen while waiting) cancels its job at
the next chunk, and every job stops after ``max_seconds``.

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /info``, ``POST /generate`` (JSON, or
Server-Sent Events with ``stream``), and the OpenAI-style ``POST /v1/completions`` and
``GET /v1/models``. Errors are ``{"error": {"message", "type", "code"}}`` with a fitting status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import queue
import re
import secrets
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from charlm.config import SampleConfig
from charlm.corpus import normalize
from charlm.errors import CharlmError, UnknownCharactersError

_DEFAULTS = SampleConfig()
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and security settings of ``charlm serve`` (each one a CLI option)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_length: int = 5000  # characters one request may ask for (per sample)
    max_prompt: int = 10_000  # characters of prompt
    max_samples: int = 8
    max_seconds: float = 60.0  # a generation stops after this long ("finish_reason": "time")
    queue_size: int = 4  # requests that may wait behind the running one; more get 503
    max_body: int = 64 * 1024  # bytes of request body
    chunk: int = 16  # characters per streamed chunk
    allow_hosts: tuple[str, ...] = ()  # extra Host names accepted (besides localhost and the bound address)
    cors_origin: str | None = None  # the one foreign origin allowed to call the API from a browser
    api_key: str | None = None  # when set: "Authorization: Bearer <key>" on every API call


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.headers = status, type_, code, headers or {}


# ---------------------------------------------------------------------------------------------
# The generation thread


@dataclass
class Job:
    prompt: str
    options: SampleConfig
    chunks: queue.Queue = field(default_factory=queue.Queue)  # ("text", [str, ...]) ... then ("done", info)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Generator:
    """The one thread that runs generations, in order, and its bounded queue."""

    def __init__(self, model, vocab, config: ServeConfig, thread: bool = True):
        self.model, self.vocab, self.config = model, vocab, config
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # admission and the hand-over from the queue to ``running``
        self.running: Job | None = None
        self.served = 0
        if thread:
            threading.Thread(target=self.run, name="charlm-generate", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.jobs.qsize() + (self.running is not None) <= self.config.queue_size:
                self.jobs.put(job)
                return
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy: one generation is running and "
                           f"{self.config.queue_size} are waiting; try again shortly", "server_busy", "busy",
                           {"Retry-After": "1"})

    def run(self) -> None:
        """Run jobs until :meth:`stop`. ``charlm serve`` runs this on the main thread: torch's parallel
        regions started from another thread are several times slower on a CPU (a 2 x LSTM 320 model
        sampled at a quarter of its main-thread speed), so HTTP gets the threads and the model the main one."""
        while True:
            try:
                # Not a blocking get: a Ctrl-C that the kernel hands to another thread only sets a flag, which
                # this thread acts on when it next runs Python code; a wait that never returned hung the server.
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job is None:
                return
            if not job.cancelled.is_set():
                with self.lock:
                    self.running = job
                try:
                    self._run(job)
                finally:
                    self.running = None
                    self.served += 1

    def _run(self, job: Job) -> None:
        from charlm.sample import iter_generate

        o = job.options
        t0 = time.perf_counter()
        chars, reason = 0, "length"
        stream = iter_generate(self.model, self.vocab, job.prompt, o.length, o.temperature, o.top_k, o.top_p, o.seed,
                               o.num_samples, chunk=self.config.chunk)
        try:
            for texts in stream:
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                chars += len(texts[0])
                job.chunks.put(("text", texts))
                if time.perf_counter() - t0 > self.config.max_seconds and chars < o.length:
                    reason = "time"
                    break
        except Exception as exc:  # noqa: BLE001 - reported to the waiting request, the thread lives on
            job.chunks.put(("error", exc))
            return
        finally:
            stream.close()  # on this thread: iter_generate's cleanup leaves inference mode here
        job.chunks.put(("done", {"finish_reason": reason, "seed": o.seed, "chars": chars,
                                 "elapsed_s": round(time.perf_counter() - t0, 4)}))

    def stop(self) -> None:
        while True:
            try:
                self.jobs.get_nowait().cancelled.set()
            except (queue.Empty, AttributeError):
                break
        if self.running is not None:
            self.running.cancelled.set()
        self.jobs.put(None)


# ---------------------------------------------------------------------------------------------
# Requests


_GENERATE_FIELDS = {"prompt": str, "length": int, "temperature": (int, float), "top_k": (int, type(None)),
                    "top_p": (int, float, type(None)), "seed": (int, type(None)), "num_samples": int,
                    "normalize": bool, "stream": bool}
# OpenAI fields this server accepts only at their neutral value (anything else is refused, named).
_OPENAI_NEUTRAL = {"echo": (False,), "logprobs": (None, 0), "stop": (None, [], ""), "presence_penalty": (0, 0.0),
                   "frequency_penalty": (0, 0.0), "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, "")}
_OPENAI_FIELDS = {"model": str, "prompt": (str, list), "max_tokens": (int, type(None)), "temperature": (int, float),
                  "top_p": (int, float, type(None)), "n": int, "seed": (int, type(None)), "stream": bool,
                  "top_k": (int, type(None)), "user": str, "stream_options": (dict, type(None))}


def _check_types(body: dict, fields: dict) -> None:
    for name, value in body.items():
        types = fields[name]
        bool_as_int = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        if bool_as_int or not isinstance(value, types):  # JSON true is no integer here
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' must be {_type_names(types)}, got {value!r}",
                           code="invalid_type")
        if isinstance(value, float) and not math.isfinite(value):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' must be a finite number, got {value!r}",
                           code="invalid_value")


def _type_names(types) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null",
             list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names[t] for t in types if not (t is int and float in types)))


class Service:
    """What the endpoints do, apart from HTTP: validation, the model card, jobs."""

    def __init__(self, ckpt, config: ServeConfig, model_id: str, command_checkpoint: str, generator_thread: bool):
        self.ckpt, self.config, self.model_id = ckpt, config, model_id
        self.command_checkpoint = command_checkpoint
        self.generator = Generator(ckpt.model, ckpt.vocab, config, thread=generator_thread)
        self.created = int(time.time())

    def info(self) -> dict:
        c, cfg, progress = self.ckpt, self.ckpt.config, self.ckpt.progress
        best = progress.get("best_val_loss")
        return {
            "model": {"id": self.model_id, "cell": cfg.cell, "hidden_size": cfg.hidden_size,
                      "num_layers": cfg.num_layers, "embedding_dim": cfg.embedding_dim, "impl": cfg.impl,
                      "parameters": c.model.num_parameters(), "checkpoint": self.command_checkpoint},
            "vocabulary": {"size": len(c.vocab), "chars": c.vocab.itos[1:]},
            "preprocess": c.preprocess,
            "corpus": c.corpus_path.name if c.corpus_path else None,
            "held_out": None if best is None else {"bits_per_char": best / math.log(2), "perplexity": math.exp(best),
                                                   "step": progress.get("step")},
            "limits": {"max_length": self.config.max_length, "max_prompt": self.config.max_prompt,
                       "max_samples": self.config.max_samples, "max_seconds": self.config.max_seconds,
                       "queue_size": self.config.queue_size, "max_body": self.config.max_body},
            "defaults": {"length": _DEFAULTS.length, "temperature": _DEFAULTS.temperature, "top_k": _DEFAULTS.top_k,
                         "top_p": _DEFAULTS.top_p, "num_samples": _DEFAULTS.num_samples},
        }

    def generate_request(self, body: dict) -> tuple[Job, bool]:
        unknown = sorted(set(body) - set(_GENERATE_FIELDS))
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}; known: "
                           f"{', '.join(_GENERATE_FIELDS)}", code="unknown_field")
        _check_types(body, _GENERATE_FIELDS)
        prompt = body.get("prompt", "")
        if body.get("normalize", False):
            prompt = normalize(prompt, self.ckpt.preprocess)
        options = dict(length=body.get("length", _DEFAULTS.length), temperature=body.get("temperature", 0.0),
                       top_k=body.get("top_k"), top_p=body.get("top_p"), seed=body.get("seed"),
                       num_samples=body.get("num_samples", 1))
        return self._job(prompt, options), body.get("stream", False)

    def completions_request(self, body: dict) -> tuple[Job, bool, bool]:
        unknown = sorted(set(body) - set(_OPENAI_FIELDS) - set(_OPENAI_NEUTRAL))
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unsupported field(s): {', '.join(unknown)}", code="unknown_field")
        for name, neutral in _OPENAI_NEUTRAL.items():
            if name in body and body[name] not in neutral:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' is not supported by this server (only "
                               f"{neutral[0]!r})", code="unsupported_value")
        _check_types({k: v for k, v in body.items() if k in _OPENAI_FIELDS}, _OPENAI_FIELDS)
        if body.get("model", self.model_id) != self.model_id:
            raise ApiError(HTTPStatus.NOT_FOUND, f"the model {body['model']!r} does not exist; this server serves "
                           f"{self.model_id!r}", "invalid_request_error", "model_not_found")
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ApiError(HTTPStatus.BAD_REQUEST, "'prompt' must be a string or a list of one string",
                               code="invalid_value")
            prompt = prompt[0]
        top_p = body.get("top_p")
        options = dict(length=16 if body.get("max_tokens") is None else body["max_tokens"],
                       temperature=body.get("temperature", 1.0), top_k=body.get("top_k"),
                       top_p=None if top_p in (None, 1) else top_p, seed=body.get("seed"), num_samples=body.get("n", 1))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._job(prompt, options), body.get("stream", False), usage

    def _job(self, prompt: str, options: dict) -> Job:
        limits = self.config
        if len(prompt) > limits.max_prompt:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the prompt has {len(prompt):,} characters; this server takes "
                           f"at most {limits.max_prompt:,}", code="prompt_too_long")
        if isinstance(options["length"], int) and options["length"] > limits.max_length:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"length {options['length']:,} is over this server's limit of "
                           f"{limits.max_length:,} characters", code="length_too_long")
        if isinstance(options["num_samples"], int) and options["num_samples"] > limits.max_samples:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{options['num_samples']} samples is over this server's limit "
                           f"of {limits.max_samples}", code="too_many_samples")
        if options["seed"] is None:
            options["seed"] = secrets.randbelow(2**31)  # chosen here, so that the answer can say which
        try:
            sample = SampleConfig(**options)
            self.ckpt.vocab.encode(prompt)
        except UnknownCharactersError as exc:
            hint = ""
            if self.ckpt.preprocess != "raw" and not self.ckpt.vocab.unknown_chars(normalize(prompt, self.ckpt.preprocess)):
                hint = f"; the model was trained with {self.ckpt.preprocess!r} preprocessing: set normalize to apply it"
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the prompt has {exc}{hint}", code="unknown_characters") from None
        except CharlmError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), code="invalid_value") from None
        job = Job(prompt, sample)
        self.generator.submit(job)
        return job


# ---------------------------------------------------------------------------------------------
# HTTP


def _page() -> tuple[bytes, str]:
    """The page, and the Content-Security-Policy that allows exactly its inline script and style."""
    html = resources.files("charlm.serve").joinpath("page.html").read_text(encoding="utf-8")
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        hashes[tag] = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                               for b in blocks)
    csp = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; connect-src 'self'; "
           f"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), csp


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "charlm"
    service: Service  # set on the subclass made by make_server
    page: bytes
    page_csp: str
    allowed_hosts: frozenset

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # quiet: the CLI prints the URL; requests are not logged

    # -- plumbing ------------------------------------------------------------------------------
    def _headers(self, status: HTTPStatus, content_type: str, length: int | None = None, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        origin = self.headers.get("Origin")
        cors = self.service.config.cors_origin
        if cors and origin == cors:
            self.send_header("Access-Control-Allow-Origin", cors)
            self.send_header("Vary", "Origin")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _json(self, status: HTTPStatus, payload, extra: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self._headers(status, "application/json", len(data), extra)
        self.wfile.write(data)

    def _error(self, exc: ApiError) -> None:
        self._json(exc.status, {"error": {"message": str(exc), "type": exc.type, "code": exc.code}}, exc.headers)

    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name not in self.allowed_hosts:
            raise ApiError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not served here (allowed: "
                           f"{', '.join(sorted(self.allowed_hosts))}; add one with --allow-host)",
                           "forbidden", "host_not_allowed")

    def _check_origin(self) -> None:
        """A browser POST from another site (a page the user opened elsewhere) is refused."""
        origin = self.headers.get("Origin")
        if origin is None or origin == self.service.config.cors_origin:
            return
        from urllib.parse import urlsplit

        parts = urlsplit(origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        same_site = (parts.hostname is not None and parts.hostname.lower() in self.allowed_hosts
                     and port == self.server.server_address[1])
        if not same_site:
            raise ApiError(HTTPStatus.FORBIDDEN, f"requests from {origin} are not allowed (pass --cors-origin to "
                           f"allow one origin)", "forbidden", "origin_not_allowed")

    def _check_key(self) -> None:
        key = self.service.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)",
                           "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def _body(self) -> dict:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the JSON body with a Content-Length", code="no_length")
        if int(length) > self.service.config.max_body:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {int(length):,} bytes; at most "
                           f"{self.service.config.max_body:,}", code="body_too_large")
        raw = self.rfile.read(int(length))
        if ctype != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send Content-Type: application/json (got "
                           f"{ctype or 'none'!r})", code="unsupported_media_type")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", code="invalid_json")
        return body

    def _client_gone(self) -> bool:
        """True once the client closed its end (checked without blocking)."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- dispatch ------------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 - http.server's name
        self._dispatch({"/": self._get_page, "/health": self._get_health, "/info": self._get_info,
                        "/v1/models": self._get_models}, public=("/", "/health"))

    def do_POST(self):  # noqa: N802
        self._dispatch({"/generate": self._post_generate, "/v1/completions": self._post_completions}, post=True)

    def do_OPTIONS(self):  # noqa: N802 - CORS preflight, for --cors-origin only
        cors = self.service.config.cors_origin
        if cors and self.headers.get("Origin") == cors:
            self._headers(HTTPStatus.NO_CONTENT, "text/plain", 0, {
                "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": "Content-Type, Authorization"})
        else:
            self._error(ApiError(HTTPStatus.FORBIDDEN, "no cross-origin access here (see --cors-origin)",
                                 "forbidden", "origin_not_allowed"))

    def _dispatch(self, routes: dict, post: bool = False, public=()):
        path = self.path.split("?", 1)[0]
        try:
            self._check_host()
            if path not in routes:
                allowed = "POST" if path in ("/generate", "/v1/completions") else "GET"
                if path in ("/", "/health", "/info", "/v1/models", "/generate", "/v1/completions"):
                    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}", code="method_not_allowed",
                                   headers={"Allow": allowed})
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}", code="not_found")
            if post:
                self._check_origin()
            if path not in public:
                self._check_key()
            routes[path]()
        except ApiError as exc:
            if post:
                self.close_connection = True  # a body may be left unread: this connection ends with the answer
            try:
                self._error(exc)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- endpoints -----------------------------------------------------------------------------
    def _get_page(self):
        self._headers(HTTPStatus.OK, "text/html; charset=utf-8", len(self.page),
                      {"Content-Security-Policy": self.page_csp, "X-Frame-Options": "DENY"})
        self.wfile.write(self.page)

    def _get_health(self):
        g = self.service.generator
        self._json(HTTPStatus.OK, {"status": "ok", "busy": g.running is not None, "waiting": g.jobs.qsize(),
                                   "served": g.served})

    def _get_info(self):
        self._json(HTTPStatus.OK, self.service.info())

    def _get_models(self):
        self._json(HTTPStatus.OK, {"object": "list", "data": [
            {"id": self.service.model_id, "object": "model", "created": self.service.created, "owned_by": "charlm"}]})

    def _post_generate(self):
        job, stream = self.service.generate_request(self._body())
        n = job.options.num_samples
        if stream:
            self._sse_start()
            for kind, item in self._relay(job):
                if kind == "text":
                    self._sse({"text": item[0] if n == 1 else item})
                else:
                    self._sse({"done": True, **item})
            return
        collected = self._collect(job)
        if collected is not None:
            texts, done = collected
            self._json(HTTPStatus.OK, {"text": texts[0] if n == 1 else texts, **done})

    def _post_completions(self):
        job, stream, usage = self.service.completions_request(self._body())
        n = job.options.num_samples
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.service.model_id}
        counts = {"prompt_tokens": len(job.prompt), "completion_tokens": 0}
        if stream:
            self._sse_start()
            for kind, item in self._relay(job):
                if kind == "text":
                    counts["completion_tokens"] += sum(len(t) for t in item)
                    self._sse({**base, "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": None}
                                                   for i, t in enumerate(item)]})
                else:
                    reason = _openai_reason(item["finish_reason"])
                    self._sse({**base, "choices": [{"text": "", "index": i, "logprobs": None, "finish_reason": reason}
                                                   for i in range(n)]})
                    if usage:
                        self._sse({**base, "choices": [], "usage": _usage(counts)})
            self._write(b"data: [DONE]\n\n")
            return
        collected = self._collect(job)
        if collected is not None:
            texts, done = collected
            counts["completion_tokens"] = sum(len(t) for t in texts)
            reason = _openai_reason(done["finish_reason"])
            self._json(HTTPStatus.OK, {**base, "choices": [
                {"text": t, "index": i, "logprobs": None, "finish_reason": reason} for i, t in enumerate(texts)],
                "usage": _usage(counts)})

    # -- streaming -----------------------------------------------------------------------------
    def _relay(self, job: Job):
        """The job's chunks as they come; the job is cancelled if the client goes away meanwhile."""
        try:
            while True:
                try:
                    kind, item = job.chunks.get(timeout=0.25)
                except queue.Empty:
                    if self._client_gone():
                        job.cancelled.set()
                        return
                    continue
                if kind == "error":
                    raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {item}", "server_error",
                                   "generation_failed")
                yield kind, item
                if kind == "done":
                    return
        finally:
            job.cancelled.set()  # a no-op once done; otherwise (a failed write, an exception) stop the job now

    def _collect(self, job: Job) -> tuple[list[str], dict] | None:
        """Every sample's whole text and the final info; None when the client left first."""
        parts = [[] for _ in range(job.options.num_samples)]
        for kind, item in self._relay(job):
            if kind == "done":
                return ["".join(p) for p in parts], item
            for p, t in zip(parts, item):
                p.append(t)
        return None

    def _sse_start(self):
        self._headers(HTTPStatus.OK, "text/event-stream; charset=utf-8", None, {"X-Accel-Buffering": "no"})

    def _sse(self, payload) -> None:
        self._write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def _openai_reason(reason: str) -> str:
    return {"length": "length", "time": "length", "cancelled": "stop"}.get(reason, reason)


def _usage(counts: dict) -> dict:
    return {**counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client that vanished is not an error worth printing
        pass


def make_server(ckpt, config: ServeConfig, model_id: str = "charlm", command_checkpoint: str = "",
                generator_thread: bool = True) -> _Server:
    """A server bound to ``config.host``/``config.port`` (port 0: a free one), not yet serving.

    With ``generator_thread=False`` no thread runs the generations: the caller runs
    ``server.service.generator.run()`` (on the main thread, as ``charlm serve`` does).
    """
    service = Service(ckpt, config, model_id, command_checkpoint, generator_thread)
    page, csp = _page()
    hosts = {*_LOCAL_NAMES, config.host.lower(), *(h.lower() for h in config.allow_hosts)}
    handler = type("Handler", (_Handler,), {"service": service, "page": page, "page_csp": csp,
                                            "allowed_hosts": frozenset(hosts)})
    server = _Server((config.host, config.port), handler)
    server.service = service
    return server
