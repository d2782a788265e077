"""``charlm serve``: a local web playground and a streaming HTTP API (see :mod:`charlm.serve.server`)."""

from charlm.serve.server import ServeConfig, make_server

__all__ = ["ServeConfig", "make_server"]
