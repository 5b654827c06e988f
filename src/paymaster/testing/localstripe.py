"""Run a real localstripe server in a subprocess, for tests that talk to a fake Stripe API.

localstripe's own command line listens on every interface and keeps its whole state in the
fixed file ``/tmp/localstripe.pickle`` (hard-coded, not ``tempfile``), reloaded at start. So
the child process here serves localstripe's aiohttp app itself, on a socket bound to
127.0.0.1 only, and points that state file into a fresh per-server temp directory: every
server starts empty and parallel test runs never share state.

Usage::

    with run_localstripe() as ls:
        customer = ls.client().v1.customers.create(params={"email": "a@example.com"})
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import stripe

TEST_API_KEY = "sk_test_paymaster"

# Runs in the child: argv = [listening socket fd, state directory].
_CHILD = """
import os, pickle, socket, sys
from localstripe import resources

state = os.path.join(sys.argv[2], "localstripe.pickle")

def dump_to_disk(self):
    with open(state, "wb") as f:
        pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

resources.Store.dump_to_disk = dump_to_disk
resources.Store.try_load_from_disk = lambda self: None

from aiohttp import web
from localstripe.server import app

sock = socket.socket(fileno=int(sys.argv[1]))
web.run_app(app, sock=sock, access_log=None, print=None, shutdown_timeout=1.0)
"""


@dataclass(frozen=True)
class LocalStripe:
    """A running localstripe server."""

    url: str
    pid: int
    port: int
    state_dir: Path

    def client(self, **kwargs: Any) -> stripe.StripeClient:
        """A ``stripe.StripeClient`` aimed at this server; ``kwargs`` override the defaults."""
        import stripe

        kwargs.setdefault("api_key", TEST_API_KEY)
        kwargs.setdefault("base_addresses", {"api": self.url})
        return stripe.StripeClient(**kwargs)


def _wait_until_serving(proc: subprocess.Popen[bytes], port: int, deadline: float) -> None:
    """Poll until the server answers any HTTP request, the child dies, or the deadline passes."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"localstripe exited early with code {proc.returncode}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("localstripe did not answer HTTP in time")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=min(remaining, 1.0))
        try:
            conn.request("GET", "/v1/balance")
            conn.getresponse().read()  # any status (401 without a key) means it is serving
            return
        except OSError:
            continue  # connection reset or per-attempt timeout: check the child and retry
        finally:
            conn.close()


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate the child by its PID, then kill it if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextlib.contextmanager
def run_localstripe(
    start_timeout: float = 30.0, stop_timeout: float = 10.0
) -> Iterator[LocalStripe]:
    """Start a fresh localstripe on a free 127.0.0.1 port; stop it and remove its files on exit.

    The listening socket is bound here and handed to the child, so no other process can take
    the port between picking it and serving on it. The child's output goes to ``server.log``
    in its state directory and is appended to the error if it fails to start.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="localstripe-"))
    log_path = state_dir / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with socket.create_server(("127.0.0.1", 0)) as sock, log_path.open("wb") as log:
            port = sock.getsockname()[1]
            env = {**os.environ, "TMPDIR": str(state_dir), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(sock.fileno()), str(state_dir)],
                pass_fds=(sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            _wait_until_serving(proc, port, time.monotonic() + start_timeout)
        except (RuntimeError, TimeoutError) as exc:
            _stop(proc, stop_timeout)
            output = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{exc}; server output:\n{output}") from exc
        yield LocalStripe(f"http://127.0.0.1:{port}", proc.pid, port, state_dir)
    finally:
        if proc is not None:
            _stop(proc, stop_timeout)
        shutil.rmtree(state_dir, ignore_errors=True)
