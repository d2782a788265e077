"""Sphinx configuration for charlm's documentation.

Build it strictly, as CI does (every warning, broken cross-reference included, fails the build):

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

import charlm  # noqa: E402  (installed with: pip install -e ".[docs]")

project = "charlm"
author = "the charlm authors"
copyright = "2026, the charlm authors"
release = version = charlm.__version__

extensions = [
    "myst_parser",  # Markdown pages
    "sphinx.ext.autodoc",  # the Python API, from docstrings
    "sphinx_click",  # the CLI reference, from the click commands
    "charlm_openapi",  # the HTTP API reference, from the server's OpenAPI schema (docs/_ext)
    "charlm_options",  # tables of a command's options and defaults, from the click commands (docs/_ext)
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

myst_enable_extensions = ["colon_fence", "deflist"]
# Smart quotes, not smart dashes: the commands' help texts (the CLI reference, from click) name options in
# plain text ("into --dir"), and docutils would print their "--" as an en dash, which a shell does not take.
smartquotes_action = "qe"
myst_heading_anchors = 3

html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["charlm.css"]
html_title = f"charlm {release}"

# autodoc: the signatures show type hints as written; members in source order.
autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # torch's nn.Module.forward docstring is not charlm's

# -n (nitpicky) reports every reference that does not resolve. The ones below name types from other
# projects in charlm's signatures and docstrings: the build has no network, so intersphinx cannot fetch
# their inventories, and these are deliberately left unlinked. Each is listed by name; anything else
# that does not resolve fails the build.
_EXTERNAL = [
    # PyTorch
    "torch.Tensor", "Tensor", "torch.device", "torch.dtype", "torch.Generator", "torch.nn.Module", "nn.Module",
    "torch.optim.Optimizer", "torch.amp.GradScaler",
    # NumPy
    "np.ndarray", "numpy.ndarray", "np.dtype", "numpy.dtype", "np.memmap",
    # the standard library (no local copy of Python's inventory)
    "Path", "pathlib.Path", "os.PathLike", "Iterator", "collections.abc.Iterator", "Iterable",
    "collections.abc.Iterable", "Callable", "collections.abc.Callable", "Sequence", "collections.abc.Sequence",
    "Mapping", "subprocess.Popen", "threading.Thread", "asyncio.Queue", "asyncio.AbstractEventLoop",
    "socket.socket", "io.TextIOBase", "HTTPStatus", "http.HTTPStatus",
    # third-party servers and formats
    "torch.nn.modules.module.Module",
    # pydantic's annotations of the request bodies' fields (charlm.serve.schemas)
    "annotated_types.Ge", "annotated_types.Gt", "annotated_types.Le", "pydantic.types.AllowInfNan",
    "types.Annotated", "pydantic.main.BaseModel",
    "asyncio.events.AbstractEventLoop", "asyncio.queues.Queue", "collections.deque", "threading.Event",
    "starlette.responses.JSONResponse",
    "fastapi.Request", "Request", "starlette.datastructures.Headers", "Headers", "JSONResponse",
    "pydantic.BaseModel", "BaseModel", "tokenizers.Tokenizer", "onnxruntime.InferenceSession",
]
# charlm.data's iterators share a private base class, which make_batches names as its return type.
# The same for the server engine's private row state, and the schemas' type alias of a stop field.
_PRIVATE = ["charlm.data._Batches", "charlm.serve.engine._Row", "Stop"]
nitpick_ignore = [("py:class", name) for name in _EXTERNAL + _PRIVATE]


def _escape_click_help(app, ctx, lines):
    """The commands' help is plain text for a terminal; as reST, ``*.txt`` would open an emphasis."""
    lines[:] = [line.replace(" *.", r" \*.") for line in lines]


def _show_defaults(command) -> None:
    """``charlm --help`` shows every option's default (the group's ``show_default`` context setting);
    sphinx-click builds its own contexts, without that setting, so the options say it themselves here."""
    import click

    for param in command.params:
        if isinstance(param, click.Option) and param.show_default is None and not param.is_flag:
            param.show_default = True
    for sub in getattr(command, "commands", {}).values():
        _show_defaults(sub)


def _drop_type_docstring(app, what, name, obj, options, lines):
    """A constant without a doc comment would show its type's docstring (dict's, tuple's): drop it."""
    own = (type(obj).__doc__ or "").strip().splitlines()
    if what in ("data", "attribute") and lines and own and lines[0].strip() == own[0].strip():
        lines[:] = []


def setup(app):
    from charlm.cli import main

    _show_defaults(main)
    app.connect("autodoc-process-docstring", _drop_type_docstring)
    app.connect("sphinx-click-process-description", _escape_click_help)
    app.connect("sphinx-click-process-options", _escape_click_help)
