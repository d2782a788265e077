"""A Sphinx directive that renders the HTTP API of ``charlm serve`` from its OpenAPI schema.

The schema is read from the FastAPI app itself at build time (``app.openapi()``), so the reference
cannot drift from the server: the app is built around a tiny untrained model saved to a temporary
directory (nothing is served; no socket is opened). ``.. charlm-openapi::`` renders one section per
endpoint (method, path, summary, description, request body fields, responses) and one per schema
the endpoints name. The schema itself is written beside the page as ``openapi.json``.

Only what the schema says is rendered: a field's type, default, range and description come from
the pydantic models, an endpoint's summary and responses from its route.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

_METHODS = ("get", "post", "put", "patch", "delete")


def server_schema() -> dict:
    """The OpenAPI schema of the app ``charlm serve`` runs, built around a tiny untrained model."""
    import torch

    from charlm import RNNLM, Vocab, load_checkpoint, save_checkpoint
    from charlm.serve import ServeConfig
    from charlm.serve.app import build_app
    from charlm.serve.server import Service

    vocab = Vocab.from_text("the time machine\n")
    torch.manual_seed(0)
    model = RNNLM(len(vocab), cell="gru", hidden_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "run" / "best", model, vocab, {})
        ckpt = load_checkpoint(path)
        app = build_app(Service(ckpt, ServeConfig(), "run", "checkpoints/run"), port=8000)
    while not hasattr(app, "openapi"):  # the FastAPI app sits inside the outer middleware
        app = app.app
    return app.openapi()


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _resolve(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[_ref_name(schema["$ref"])]
    return schema


def _type(schema: dict, defs: dict) -> str:
    """A JSON schema's type in a few words: ``integer``, ``string or null``, ``array of string``, a schema name."""
    if "$ref" in schema:
        return _ref_name(schema["$ref"])
    if "anyOf" in schema or "oneOf" in schema:
        return " or ".join(dict.fromkeys(_type(s, defs) for s in schema.get("anyOf", schema.get("oneOf"))))
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), defs)}"
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return "object"
    if isinstance(kind, list):
        return " or ".join(kind)
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    return kind or "any"


def _range(schema: dict) -> str:
    """The bounds of a number (``>= 0``, ``(0, 1]``), searching the alternatives of an ``anyOf``."""
    for s in [schema, *schema.get("anyOf", [])]:
        lo = ("[", s["minimum"]) if "minimum" in s else ("(", s["exclusiveMinimum"]) if "exclusiveMinimum" in s \
            else None
        hi = ("]", s["maximum"]) if "maximum" in s else (")", s["exclusiveMaximum"]) if "exclusiveMaximum" in s \
            else None
        fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
        if lo and hi:
            return f"{lo[0]}{fmt(lo[1])}, {fmt(hi[1])}{hi[0]}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + fmt(lo[1])
        if hi:
            return ("<= " if hi[0] == "]" else "< ") + fmt(hi[1])
    return ""


def _literal(text: str) -> nodes.literal:
    return nodes.literal(text, text)


def _table(headers: list[str], rows: list[list]) -> nodes.table:
    """A docutils table; a cell is text or a node."""
    table = nodes.table()
    group = nodes.tgroup(cols=len(headers))
    table += group
    for i, header in enumerate(headers):  # widths in proportion to the longest text of each column, capped
        longest = max([len(header), *(len(r[i].astext() if isinstance(r[i], nodes.Node) else str(r[i])) for r in rows)])
        group += nodes.colspec(colwidth=min(max(longest, 6), 40))
    head = nodes.thead()
    group += head
    body = nodes.tbody()
    group += body
    for parent, cells in [(head, headers), *[(body, r) for r in rows]]:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", cell if isinstance(cell, nodes.Node) else nodes.Text(str(cell)))
            row += entry
        parent += row
    return table


