"""One reserved call: :class:`GovernedCall`, how a ``guard`` block closes it
(:func:`close_call`) and how a verdict is recorded on it (:func:`conclude`)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from .._audit import Outcome
from .._audit.records import row_number_problem
from .._errors import HoldAlreadyResolved
from .._ledger import Hold, Ledger, Reservation, ReserveRequest
from .._money import Money
from .._outcomes import OUTCOME_UNKNOWN_EXCEPTIONS, Resolution, Verdict, decide
from .._policy import EffectivePolicy

if TYPE_CHECKING:
    from .cancellation import AsyncGovernedCall

__all__ = ["CallSpan", "GovernedCall", "close_call", "conclude", "open_call"]

log = logging.getLogger("paymaster")


class CallSpan(Protocol):
    """What a governed call tells telemetry: entered before the checks, ``started`` once
    reserved, exited with the block's exception (see :mod:`paymaster._telemetry`)."""

    def __enter__(self) -> CallSpan: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def started(self, call: GovernedCall) -> None: ...


class _NoSpan:
    """The span of a governed call when telemetry is off: does nothing."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def started(self, call: GovernedCall) -> None:
        return None


_NO_SPAN = _NoSpan()


class GovernedCall:
    """One reserved call. Resolve it once: :meth:`settle`, :meth:`fail` or :meth:`unknown`.

    Leaving the ``guard`` block without resolving settles at the estimate; leaving it by an
    exception releases the hold, or keeps it counted as unknown when money may have moved
    (:func:`paymaster._outcomes.decide`). Settling above the estimate is an overrun: it is
    recorded and freezes the budget until an operator acknowledges it.
    """

    def __init__(
        self,
        ledger: Ledger,
        reservation: Reservation,
        policy: EffectivePolicy,
        *,
        free: bool = False,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> None:
        self._ledger = ledger
        self.reservation = reservation
        self.policy = policy
        #: Declared to move no money: a failure releases it, whatever the exception.
        self.free = free
        #: This attempt's tool call (its own, even when it resumed another's hold).
        self.tool_call_id = tool_call_id
        #: What the call was presented with (a proxy's vault key id), on its rows.
        self.credential = credential
        #: The exceptions after which money may have moved (``Governor(unknown_on=...)``):
        #: adapters deciding this call's outcome pass them to ``outcomes.decide``.
        self.unknown_on: tuple[type[BaseException], ...] = OUTCOME_UNKNOWN_EXCEPTIONS
        self.hold: Hold = reservation.hold
        self._started = time.monotonic()
        # Set once settle/fail/unknown is attempted: after that, a failure to record the
        # outcome must never release the hold (the vendor may have moved money).
        self._attempted = False
        # Set once this attempt's outcome (and its audit row) is recorded. The hold itself
        # may still be pending: another attempt may hold it too.
        self._done = False
        self._resolving = False
        self._claim = threading.Lock()
        #: This attempt's id for the ledger: a resolution after one that raised looks for
        #: that one's commit first, so the attempt never gets two rows.
        self._attempt = uuid.uuid4().hex

    @property
    def hold_id(self) -> str:
        return self.hold.id

    @property
    def estimate(self) -> Money:
        return self.hold.estimate

    @property
    def remaining(self) -> Money:
        """What was left of the daily budget once this call was reserved."""
        return self.reservation.remaining

    @property
    def idempotency_key(self) -> str:
        """The key to send to the vendor so a retry cannot pay twice."""
        return self.hold.idempotency_key or f"paymaster-{self.hold.id}"

    @property
    def resolved(self) -> bool:
        """Whether this attempt's outcome is recorded (its audit row written)."""
        return self._done

    def _record(self, resolve: Callable[[], Hold], *, attempted: bool = True) -> Hold:
        # One resolver at a time: two settles (or a settle and a fail) racing from two
        # threads or tasks would otherwise both reach the ledger, which takes the second
        # for another attempt's late result and writes a second row for this attempt.
        with self._claim:
            if self._done:
                raise HoldAlreadyResolved(
                    f"this call already recorded its outcome (hold {self.hold.id} is "
                    f"{self.hold.state}); an attempt records it exactly once"
                )
            if self._resolving:
                raise HoldAlreadyResolved(
                    f"this call's outcome (hold {self.hold.id}) is being recorded by "
                    "another settle, fail or unknown; an attempt records it exactly once"
                )
            self._resolving = True
            self._attempted = self._attempted or attempted
        try:
            hold = resolve()
        except BaseException:
            with self._claim:  # a resolve that raised (ledger down) may be retried
                self._resolving = False
            raise
        with self._claim:
            self.hold, self._done, self._resolving = hold, True, False
        return hold

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    def _money(self, actual: Money | int | None) -> Money:
        if actual is None:
            return self.estimate
        if isinstance(actual, Money):
            money = actual
        elif isinstance(actual, bool) or not isinstance(actual, int):
            raise TypeError("actual must be Money or an int of minor units")
        else:
            money = Money(actual, self.estimate.currency)
        if money.amount < 0:
            raise ValueError(f"a call cannot cost a negative amount ({money})")
        return money

    def settle(
        self,
        actual: Money | int | None = None,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
    ) -> Hold:
        """The call succeeded: spend ``actual`` (Money, or int minor units in the call's
        currency; default the estimate). Above the estimate it is an overrun."""
        _check_row_numbers(http_status)
        return self._record(
            lambda: self._ledger.settle(
                self.hold.id,
                self._money(actual),
                http_status=http_status,
                vendor_request_id=vendor_request_id,
                duration_ms=self._elapsed_ms(),
                per_call_cap=self.policy.per_call_cap,
                tool_call_id=self.tool_call_id,
                credential=self.credential,
                attempt=self._attempt,
            )
        )

    def fail(
        self,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        error: str | None = None,
    ) -> Hold:
        """The vendor refused the call and no money moved: release the hold (unless another
        attempt holds it too, which keeps it counted)."""
        _check_row_numbers(http_status)
        return self._record(
            lambda: self._ledger.release(
                self.hold.id,
                outcome=Outcome.FAILED,
                http_status=http_status,
                vendor_request_id=vendor_request_id,
                error=error,
                duration_ms=self._elapsed_ms(),
                tool_call_id=self.tool_call_id,
                credential=self.credential,
                attempt=self._attempt,
            )
        )

    def unknown(self, error: str) -> Hold:
        """Whether money moved is unknown: keep the hold counted for reconciliation."""
        return self._record(
            lambda: self._ledger.mark_unknown(
                self.hold.id,
                error=error,
                duration_ms=self._elapsed_ms(),
                tool_call_id=self.tool_call_id,
                credential=self.credential,
                attempt=self._attempt,
            )
        )

    def _release_errored(self, error: str) -> Hold:
        """The block raised before any outcome was recorded, and no money moved."""
        return self._record(
            lambda: self._ledger.release(
                self.hold.id,
                outcome=Outcome.ERRORED,
                error=error,
                duration_ms=self._elapsed_ms(),
                tool_call_id=self.tool_call_id,
                credential=self.credential,
                attempt=self._attempt,
            ),
            attempted=False,
        )


