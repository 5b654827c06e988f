"""The Stripe operations paymaster governs, and what each one costs.

A request is matched to an :class:`Operation` by method and path. The operation says who
the customer is and prices the call twice: an estimate before it runs (reserved in the
ledger) and the actual cost read from Stripe's response (settled). A request that matches
no operation is refused by the governed client and the proxy: nothing passes ungoverned.

Pricing needs no network, except for refunds: a refund names a charge or PaymentIntent,
not a currency or (when it refunds "what remains") an amount, so the charge or
PaymentIntent is looked up first. The caller performs that look-up, itself a governed,
free call, and hands the object to :meth:`Operation.quote`.

Reading a request as Stripe would (:class:`StripeRequest`, :class:`InvalidStripeRequest`)
lives in :mod:`._request`; both are importable from here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..._money import Money
from ._currency import StripeAmountError, check_charge_amount, from_stripe
from ._request import _ID, InvalidStripeRequest, StripeRequest

__all__ = [
    "CATALOGUE",
    "STRIPE_VERSION",
    "Catalogue",
    "Cost",
    "InvalidStripeRequest",
    "Operation",
    "Quote",
    "StripeRequest",
    "actual_cost",
]

#: The Stripe API version this catalogue's pricing was written for: its look-ups are sent
#: with it, and so is every call that names no version. A call naming another version is
#: refused unless the catalogue is told it knows it (``Catalogue(stripe_versions=...)``).
STRIPE_VERSION = "2026-10-28.endive"


class Cost(str, enum.Enum):
    """How an operation is priced."""

    FREE = "free"
    """Moves no money: governed (endpoint, customer, call-count rules) and audited."""
    AMOUNT = "amount"
    """Costs its ``amount`` in its ``currency`` (PaymentIntents, charges)."""
    REFUND = "refund"
    """Costs its ``amount``, or what remains of the charge or PaymentIntent it refunds."""
    INVOICE = "invoice"
    """Finalizing an invoice that Stripe will charge automatically costs its amount due;
    one sent to the customer to pay costs nothing."""
    INVOICE_ITEM = "invoice_item"
    """Free, but only on a draft invoice that cannot charge by itself (sent to the
    customer, or ``auto_advance`` off, so its charge is priced when it is finalized)."""


class SubjectFrom(str, enum.Enum):
    """Which object an operation changes, so that no other call on it runs meanwhile."""

    NONE = "none"
    PATH = "path"  # the object id in the path
    INVOICE_PARAM = "invoice_param"  # the ``invoice`` parameter


class CustomerFrom(str, enum.Enum):
    NONE = "none"
    PARAM = "param"  # the ``customer`` parameter
    PATH = "path"  # the object id in the path is the customer
    LOOKUP = "lookup"  # the looked-up object's customer


@dataclass(frozen=True)
class Quote:
    """What a call is expected to cost, and for which customer."""

    estimate: Money | None
    """``None`` for a call that moves no money."""
    customer: str | None


@dataclass(frozen=True)
class Operation:
    """One catalogued Stripe operation."""

    name: str
    """As the Python client names it: ``refunds.create``."""
    method: str
    path: str
    """A template: ``{id}`` stands for one Stripe object id."""
    cost: Cost = Cost.FREE
    customer: CustomerFrom = CustomerFrom.NONE
    forbidden: frozenset[str] = frozenset()
    """Parameters that would move money this operation does not price: refused."""
    check: Callable[[StripeRequest], None] | None = None
    """Further rules for the request (raise :class:`InvalidStripeRequest`)."""
    subject: SubjectFrom = SubjectFrom.NONE
    """The object it changes: while it is in flight, no other call on that object starts
    (in any process on the ledger), so what priced it cannot change under it."""
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.escape(self.path).replace(re.escape("{id}"), f"(?P<id>{_ID})")
        object.__setattr__(self, "_pattern", re.compile(f"{regex}$"))

    @property
    def moves_money(self) -> bool:
        return self.cost not in (Cost.FREE, Cost.INVOICE_ITEM)

    @property
    def reprices_in_flight(self) -> bool:
        """Priced from an object that another call could change between the look-up and
        the reserve: looked up again once the reserve holds the object, and refused
        (``stale_price``) if it now costs more than was reserved."""
        return self.cost is Cost.INVOICE

    def subject_of(self, request: StripeRequest) -> str | None:
        """The ledger's name for the object this request changes (``stripe:in_123``)."""
        if self.subject is SubjectFrom.PATH:
            found = self.match(request)
            return f"stripe:{found}" if found else None
        if self.subject is SubjectFrom.INVOICE_PARAM:
            invoice = request.params.get("invoice")
            return f"stripe:{_object_id(invoice, 'invoice')}" if invoice else None
        return None

    def match(self, request: StripeRequest) -> str | None:
        """The path's object id (``""`` when the template has none), or ``None``."""
        if request.method != self.method:
            return None
        found = self._pattern.match(request.path)
        if found is None:
            return None
        return found.groupdict().get("id") or ""

    def lookup_path(self, request: StripeRequest) -> str | None:
        """Path and query of the object to fetch before this call can be priced (``None``:
        no look-up). A PaymentIntent comes with its latest charge expanded, which says
        how much of it was refunded already."""
        if self.cost is Cost.INVOICE:
            return f"/v1/invoices/{self.match(request)}"
        if self.cost is Cost.INVOICE_ITEM:
            invoice = request.params.get("invoice")
            if not invoice:
                raise InvalidStripeRequest(
                    f"{self.name} must name its draft invoice (invoice=in_...): an item "
                    "without one lands on an invoice Stripe may charge unpriced"
                )
            return f"/v1/invoices/{_object_id(invoice, 'invoice')}"
        if self.cost is not Cost.REFUND:
            return None
        charge = request.params.get("charge")
        intent = request.params.get("payment_intent")
        if bool(charge) == bool(intent):
            raise InvalidStripeRequest(
                "a refund must name exactly one of 'charge' or 'payment_intent'"
            )
        if charge:
            return f"/v1/charges/{_object_id(charge, 'charge')}"
        intent_id = _object_id(intent or "", "payment_intent")
        return f"/v1/payment_intents/{intent_id}?expand%5B%5D=latest_charge"

    def quote(self, request: StripeRequest, looked_up: Mapping[str, Any] | None = None) -> Quote:
        """Price ``request`` (and name its customer) before it is sent.

        ``looked_up`` is the JSON of the object :meth:`lookup_path` named, if any.
        """
        sent = sorted(request.roots & self.forbidden)
        if sent:
            raise InvalidStripeRequest(
                f"{self.name} with {', '.join(sent)} would move money paymaster does not "
                "price, so it is refused"
            )
        if self.check is not None:
            self.check(request)
        try:
            estimate = self._estimate(request, looked_up)
        except StripeAmountError as exc:
            raise InvalidStripeRequest(f"{self.name}: {exc}") from exc
        return Quote(estimate, self._customer(request, looked_up))

    def _estimate(
        self, request: StripeRequest, looked_up: Mapping[str, Any] | None
    ) -> Money | None:
        if self.cost is Cost.FREE:
            return None
        if self.cost is Cost.INVOICE_ITEM:
            if looked_up is None:
                raise InvalidStripeRequest(f"{self.name} is checked against its invoice")
            _check_invoice_cannot_charge_by_itself(looked_up, self.name)
            return None
        params = request.params
        if self.cost is Cost.AMOUNT:
            return check_charge_amount(
                _int_param(params, "amount", self.name), _required(params, "currency", self.name)
            )
        if looked_up is None:
            raise InvalidStripeRequest(f"{self.name} is priced from {self.lookup_path(request)}")
        currency = looked_up.get("currency")
        if not isinstance(currency, str):
            raise InvalidStripeRequest(f"{self.name}: the looked-up object has no currency")
        if self.cost is Cost.INVOICE:
            return _charged_automatically(looked_up, at_most=True)
        if "amount" in params:
            return check_charge_amount(_int_param(params, "amount", self.name), currency)
        return from_stripe(_refundable(looked_up), currency)

    def _customer(self, request: StripeRequest, looked_up: Mapping[str, Any] | None) -> str | None:
        if self.customer is CustomerFrom.PARAM:
            return request.params.get("customer") or None
        if self.customer is CustomerFrom.PATH:
            return self.match(request) or None
        if self.customer is CustomerFrom.LOOKUP and looked_up is not None:
            return _id_of(looked_up.get("customer"))
        return None


