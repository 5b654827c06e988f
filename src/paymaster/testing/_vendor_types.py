"""What the fake vendor's callers see: the faults a request can meet, the errors it
raises, the results and charges it returns, and the interface both the in-process vendor
and its HTTP client offer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


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


class ChargesInAThread:
    """``acharge`` for a vendor API whose ``charge`` blocks: it runs in a worker thread,
    as an async caller of a blocking client would run it."""

    async def acharge(
        self: VendorAPI,
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
