"""The fake Stripe's API and books: the objects it keeps (customers, prices,
PaymentIntents, charges, refunds, invoices), what each request does to them, and every
charge and refund made (:class:`Movement`). Mixed into
:class:`paymaster.testing.stripe_upstream.StripeUpstream`, which serves it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any


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
class _Request:
    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]
    expand: frozenset[str]
    body: str
    api_key: str
    idempotency_key: str | None


class _StripeObjects:
    """The objects and the books; every method runs holding the upstream's lock."""

    _ids: Iterator[int]
    _objects: dict[str, dict[str, Any]]
    _movements: list[Movement]

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
        charge = self._refunded_charge(req)
        amount = _refund_amount(req, charge)
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

    def _refunded_charge(self, req: _Request) -> dict[str, Any]:
        """The charge a refund names: its ``charge``, or its PaymentIntent's latest charge."""
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
        return charge

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


def _refund_amount(req: _Request, charge: dict[str, Any]) -> int:
    """What a refund returns: its ``amount``, or what remains of the charge; never more
    than remains, nor nothing."""
    charge_id = charge["id"]
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
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
        )
    if amount <= 0:
        raise _Error(
            400, "invalid_request_error", "amount_too_small", "Refund amount must be positive."
        )
    return amount


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
