"""The request bodies of ``charlm serve`` as pydantic models, and their errors as one sentence each.

Strict types (JSON ``true`` is no integer, ``"10"`` no number), unknown fields refused, and the
ranges of :class:`charlm.config.SampleConfig`. The per-server limits (length, prompt, samples) are
checked afterwards, by :class:`charlm.serve.server.Service`. The OpenAI fields are those of the
completions API; a few are accepted only at their neutral value (named in the error).
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from charlm.config import SEED_MAX, SampleConfig

_DEFAULTS = SampleConfig()
_STRICT = ConfigDict(extra="forbid", strict=True)
MAX_STOPS = 4  # stop strings per request, as in OpenAI's API
MAX_LOGPROBS = 20  # top characters per position
MAX_NESTING = 16  # arrays and objects inside one another in a body, at most (the bodies charlm takes nest 2)

Stop = str | list[str] | None


class GenerateBody(BaseModel):
    """``POST /generate``."""

    model_config = _STRICT
    prompt: str = Field("", description="The prefix to continue (the model's characters only).")
    length: int = Field(_DEFAULTS.length, ge=0, description="Characters to add.")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="0: greedy.")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="The same seed gives the same text (0 to 2**63 - 1); omitted: the answer "
                                         "names one.")
    num_samples: int = Field(1, ge=1)
    normalize: bool = Field(False, description="Apply the model's preprocessing to the prompt first.")
    stream: bool = Field(False, description="Server-Sent Events instead of one JSON answer.")
    stop: Stop = Field(None, description="The text ends before the first of these strings to appear.")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class CompletionBody(BaseModel):
    """``POST /v1/completions``: OpenAI's completions API, with characters for tokens."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=0, description="Characters to generate; 0 with echo and logprobs scores "
                                                         "the prompt.")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="0 to 2**63 - 1; omitted: one is chosen.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Log-probabilities of each character "
                                                                          "and of the top-N at each position.")
    echo: bool = Field(False, description="The prompt comes back before the completion (with its logprobs).")
    user: str | None = None
    # accepted only at their neutral values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    logit_bias: dict[str, Any] | None = None
    suffix: str | None = None


NEUTRAL = {"presence_penalty": (0.0,), "frequency_penalty": (0.0,), "best_of": (None, 1), "logit_bias": (None, {}),
           "suffix": (None, "")}

_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "list_type": "a list", "dict_type": "an object",
               "model_type": "an object", "finite_number": "a finite number"}


def nesting(value) -> int:
    """How deep arrays and objects nest in a decoded JSON ``value`` (0 for a number or a string), read level by
    level (no recursion: a deep value cannot exhaust the stack)."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]


class BodyError(ValueError):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def parse(model: type[BaseModel], body: dict) -> BaseModel:
    """``model`` from ``body``; a ``ValueError`` with one sentence (and a code) when it does not fit."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise BodyError(*_describe(model, body, exc.errors())) from None
    for name, neutral in (NEUTRAL.items() if model is CompletionBody else ()):
        if getattr(parsed, name) not in neutral:
            accepted = " or ".join("null" if v is None else json.dumps(v) for v in neutral)
            raise BodyError(f"'{name}' is not supported by this server (only {accepted})", "unsupported_value")
    return parsed


def _describe(model: type[BaseModel], body: dict, errors: list[dict]) -> tuple[str, str]:
    """One sentence for pydantic's ``errors``, naming the field by its path in the body once
    (``stream_options.include_usage``), and a code."""
    # unknown fields: the body's own first, then those inside an object field
    extra = sorted((e for e in errors if e["type"] == "extra_forbidden"), key=lambda e: len(e["loc"]))
    if extra:
        path, _, _, inner = _resolve(model, extra[0]["loc"][:-1])
        names = [str(e["loc"][-1]) for e in extra if _resolve(model, e["loc"][:-1])[0] == path]
        where = f" in '{_name(path)}'" if path else ""
        return f"unknown field(s){where}: {', '.join(names)}; known: {', '.join(inner.model_fields)}", "unknown_field"
    path, owner, name, _ = _resolve(model, errors[0]["loc"])
    field = owner.model_fields[name]
    kinds = _kinds(field.annotation)
    if len(kinds) > 2 or (len(kinds) == 2 and "null" not in kinds):  # a union (prompt, stop): named as a whole
        path = path[:path.index(name) + 1]
    where, value = _name(path), _shown(_value_at(body, path))
    e = errors[0]
    bounds = [m for m in field.metadata if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le))]
    if path[-1] == name and e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") \
            and bounds:
        return f"'{where}' must be {_range(bounds)}, got {value}", "invalid_value"
    if path[-1] == name and e["type"] == "finite_number":
        return f"'{where}' must be a finite number, got {value}", "invalid_value"
    if path[-1] != name:  # an item of a list field
        kinds = [_TYPE_NAMES.get(x["type"], "valid") for x in errors if _resolve(model, x["loc"])[0] == path]
    return f"'{where}' must be {' or '.join(dict.fromkeys(kinds))}, got {value}", "invalid_type"


def _resolve(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel], str | None, type[BaseModel] | None]:
    """A pydantic location as a path in the body (fields and list indices; the names pydantic gives the
    branches of a union left out), the model that holds its last field, that field's name, and the model
    the path leads into (None where it leads to no model)."""
    path, current, owner, name = [], model, model, None
    for part in loc:
        if isinstance(part, int):
            path.append(part)
        elif current is not None and part in current.model_fields:
            path.append(part)
            owner, name = current, part
            current = _model_in(current.model_fields[part].annotation)
    return tuple(path), owner, name, current