def actual_cost(operation: Operation, response: Mapping[str, Any]) -> Money | None:
    """What a successful call actually cost, from Stripe's JSON response (``None`` for a
    call that moves no money). Raises :class:`StripeAmountError` on a response without a
    usable amount."""
    if not operation.moves_money:
        return None
    if operation.cost is Cost.INVOICE:
        return _charged_automatically(response)
    amount, currency = response.get("amount"), response.get("currency")
    if not isinstance(amount, int) or not isinstance(currency, str):
        raise StripeAmountError(
            f"the {operation.name} response has no integer amount and currency "
            f"(amount={amount!r}, currency={currency!r})"
        )
    return from_stripe(amount, currency)


class Catalogue:
    """An ordered set of operations: a request matches the first operation that fits."""

    def __init__(
        self,
        operations: list[Operation],
        *,
        stripe_version: str = STRIPE_VERSION,
        also_known_versions: frozenset[str] = frozenset(),
    ) -> None:
        names = [op.name for op in operations]
        if len(set(names)) != len(names):
            raise ValueError("operation names must be unique")
        self.operations = tuple(operations)
        self._by_name = {op.name: op for op in operations}
        #: Sent on every look-up, and on every call that names no version.
        self.stripe_version = stripe_version
        #: The versions a call may name (the pinned one and those the owner vouches for).
        self.stripe_versions = frozenset({stripe_version}) | also_known_versions

    def check_version(self, version: str | None) -> None:
        """Refuse a ``Stripe-Version`` this catalogue's pricing was not written for."""
        if version is not None and version not in self.stripe_versions:
            raise InvalidStripeRequest(
                f"Stripe-Version {version!r} is not one paymaster's catalogue prices for "
                f"({sorted(self.stripe_versions)}): send {self.stripe_version!r} (e.g. "
                "StripeClient(..., stripe_version=paymaster.vendors.stripe.STRIPE_VERSION)), "
                "or none, or vouch for it with Catalogue(also_known_versions=...)"
            )

    def match(self, request: StripeRequest) -> Operation | None:
        for operation in self.operations:
            if operation.match(request) is not None:
                return operation
        return None

    def __getitem__(self, name: str) -> Operation:
        return self._by_name[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.operations)

    def __len__(self) -> int:
        return len(self.operations)


