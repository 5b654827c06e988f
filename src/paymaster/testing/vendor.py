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

The faults, errors and results live in :mod:`._vendor_types` and the HTTP face in
:mod:`._vendor_http`; every name is importable from here.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._vendor_http import VendorClient, VendorServer
from ._vendor_types import (
    _TIMEOUTS,
    Charge,
    ChargeResult,
    ChargesInAThread,
    Fault,
    VendorAPI,
    VendorError,
    VendorRefused,
    VendorServerError,
)

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


class FakeVendor(ChargesInAThread):
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
