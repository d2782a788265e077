"""``charlm serve``: one checkpoint behind a local page and a streaming HTTP API, on uvicorn.

The HTTP side is a FastAPI app (:mod:`charlm.serve.app`) on uvicorn's event loop, in a thread of
its own; the model belongs to the engine (:mod:`charlm.serve.engine`), which ``charlm serve`` runs
on the main thread and which steps every active request together. This module holds the limits
(:class:`ServeConfig`) and what the endpoints do apart from HTTP (:class:`Service`: validation, the
model card, submitting to the engine); :mod:`charlm.serve.host` binds and runs it all.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from dataclasses import dataclass
from http import HTTPStatus

from charlm.config import MAX_SAMPLES, MOGRIFIER_FIELDS, MAX_STREAM_INTERVAL, SampleConfig, _is_int, _is_real
from charlm.corpus import normalize
from charlm.errors import CharlmError, ConfigError, UnknownCharactersError
from charlm.serve import schemas
from charlm.serve.engine import Busy, Engine, Request

_DEFAULTS = SampleConfig()
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and security settings of ``charlm serve`` (most of them a CLI option). Each number is checked
    (a ``ConfigError`` names it): the port 0 to 65,535, ``slots`` at most 65,536, ``stream_interval`` 0 to 10
    seconds, ``max_seconds`` finite."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_length: int = 5000  # characters one request may ask for (per sample)
    max_prompt: int = 10_000  # characters of prompt
    max_samples: int | None = None  # samples one request may ask for; None: 8, or --slots if fewer
    max_seconds: float = 60.0  # a generation stops after this long ("finish_reason": "time")
    slots: int = 16  # sequences generated together (a request for n samples takes n)
    queue_size: int = 16  # requests that may wait for a slot; more get 503
    max_body: int = 64 * 1024  # bytes of request body
    chunk: int = 16  # characters per streamed chunk, at least (the first character is sent alone, at once)
    # seconds between a request's chunks, at least: each chunk costs the HTTP side a wake-up and its work
    # holds the GIL the engine needs, so fewer, larger chunks leave more of the CPU to generation
    # (8 clients on 2 cores: 0.80x in-process charlm.generate at 0 s, 0.86-1.07x at 0.05-0.1 s)
    stream_interval: float = 0.05
    allow_hosts: tuple[str, ...] = ()  # extra Host names accepted (besides localhost and the bound address)
    cors_origin: str | None = None  # the one foreign origin allowed to call the API from a browser
    api_key: str | None = None  # when set: "Authorization: Bearer <key>" on every API call

    def __post_init__(self):
        ints = {"port": (0, 65535), "max_length": (1, None), "max_prompt": (0, None), "slots": (1, MAX_SAMPLES),
                "queue_size": (0, None), "max_body": (1, None), "chunk": (1, None)}
        for name, (low, high) in ints.items():
            if not _is_int(getattr(self, name), low, high):
                limit = f"from {low:,} to {high:,}" if high is not None else f">= {low}"
                raise ConfigError(f"{name} must be an integer {limit}, got {getattr(self, name)!r}")
        if not _is_real(self.max_seconds, 0, low_open=True):
            raise ConfigError(f"max_seconds must be a finite number > 0, got {self.max_seconds!r}")
        if not _is_real(self.stream_interval, 0, MAX_STREAM_INTERVAL):
            raise ConfigError(f"stream_interval must lie in [0, {MAX_STREAM_INTERVAL:g}] seconds, got "
                              f"{self.stream_interval!r}")
        if self.max_samples is None:
            object.__setattr__(self, "max_samples", min(8, self.slots))
        if not _is_int(self.max_samples, 1):
            raise ConfigError(f"max_samples must be an integer >= 1, got {self.max_samples!r}")
        if self.max_samples > self.slots:
            raise ConfigError(f"--max-samples {self.max_samples} is more than --slots {self.slots}: a request for "
                              f"that many samples could never start")


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.headers = status, type_, code, headers or {}


@dataclass
class Job:
    """A validated request: what to submit, and how to answer."""

    prompt: str
    options: SampleConfig
    stream: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    usage: bool = False  # OpenAI stream_options.include_usage


class Service:
    """What the endpoints do, apart from HTTP: validation, the model card, submitting to the engine."""

    def __init__(self, ckpt, config: ServeConfig, model_id: str, command_checkpoint: str, metrics=None):
        self.ckpt, self.config, self.model_id = ckpt, config, model_id
        self.command_checkpoint = command_checkpoint
        self.metrics = metrics
        self.engine = Engine(ckpt.model, ckpt.vocab, slots=config.slots, queue_size=config.queue_size,
                             chunk=config.chunk, max_seconds=config.max_seconds, metrics=metrics,
                             flush_s=config.stream_interval)
        self.created = int(time.time())
        self.mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}
        self.allowed_hosts = frozenset({*LOCAL_NAMES, config.host.lower(), *(h.lower() for h in config.allow_hosts)})

    def info(self) -> dict:
        c, cfg, progress = self.ckpt, self.ckpt.config, self.ckpt.progress
        best, chars = c.held_out_figure()  # (the whole held-out text's, as charlm info and charlm eval give it)
        limits = self.config
        mogrifier = {name: getattr(cfg, name) for name in MOGRIFIER_FIELDS} if cfg.cell == "mogrifier" else {}
        return {
            "model": {"id": self.model_id, "cell": cfg.cell, "hidden_size": cfg.hidden_size,
                      "num_layers": cfg.num_layers, "embedding_dim": cfg.embedding_dim, **mogrifier, "impl": cfg.impl,
                      "parameters": c.model.num_parameters(), "checkpoint": self.command_checkpoint},
            "vocabulary": {"size": len(c.vocab), "chars": c.vocab.itos[1:]},
            "preprocess": c.preprocess,
            "corpus": c.corpus_path.name if c.corpus_path else None,
            "held_out": None if best is None else {"bits_per_char": best / math.log(2), "perplexity": math.exp(best),
                                                   "chars": chars, "step": progress.get("step")},
            "limits": {"max_length": limits.max_length, "max_prompt": limits.max_prompt,
                       "max_samples": limits.max_samples, "max_seconds": limits.max_seconds, "slots": limits.slots,
                       "queue_size": limits.queue_size, "max_body": limits.max_body},
            "defaults": {"length": _DEFAULTS.length, "temperature": _DEFAULTS.temperature, "top_k": _DEFAULTS.top_k,
                         "top_p": _DEFAULTS.top_p, "num_samples": _DEFAULTS.num_samples},
        }

    def health(self) -> dict:
        rate = self.metrics.chars_per_s() if self.metrics is not None else None
        return {"status": "ok", **self.engine.health(), "chars_per_s": None if rate is None else round(rate, 1)}

    def generate_job(self, body: dict) -> Job:
        b = _parse(schemas.GenerateBody, body)
        prompt = normalize(b.prompt, self.ckpt.preprocess) if b.normalize else b.prompt
        options = dict(length=b.length, temperature=b.temperature, top_k=b.top_k, top_p=b.top_p, seed=b.seed,
                       num_samples=b.num_samples)
        return self._job(prompt, options, stream=b.stream, stop=_stops(b.stop))

    def completions_job(self, body: dict) -> Job:
        b = _parse(schemas.CompletionBody, body)
        if b.model not in (None, self.model_id):
            raise ApiError(HTTPStatus.NOT_FOUND, f"the model {b.model!r} does not exist; this server serves "
                           f"{self.model_id!r}", "invalid_request_error", "model_not_found")
        prompt = b.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(HTTPStatus.BAD_REQUEST, "'prompt' must be a string or a list of one string",
                               code="invalid_value")
            prompt = prompt[0]
        options = dict(length=16 if b.max_tokens is None else b.max_tokens, temperature=b.temperature, top_k=b.top_k,
                       top_p=None if b.top_p in (None, 1) else b.top_p, seed=b.seed, num_samples=b.n)
        usage = b.stream_options is not None and b.stream_options.include_usage
        return self._job(prompt, options, stream=b.stream, stop=_stops(b.stop), logprobs=b.logprobs, echo=b.echo,
                         usage=usage)

    def _job(self, prompt: str, options: dict, **how) -> Job:
        limits = self.config
        if len(prompt) > limits.max_prompt:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the prompt has {len(prompt):,} characters; this server takes "
                           f"at most {limits.max_prompt:,}", code="prompt_too_long")
        if options["length"] > limits.max_length:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"length {options['length']:,} is over this server's limit of "
                           f"{limits.max_length:,} characters", code="length_too_long")
        if options["num_samples"] > limits.max_samples:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{options['num_samples']} samples is over this server's limit "
                           f"of {limits.max_samples}", code="too_many_samples")
        if options["seed"] is None:
            options["seed"] = secrets.randbelow(2**31)  # chosen here, so that the answer can say which
        try:
            sample = SampleConfig(**options)
            self.ckpt.vocab.encode(prompt)
        except UnknownCharactersError as exc:
            hint, pre = "", self.ckpt.preprocess
            if pre != "raw" and not self.ckpt.vocab.unknown_chars(normalize(prompt, pre)):
                hint = f"; the model was trained with {pre!r} preprocessing: set normalize to apply it"
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the prompt has {exc}{hint}", code="unknown_characters") from None
        except CharlmError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), code="invalid_value") from None
        if how.get("echo") and how.get("logprobs") is not None and len(prompt) == 0 and sample.length == 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, "nothing to score: the prompt is empty", code="invalid_value")
        return Job(prompt, sample, **how)

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> tuple[Request, asyncio.Queue]:
        """Hand ``job`` to the engine; its events arrive on the returned queue (on ``loop``)."""
        events: asyncio.Queue = asyncio.Queue()
        mailbox = self.mailboxes.get(loop)
        if mailbox is None:
            mailbox = self.mailboxes[loop] = Mailbox(loop, on_close=lambda: self.mailboxes.pop(loop, None))
            self.engine.flushers.append(mailbox.flush)
        req = Request(self.ckpt.vocab.encode(job.prompt), job.options, deliver=None, stop=job.stop,
                      logprobs=job.logprobs, prompt_logprobs=job.echo and job.logprobs is not None)
        req.deliver = functools.partial(mailbox.put, events, req)
        try:
            self.engine.submit(req)
        except Busy as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), "server_busy", "busy", {"Retry-After": "1"}) \
                from None
        return req, events


class Mailbox:
    """The engine's events for the requests of one event loop, handed over once per engine loop: one
    wake-up of the HTTP side for every request's news of a tick, not one per request and chunk (each
    wake-up writes to the loop's pipe, and the loop's work holds the GIL the engine needs).

    :meth:`put` and :meth:`flush` run on the engine's thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_close=None):
        self.loop, self.items, self.on_close = loop, [], on_close

    def put(self, queue: asyncio.Queue, req: Request, event: tuple) -> None:
        self.items.append((queue, req, event))

    def flush(self) -> bool:
        """Hand the events over; False once the loop is closed (the engine then drops this mailbox)."""
        items, self.items = self.items, []
        if self.loop.is_closed():
            self._closed(items)
            return False
        if items:
            try:
                self.loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # closed meanwhile
                self._closed(items)
                return False
        return True

    def _closed(self, items: list) -> None:
        for _, req, _ in items:  # nobody will read these: stop their work
            req.cancel()
        if self.on_close is not None:
            self.on_close()


def _hand_over(items: list) -> None:
    for queue, _, event in items:
        queue.put_nowait(event)


def _parse(model, body: dict):
    try:
        return schemas.parse(model, body)
    except schemas.BodyError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), code=exc.code) from None


def _stops(value) -> tuple[str, ...]:
    try:
        return schemas.stops(value)
    except schemas.BodyError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), code=exc.code) from None
