"""A fake paid-API vendor that keeps its own books: the truth a ledger is checked against.

The vendor records every charge it actually makes, whatever its client was told. It
behaves, where money is concerned, like a real payments API:

* **Idempotency keys.** A request that repeats a completed key is answered with the first
  result and charges nothing; a request whose key is still being processed gets a
  ``409`` ("in progress") and charges nothing.
* **Refusals after which nothing moved**: ``402`` (card declined, stored for replay like
  any finished request) and ``429`` (rate limited, not stored).
* **Server errors** (``5xx``) either *before* the charge (nothing moved) or *after* it (the
  money moved, but the client sees an error; a retry with the same key replays the
  charge).
* **A lost response**: the vendor charges, then the connection drops; the client gets a
  :class:`ConnectionResetError`.
* **Slow calls that time out**: the client gives up at once with :class:`TimeoutError`
  while the request stays *parked*, in progress, at the vendor (its key answers ``409``)
  until :meth:`FakeVendor.release` lets it finish, charging or not as its fault says.
  Nothing waits on a clock, so a run replays exactly.

Which fault a request meets is chosen, in this order, by the ``fault=`` passed with it, by
the next entry of a script given to :meth:`FakeVendor.script`, or by the seeded
``random.Random`` the vendor was built with (otherwise: no fault)::

    vendor = FakeVendor(rng=random.Random(1234), faults={Fault.LOST_AFTER_CHARGE: 0.1})
    result = vendor.charge(2500, "USD", idempotency_key=call.idempotency_key,
                           labels=("day:refund-agent",))
    vendor.total(label="day:refund-agent")       # {"USD": 2500}

The same books are reachable over HTTP on 127.0.0.1 (:class:`VendorServer`, for worker
processes) through :class:`VendorClient`, whose methods mirror the in-process ones.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "Charge",
    "ChargeResult",
    "FakeVendor",
    "Fault",
    "VendorAPI",
    "VendorClient",
    "VendorError",
    "VendorRefused",
    "VendorServer",
    "VendorServerError",
]


class Fault(str, Enum):
    """What goes wrong with one request, and whether money moves."""

    NONE = "none"
    """The charge is made and answered."""
    DECLINED = "declined"
    """``402``: refused (card declined); nothing moved. Stored: a replay answers 402."""
    RATE_LIMITED = "rate_limited"
    """``429`` before anything is done; nothing moved; not stored."""
    RATE_LIMITED_AFTER_CHARGE = "rate_limited_after_charge"
    """``429`` *after* charging: a misbehaving vendor, whose 429 a client cannot tell
    from an honest one. Never chosen unless asked for."""
    SERVER_ERROR_BEFORE = "server_error_before"
    """``503`` before anything is done; nothing moved; not stored."""
    SERVER_ERROR_AFTER = "server_error_after"
    """``500`` after the charge: the money moved; a replay answers the charge."""
    LOST_BEFORE = "lost_before"
    """The connection drops before the request reaches the vendor: nothing moved, but the
    client sees a :class:`ConnectionResetError`."""
    LOST_AFTER_CHARGE = "lost_after_charge"
    """The vendor charges, then the response is lost (:class:`ConnectionResetError`)."""
    TIMEOUT_THEN_CHARGE = "timeout_then_charge"
    """The client times out (:class:`TimeoutError`); the parked request charges when
    released."""
    TIMEOUT_NO_CHARGE = "timeout_no_charge"
    """The client times out; the parked request is dropped uncharged when released."""

    def __str__(self) -> str:
        return self.value

    @property
    def moves_money(self) -> bool:
        """Whether a first (not replayed) request with this fault ends up charged."""
        return self in _CHARGING


_CHARGING = frozenset(
    {
        Fault.NONE,
        Fault.RATE_LIMITED_AFTER_CHARGE,
        Fault.SERVER_ERROR_AFTER,
        Fault.LOST_AFTER_CHARGE,
        Fault.TIMEOUT_THEN_CHARGE,
    }
)
_TIMEOUTS = frozenset({Fault.TIMEOUT_THEN_CHARGE, Fault.TIMEOUT_NO_CHARGE})


class VendorError(Exception):
    """An error answer from the vendor. Shaped like a payments SDK's error (an
    ``http_status`` and a ``user_message``), so agent adapters can tell a model about it."""

    def __init__(self, http_status: int, code: str, message: str, request_id: str) -> None:
        super().__init__(f"HTTP {http_status} {code}: {message}")
        self.http_status = http_status
        self.code = code
        self.user_message = message
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.http_status, self.code, self.user_message, self.request_id))


class VendorRefused(VendorError):
    """A ``4xx``: the vendor refused the request (declined, rate limited, in progress,
    bad request)."""


class VendorServerError(VendorError):
    """A ``5xx``: whether money moved is not known to the client."""


@dataclass(frozen=True)
class ChargeResult:
    """A successful answer: the charge, possibly replayed from an earlier request."""

    charge_id: str
    amount: int
    currency: str
    idempotency_key: str | None
    replayed: bool
    request_id: str


@dataclass(frozen=True)
class Charge:
    """One entry of the vendor's books: money that actually moved."""

    charge_id: str
    seq: int
    amount: int
    currency: str
    idempotency_key: str | None
    labels: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)