def _model_in(annotation) -> type[BaseModel] | None:
    """The model an annotation holds (``StreamOptions | None``: StreamOptions), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, typing.get_args(annotation)) if m is not None), None)


def _kinds(annotation) -> list[str]:
    """What a field's annotation takes, in words: ``str | list[str] | None``: a string, a list of strings, null."""
    if annotation is None or annotation is type(None):
        return ["null"]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [k for a in typing.get_args(annotation) for k in _kinds(a)]
    if typing.get_origin(annotation) is dict:
        return ["an object"]
    if typing.get_origin(annotation) is list:
        return [f"a list of {_PLURALS.get(typing.get_args(annotation)[0], 'values')}"]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ["an object"]
    return [_WORDS.get(annotation, "valid")]


_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}
_PLURALS = {str: "strings", int: "integers", float: "numbers"}


def _name(path: tuple) -> str:
    """``("stream_options", "include_usage")``: stream_options.include_usage; ``("prompt", 1)``: prompt[1]."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _value_at(body, path: tuple):
    for part in path:
        try:
            body = body[part]
        except (KeyError, IndexError, TypeError):
            return None
    return body


def _shown(value) -> str:
    """A value as the error shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + " ..."


def _range(bounds) -> str:
    lo = next((b for b in bounds if isinstance(b, (at.Gt, at.Ge))), None)
    hi = next((b for b in bounds if isinstance(b, (at.Lt, at.Le))), None)
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    if lo is not None and hi is not None:
        left = "(" if isinstance(lo, at.Gt) else "["
        right = ")" if isinstance(hi, at.Lt) else "]"
        low = lo.gt if isinstance(lo, at.Gt) else lo.ge
        high = hi.lt if isinstance(hi, at.Lt) else hi.le
        return f"in {left}{fmt(low)}, {fmt(high)}{right}"
    if lo is not None:
        return f"> {fmt(lo.gt)}" if isinstance(lo, at.Gt) else f">= {fmt(lo.ge)}"
    return f"< {fmt(hi.lt)}" if isinstance(hi, at.Lt) else f"<= {fmt(hi.le)}"


def stops(value: Stop) -> tuple[str, ...]:
    """The stop strings of a body: one string, or up to ``MAX_STOPS``, none empty."""
    if value is None or value == "":  # OpenAI's neutral values
        return ()
    items = [value] if isinstance(value, str) else list(value)
    if len(items) > MAX_STOPS:
        raise BodyError(f"'stop' takes at most {MAX_STOPS} strings, got {len(items)}", "invalid_value")
    if any(s == "" for s in items):
        raise BodyError("'stop' strings must not be empty", "invalid_value")
    return tuple(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# The answers, as the OpenAPI schema documents them (charlm.serve.app builds them as plain dicts; these
# models describe them, and the fuzz test checks every answer against them)

class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Answer):
    message: str = Field(description="One sentence: what was wrong, and what to do.")
    type: str = Field(description="invalid_request_error, authentication_error, forbidden, server_busy or "
                                  "server_error.")
    code: str | None = Field(description="A stable name for the error (e.g. invalid_value, busy).")


class ErrorAnswer(_Answer):
    """Every error, whatever its status."""

    error: ErrorDetail


class HealthAnswer(_Answer):
    status: str = Field(description="Always ok.")
    busy: bool
    running: int = Field(ge=0, description="Slots held by requests (warming up or generating).")
    waiting: int = Field(ge=0, description="Requests queued for a slot.")
    slots: int = Field(ge=1)
    served: int = Field(ge=0, description="Requests ended since the server started.")
    chars_per_s: float | None = Field(description="Characters sent per second over the last second or so.")


class InfoAnswer(_Answer):
    model: dict[str, Any] = Field(description="id, cell, hidden_size, num_layers, embedding_dim, (a mogrifier's) "
                                              "mogrify_rounds and mogrify_rank, impl, parameters, checkpoint.")
    vocabulary: dict[str, Any] = Field(description="size (with <unk>) and chars (the characters a prompt may use).")
    preprocess: str
    corpus: str | None
    held_out: dict[str, Any] | None = Field(description="bits_per_char, perplexity, chars (the held-out characters "
                                                        "scored) and step of the best checkpoint.")
    limits: dict[str, Any]
    defaults: dict[str, Any]


class ModelCard(_Answer):
    id: str
    object: str
    created: int
    owned_by: str


class ModelsAnswer(_Answer):
    object: str
    data: list[ModelCard]


class GenerateAnswer(_Answer):
    """``POST /generate`` without ``stream``; with it, Server-Sent Events: ``{"text": ...}`` chunks, then
    ``{"done": true, ...}`` with the fields below but ``text`` (or ``{"error": ...}``)."""

    text: str | list[str] = Field(description="The continuation (a list with num_samples > 1).")
    finish_reason: str = Field(description="length, stop, time or cancelled (the first sample's, unless any "
                                           "ended for time or was cancelled).")
    finish_reasons: list[str]
    seed: int
    chars: int = Field(ge=0)
    elapsed_s: float = Field(ge=0)


class Logprobs(_Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Answer):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: str | None


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionAnswer(_Answer):
    """``POST /v1/completions`` without ``stream``; with it, Server-Sent Events of the same object with a
    piece of each choice's text, then ``data: [DONE]``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
