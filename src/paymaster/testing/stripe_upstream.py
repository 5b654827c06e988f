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
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

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


@dataclass(frozen=True)
class Movement:
    """One charge or refund the fake Stripe actually made."""

    kind: str
    """``charge`` or ``refund``."""
    id: str
    amount: int
    currency: str
    customer: str | None
    label: str | None
    """The customer's ``metadata[label]``: whose books it belongs to."""
    source: str
    """The object that caused it: ``pi_...``, ``in_...``, or the refunded ``ch_...``."""
    idempotency_key: str | None
    api_key: str
    method: str
    path: str
    body: str
    """The raw request that made it (for matching it with a ledger's hold)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Error(Exception):
    def __init__(self, status: int, kind: str, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.message = status, kind, code, message

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.code:
            error["code"] = self.code
        return {"error": error}


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


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]
    expand: frozenset[str]
    body: str
    api_key: str
    idempotency_key: str | None


class StripeUpstream:
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
            elif (stored := self._keys.get(slot)) is not None:
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
            else:
                stored = self._keys[slot] = _Stored(fingerprint)
            parked = None
            if fault in (Fault.SLOW, Fault.SLOW_DROPPED):
                parked = self._parked[client_key(slot[1])] = _Parked(act=fault is Fault.SLOW)
        if stored is None:
            status, body = self._act(req)
            return status, body, {}
        if parked is not None:
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
        stored.response = self._act(req)
        if fault is Fault.ERROR_AFTER:
            return _error(_Error(500, "api_error", None, "An unexpected error occurred"))
        if fault is Fault.LOST_AFTER:
            return None
        status, body = stored.response
        return status, body, {}

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

    # -- the API -------------------------------------------------------------------------
    def _route(self, req: _Request) -> dict[str, Any]:
        parts = req.path.strip("/").split("/")
        if not parts or parts[0] != "v1" or len(parts) < 2:
            raise _Error(404, "invalid_request_error", "resource_missing", "Unrecognized URL")
        resource, rest = parts[1], parts[2:]
        handlers: dict[tuple[str, str, int], Callable[[_Request, list[str]], dict[str, Any]]] = {
            ("POST", "customers", 0): self._create_customer,
            ("GET", "customers", 1): self._retrieve,
            ("POST", "prices", 0): self._create_price,
            ("POST", "payment_intents", 0): self._create_intent,
            ("GET", "payment_intents", 1): self._retrieve,
            ("GET", "charges", 1): self._retrieve,
            ("POST", "refunds", 0): self._create_refund,
            ("GET", "refunds", 1): self._retrieve,
            ("POST", "invoices", 0): self._create_invoice,
            ("GET", "invoices", 1): self._retrieve,
            ("POST", "invoices", 2): self._finalize,
            ("POST", "invoiceitems", 0): self._create_item,
        }
        handler = handlers.get((req.method, resource, len(rest)))
        if handler is None:
            raise _Error(
                404,
                "invalid_request_error",
                "resource_missing",
                f"Unrecognized request URL ({req.method}: {req.path})",
            )
        return handler(req, rest)

    def _new(self, prefix: str, obj: dict[str, Any]) -> dict[str, Any]:
        object_id = f"{prefix}_{next(self._ids):06d}{secrets.token_hex(4)}"
        obj = {"id": object_id, **obj}
        self._objects[object_id] = obj
        return obj

    def _find(self, object_id: str, kind: str) -> dict[str, Any]:
        obj = self._objects.get(object_id)
        if obj is None or obj["object"] != kind:
            raise _Error(
                404,
                "invalid_request_error",
                "resource_missing",
                f"No such {kind}: '{object_id}'",
            )
        return obj

    def _view(self, obj: dict[str, Any], expand: frozenset[str]) -> dict[str, Any]:
        view = json.loads(json.dumps(obj))
        for name in expand:
            value = view.get(name)
            if isinstance(value, str) and value in self._objects:
                view[name] = json.loads(json.dumps(self._objects[value]))
        return view  # type: ignore[no-any-return]

    def _retrieve(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        kind = {
            "customers": "customer",
            "payment_intents": "payment_intent",
            "charges": "charge",
            "refunds": "refund",
            "invoices": "invoice",
        }[req.path.strip("/").split("/")[1]]
        return self._view(self._find(rest[0], kind), req.expand)

    def _create_customer(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        return self._new(
            "cus",
            {
                "object": "customer",
                "name": req.params.get("name"),
                "email": req.params.get("email"),
                "metadata": _metadata(req.params),
            },
        )

    def _create_price(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        amount = _amount(req.params, "unit_amount")
        return self._new(
            "price",
            {
                "object": "price",
                "product": req.params.get("product"),
                "unit_amount": amount,
                "currency": _currency(req.params),
            },
        )

    def _customer(self, req: _Request, required: bool) -> str | None:
        customer = req.params.get("customer")
        if customer is None:
            if required:
                raise _Error(
                    400,
                    "invalid_request_error",
                    "parameter_missing",
                    "Missing required param: customer.",
                )
            return None
        self._find(customer, "customer")
        return customer

    def _create_intent(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        amount, currency = _amount(req.params, "amount"), _currency(req.params)
        customer = self._customer(req, False)
        intent = self._new(
            "pi",
            {
                "object": "payment_intent",
                "amount": amount,
                "currency": currency,
                "customer": customer,
                "status": "requires_payment_method",
                "amount_received": 0,
                "latest_charge": None,
                "metadata": _metadata(req.params),
            },
        )
        if req.params.get("confirm") == "true":
            charge = self._charge(req, amount, currency, customer, intent["id"])
            intent.update(status="succeeded", amount_received=amount, latest_charge=charge)
        return self._view(intent, req.expand)

    def _charge(
        self, req: _Request, amount: int, currency: str, customer: str | None, source: str
    ) -> str:
        charge = self._new(
            "ch",
            {
                "object": "charge",
                "amount": amount,
                "amount_refunded": 0,
                "currency": currency,
                "customer": customer,
                "payment_intent": source if source.startswith("pi_") else None,
                "invoice": source if source.startswith("in_") else None,
                "refunded": False,
                "status": "succeeded",
                "paid": True,
            },
        )
        self._book("charge", charge["id"], amount, currency, customer, source, req)
        return str(charge["id"])

    def _book(
        self,
        kind: str,
        object_id: str,
        amount: int,
        currency: str,
        customer: str | None,
        source: str,
        req: _Request,
    ) -> None:
        label = None
        if customer is not None:
            label = self._objects[customer].get("metadata", {}).get("label")
        self._movements.append(
            Movement(
                kind,
                object_id,
                amount,
                currency,
                customer,
                label,
                source,
                req.idempotency_key,
                req.api_key,
                req.method,
                req.path,
                req.body,
            )
        )

    def _create_refund(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        charge_id, intent_id = req.params.get("charge"), req.params.get("payment_intent")
        if bool(charge_id) == bool(intent_id):
            raise _Error(
                400,
                "invalid_request_error",
                "parameter_missing",
                "One of charge or payment_intent is required.",
            )
        if intent_id:
            intent = self._find(intent_id, "payment_intent")
            charge_id = intent.get("latest_charge")
            if not charge_id:
                raise _Error(
                    400,
                    "invalid_request_error",
                    "payment_intent_unexpected_state",
                    f"PaymentIntent {intent_id} does not have a successful charge to refund.",
                )
        charge = self._find(str(charge_id), "charge")
        remaining = charge["amount"] - charge["amount_refunded"]
        if remaining <= 0:
            raise _Error(
                400,
                "invalid_request_error",
                "charge_already_refunded",
                f"Charge {charge_id} has already been refunded.",
            )
        amount = _amount(req.params, "amount") if "amount" in req.params else remaining
        if amount > remaining:
            raise _Error(
                400,
                "invalid_request_error",
                "amount_too_large",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                f"({remaining})",
            )
        if amount <= 0:
            raise _Error(
                400, "invalid_request_error", "amount_too_small", "Refund amount must be positive."
            )
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        refund = self._new(
            "re",
            {
                "object": "refund",
                "amount": amount,
                "currency": charge["currency"],
                "charge": charge["id"],
                "payment_intent": charge["payment_intent"],
                "status": "succeeded",
                "metadata": _metadata(req.params),
            },
        )
        self._book(
            "refund",
            refund["id"],
            amount,
            charge["currency"],
            charge["customer"],
            str(charge["id"]),
            req,
        )
        return dict(refund)

    def _create_invoice(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        customer = self._customer(req, True)
        method = req.params.get("collection_method", "charge_automatically")
        if method not in ("charge_automatically", "send_invoice"):
            raise _Error(
                400,
                "invalid_request_error",
                "parameter_invalid_string",
                f"Invalid collection_method: {method}",
            )
        return self._new(
            "in",
            {
                "object": "invoice",
                "customer": customer,
                "currency": "usd",
                "status": "draft",
                "collection_method": method,
                "auto_advance": req.params.get("auto_advance", "false") == "true",
                "amount_due": 0,
                "amount_paid": 0,
                "amount_remaining": 0,
                "total": 0,
                "charge": None,
                "lines": [],
                "metadata": _metadata(req.params),
            },
        )

    def _create_item(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        customer = self._customer(req, True)
        price_id = req.params.get("price")
        if price_id:
            price = self._find(price_id, "price")
            amount, currency = int(price["unit_amount"]), str(price["currency"])
        else:
            amount, currency = _amount(req.params, "amount"), _currency(req.params)
        invoice_id = req.params.get("invoice")
        if not invoice_id:
            raise _Error(
                400,
                "invalid_request_error",
                "parameter_missing",
                "this fake Stripe needs invoice= on invoice items",
            )
        invoice = self._find(invoice_id, "invoice")
        if invoice["status"] != "draft":
            raise _Error(
                400,
                "invalid_request_error",
                "invoice_not_editable",
                f"Invoice {invoice_id} is not a draft; it cannot be edited.",
            )
        if invoice["customer"] != customer:
            raise _Error(
                400, "invalid_request_error", None, "The invoice belongs to another customer."
            )
        if currency != invoice["currency"]:
            raise _Error(
                400,
                "invalid_request_error",
                None,
                f"The invoice is in {invoice['currency']}, not {currency}.",
            )
        item = self._new(
            "ii",
            {
                "object": "invoiceitem",
                "amount": amount,
                "currency": currency,
                "customer": customer,
                "invoice": invoice_id,
            },
        )
        invoice["lines"].append(item["id"])
        for name in ("amount_due", "amount_remaining", "total"):
            invoice[name] += amount
        return dict(item)

    def _finalize(self, req: _Request, rest: list[str]) -> dict[str, Any]:
        if rest[1] != "finalize":
            raise _Error(404, "invalid_request_error", "resource_missing", "Unrecognized URL")
        invoice = self._find(rest[0], "invoice")
        if invoice["status"] != "draft":
            raise _Error(
                400,
                "invalid_request_error",
                "invoice_not_editable",
                f"Invoice {rest[0]} is already finalized.",
            )
        if "auto_advance" in req.params:
            invoice["auto_advance"] = req.params["auto_advance"] == "true"
        invoice["status"] = "open"
        due = invoice["amount_due"]
        if invoice["collection_method"] == "charge_automatically" and invoice["auto_advance"]:
            if due > 0:
                invoice["charge"] = self._charge(
                    req, due, invoice["currency"], invoice["customer"], invoice["id"]
                )
            invoice.update(status="paid", amount_paid=due, amount_remaining=0)
        return self._view(invoice, req.expand)


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


def _metadata(params: Mapping[str, str]) -> dict[str, str]:
    return {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[") and k[-1] == "]"}


def _amount(params: Mapping[str, str], name: str) -> int:
    raw = params.get(name)
    if raw is None or not raw.isdigit():
        raise _Error(
            400, "invalid_request_error", "parameter_invalid_integer", f"Invalid integer: {raw}"
        )
    return int(raw)


def _currency(params: Mapping[str, str]) -> str:
    currency = params.get("currency")
    if not currency:
        raise _Error(
            400, "invalid_request_error", "parameter_missing", "Missing required param: currency."
        )
    return currency.lower()


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
