"""The fake vendor's HTTP face: :class:`VendorServer` serves a
:class:`~paymaster.testing.vendor.FakeVendor` on 127.0.0.1, and :class:`VendorClient`
charges it from any process with the same methods and errors."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._vendor_types import (
    Charge,
    ChargeResult,
    ChargesInAThread,
    Fault,
    VendorError,
    VendorRefused,
    VendorServerError,
)

if TYPE_CHECKING:
    from .vendor import FakeVendor

__all__ = ["VendorClient", "VendorServer"]

_TIMEOUT_HEADER = "X-Sim-Client-Timeout"
_LOST_HEADER = "X-Sim-Connection-Lost"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        body = json.loads(raw or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    def do_GET(self) -> None:
        vendor = self.server.vendor
        if self.path == "/_sim/charges":
            self._send(200, {"charges": [_charge_json(c) for c in vendor.charges()]})
        elif self.path == "/_sim/stats":
            self._send(200, vendor.stats())
        else:
            self._send(404, {"error": {"code": "not_found", "message": self.path}})

    def do_POST(self) -> None:
        vendor = self.server.vendor
        try:
            body = self._body()
        except ValueError as exc:
            self._send(400, {"error": {"code": "bad_request", "message": str(exc)}})
            return
        if self.path == "/_sim/release":
            self._send(200, {"released": vendor.release(body.get("idempotency_key"))})
            return
        if self.path != "/v1/charges":
            self._send(404, {"error": {"code": "not_found", "message": self.path}})
            return
        fault = body.get("fault")
        try:
            result = vendor.charge(
                int(body["amount"]),
                str(body["currency"]),
                idempotency_key=self.headers.get("Idempotency-Key"),
                labels=tuple(body.get("labels") or ()),
                metadata={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
                fault=None if fault is None else Fault(fault),
            )
        except VendorError as exc:
            error = {"code": exc.code, "message": exc.user_message, "request_id": exc.request_id}
            self._send(exc.http_status, {"error": error})
        except TimeoutError as exc:
            # The client's timeout is simulated: it is told to give up now, while the
            # request stays parked at the vendor.
            self._send(504, {"error": {"message": str(exc)}}, {_TIMEOUT_HEADER: "1"})
        except ConnectionResetError as exc:
            # Dropping the socket here would race the client's read; the client raises
            # the reset itself on seeing this header (nothing else of the answer is read).
            self._send(502, {"error": {"message": str(exc)}}, {_LOST_HEADER: "1"})
        except (KeyError, ValueError) as exc:
            self._send(400, {"error": {"code": "bad_request", "message": str(exc)}})
        else:
            self._send(200, asdict(result))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], vendor: FakeVendor) -> None:
        super().__init__(address, _Handler)
        self.vendor = vendor


def _charge_json(charge: Charge) -> dict[str, Any]:
    data = asdict(charge)
    data["labels"] = list(charge.labels)
    data["metadata"] = dict(charge.metadata)
    return data


class VendorServer:
    """Serves a :class:`FakeVendor` over HTTP on 127.0.0.1 (a thread of this process), so
    worker processes charge the same books::

        with VendorServer(vendor) as server:
            client = VendorClient(server.url)   # in any process
    """

    def __init__(self, vendor: FakeVendor, *, port: int = 0) -> None:
        self.vendor = vendor
        self._server = _Server(("127.0.0.1", port), vendor)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-vendor-http", daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> VendorServer:
        """Start serving (idempotent)."""
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> VendorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class VendorClient(ChargesInAThread):
    """A small client of :class:`VendorServer` (stdlib ``http.client``, one connection
    per request), with the same methods and errors as :class:`FakeVendor`.

    ``timeout`` is a safety net only: the vendor's timeouts are simulated and answered
    at once.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"expected http://host:port, got {url!r}")
        self._host, self._port = parts.hostname, parts.port
        self._timeout = timeout

    def _request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Mapping[str, str], Any]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            sent = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            payload = json.loads(response.read() or b"null")
            return response.status, dict(response.headers.items()), payload
        finally:
            conn.close()

    def charge(
        self,
        amount: int,
        currency: str,
        *,
        idempotency_key: str | None = None,
        labels: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        fault: Fault | None = None,
    ) -> ChargeResult:
        """:meth:`FakeVendor.charge`, over HTTP."""
        body: dict[str, Any] = {
            "amount": amount,
            "currency": currency,
            "labels": list(labels),
            "metadata": dict(metadata or {}),
        }
        if fault is not None:
            body["fault"] = Fault(fault).value
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        status, response_headers, payload = self._request("POST", "/v1/charges", body, headers)
        lowered = {k.lower(): v for k, v in response_headers.items()}
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            error = {}
        if lowered.get(_TIMEOUT_HEADER.lower()):
            raise TimeoutError(error.get("message", "timed out"))
        if lowered.get(_LOST_HEADER.lower()):
            raise ConnectionResetError(error.get("message", "connection reset"))
        if status == 200:
            return ChargeResult(**payload)
        kind = VendorServerError if status >= 500 else VendorRefused
        raise kind(
            status,
            str(error.get("code", "error")),
            str(error.get("message", "")),
            str(error.get("request_id", "")),
        )

    def release(self, idempotency_key: str | None = None) -> int:
        """:meth:`FakeVendor.release`, over HTTP."""
        _, _, payload = self._request("POST", "/_sim/release", {"idempotency_key": idempotency_key})
        return int(payload["released"])

    def charges(self) -> list[Charge]:
        """:meth:`FakeVendor.charges`, over HTTP."""
        _, _, payload = self._request("GET", "/_sim/charges")
        return [
            Charge(**{**c, "labels": tuple(c["labels"]), "metadata": dict(c["metadata"])})
            for c in payload["charges"]
        ]

    def stats(self) -> dict[str, Any]:
        """:meth:`FakeVendor.stats`, over HTTP."""
        _, _, payload = self._request("GET", "/_sim/stats")
        return dict(payload)