class VendorAPI(Protocol):
    """What :class:`FakeVendor` and :class:`VendorClient` both offer."""

    def charge(
        self,
        amount: int,
        currency: str,
        *,
        idempotency_key: str | None = None,
        labels: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        fault: Fault | None = None,
    ) -> ChargeResult: ...

    def release(self, idempotency_key: str | None = None) -> int: ...


@dataclass(frozen=True)
class _Request:
    amount: int
    currency: str
    key: str | None
    labels: tuple[str, ...]
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class _Stored:
    """The stored answer of a finished request, replayed for its key."""

    status: int
    charge: Charge | None
    request: _Request
    code: str = ""
    message: str = ""


@dataclass
class _Parked:
    fault: Fault
    request: _Request
    request_id: str


class FakeVendor:
    """A thread-safe, stateful fake vendor keeping the books of every charge it makes.

    ``rng`` and ``faults`` (weights per :class:`Fault`, the rest of the probability being
    :attr:`Fault.NONE`) choose the faults of requests that name none and meet no script.
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        faults: Mapping[Fault, float] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._rng = rng
        weights = dict(faults or {})
        if sum(weights.values()) > 1.0:
            raise ValueError("fault weights must add up to at most 1")
        self._weights = [(fault, float(w)) for fault, w in weights.items() if w > 0]
        self._script: list[Fault] = []
        self._charges: list[Charge] = []
        self._stored: dict[str, _Stored] = {}
        self._in_flight: set[str] = set()
        self._parked: list[_Parked] = []
        self._ids = itertools.count(1)
        self._requests = 0
        self._faults: Counter[str] = Counter()
        self._answers: Counter[str] = Counter()

    # -- faults ---------------------------------------------------------------------------
    def script(self, *faults: Fault) -> None:
        """Queue faults for the next requests that name none, in order."""
        with self._lock:
            self._script.extend(Fault(f) for f in faults)

    def _choose(self, fault: Fault | None) -> Fault:
        if fault is not None:
            return Fault(fault)
        if self._script:
            return self._script.pop(0)
        if self._rng is None or not self._weights:
            return Fault.NONE
        draw = self._rng.random()
        for candidate, weight in self._weights:
            if draw < weight:
                return candidate
            draw -= weight
        return Fault.NONE

    # -- the API ----------------------------------------------------------------------------
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
        """Charge ``amount`` minor units of ``currency``.

        ``labels`` tag the charge in the books (budget names, say: :meth:`total` sums per
        label); ``metadata`` is kept with it. Returns the charge, or the first result of a
        completed ``idempotency_key``; raises :class:`VendorRefused`,
        :class:`VendorServerError`, :class:`ConnectionResetError` or
        :class:`TimeoutError` as the request's fault says.
        """
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"amount must be a non-negative int of minor units, not {amount!r}")
        request = _Request(
            amount, currency.upper(), idempotency_key, tuple(labels), dict(metadata or {})
        )
        with self._lock:
            self._requests += 1
            request_id = f"req_{next(self._ids)}"
            chosen = self._choose(fault)
            self._faults[chosen.value] += 1
            result = self._handle(request, chosen, request_id)
            self._answers[_answer_name(result)] += 1
        if isinstance(result, BaseException):
            raise result
        return result

    async def acharge(
        self,
        amount: int,
        currency: str,
        *,
        idempotency_key: str | None = None,
        labels: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        fault: Fault | None = None,
    ) -> ChargeResult:
        """:meth:`charge` for asyncio (run in a worker thread, like a blocking client)."""
        return await asyncio.to_thread(
            self.charge,
            amount,
            currency,
            idempotency_key=idempotency_key,
            labels=labels,
            metadata=metadata,
            fault=fault,
        )

    def _handle(
        self, request: _Request, fault: Fault, request_id: str
    ) -> ChargeResult | BaseException:
        key = request.key
        # Faults that strike before the vendor looks at the request.
        if fault is Fault.LOST_BEFORE:
            return ConnectionResetError(f"connection reset before {request_id} was sent")
        if fault is Fault.RATE_LIMITED:
            return VendorRefused(429, "rate_limited", "too many requests", request_id)
        if fault is Fault.SERVER_ERROR_BEFORE:
            return VendorServerError(503, "unavailable", "service unavailable", request_id)
        # Idempotency: a key in progress is refused, a finished one replayed.
        if key is not None:
            if key in self._in_flight:
                return VendorRefused(
                    409,
                    "idempotency_in_progress",
                    f"a request with idempotency key {key!r} is in progress",
                    request_id,
                )
            stored = self._stored.get(key)
            if stored is not None:
                return self._replay(stored, request, fault, request_id)
        if fault in _TIMEOUTS:
            if key is not None:
                self._in_flight.add(key)
            self._parked.append(_Parked(fault, request, request_id))
            return TimeoutError(f"the client gave up waiting for {request_id}")
        if fault is Fault.DECLINED:
            if key is not None:
                self._stored[key] = _Stored(402, None, request, "card_declined", "declined")
            return VendorRefused(402, "card_declined", "your card was declined", request_id)
        charge = self._book(request)
        if fault is Fault.SERVER_ERROR_AFTER:
            return VendorServerError(500, "internal", "internal server error", request_id)
        if fault is Fault.LOST_AFTER_CHARGE:
            return ConnectionResetError(f"connection reset awaiting the answer to {request_id}")
        if fault is Fault.RATE_LIMITED_AFTER_CHARGE:
            return VendorRefused(429, "rate_limited", "too many requests", request_id)
        return _result(charge, replayed=False, request_id=request_id)

    def _replay(
        self, stored: _Stored, request: _Request, fault: Fault, request_id: str
    ) -> ChargeResult | BaseException:
        first = stored.request
        if (first.amount, first.currency) != (request.amount, request.currency):
            return VendorRefused(
                400,
                "idempotency_error",
                f"idempotency key {request.key!r} was used with other parameters",
                request_id,
            )
        if fault in (Fault.LOST_AFTER_CHARGE, Fault.SERVER_ERROR_AFTER) or fault in _TIMEOUTS:
            # The replay is answered, but the answer is lost (nothing charged again).
            if fault is Fault.SERVER_ERROR_AFTER:
                return VendorServerError(500, "internal", "internal server error", request_id)
            if fault in _TIMEOUTS:
                return TimeoutError(f"the client gave up waiting for {request_id}")
            return ConnectionResetError(f"connection reset awaiting the answer to {request_id}")
        if stored.charge is None:
            return VendorRefused(stored.status, stored.code, stored.message, request_id)
        return _result(stored.charge, replayed=True, request_id=request_id)

    def _book(self, request: _Request) -> Charge:
        seq = len(self._charges) + 1
        charge = Charge(
            charge_id=f"ch_{seq}",
            seq=seq,
            amount=request.amount,
            currency=request.currency,
            idempotency_key=request.key,
            labels=request.labels,
            metadata=request.metadata,
        )
        self._charges.append(charge)
        if request.key is not None:
            self._stored[request.key] = _Stored(200, charge, request)
        return charge

    def release(self, idempotency_key: str | None = None) -> int:
        """Let parked (timed-out) requests finish: those of ``idempotency_key``, or all.
        Each charges or is dropped as its fault says, and frees its key. Returns how many
        finished."""
        with self._lock:
            done = [p for p in self._parked if idempotency_key in (None, p.request.key)]
            self._parked = [p for p in self._parked if p not in done]
            for parked in done:
                key = parked.request.key
                if key is not None:
                    self._in_flight.discard(key)
                if parked.fault is Fault.TIMEOUT_THEN_CHARGE:
                    self._book(parked.request)
            return len(done)

    async def arelease(self, idempotency_key: str | None = None) -> int:
        """:meth:`release` for asyncio."""
        return await asyncio.to_thread(self.release, idempotency_key)

    # -- the books --------------------------------------------------------------------------
    def charges(self) -> list[Charge]:
        """Every charge made, in order."""
        with self._lock:
            return list(self._charges)

    def total(self, *, label: str | None = None) -> dict[str, int]:
        """Minor units charged per currency, of every charge or of those tagged ``label``."""
        totals: dict[str, int] = {}
        for charge in self.charges():
            if label is None or label in charge.labels:
                totals[charge.currency] = totals.get(charge.currency, 0) + charge.amount
        return totals

    def totals_by_label(self) -> dict[tuple[str, str], int]:
        """Minor units charged per (label, currency)."""
        totals: dict[tuple[str, str], int] = {}
        for charge in self.charges():
            for label in charge.labels:
                totals[label, charge.currency] = totals.get((label, charge.currency), 0) + (
                    charge.amount
                )
        return totals

    def parked(self) -> int:
        """How many timed-out requests are still in progress."""
        with self._lock:
            return len(self._parked)

    def stats(self) -> dict[str, Any]:
        """Requests seen, faults injected and answers given, by kind."""
        with self._lock:
            return {
                "requests": self._requests,
                "charges": len(self._charges),
                "faults": dict(self._faults),
                "answers": dict(self._answers),
                "parked": len(self._parked),
            }


def _result(charge: Charge, *, replayed: bool, request_id: str) -> ChargeResult:
    return ChargeResult(
        charge.charge_id,
        charge.amount,
        charge.currency,
        charge.idempotency_key,
        replayed,
        request_id,
    )


def _answer_name(result: ChargeResult | BaseException) -> str:
    if isinstance(result, ChargeResult):
        return "replayed" if result.replayed else "charged"
    if isinstance(result, VendorError):
        return str(result.http_status)
    return type(result).__name__


# -- the HTTP face ------------------------------------------------------------------------------
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


class VendorClient:
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

    async def acharge(
        self,
        amount: int,
        currency: str,
        *,
        idempotency_key: str | None = None,
        labels: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        fault: Fault | None = None,
    ) -> ChargeResult:
        """:meth:`charge` for asyncio (in a worker thread)."""
        return await asyncio.to_thread(
            self.charge,
            amount,
            currency,
            idempotency_key=idempotency_key,
            labels=labels,
            metadata=metadata,
            fault=fault,
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
