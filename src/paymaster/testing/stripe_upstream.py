"""A fake Stripe upstream that keeps Stripe's own books: every charge and refund it makes.

It speaks Stripe's form-encoded API on 127.0.0.1 well enough for the real ``stripe``
client, paymaster's catalogue and its proxy, and serves what localstripe cannot:
``auto_advance`` and ``collection_method`` on invoices, and idempotency keys as Stripe
honours them. It knows:

* customers (create, retrieve), prices (create), PaymentIntents (create with ``amount``,
  ``currency``, ``customer``; ``confirm=true`` charges at once; retrieve, with
  ``expand[]=latest_charge``), charges (retrieve);
* refunds (create) of a charge or a PaymentIntent, with or without ``amount`` (without:
  what remains), never more than remains;
* invoices: create (a draft; ``collection_method``, ``auto_advance``), invoice items
  (``amount``/``currency`` or ``price``, on a draft ``invoice``: added to its
  ``amount_due``), finalize (with ``auto_advance`` true and ``charge_automatically``,
  the amount due is charged at once), retrieve.

**Idempotency**, as Stripe does it: a POST repeating a key with the same parameters
gets the first response (``Idempotent-Replayed: true``) and acts no more; a key still in
flight answers ``409 idempotency_key_in_use``; a used key with other parameters answers
``400`` (``idempotency_error``). 429s and 5xx raised before acting are not stored; a 5xx
after acting or a lost response leaves the action's own response stored, so a retry
replays it.

**Faults**, scripted per idempotency key (:meth:`StripeUpstream.script`), one per request
with that key, in order: ``429`` or ``500`` before acting, ``500`` after acting, the
response lost after acting (the connection is closed), and a slow answer: the request is
parked, in flight, until :meth:`StripeUpstream.release` lets it act (``SLOW``) or drops
it (``SLOW_DROPPED``); a client's timeout ends its wait meanwhile. Nothing waits on a
clock except the safety nets against a stuck test.

**The books**: :meth:`StripeUpstream.movements` lists every charge and refund made, with
its customer, the customer's ``metadata[label]``, the idempotency key and the API key of
the request that made it, so a test can compare them with a ledger::

    with StripeUpstream() as upstream:
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": upstream.url})
        ...
        upstream.totals(api_key="sk_test_x")   # {("agent-a", "usd"): 12500, ...}

The objects and the books live in :mod:`._stripe_objects`; :class:`Movement` is importable
from here.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ._stripe_objects import Movement, _Error, _Request, _StripeObjects

__all__ = ["Fault", "Movement", "StripeUpstream"]

#: A safety net against a stuck test (a parked request nobody releases), never a means
#: of synchronisation.
STUCK_AFTER = 60.0


class Fault(str, Enum):
    """What goes wrong with one request."""

    NONE = "none"
    RATE_LIMITED = "rate_limited"
    """``429`` before anything is done; not stored."""
    ERROR_BEFORE = "error_before"
    """``500`` before anything is done; not stored."""
    ERROR_AFTER = "error_after"
    """The action is done (and its response stored), then ``500`` is answered."""
    LOST_AFTER = "lost_after"
    """The action is done (and its response stored), then the connection is closed."""
    SLOW = "slow"
    """Parked, in flight, until released; then it acts (its answer reaches nobody whose
    client gave up)."""
    SLOW_DROPPED = "slow_dropped"
    """Parked until released; then dropped without acting (and without storing)."""

    def __str__(self) -> str:
        return self.value

    @property
    def acts(self) -> bool:
        """Whether a first (not replayed) request meeting this fault acts."""
        return self in (Fault.NONE, Fault.ERROR_AFTER, Fault.LOST_AFTER, Fault.SLOW)


@dataclass
class _Stored:
    """An idempotency key's record: in flight (``response is None``) or done."""

    fingerprint: str
    response: tuple[int, dict[str, Any]] | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Parked:
    release: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    act: bool = True