def _required(params: Mapping[str, str], name: str, operation: str) -> str:
    value = params.get(name)
    if not value:
        raise InvalidStripeRequest(f"{operation} needs the {name!r} parameter")
    return value


def _int_param(params: Mapping[str, str], name: str, operation: str) -> int:
    raw = _required(params, name, operation)
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise InvalidStripeRequest(
            f"{operation}: {name!r} must be a whole number of minor units, got {raw!r}"
        )
    return int(raw)


def _object_id(value: str, name: str) -> str:
    if not re.fullmatch(_ID, value):
        raise InvalidStripeRequest(f"{name} {value!r} is not a Stripe object id")
    return value


def _id_of(value: Any) -> str | None:
    """An id field that may come back expanded into the object it names."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _charged_automatically(invoice: Mapping[str, Any], *, at_most: bool = False) -> Money | None:
    """What Stripe charges for an invoice by itself (``None``: the customer pays).

    ``at_most``: what it can charge when it is finalized later. A draft's ``amount_due``
    is net of the customer's credit balance, which another invoice of the customer may
    use up first; ``total`` is not, and cannot change while the invoice is held, so the
    larger of the two bounds the charge."""
    if invoice.get("collection_method") == "send_invoice":
        return None
    amount, currency = invoice.get("amount_due"), invoice.get("currency")
    if not isinstance(amount, int) or not isinstance(currency, str):
        raise StripeAmountError("the invoice has no integer amount_due and currency")
    total = invoice.get("total")
    if at_most and isinstance(total, int) and not isinstance(total, bool):
        amount = max(amount, total)
    return from_stripe(amount, currency)


def _check_invoice_cannot_charge_by_itself(invoice: Mapping[str, Any], operation: str) -> None:
    if invoice.get("status") != "draft":
        raise InvalidStripeRequest(f"{operation}: the invoice is not a draft")
    if invoice.get("collection_method") != "send_invoice" and invoice.get("auto_advance"):
        raise InvalidStripeRequest(
            f"{operation}: the invoice is charged automatically and advances by itself, so "
            "an item added to it would be charged unpriced"
        )


def _invoice_is_priced(request: StripeRequest) -> None:
    """An invoice Stripe charges by itself must not finalize by itself either: its
    charge is priced when paymaster finalizes it."""
    params = request.params
    if params.get("collection_method") != "send_invoice" and params.get("auto_advance") != (
        "false"
    ):
        raise InvalidStripeRequest(
            "invoices.create: an invoice charged automatically must be created with "
            "auto_advance=false (its charge is priced when it is finalized), or sent to "
            "the customer with collection_method=send_invoice"
        )


def _refundable(obj: Mapping[str, Any]) -> int:
    """What a full refund of this charge or PaymentIntent would return."""
    charge = obj if obj.get("object") == "charge" else obj.get("latest_charge")
    if isinstance(charge, Mapping):
        amount, refunded = charge.get("amount"), charge.get("amount_refunded", 0)
    else:  # a PaymentIntent whose charge was not expanded: its received amount bounds it
        amount, refunded = obj.get("amount_received", obj.get("amount")), 0
    if not isinstance(amount, int) or not isinstance(refunded, int):
        raise InvalidStripeRequest(f"cannot tell what remains to refund of {obj.get('id')!r}")
    return max(amount - refunded, 0)


_F, _A, _R = Cost.FREE, Cost.AMOUNT, Cost.REFUND
_P, _PATH, _L = CustomerFrom.PARAM, CustomerFrom.PATH, CustomerFrom.LOOKUP

#: The default catalogue: what the prebuilt tools use and agents commonly call. Money
#: moves through refunds, PaymentIntents, charges and invoices Stripe charges by itself;
#: everything else costs nothing.
CATALOGUE = Catalogue(
    [
        Operation("refunds.create", "POST", "/v1/refunds", _R, _L),
        Operation("refunds.list", "GET", "/v1/refunds"),
        Operation("refunds.retrieve", "GET", "/v1/refunds/{id}"),
        Operation("payment_intents.create", "POST", "/v1/payment_intents", _A, _P),
        Operation("payment_intents.list", "GET", "/v1/payment_intents", customer=_P),
        Operation("payment_intents.retrieve", "GET", "/v1/payment_intents/{id}"),
        Operation("charges.create", "POST", "/v1/charges", _A, _P),
        Operation("charges.list", "GET", "/v1/charges", customer=_P),
        Operation("charges.retrieve", "GET", "/v1/charges/{id}"),
        Operation(
            "customers.create",
            "POST",
            "/v1/customers",
            forbidden=frozenset({"balance", "cash_balance"}),
        ),
        Operation("customers.list", "GET", "/v1/customers"),
        Operation("customers.retrieve", "GET", "/v1/customers/{id}", customer=_PATH),
        Operation("products.create", "POST", "/v1/products"),
        Operation("products.list", "GET", "/v1/products"),
        Operation("prices.create", "POST", "/v1/prices"),
        Operation("prices.list", "GET", "/v1/prices"),
        Operation("payment_links.create", "POST", "/v1/payment_links"),
        Operation("invoices.create", "POST", "/v1/invoices", customer=_P, check=_invoice_is_priced),
        Operation("invoices.list", "GET", "/v1/invoices", customer=_P),
        Operation("invoices.retrieve", "GET", "/v1/invoices/{id}"),
        Operation(
            "invoices.finalize_invoice",
            "POST",
            "/v1/invoices/{id}/finalize",
            Cost.INVOICE,
            _L,
            subject=SubjectFrom.PATH,
        ),
        Operation(
            "invoice_items.create",
            "POST",
            "/v1/invoiceitems",
            Cost.INVOICE_ITEM,
            _P,
            subject=SubjectFrom.INVOICE_PARAM,
        ),
        Operation("balance.retrieve", "GET", "/v1/balance"),
    ]
)
