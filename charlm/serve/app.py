"""The HTTP side of ``charlm serve``: a FastAPI app.

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus),
``POST /generate`` (JSON, or Server-Sent Events with ``stream``), the OpenAI-style
``POST /v1/completions`` and ``GET /v1/models``, and the OpenAPI page at ``/docs``. Errors are
``{"error": {"message", "type", "code"}}`` with a fitting status.

Security: the outermost middleware (:class:`Guard`) answers 403 to a Host outside the allow-list
and to a browser request from a foreign Origin (a POST, or a CORS preflight from anywhere but
``--cors-origin``), and sets nosniff, no-referrer and no-store on every answer; the page gets a
Content-Security-Policy that allows exactly its inline script and style. Starlette's
CORSMiddleware answers for the one ``--cors-origin``. The API key is compared in constant time.
Starlette's TrustedHostMiddleware is not used: it answers 400 in plain text, and this server's
clients rely on the JSON error and its 403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import time
import uuid
from contextlib import aclosing
from http import HTTPStatus
from importlib import resources
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from charlm.serve import schemas
from charlm.serve.server import ApiError, Job, Service

_POST_PATHS = ("/generate", "/v1/completions")
_GET_PATHS = ("/", "/health", "/info", "/metrics", "/v1/models", "/docs", "/openapi.json")
_METHODS = ("GET", "POST", "HEAD", "OPTIONS")  # the request counter's method labels; any other is "other"
_OPENAI_REASONS = {"length": "length", "time": "length", "stop": "stop", "cancelled": "stop"}


def build_app(service: Service, port: int):
    app = FastAPI(title="charlm serve", version=_version(), summary="A character-level language model's API.",
                  docs_url="/docs", redoc_url=None)
    page, csp = _page()
    key = _key_check(service.config.api_key)
    limits = service.config
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.get("/", response_class=HTMLResponse, summary="The page: a playground for the model",
             responses=_responses(None, 403))
    async def get_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Frame-Options": "DENY"})

    @app.get("/health", summary="Up, and how busy", responses=_responses(schemas.HealthAnswer, 403))
    async def get_health():
        return service.health()

    @app.get("/info", dependencies=[Depends(key)], summary="The model card: sizes, vocabulary, limits",
             responses=_responses(schemas.InfoAnswer, 401, 403))
    async def get_info():
        return service.info()

    @app.get("/metrics", dependencies=[Depends(key)], summary="Counters in Prometheus's text format",
             response_class=PlainTextResponse, responses=_responses(None, 401, 403))
    async def get_metrics():
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(key)], summary="OpenAI: the one model served",
             responses=_responses(schemas.ModelsAnswer, 401, 403))
    async def get_models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "charlm"}]}

    @app.post("/generate", dependencies=[Depends(key)], summary="Continue a prompt",
              openapi_extra=_body_schema(schemas.GenerateBody, limits, length="max_length",
                                         num_samples="max_samples", prompt="max_prompt"),
              responses=_responses(schemas.GenerateAnswer, *_POST_ERRORS, stream=True))
    async def post_generate(request: Request):
        job = service.generate_job(await _json_body(request, service.config.max_body))
        return await _answer_generate(request, service, job)

    @app.post("/v1/completions", dependencies=[Depends(key)], summary="OpenAI: completions (characters for tokens)",
              openapi_extra=_body_schema(schemas.CompletionBody, limits, max_tokens="max_length", n="max_samples",
                                         prompt="max_prompt"),
              responses=_responses(schemas.CompletionAnswer, 404, *_POST_ERRORS, stream=True))
    async def post_completions(request: Request):
        job = service.completions_job(await _json_body(request, service.config.max_body))
        return await _answer_completions(request, service, job)

    app = _cors(app, service.config.cors_origin)
    return Guard(app, service, port)


def _version() -> str:
    from charlm import __version__

    return __version__


def _cors(app, origin: str | None):
    if not origin:
        return app
    return CORSMiddleware(app, allow_origins=[origin], allow_methods=["GET", "POST"],
                          allow_headers=["Content-Type", "Authorization"], max_age=600)


_ERRORS = {
    400: f"The body does not fit: not JSON, or nested more than {schemas.MAX_NESTING} deep; a field's type or range, "
         f"an unknown field (the message names it by its path), a character outside the model's vocabulary, a "
         f"server limit.",
    401: "The API key is missing or wrong (only when the server was started with --api-key).",
    403: "A Host this server does not answer to, or a browser request from another origin.",
    404: "No such model (OpenAI's model field names another).",
    411: "No Content-Length.",
    413: "The body is larger than the server's limit.",
    415: "The body is not sent as application/json.",
    500: "The generation failed (the engine's error, in one sentence); other requests go on.",
    503: "Busy: every slot is taken and the queue is full; try again after Retry-After seconds.",
}
_POST_ERRORS = (400, 401, 403, 411, 413, 415, 500, 503)


def _responses(ok, *codes: int, stream: bool = False) -> dict:
    """The documented answers of an endpoint: 200 (``ok``, a pydantic model, or None for a non-JSON page),
    with Server-Sent Events too when it can ``stream``, and each error status in ``codes``."""
    answer: dict = {"description": "The answer."}
    if ok is not None:
        answer["model"] = ok
    if stream:
        answer["content"] = {"text/event-stream": {"schema": {  # (OpenAPI 3.1: the schema of each event)
            "type": "object", "description": "With stream true, Server-Sent Events: each event's data is one JSON "
                                             "object (the completions stream ends with data: [DONE]).",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                           "retry": {"type": "integer"}},
            "required": ["data"]}}}
    out = {200: answer}
    for code in codes:
        out[code] = {"model": schemas.ErrorAnswer, "description": _ERRORS[code]}
    return out


def _body_schema(model, limits, **bounds: str) -> dict:
    """The request body's schema, with this server's limits in it (``field="max_length"``: the field's
    maximum, or a string's maxLength, is that limit of ``limits``)."""
    schema = _inlined(model.model_json_schema())
    for name, limit in bounds.items():
        _bound(schema["properties"][name], getattr(limits, limit))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _bound(node: dict, value: int) -> None:
    """Put ``value`` as the maximum of an integer schema, the maxLength of a string's (in each branch of anyOf)."""
    for branch in node.get("anyOf", [node]):
        kind = branch.get("type")
        if kind == "integer":
            branch["maximum"] = value
        elif kind == "string":
            branch["maxLength"] = value
        elif kind == "array" and branch.get("items", {}).get("type") == "string":
            branch["items"]["maxLength"] = value


def _inlined(schema: dict) -> dict:
    """A JSON schema with its ``$defs`` put in place of their references (pydantic's ``#/$defs/...`` do not
    resolve inside an OpenAPI document)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk({**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _page() -> tuple[str, str]:
    """The page, and the Content-Security-Policy that allows exactly its inline script and style."""
    html = resources.files("charlm.serve").joinpath("page.html").read_text(encoding="utf-8")
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        hashes[tag] = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                               for b in blocks)
    csp = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; connect-src 'self'; "
           f"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


# ---------------------------------------------------------------------------------------------
# Errors, the key, the body


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(_error_payload(exc), status_code=exc.status, headers=exc.headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    if exc.status_code == 405:
        allowed = "POST" if path in _POST_PATHS else "GET"
        return error_response(ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}",
                                       code="method_not_allowed", headers={"Allow": allowed}))
    if exc.status_code == 404:
        return error_response(ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}", code="not_found"))
    return error_response(ApiError(HTTPStatus(exc.status_code), str(exc.detail), code="http_error"))


def _key_check(api_key: str | None):
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("Authorization", "").encode()
        if not secrets.compare_digest(given, expected):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)",
                           "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
    return check


async def _json_body(request: Request, max_body: int) -> dict:
    length = request.headers.get("Content-Length")
    if length is None or not length.isdigit():
        raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the JSON body with a Content-Length", code="no_length")
    if int(length) > max_body:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {int(length):,} bytes; at most "
                       f"{max_body:,}", code="body_too_large")
    raw = await request.body()
    ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send Content-Type: application/json (got "
                       f"{ctype or 'none'!r})", code="unsupported_media_type")
    too_deep = ApiError(HTTPStatus.BAD_REQUEST, f"the body nests arrays and objects more than {schemas.MAX_NESTING} "
                        f"deep", code="invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:  # (the decoder recurses once per level: thousands of "[" exhaust the stack)
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object", code="invalid_json")
    if schemas.nesting(body) > schemas.MAX_NESTING:  # nothing after this point walks a deep value
        raise too_deep
    return body


# ---------------------------------------------------------------------------------------------
# Answers


_GONE = ("gone",)  # put in a request's queue when its client goes away


async def _events(request: Request, req, events: asyncio.Queue):
    """The engine's events for ``req`` as they come; the request is cancelled if the client goes away
    (seen by a watcher on the connection, which then wakes this reader) or the consumer stops early.
    One await per event (no task or wait set made per event: at 8 clients this loop handles a thousand
    events a second, beside the engine)."""
    gone = asyncio.ensure_future(_disconnected(request))
    gone.add_done_callback(lambda _: events.put_nowait(_GONE))
    try:
        while True:
            event = await events.get()
            if event is _GONE:
                return
            yield event
            if event[0] in ("done", "error"):
                return
    finally:
        gone.cancel()
        req.cancel()  # a no-op once done; else the engine drops it at its next tick


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _stream(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream; charset=utf-8",
                             headers={"X-Accel-Buffering": "no"})


def _failed(item) -> ApiError:
    return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {item}", "server_error",
                    "generation_failed")


async def _answer_generate(request: Request, service: Service, job: Job):
    req, events = service.submit(job, asyncio.get_running_loop())
    n = job.options.num_samples

    async def chunks():
        async with aclosing(_events(request, req, events)) as stream:
            async for kind, *item in stream:
                if kind == "text":
                    yield _sse({"text": item[0][0] if n == 1 else item[0]})
                elif kind == "done":
                    yield _sse({"done": True, **item[0]})
                elif kind == "error":
                    yield _sse(_error_payload(_failed(item[0])))

    if job.stream:
        return _stream(chunks())
    parts = [[] for _ in range(n)]
    async with aclosing(_events(request, req, events)) as stream:
        async for kind, *item in stream:
            if kind == "text":
                for p, t in zip(parts, item[0]):
                    p.append(t)
            elif kind == "error":
                raise _failed(item[0])
            elif kind == "done":
                texts = ["".join(p) for p in parts]
                return {"text": texts[0] if n == 1 else texts, **item[0]}
    return Response(status_code=499)  # the client left: nobody reads this


def _error_payload(e: ApiError) -> dict:
    return {"error": {"message": str(e), "type": e.type, "code": e.code}}


class _Choice:
    """One OpenAI choice as it grows: its text, and its logprobs object (tokens, token_logprobs,
    top_logprobs, text_offset) when asked."""

    def __init__(self, index: int, logprobs: bool):
        self.index, self.offset, self.text = index, 0, []
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if logprobs \
            else None

    def add(self, text: str, entries) -> dict | None:
        """Append a piece; return the piece's own logprobs object (None without logprobs)."""
        self.text.append(text)
        if self.logprobs is None:
            self.offset += len(text)
            return None
        piece = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for char, lp, top in entries or ():
            for obj in (piece, self.logprobs):
                obj["tokens"].append(char)
                obj["token_logprobs"].append(lp)
                obj["top_logprobs"].append(top)
                obj["text_offset"].append(self.offset)
            self.offset += len(char)
        return piece


async def _answer_completions(request: Request, service: Service, job: Job):
    req, events = service.submit(job, asyncio.get_running_loop())
    answer = _Completion(service.model_id, job, req, events, request)
    return _stream(answer.chunks()) if job.stream else await answer.collect()


class _Completion:
    """One OpenAI completions answer: the engine's events as choices, streamed or collected."""

    def __init__(self, model_id: str, job: Job, req, events: asyncio.Queue, request: Request):
        self.job, self.req, self.events, self.request = job, req, events, request
        self.n, self.wants_lp = job.options.num_samples, job.logprobs is not None
        self.base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                     "model": model_id}
        self.choices = [_Choice(i, self.wants_lp) for i in range(self.n)]
        self.counts = {"prompt_tokens": len(job.prompt), "completion_tokens": 0}

    async def updates(self):
        """("text", [(text, entries) per choice]), then ("done", info) or ("error", exception); the echoed
        prompt comes first (with its logprobs when asked: the engine scores it while warming up)."""
        job, n = self.job, self.n
        if job.echo and not self.wants_lp and job.prompt:
            yield "text", [(job.prompt, None)] * n
        async with aclosing(_events(self.request, self.req, self.events)) as stream:
            async for kind, *item in stream:
                if kind == "prompt":
                    yield "text", [("".join(c for c, _, _ in item[0]), item[0])] * n
                elif kind == "text":
                    self.counts["completion_tokens"] += sum(len(t) for t in item[0])
                    yield "text", list(zip(item[0], item[1] or [None] * n))
                else:
                    yield kind, item[0]

    async def chunks(self):
        async with aclosing(self.updates()) as stream:
            async for kind, item in stream:
                if kind == "text":
                    out = [{"text": t, "index": c.index, "logprobs": c.add(t, e), "finish_reason": None}
                           for c, (t, e) in zip(self.choices, item) if t or e]
                    if out:
                        yield _sse({**self.base, "choices": out})
                elif kind == "done":
                    yield _sse({**self.base, "choices": [
                        {"text": "", "index": i, "logprobs": None, "finish_reason": _OPENAI_REASONS.get(r, r)}
                        for i, r in enumerate(item["finish_reasons"])]})
                    if self.job.usage:
                        yield _sse({**self.base, "choices": [], "usage": _usage(self.counts)})
                elif kind == "error":
                    yield _sse(_error_payload(_failed(item)))
        yield b"data: [DONE]\n\n"

    async def collect(self):
        async with aclosing(self.updates()) as stream:
            async for kind, item in stream:
                if kind == "text":
                    for c, (t, e) in zip(self.choices, item):
                        c.add(t, e)
                elif kind == "error":
                    raise _failed(item)
                elif kind == "done":
                    return {**self.base, "choices": [
                        {"text": "".join(c.text), "index": c.index, "logprobs": c.logprobs,
                         "finish_reason": _OPENAI_REASONS.get(r, r)} for c, r in zip(self.choices,
                                                                                     item["finish_reasons"])],
                        "usage": _usage(self.counts)}
        return Response(status_code=499)  # the client left: nobody reads this


