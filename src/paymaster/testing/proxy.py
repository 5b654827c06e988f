"""Run the governing proxy for tests and benchmarks: in a thread of this process, or as a
real ``paymaster proxy`` process.

Both listen on a socket bound here before the server starts, so a client can connect at
once (the connection waits in the socket's backlog until the server accepts it) and no
other process can take the port.

Usage::

    with run_localstripe() as ls, run_proxy(db_url, "policies.yaml", ls.url) as proxy:
        client = proxy.client(vault_key)
        client.v1.refunds.create(params={"payment_intent": "pi_...", "amount": 500})
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .localstripe import TEST_API_KEY

if TYPE_CHECKING:
    import stripe
    from starlette.applications import Starlette

__all__ = ["RunningProxy", "proxy_client", "run_proxy", "serve_app"]


def proxy_client(url: str, vault_key: str, **kwargs: Any) -> stripe.StripeClient:
    """A ``stripe.StripeClient`` aimed at a proxy with a vault key (no retries unless
    ``max_network_retries`` is given)."""
    import stripe

    kwargs.setdefault("base_addresses", {"api": url})
    kwargs.setdefault("max_network_retries", 0)
    return stripe.StripeClient(vault_key, **kwargs)


@contextlib.contextmanager
def serve_app(app: Starlette) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread; yields its ``http://127.0.0.1:port``.
    On exit, requests in flight finish and the app's shutdown runs."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="paymaster-proxy", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


@dataclass
class RunningProxy:
    """A ``paymaster proxy`` process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    _closed: bool = field(default=False, repr=False)

    def client(self, vault_key: str, **kwargs: Any) -> stripe.StripeClient:
        """A stripe client aimed at this proxy."""
        return proxy_client(self.url, vault_key, **kwargs)

    def kill(self) -> None:
        """SIGKILL: no request in flight finishes, nothing is cleaned up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """One request that waits in the backlog until the proxy has started and answers."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/_paymaster/health")
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise RuntimeError(f"the proxy did not answer ({exc}); exit code {process.poll()}") from exc
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"the proxy is not healthy: {response.status} {body!r}")


@contextlib.contextmanager
def run_proxy(
    db: str,
    policies: str | Path,
    upstream: str,
    *,
    stripe_key: str = TEST_API_KEY,
    args: tuple[str, ...] = (),
    start_timeout: float = 60.0,
    stop_timeout: float = 10.0,
) -> Iterator[RunningProxy]:
    """Start ``paymaster proxy`` on a free 127.0.0.1 port with the real key in its
    environment; stop it (SIGTERM, then SIGKILL) on exit. Its output goes to a log file,
    appended to the error if it fails to start."""
    log_dir = Path(tempfile.mkdtemp(prefix="paymaster-proxy-"))
    log_path = log_dir / "proxy.log"
    with socket.create_server(("127.0.0.1", 0)) as sock, log_path.open("wb") as log:
        port = sock.getsockname()[1]
        env = {**os.environ, "PAYMASTER_STRIPE_KEY": stripe_key, "PYTHONUNBUFFERED": "1"}
        command = [
            sys.executable,
            "-m",
            "paymaster.cli",
            "proxy",
            "--db",
            db,
            "--policies",
            str(policies),
            "--upstream",
            upstream,
            "--fd",
            str(sock.fileno()),
            "--log-level",
            "warning",
            *args,
        ]
        process = subprocess.Popen(
            command,
            pass_fds=(sock.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    running = RunningProxy(f"http://127.0.0.1:{port}", process, log_path)
    try:
        try:
            _wait_healthy(running.url, process, start_timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; proxy output:\n{running.output()[-4000:]}") from exc
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(log_dir, ignore_errors=True)
