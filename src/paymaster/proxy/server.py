"""Serve the proxy with uvicorn."""

from __future__ import annotations

import socket

import uvicorn

from .._governor import Governor
from .app import create_app
from .config import ProxyConfig

__all__ = ["serve"]


def serve(
    governor: Governor,
    config: ProxyConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8421,
    fd: int | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Run the proxy until interrupted (SIGINT/SIGTERM finish the requests in flight).

    ``fd`` serves on an inherited listening socket instead of binding ``host:port`` (how a
    supervisor or a test hands over a socket it bound).
    """
    app = create_app(governor, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            lifespan="on",
            server_header=False,
            proxy_headers=False,
        )
    )
    if fd is None:
        server.run()
    else:
        server.run(sockets=[socket.socket(fileno=fd)])