def _usage(counts: dict) -> dict:
    return {**counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]}


# ---------------------------------------------------------------------------------------------
# The outermost middleware


class Guard:
    """Host allow-list, foreign-Origin refusal, security headers and the per-status request counter."""

    def __init__(self, app, service: Service, port: int):
        self.app, self.service, self.port = app, service, port

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        label = path if path in _GET_PATHS or path in _POST_PATHS else "other"
        method_label = method if method in _METHODS else "other"  # a client cannot grow the label set
        metrics = self.service.metrics

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                if metrics is not None:  # counted before the client can have its answer (and read /metrics)
                    metrics.answered(label, method_label, message["status"])
                h = MutableHeaders(scope=message)
                h.setdefault("X-Content-Type-Options", "nosniff")
                h.setdefault("Referrer-Policy", "no-referrer")
                h.setdefault("Cache-Control", "no-store")
            await send(message)

        try:
            self._check_host(headers)
            if method in ("POST", "OPTIONS"):
                self._check_origin(headers, method)
        except ApiError as exc:
            await error_response(exc)(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)

    def _check_host(self, headers: Headers) -> None:
        host = (headers.get("host") or "").strip().lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        allowed = self.service.allowed_hosts
        if name not in allowed:
            raise ApiError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not served here (allowed: "
                           f"{', '.join(sorted(allowed))}; add one with --allow-host)", "forbidden", "host_not_allowed")

    def _check_origin(self, headers: Headers, method: str) -> None:
        """A browser request from another site (a page the user opened elsewhere) is refused."""
        origin = headers.get("origin")
        cors = self.service.config.cors_origin
        if origin is None or origin == cors:  # (an OPTIONS without Origin is no preflight: the app answers 405)
            return
        if method == "OPTIONS":
            raise ApiError(HTTPStatus.FORBIDDEN, "no cross-origin access here (see --cors-origin)", "forbidden",
                           "origin_not_allowed")
        parts = urlsplit(origin)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        same_site = (parts.hostname is not None and parts.hostname.lower() in self.service.allowed_hosts
                     and port == self.port)
        if not same_site:
            raise ApiError(HTTPStatus.FORBIDDEN, f"requests from {origin} are not allowed (pass --cors-origin to "
                           f"allow one origin)", "forbidden", "origin_not_allowed")