class StripeUpstream(_StripeObjects):
    """The fake Stripe: its objects, its idempotency store, its faults and its books."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._objects: dict[str, dict[str, Any]] = {}
        self._keys: dict[tuple[str, str], _Stored] = {}
        self._script: dict[str, deque[Fault]] = {}
        self._parked: dict[str, _Parked] = {}
        self._gates: dict[str, tuple[threading.Event, threading.Event]] = {}
        self._movements: list[Movement] = []
        self._faults: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the server --------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Stripe is not serving; use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StripeUpstream:
        upstream = self

        class Handler(_Handler):
            fake = upstream

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-stripe", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(act=False)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    # -- faults --------------------------------------------------------------------------
    # Faults are scripted, and parked requests released, by the key the client sent:
    # paymaster sends it to Stripe scoped to the agent type and run, as ``key~digest``.
    def script(self, idempotency_key: str, *faults: Fault) -> None:
        """The faults the next requests with this key meet, one each, in order."""
        with self._lock:
            self._script.setdefault(idempotency_key, deque()).extend(faults)

    def release(self, idempotency_key: str | None = None, *, act: bool | None = None) -> int:
        """Let parked requests (one key's, or all) finish: each acts as its fault says (or
        as ``act`` overrides). Waits until they have. A ``SLOW`` fault still scripted for
        the key (its request has not arrived) is unscripted, so it will act at once.
        Returns how many were parked."""
        with self._lock:
            if idempotency_key is not None:
                queue = self._script.get(idempotency_key)
                if queue:
                    kept = [f for f in queue if f not in (Fault.SLOW, Fault.SLOW_DROPPED)]
                    self._script[idempotency_key] = deque(kept)
                keys = [idempotency_key] if idempotency_key in self._parked else []
            else:
                keys = list(self._parked)
            parked = [self._parked.pop(k) for k in keys]
        for entry in parked:
            if act is not None:
                entry.act = act
            entry.release.set()
        for entry in parked:
            entry.finished.wait(STUCK_AFTER)
        return len(parked)

    def gate_finalize(self, invoice: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next finalize of ``invoice`` once it arrives, before it acts: returns
        ``(arrived, proceed)``. The finalize sets ``arrived``, then waits for ``proceed``
        (a test adds to the invoice meanwhile)."""
        events = (threading.Event(), threading.Event())
        with self._lock:
            self._gates[invoice] = events
        return events

    # -- the books -----------------------------------------------------------------------
    def movements(self) -> list[Movement]:
        """Every charge and refund made, in order."""
        with self._lock:
            return list(self._movements)

    def totals(self, *, api_key: str | None = None) -> dict[tuple[str | None, str], int]:
        """Money moved per ``(label, currency)``: charges plus refunds (both are money an
        agent moved), only by requests made with ``api_key`` if given."""
        totals: Counter[tuple[str | None, str]] = Counter()
        for m in self.movements():
            if api_key is None or m.api_key == api_key:
                totals[(m.label, m.currency)] += m.amount
        return dict(totals)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            kinds = Counter(m.kind for m in self._movements)
            return {
                "requests": dict(self._requests),
                "faults": dict(self._faults),
                "charges": kinds["charge"],
                "refunds": kinds["refund"],
                "parked": len(self._parked),
            }

    def get(self, object_id: str) -> dict[str, Any]:
        """A copy of one object, as stored."""
        with self._lock:
            return json.loads(json.dumps(self._objects[object_id]))  # type: ignore[no-any-return]

    # -- handling one request ------------------------------------------------------------
    def handle(self, req: _Request) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """Answer one request: ``(status, body, headers)``, or ``None`` to drop the
        connection without an answer."""
        slot = (req.api_key, req.idempotency_key or "")
        fingerprint = json.dumps([req.method, req.path, sorted(req.params.items())])
        keyed = req.method == "POST" and req.idempotency_key is not None
        with self._lock:  # one step: a release() never falls between the draw and the park
            self._requests[f"{req.method} {_route(req.path)}"] += 1
            fault = Fault.NONE
            if keyed:
                queue = self._script.get(client_key(slot[1]))
                if queue:
                    fault = queue.popleft()
            self._faults[fault.value] += 1
            if fault is Fault.RATE_LIMITED:
                return _error(
                    _Error(429, "invalid_request_error", "rate_limit", "Too many requests")
                )
            if fault is Fault.ERROR_BEFORE:
                return _error(_Error(500, "api_error", None, "An unexpected error occurred"))
            if not keyed:
                stored = None
            else:
                claimed = self._claim_key(slot, fingerprint)
                if not isinstance(claimed, _Stored):
                    return claimed
                stored = claimed
            parked = None
            if fault in (Fault.SLOW, Fault.SLOW_DROPPED):
                parked = self._parked[client_key(slot[1])] = _Parked(act=fault is Fault.SLOW)
        if stored is None:
            status, body = self._act(req)
            return status, body, {}
        if parked is not None:
            self._finish_parked(req, slot, stored, parked)
            return None
        stored.response = self._act(req)
        if fault is Fault.ERROR_AFTER:
            return _error(_Error(500, "api_error", None, "An unexpected error occurred"))
        if fault is Fault.LOST_AFTER:
            return None
        status, body = stored.response
        return status, body, {}

    def _claim_key(
        self, slot: tuple[str, str], fingerprint: str
    ) -> _Stored | tuple[int, dict[str, Any], dict[str, str]]:
        """A keyed POST's record, made now for a new key; for a used key, its answer
        instead: the stored response replayed, or a refusal (other parameters, or still in
        flight). Called holding the lock."""
        if (stored := self._keys.get(slot)) is not None:
            if stored.fingerprint != fingerprint:
                return _error(
                    _Error(
                        400,
                        "idempotency_error",
                        None,
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                    )
                )
            if stored.response is None:
                return _error(
                    _Error(
                        409,
                        "invalid_request_error",
                        "idempotency_key_in_use",
                        "There is currently another in-progress request using this "
                        "Stripe-Idempotency-Key; please try again later.",
                    )
                )
            status, body = stored.response
            return status, body, {"Idempotent-Replayed": "true"}
        stored = self._keys[slot] = _Stored(fingerprint)
        return stored

    def _finish_parked(
        self, req: _Request, slot: tuple[str, str], stored: _Stored, parked: _Parked
    ) -> None:
        """Wait until a parked request is released, then act (storing the response) or
        drop it (forgetting the key); either way nobody hears an answer."""
        parked.release.wait(STUCK_AFTER)
        try:
            if not parked.act:
                with self._lock:
                    del self._keys[slot]
                return None
            stored.response = self._act(req)
            return None
        finally:
            parked.finished.set()

    def _act(self, req: _Request) -> tuple[int, dict[str, Any]]:
        gate = None
        parts = req.path.strip("/").split("/")
        if req.method == "POST" and len(parts) == 4 and parts[1:4:2] == ["invoices", "finalize"]:
            with self._lock:
                gate = self._gates.pop(parts[2], None)
        if gate is not None:
            arrived, proceed = gate
            arrived.set()
            proceed.wait(STUCK_AFTER)
        try:
            with self._lock:
                return 200, self._route(req)
        except _Error as err:
            return err.status, err.body()


