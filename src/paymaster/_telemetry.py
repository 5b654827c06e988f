"""OpenTelemetry spans and metrics for governed calls (``pip install 'paymaster[otel]'``).

::

    gov = Governor(url, policies=..., telemetry=True)         # the global providers
    paymaster.instrument(gov, tracer_provider=tp, meter_provider=mp)  # or these

* A span ``paymaster.call`` per governed call (``guard`` / ``aguard``, so also the
  ``governed`` decorator and the adapters), current while the block runs (the vendor
  call's own spans are its children), with ``paymaster.vendor``, ``.endpoint``,
  ``.method``, ``.agent``, ``.run``, ``.estimate`` and ``.actual`` (minor units),
  ``.currency``, ``.hold_id``, ``.policy_id``, ``.outcome`` (``allowed``, ``failed``,
  ``errored``, ``denied``, ``unknown``, ``pending``, ``unavailable``, ``cancelled``,
  ``error``) and, for a refusal, ``.violation_code``. Refusals and exceptions leaving the
  block set status ERROR.
* Metrics: ``paymaster.spend`` (counter of settled minor units, by ``paymaster.currency``,
  ``.agent`` and ``.vendor``), ``paymaster.denials`` (counter, by ``paymaster.code``,
  ``.agent`` and ``.vendor``) and ``paymaster.governance.duration`` (histogram, ms, of
  each ledger operation, by ``paymaster.operation``: ``reserve``, ``settle``,
  ``release``, ``unknown``).

OpenTelemetry is imported only when telemetry is turned on: the core does not need it.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import GovernanceUnavailable, PolicyViolation
from ._extras import requires
from ._ledger import HoldState, observing
from ._money import Money

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from sqlalchemy import Connection

    from ._audit import AuditEntry
    from ._ledger import BudgetRef, Hold, Ledger, LedgerObserver, ReserveRequest, RevocationScope

__all__ = ["Telemetry", "instrument", "uninstrument"]

log = logging.getLogger("paymaster.telemetry")

#: Bucket boundaries (ms) for ledger operations, which take from a fraction of a
#: millisecond (SQLite, NORMAL) to tens of milliseconds (a remote PostgreSQL under load).
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000, 2500)


class _Call(Protocol):
    """What a span reads of a governed call (:class:`paymaster.GovernedCall`)."""

    @property
    def hold(self) -> Hold: ...

    @property
    def _attempted(self) -> bool: ...


class _Instrumented(Protocol):
    """What telemetry is wired into (:class:`paymaster.Governor`): its ledger's one
    observer is its alerter and its telemetry, together (:func:`paymaster._ledger.observing`)."""

    telemetry: Telemetry | None

    @property
    def ledger(self) -> Ledger: ...

    @property
    def alerter(self) -> LedgerObserver | None: ...


_OPERATION = {
    HoldState.SETTLED: "settle",
    HoldState.RELEASED: "release",
    HoldState.UNKNOWN: "unknown",
    HoldState.PENDING: "resume",
}


class Telemetry:
    """Spans for governed calls and metrics for the ledger's work (a ledger observer)."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        with requires("otel", "paymaster telemetry"):
            from opentelemetry import metrics, trace
        from . import __version__

        self._trace = trace
        self.tracer = trace.get_tracer("paymaster", __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter("paymaster", __version__, meter_provider=meter_provider)
        self.spend = meter.create_counter(
            "paymaster.spend",
            unit="{minor_unit}",
            description="Settled cost of governed calls, in minor units of paymaster.currency",
        )
        self.denials = meter.create_counter(
            "paymaster.denials", unit="{call}", description="Governed calls refused, by code"
        )
        latency: dict[str, Any] = {
            "name": "paymaster.governance.duration",
            "unit": "ms",
            "description": "Time in the ledger per operation (reserve, settle, release, unknown)",
        }
        try:
            self.latency = meter.create_histogram(
                **latency, explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS
            )
        except TypeError:  # pragma: no cover - opentelemetry-api < 1.23
            self.latency = meter.create_histogram(**latency)

    # -- spans (the governor's side) -----------------------------------------------------
    def call_span(
        self,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str,
        run: str | None,
        estimate: Money | None,
    ) -> CallSpan:
        """The span of one governed call (a context manager; ``started(call)`` once it is
        reserved)."""
        attributes: dict[str, Any] = {
            "paymaster.agent": agent,
            "paymaster.vendor": vendor,
            "paymaster.endpoint": endpoint,
            "paymaster.method": method.upper(),
        }
        if run is not None:
            attributes["paymaster.run"] = run
        if isinstance(estimate, Money):  # anything else is refused by the checks after
            attributes["paymaster.estimate"] = estimate.amount
            attributes["paymaster.currency"] = estimate.currency
        return CallSpan(self, attributes)

    # -- metrics (the ledger's observer: paymaster._ledger.LedgerObserver) ----------------
    def budget_rose(
        self,
        conn: Connection,
        budget_id: int,
        committed: int,
        cap: int,
        at: datetime,
        budget: Callable[[], BudgetRef],
        refused: Money | None = None,
    ) -> None:
        """Not measured: nothing to do after commit."""

    def after_commit(self, note: object) -> None:
        """Never called: :meth:`budget_rose` notes nothing."""

    def budgets_reset(self) -> None:
        """Not measured."""

    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None:
        self._record(seconds, "reserve")

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None:
        self._record(seconds, _OPERATION[state])
        if state is HoldState.SETTLED and hold is not None and hold.actual is not None:
            try:
                self.spend.add(
                    hold.actual.amount,
                    {
                        "paymaster.currency": hold.actual.currency,
                        "paymaster.agent": hold.agent,
                        "paymaster.vendor": hold.vendor,
                    },
                )
            except Exception:  # telemetry never breaks a governed call
                log.exception("could not record spend")

    def overran(self, hold: Hold, at: datetime) -> None:
        """Not measured apart from its settle."""

    def revoked(
        self, scope: RevocationScope, target: str, *, reason: str, by: str, at: datetime
    ) -> None:
        """Not measured."""

    def denied(self, entry: AuditEntry, violation: PolicyViolation, at: datetime) -> None:
        try:
            self.denials.add(
                1,
                {
                    "paymaster.code": entry.violation_code or "",
                    "paymaster.agent": entry.agent,
                    "paymaster.vendor": entry.vendor,
                },
            )
        except Exception:
            log.exception("could not record a denial")

    def _record(self, seconds: float, operation: str) -> None:
        try:
            self.latency.record(seconds * 1000.0, {"paymaster.operation": operation})
        except Exception:
            log.exception("could not record ledger latency")


class CallSpan:
    """One governed call's span, current from ``__enter__`` to ``__exit__``."""

    def __init__(self, telemetry: Telemetry, attributes: dict[str, Any]) -> None:
        self._telemetry = telemetry
        self._attributes = attributes
        self._span: Any = None
        self._token: Any = None
        self._call: _Call | None = None

    def __enter__(self) -> CallSpan:
        from opentelemetry import context

        trace = self._telemetry._trace
        try:
            self._span = self._telemetry.tracer.start_span(
                "paymaster.call", kind=trace.SpanKind.INTERNAL, attributes=self._attributes
            )
            self._token = context.attach(trace.set_span_in_context(self._span))
        except Exception:  # telemetry never breaks a governed call, nor loses its row
            log.exception("could not start the governed call's span")
            self._span, self._token = trace.INVALID_SPAN, None
        return self

    def started(self, call: _Call) -> None:
        """The call was reserved (its hold exists)."""
        self._call = call
        hold = call.hold
        attributes: dict[str, Any] = {
            "paymaster.hold_id": hold.id,
            "paymaster.policy_id": hold.policy_id,
        }
        if hold.endpoint != self._attributes["paymaster.endpoint"]:
            attributes["paymaster.endpoint"] = hold.endpoint  # as the policy matched it
        if "paymaster.estimate" not in self._attributes:  # a free call: estimate 0
            attributes["paymaster.estimate"] = hold.estimate.amount
            attributes["paymaster.currency"] = hold.estimate.currency
        try:  # reserved already: a raise here would leave the hold without its row
            self._span.set_attributes(attributes)
        except Exception:
            log.exception("could not record the governed call's hold on its span")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        try:
            call = self._call
            if call is None:  # refused, or never reserved
                if isinstance(exc, PolicyViolation):
                    span.set_attributes(
                        {"paymaster.outcome": "denied", "paymaster.violation_code": exc.code.value}
                    )
                    span.set_status(Status(StatusCode.ERROR, f"{exc.code.value}: {exc.message}"))
                    exc = None  # a refusal is the call's outcome, not a crash of paymaster
                elif isinstance(exc, GovernanceUnavailable):
                    span.set_attribute("paymaster.outcome", "unavailable")
                elif isinstance(exc, asyncio.CancelledError):
                    span.set_attribute("paymaster.outcome", "cancelled")
                else:
                    span.set_attribute("paymaster.outcome", "error")
            else:
                span.set_attribute("paymaster.outcome", _outcome(call))
                hold = call.hold
                if hold.actual is not None:
                    span.set_attribute("paymaster.actual", hold.actual.amount)
                elif hold.state is HoldState.RELEASED:
                    span.set_attribute("paymaster.actual", 0)  # no money moved
            if exc is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.exception("could not finish the governed call's span")
        finally:
            try:
                span.end()
                if self._token is not None:
                    context.detach(self._token)
            except Exception:
                log.exception("could not end the governed call's span")


def _outcome(call: _Call) -> str:
    state = call.hold.state
    if state is HoldState.SETTLED:
        return "allowed"
    if state is HoldState.RELEASED:
        return "failed" if call._attempted else "errored"
    return str(state)  # unknown, or pending when recording the outcome failed


def instrument(
    governor: _Instrumented, *, tracer_provider: Any = None, meter_provider: Any = None
) -> Telemetry:
    """Turn on spans and metrics for ``governor`` (the global providers unless given)."""
    telemetry = Telemetry(tracer_provider, meter_provider)
    attach(governor, telemetry)
    return telemetry


def uninstrument(governor: _Instrumented) -> None:
    """Turn telemetry off again for ``governor``."""
    attach(governor, None)


def attach(governor: _Instrumented, telemetry: Telemetry | None) -> None:
    """Make ``telemetry`` (``None``: none) ``governor``'s, alongside its alerts."""
    governor.telemetry = telemetry
    governor.ledger.observer = observing(governor.alerter, telemetry)
