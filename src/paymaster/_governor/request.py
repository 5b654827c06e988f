"""One governed call, as asked: :class:`CallRequest` (checked, and turned into the
ledger's request, by :func:`paymaster._governor.prepare.prepare`).

::

    request = CallRequest(agent="refund-agent", vendor="stripe", endpoint="/v1/refunds",
                          estimate=Money.parse("25.00 USD"), customer="cus_1")
    with gov.guard(request) as call:
        ...

``Governor.guard`` and ``Governor.aguard`` take a request, or its fields as keywords
(never both).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from .._money import Money
    from .._policy import RunPolicy

__all__ = ["CallKeywords", "CallRequest", "as_request"]


@dataclass(frozen=True, kw_only=True)
class CallRequest:
    """One call to govern: who makes it, what it calls, and what it may cost.

    ``estimate`` is what the call may cost at most: it is reserved, and settling above
    it is an overrun that freezes the budget. A call that moves no money passes
    ``free=True`` instead (still checked, counted and audited).
    ``pricing_lookup=True`` marks a free read made only to price another governed call
    (its result never reaches the agent): it may pass a customer allowlist without
    naming a customer, since the call it prices is checked against the allowlist.
    ``tool_call_id`` names the agent framework's tool call on the hold and audit rows;
    ``credential`` what the call was presented with (a proxy's vault key id) on its rows.
    ``subject`` names the object the call changes (``"stripe:in_123"``): while this
    call's hold is pending or unknown, every other call on it is refused
    (``subject_busy``), in every process on the ledger. ``accounts`` are the connected
    accounts the call acts for or routes money to; each must be in the policy's
    ``accounts`` (``account_not_allowed``).

    The request is taken as given: it is checked (and a bad one audited as refused) when
    a guard opens, not when it is built.
    """

    agent: str
    vendor: str
    endpoint: str
    method: str = "POST"
    estimate: Money | None = None
    customer: str | None = None
    run: str | None = None
    run_policy: RunPolicy | None = None
    idempotency_key: str | None = None
    pricing_lookup: bool = False
    tool_call_id: str | None = None
    credential: str | None = None
    subject: str | None = None
    accounts: Collection[str] = ()
    free: bool = False


class _RequiredKeywords(TypedDict):
    agent: str
    vendor: str
    endpoint: str


class CallKeywords(_RequiredKeywords, total=False):
    """The fields of :class:`CallRequest` as the keywords of ``guard`` and ``aguard``
    (for type checkers; kept in step with the dataclass by a test)."""

    method: str
    estimate: Money | None
    customer: str | None
    run: str | None
    run_policy: RunPolicy | None
    idempotency_key: str | None
    pricing_lookup: bool
    tool_call_id: str | None
    credential: str | None
    subject: str | None
    accounts: Collection[str]
    free: bool


def as_request(request: CallRequest | None, keywords: Mapping[str, Any], name: str) -> CallRequest:
    """The request of ``name(request)`` or ``name(**keywords)``; both at once is refused."""
    if request is None:
        return CallRequest(**keywords)
    if keywords:
        raise TypeError(
            f"{name}() takes a CallRequest or its fields as keywords, not both (got the "
            f"request and {', '.join(sorted(keywords))}=): pass "
            f"{name}(dataclasses.replace(request, {next(iter(sorted(keywords)))}=...)) "
            "to change a field of the request"
        )
    if not isinstance(request, CallRequest):
        raise TypeError(
            f"{name}() takes a paymaster.CallRequest, got {type(request).__name__}: pass "
            f"{name}(CallRequest(agent=..., vendor=..., endpoint=...)) or the fields as "
            "keywords"
        )
    if type(request) is not CallRequest:
        # A subclass is read once, as the plain value: the checks, the reserve and the
        # rows then see one request, whatever its ``__post_init__`` or properties do.
        return CallRequest(**{f.name: getattr(request, f.name) for f in fields(CallRequest)})
    return request