def client_key(sent: str) -> str:
    """The key a client gave, from the Idempotency-Key paymaster sent for it
    (``key~digest``, scoped to the agent type and run)."""
    return sent.split("~", 1)[0]


def _route(path: str) -> str:
    """``/v1/invoices/{id}/finalize`` for ``/v1/invoices/in_1/finalize``."""
    parts = path.split("/")
    if len(parts) > 3:
        parts[3] = "{id}"
    return "/".join(parts)


def _error(err: _Error) -> tuple[int, dict[str, Any], dict[str, str]]:
    return err.status, err.body(), {}


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request: parsed, answered by the fake, one request per connection."""

    fake: StripeUpstream
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        auth = self.headers.get("Authorization") or ""
        api_key = auth.removeprefix("Bearer ").strip()
        if not api_key.startswith("sk_"):
            self._answer(
                *_error(_Error(401, "invalid_request_error", None, "Invalid API Key provided"))
            )
            return
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        params = dict(parse_qsl(body, keep_blank_values=True)) if method == "POST" else query
        expand = frozenset(v for k, v in {**query, **params}.items() if k.startswith("expand"))
        request = _Request(
            method,
            parts.path,
            query,
            params,
            expand,
            body,
            api_key,
            self.headers.get("Idempotency-Key"),
        )
        try:
            answer = self.fake.handle(request)
        except Exception as exc:  # a bug in the fake: say so rather than hang the client
            answer = _error(_Error(500, "api_error", "fake_stripe_bug", repr(exc)))
        if answer is None:
            self.close_connection = True
            return
        self._answer(*answer)

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
            if self.headers.get("Idempotency-Key"):
                self.send_header("Idempotency-Key", self.headers["Idempotency-Key"])
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (a timeout): nobody hears this answer
            pass
