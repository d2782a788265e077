"""``charlm serve``: a local web playground and a streaming HTTP API (see :mod:`charlm.serve.app`).

Importing this package needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""

from charlm.serve.host import Server, make_server
from charlm.serve.server import ServeConfig

__all__ = ["ServeConfig", "Server", "make_server"]