class OpenApiDirective(SphinxDirective):
    """``.. charlm-openapi::``: every endpoint of ``charlm serve`` and the schemas they name."""

    has_content = False

    def run(self):
        schema = _SCHEMA["schema"]
        components = dict(schema.get("components", {}).get("schemas", {}))
        out = []
        named: dict[str, dict] = {}
        for path, item in schema["paths"].items():
            for method in _METHODS:
                if method in item:
                    out.append(self._operation(method.upper(), path, item[method], components, named))
        if named:
            section = self._section("Schemas", "http-schemas")
            section += nodes.paragraph("", "The objects the endpoints above name, field by field.")
            for name in sorted(named):
                sub = self._section(name, f"http-schema-{name.lower()}")
                sub += self._fields(named[name], {**components, **named}, named)
                section += sub
            out.append(section)
        return out

    def _section(self, title: str, ident: str) -> nodes.section:
        section = nodes.section(ids=[nodes.make_id(ident)])
        section += nodes.title(title, title)
        self.state.document.note_implicit_target(section)
        return section

    def _operation(self, method: str, path: str, op: dict, components: dict, named: dict) -> nodes.section:
        section = self._section(f"{method} {path}", f"http-{method}-{path}")
        if op.get("summary"):
            section += nodes.paragraph("", op["summary"] + ".")
        if op.get("description"):
            for block in op["description"].split("\n\n"):
                section += nodes.paragraph("", block.strip())
        body = op.get("requestBody")
        if body:
            for media, content in body.get("content", {}).items():
                para = nodes.paragraph()
                para += nodes.strong("", "Request body")
                para += nodes.Text(" (")
                para += _literal(media)
                para += nodes.Text(", required):" if body.get("required") else "):")
                section += para
                body_schema = content.get("schema", {})
                defs = {**components, **body_schema.get("$defs", {})}
                for name, sub in body_schema.get("$defs", {}).items():
                    named.setdefault(name, sub)
                section += self._fields(_resolve(body_schema, defs), defs, named)
        responses = op.get("responses", {})
        if responses:
            para = nodes.paragraph()
            para += nodes.strong("", "Responses")
            section += para
            rows = []
            for status, answer in responses.items():
                kinds = []
                for media, content in answer.get("content", {}).items():
                    shown = content.get("schema") or {}
                    if "$ref" in shown:
                        named.setdefault(_ref_name(shown["$ref"]), components.get(_ref_name(shown["$ref"]), {}))
                    kinds.append(media + (f" ({_type(shown, components)})" if shown else ""))
                rows.append([_literal(status), answer.get("description", ""), ", ".join(kinds) or "no body"])
            section += _table(["status", "meaning", "content"], rows)
        return section

    def _fields(self, schema: dict, defs: dict, named: dict) -> nodes.Node:
        props = schema.get("properties")
        if not props:
            return nodes.paragraph("", schema.get("description", "") or f"Type: {_type(schema, defs)}.")
        required = set(schema.get("required", []))
        rows = []
        for name, prop in props.items():
            for alt in [prop, *prop.get("anyOf", []), prop.get("items", {})]:
                if "$ref" in alt:
                    named.setdefault(_ref_name(alt["$ref"]), defs.get(_ref_name(alt["$ref"]), {}))
            kind = _type(prop, defs)
            default = ("required" if name in required else json.dumps(prop["default"]) if "default" in prop
                       else "null" if kind.endswith("or null") else "")
            rows.append([_literal(name), kind, _literal(default) if default else "",
                         _range(prop), prop.get("description", "")])
        table = _table(["field", "type", "default", "range", "meaning"], rows)
        if schema.get("additionalProperties") is False:
            box = nodes.container()
            box += table
            box += nodes.paragraph("", "Any other field is refused (400).")
            return box
        return table


def _write_schema(app, exception) -> None:
    """``reference/openapi.json`` in the HTML output: the schema the server serves at ``/openapi.json``."""
    schema = _SCHEMA.get("schema")
    if exception is None and schema is not None and app.builder.format == "html":
        target = Path(app.outdir) / "reference" / "openapi.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_SCHEMA: dict = {}


def _read_schema(app) -> None:
    """The schema, once per build and before autodoc imports the documented modules (FastAPI's schema
    generation failed when first run after them)."""
    _SCHEMA["schema"] = server_schema()


def setup(app):
    app.connect("builder-inited", _read_schema)
    app.add_directive("charlm-openapi", OpenApiDirective)
    app.connect("build-finished", _write_schema)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