def open_call(
    ledger: Ledger,
    reservation: Reservation,
    request: ReserveRequest,
    unknown_on: tuple[type[BaseException], ...],
) -> GovernedCall:
    """The call of a reserved ``request`` (for ``guard``, and wrapped for ``aguard``)."""
    call = GovernedCall(
        ledger,
        reservation,
        request.policy,
        free=request.free,
        tool_call_id=request.tool_call_id,
        credential=request.credential,
    )
    call.unknown_on = unknown_on
    return call


def conclude(call: GovernedCall | AsyncGovernedCall, verdict: Verdict) -> Hold:
    """Record ``verdict`` on ``call`` with the blocking methods (also for the call of an
    ``aguard``, from a worker thread: its wrapped :class:`GovernedCall` records it)."""
    sync = call if isinstance(call, GovernedCall) else call.sync_call
    if verdict.resolution is Resolution.SETTLE:
        return sync.settle(verdict.actual)
    if verdict.resolution is Resolution.UNKNOWN:
        return sync.unknown(verdict.reason)
    return sync.fail(error=verdict.reason)


def _check_row_numbers(http_status: object) -> None:
    problem = row_number_problem(http_status=http_status)
    if problem is not None:
        raise ValueError(problem)


def close_call(
    call: GovernedCall, exc: BaseException | None, unknown_on: tuple[type[BaseException], ...]
) -> None:
    """Resolve the hold as the block ended, if the block did not (runs off the event loop
    for ``aguard``, on the :class:`GovernedCall` its call wraps).

    A normal exit settles at the estimate. An exception releases the hold only when it is
    known that no money moved: not after a timeout, a cancellation or a lost connection,
    and not after an attempt to record the outcome failed (the vendor call had returned).
    """
    if call.resolved:
        return
    resolution = decide(
        exc,
        attempted=call._attempted,
        shared=call.reservation.resumed,
        moves_money=not call.free,
        unknown_on=unknown_on,
    )
    if resolution is Resolution.SETTLE:
        call.settle()
        return
    if exc is None:  # the block caught a failed settle/fail: the actual is not known
        text = "recording the outcome failed and the block went on"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        if resolution is Resolution.UNKNOWN:
            call.unknown(f"outcome unknown, hold kept for reconciliation: {text}")
        else:
            call._release_errored(text)
    except Exception:
        # The user's exception must surface unchanged; the hold stays pending and counted.
        log.exception("could not record hold %s after %s; it stays pending", call.hold.id, text)
