"""Binding and running ``charlm serve``: uvicorn on a socket bound here, and the engine beside it."""

from __future__ import annotations

import socket
import threading

import uvicorn

from charlm.serve.app import build_app
from charlm.serve.metrics import Metrics
from charlm.serve.server import ServeConfig, Service


class Server:
    """uvicorn serving the app on a socket bound here (so port 0 has its number at once).

    :meth:`serve_forever` runs the HTTP loop in the calling thread (``charlm serve``: a thread of its
    own); :meth:`shutdown` stops it from another; with ``engine_thread`` the engine runs on a thread
    too, else the caller runs ``server.service.engine.run()``.
    """

    def __init__(self, service: Service, engine_thread: bool):
        self.service = service
        config = service.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((config.host, config.port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            build_app(service, port=self.server_address[1]), log_level="warning", access_log=False,
            lifespan="off", timeout_keep_alive=5, timeout_graceful_shutdown=2, server_header=False))
        self.engine_thread = None
        if engine_thread:
            self.engine_thread = threading.Thread(target=service.engine.run, name="charlm-engine", daemon=True)
            self.engine_thread.start()
        self.done = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.done.set()

    def shutdown(self) -> None:
        self.service.engine.stop()  # every request in flight ends ("cancelled"), so every stream closes
        self.uvicorn.should_exit = True
        if self.uvicorn.started:
            self.done.wait(10)
        if self.engine_thread is not None:
            self.engine_thread.join(5)

    def server_close(self) -> None:
        self.socket.close()


def make_server(ckpt, config: ServeConfig, model_id: str = "charlm", command_checkpoint: str = "",
                engine_thread: bool = True) -> Server:
    """A server bound to ``config.host``/``config.port`` (port 0: a free one), not yet serving."""
    service = Service(ckpt, config, model_id, command_checkpoint, metrics=Metrics(config.slots))
    return Server(service, engine_thread)
