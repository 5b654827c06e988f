"""One request on its way through governance (:class:`_Plan`: the governed call it
asks for, and the headers it is sent with), and how its hold ends from Stripe's answer
(:func:`_resolution`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..._governor.call import GovernedCall
from ..._governor.cancellation import AsyncGovernedCall
from ..._governor.request import CallRequest
from ..._money import Money
from ..._outcomes import Resolution, decide, resolution_of_status
from ._binding import StripeBinding
from ._catalogue import Operation, Quote, StripeRequest
from ._catalogue import actual_cost as _actual_cost
from ._wire import (
    VENDOR,
    Response,
    _error_text,
    _header,
    _header_name,
    _json,
    _single_header,
    _vendor_key,
)

log = logging.getLogger("paymaster.stripe")

HoldEnd = tuple[Literal["settle", "fail", "unknown"], dict[str, Any]]
Call = GovernedCall | AsyncGovernedCall


@dataclass(frozen=True)
class _Plan:
    """One request on its way through governance."""

    binding: StripeBinding
    request: StripeRequest
    operation: Operation
    sent_headers: Mapping[str, str] | None
    wire_key: str | None
    """The Idempotency-Key the client sent (POST only)."""
    ledger_key: str | None
    """The governed call's key: the wire key, scoped to this exact request."""
    pricing_lookup: bool
    lookup: str | None = None
    quote: Quote | None = None
    subject: str | None = None
    """The object the call changes (no other call on it while this one is in flight)."""
    version: str | None = None
    """The Stripe-Version sent when the client names none."""

    def call_request(self) -> CallRequest:
        """The governed call of the request, for :meth:`Governor.guard`."""
        assert self.binding.agent is not None
        assert self.quote is not None
        return CallRequest(
            agent=self.binding.agent,
            vendor=VENDOR,
            endpoint=self.request.path,
            method=self.request.method,
            estimate=self.quote.estimate,
            customer=self.quote.customer,
            run=self.binding.run,
            run_policy=self.binding.run_policy,
            idempotency_key=self.ledger_key,
            pricing_lookup=self.pricing_lookup,
            tool_call_id=self.binding.tool_call_id,
            credential=self.binding.credential,
            subject=self.subject,
            accounts=self.request.accounts,
            # The catalogue declares a call free by pricing it at nothing.
            free=self.quote.estimate is None,
        )

    def outgoing(self, call: Call) -> Mapping[str, str] | None:
        """The headers sent: a POST always carries an idempotency key (one made from the
        hold when the client sent none), so a retry of this call cannot pay twice."""
        sent = dict(self.sent_headers or {})
        if self.version is not None and _single_header(sent, "Stripe-Version") is None:
            sent["Stripe-Version"] = self.version  # the version the call was priced for
        if self.request.method == "POST":
            sent = {k: v for k, v in sent.items() if _header_name(k) != "idempotency-key"}
            if self.wire_key is None:
                sent["Idempotency-Key"] = call.idempotency_key
            else:
                sent["Idempotency-Key"] = _vendor_key(self.binding, self.wire_key)
        return sent


def _resolution(call: Call, operation: Operation, response: Response) -> HoldEnd:
    """How the hold ends, from Stripe's HTTP response."""
    body, status, headers = response
    request_id = _header(headers, "Request-Id")
    free = not operation.moves_money
    by_status = resolution_of_status(status)
    if by_status is not Resolution.SETTLE:
        replayed = _header(headers, "Idempotent-Replayed") == "true"
        # A retry refused (409 in progress, 429, a key mismatch) says nothing about the
        # earlier attempt whose hold it resumed, which may have paid; a replayed refusal
        # is that attempt's own answer.
        shared = call.reservation.resumed and not replayed
        failure = _VendorRefused() if by_status is Resolution.RELEASE else _VendorMayHaveActed()
        if decide(failure, shared=shared, moves_money=not free) is Resolution.RELEASE:
            error = _error_text(body) if 400 <= status < 500 else f"Stripe answered HTTP {status}"
            return "fail", {"http_status": status, "vendor_request_id": request_id, "error": error}
        if by_status is Resolution.RELEASE:
            return "unknown", {
                "error": f"a retry got HTTP {status} ({_error_text(body)}); whether the first "
                "attempt moved money is unknown"
            }
        return "unknown", {
            "error": f"Stripe answered HTTP {status} (request {request_id}): it may have "
            "acted; a retry with the same idempotency key replays the call"
        }
    try:
        actual = _actual_cost(operation, _json(body))
    except Exception as exc:
        if free:
            actual = None
        else:
            return "unknown", {"error": f"HTTP {status} but the cost is unreadable: {exc}"}
    if actual is not None and actual.currency != call.estimate.currency:
        return "unknown", {
            "error": f"Stripe charged {actual}, but {call.estimate} was reserved in "
            f"{call.estimate.currency}: reconcile this hold"
        }
    return "settle", {
        "actual": actual if actual is not None else Money.zero(call.estimate.currency),
        "http_status": status,
        "vendor_request_id": request_id,
    }


class _VendorRefused(Exception):
    """Stripe refused the request (4xx): nothing moved."""


class _VendorMayHaveActed(TimeoutError):
    """Stripe answered 5xx, 1xx or 3xx: it may have acted."""


def _not_recorded(call: Call, response: Response) -> None:
    """Stripe answered but the ledger could not record it. Raising now would tell the
    caller the call failed (and invite a retry) when Stripe acted: its answer is returned,
    and the hold stays pending, counted against its budgets until it is reconciled."""
    log.error(
        "Stripe answered HTTP %s (request %s) but the ledger could not record it: hold %s "
        "stays pending and counted; reconcile it with `paymaster holds resolve`",
        response[1],
        _header(response[2], "Request-Id"),
        call.hold_id,
    )
