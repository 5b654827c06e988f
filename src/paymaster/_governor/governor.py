"""The facade users hold: policies + ledger + audit log.

::

    gov = Governor("sqlite:///paymaster.db", policies=load_policies("policies.yaml"))
    with gov.guard(agent="refund-agent", run="run-42", vendor="stripe",
                   endpoint="/v1/refunds", method="POST", customer="cus_1",
                   estimate=Money.parse("25.00 USD")) as call:
        refund = stripe_client.refunds.create(...)   # outside any transaction
        call.settle(actual=refund.amount, http_status=200, vendor_request_id=...)

The work is done by small modules: the request (:mod:`.request`) and its checks
(:mod:`.prepare`), the reserved call (:mod:`.call`), ``aguard`` and its cancellation safety
(:mod:`.cancellation`), rows of attempts that reserve nothing (:mod:`.records`) and the
``governed`` decorator (:mod:`.decorator`).
"""

from __future__ import annotations

import contextvars
import functools
import getpass
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy import Engine

from .._alerts import Alert, AlertConfig, Alerter, stale_hold_alert
from .._audit import AuditLog
from .._db import SQLiteSync, connect, ensure_schema, is_configured
from .._ledger import (
    BudgetStatus,
    Hold,
    Ledger,
    ReserveRequest,
    Revocation,
    RevocationScope,
)
from .._loading import load_policies
from .._money import Money
from .._outcomes import OUTCOME_UNKNOWN_EXCEPTIONS
from .._policy import EffectivePolicy, Policy, PolicySet, RunPolicy, effective_policy
from . import decorator as _decorator
from . import records as _records
from .call import _NO_SPAN, CallSpan, GovernedCall, close_call, conclude, open_call
from .cancellation import AsyncGovernedCall, AsyncGuard, aconclude, in_executor
from .prepare import prepare
from .request import CallRequest, as_request

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .._telemetry import Telemetry
    from .request import CallKeywords

__all__ = [
    "AsyncGovernedCall",
    "AsyncGuard",
    "CallRequest",
    "GovernedCall",
    "Governor",
    "aconclude",
    "conclude",
]

log = logging.getLogger("paymaster")

T = TypeVar("T")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database in some containers
        return "unknown"


class Governor:
    """Governs calls: pure policy checks, a reserve before the call, a settle after it."""

    def __init__(
        self,
        database: str | Engine = "sqlite:///paymaster.db",
        *,
        policies: PolicySet | Iterable[Policy] | str | Path,
        clock: Callable[[], datetime] = _utcnow,
        sqlite_synchronous: SQLiteSync = "FULL",
        upgrade_schema: bool = True,
        unknown_on: tuple[type[BaseException], ...] = OUTCOME_UNKNOWN_EXCEPTIONS,
        max_threads: int = 16,
        alerts: AlertConfig | None = None,
        telemetry: bool | Telemetry = False,
    ) -> None:
        """``alerts`` turns on budget alerts (:mod:`paymaster._alerts`); ``telemetry``
        (``True`` for the global OpenTelemetry providers, or a
        :class:`paymaster.Telemetry`) spans and metrics (needs
        ``paymaster[otel]``). Both are off by default and then cost nothing."""
        if isinstance(database, Engine):
            if not is_configured(database):
                raise ValueError(
                    "a SQLite engine for the ledger must come from paymaster.connect() "
                    "(WAL, BEGIN IMMEDIATE); pass the URL instead"
                )
            self.engine, self._owns_engine = database, False
        else:
            self.engine = connect(
                database, sqlite_synchronous=sqlite_synchronous, pool_size=max_threads
            )
            self._owns_engine = True
        ensure_schema(self.engine, upgrade=upgrade_schema)
        if isinstance(policies, (str, Path)):
            policies = load_policies(policies)
        self.policies = policies if isinstance(policies, PolicySet) else PolicySet(policies)
        self._clock = clock
        #: Decides and sends alerts; ``None`` when alerts are off.
        self.alerter = None if alerts is None else Alerter(alerts)
        self.ledger = Ledger(self.engine, clock, observer=self.alerter)
        self.audit = AuditLog(self.engine)
        #: Spans and metrics (:func:`paymaster.instrument`); ``None`` when off.
        self.telemetry: Telemetry | None = None
        if telemetry:
            from .._telemetry import Telemetry, attach, instrument

            if isinstance(telemetry, Telemetry):
                attach(self, telemetry)
            else:
                instrument(self)
        self._unknown_on = unknown_on
        # Policies and run policies are immutable: narrow (and hash) each pair once.
        self._effective = functools.lru_cache(maxsize=4096)(effective_policy)
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="paymaster")

    def close(self) -> None:
        """Release the connection pool and worker threads; deliver queued alerts (waiting
        at most ``AlertConfig.close_timeout``)."""
        self._executor.shutdown(wait=True)
        if self.alerter is not None:
            self.alerter.close(self.alerter.config.close_timeout)
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Governor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the call path -------------------------------------------------------------------
    def check_agent(self, agent: str) -> str:
        """``agent`` if a policy names it as its agent type, else a
        :class:`~paymaster.PolicyError` listing the agent types the policies know
        (with the nearest as a suggestion); see :meth:`PolicySet.check_agent`. The
        adapters call it when tools are wrapped for an explicit ``agent=``."""
        return self.policies.check_agent(agent)

    def effective_policy(
        self, agent: str, vendor: str, run_policy: RunPolicy | None = None
    ) -> EffectivePolicy:
        """The rules a call of this agent type, vendor and run policy is checked against."""
        return self._effective(self.policies.require(agent, vendor), run_policy)

    def _prepare(self, request: CallRequest | None = None, /, **keywords: Any) -> ReserveRequest:
        """The pure checks of a call (:func:`paymaster._governor.prepare.prepare`)."""
        return prepare(self, as_request(request, keywords, "_prepare"))

    record_refusal = _records.record_refusal
    record_error = _records.record_error
    free_call = _records.free_call

    @overload
    def guard(self, request: CallRequest) -> AbstractContextManager[GovernedCall]: ...
    @overload
    def guard(self, **keywords: Unpack[CallKeywords]) -> AbstractContextManager[GovernedCall]: ...
    def guard(
        self, request: CallRequest | None = None, **keywords: Any
    ) -> AbstractContextManager[GovernedCall]:
        """Govern one call made inside the ``with`` block: a :class:`CallRequest`, or its
        fields as keywords (``gov.guard(agent=..., vendor=..., endpoint=..., ...)``); not
        both. The request's fields are described on :class:`CallRequest`.

        Raises :class:`PolicyViolation` before the block runs if the call is refused, and
        :class:`GovernanceUnavailable` if the ledger cannot be reached (fail closed).
        ``estimate`` is what the call may cost at most: it is reserved, and settling above
        it is an overrun that freezes the budget. A call that moves no money passes
        ``free=True`` instead (still checked, counted and audited).
        """
        return self._guard(as_request(request, keywords, "guard"))

    @contextmanager
    def _guard(self, request: CallRequest) -> Iterator[GovernedCall]:
        with self._span(request) as span:
            prepared = prepare(self, request)
            call = open_call(self.ledger, self.ledger.reserve(prepared), prepared, self._unknown_on)
            span.started(call)
            try:
                yield call
            except BaseException as exc:
                close_call(call, exc, self._unknown_on)
                raise
            close_call(call, None, self._unknown_on)

    def _span(self, request: CallRequest) -> CallSpan:
        if self.telemetry is None:
            return _NO_SPAN
        return self.telemetry.call_span(
            agent=request.agent,
            vendor=request.vendor,
            endpoint=request.endpoint,
            method=request.method,
            run=request.run,
            estimate=request.estimate,
        )

    @overload
    def aguard(self, request: CallRequest) -> AsyncGuard: ...
    @overload
    def aguard(self, **keywords: Unpack[CallKeywords]) -> AsyncGuard: ...
    def aguard(self, request: CallRequest | None = None, **keywords: Any) -> AsyncGuard:
        """:meth:`guard` for asyncio (``async with``): ledger work runs in worker threads,
        never on the loop. The block's call is an :class:`AsyncGovernedCall`, whose
        resolving methods are awaited.

        A task cancelled while its reserve is in flight releases the hold once the reserve
        lands (the call never ran); cancelled inside the block, the hold is kept and marked
        unknown, since the vendor may have acted.
        """
        request = as_request(request, keywords, "aguard")
        return AsyncGuard(self, functools.partial(prepare, self, request), self._span(request))

    async def in_worker(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Await blocking ``fn`` (a governed vendor call with its settle, say) run in the
        governor's worker threads, with this task's context variables.

        The work is never cut off half-way: if the awaiting task is cancelled, ``fn``
        still runs to completion in its thread and records its real outcome, while the
        task ends cancelled at once (an agent framework tearing down sibling tool calls
        need not wait for it). Work cancelled before a thread picks it up never starts.
        :meth:`close` waits for work in flight.
        """
        return await in_executor(self._executor, fn, *args, **kwargs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run blocking ``fn`` in the governor's worker threads without waiting for it
        (an audit row that must be written although the asking task is being cancelled);
        :meth:`close` waits for it."""
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    governed = _decorator.governed

    # -- operations ----------------------------------------------------------------------
    def revoke(
        self,
        *,
        agent: str | None = None,
        run: str | None = None,
        everything: bool = False,
        reason: str,
        by: str | None = None,
    ) -> int:
        """Kill switch: the next reserve of every process in this scope is refused."""
        scope, target = self._scope(agent, run, everything)
        return self.ledger.revoke(scope, target, reason=reason, by=by or _who())

    def restore(
        self,
        *,
        agent: str | None = None,
        run: str | None = None,
        everything: bool = False,
        reason: str = "restored",
        by: str | None = None,
    ) -> int:
        scope, target = self._scope(agent, run, everything)
        return self.ledger.restore(scope, target, reason=reason, by=by or _who())

    @staticmethod
    def _scope(
        agent: str | None, run: str | None, everything: bool
    ) -> tuple[RevocationScope, str | None]:
        if sum((agent is not None, run is not None, everything)) != 1:
            raise ValueError("name exactly one of agent=..., run=... or everything=True")
        if everything:
            return RevocationScope.ALL, None
        if agent is not None:
            return RevocationScope.AGENT, agent
        return RevocationScope.RUN, run

    def revocations(self) -> list[Revocation]:
        return self.ledger.revocations()

    def holds(self, *, older_than: timedelta | None = None) -> list[Hold]:
        """Unresolved holds (pending or unknown), oldest first."""
        return self.ledger.holds(older_than=older_than)

    def resolve_hold(
        self,
        hold_id: str,
        *,
        settle: Money | None = None,
        release: bool = False,
        reason: str,
        by: str | None = None,
    ) -> Hold:
        return self.ledger.resolve_hold(
            hold_id, settle=settle, release=release, reason=reason, by=by or _who()
        )

    def acknowledge_overrun(self, hold_id: str, *, reason: str, by: str | None = None) -> Hold:
        """Acknowledge a call that settled above its reservation: its budgets, frozen by
        the overrun, take calls again (they keep counting what was spent). Audited."""
        return self.ledger.acknowledge_overrun(hold_id, reason=reason, by=by or _who())

    def overruns(self, *, acknowledged: bool = False) -> list[Hold]:
        """Holds settled above their reservation; by default those still freezing their
        budgets (awaiting :meth:`acknowledge_overrun`)."""
        return self.ledger.overruns(acknowledged=acknowledged)

    def budgets(self, *, day: date | None = None) -> list[BudgetStatus]:
        return self.ledger.budgets(day=day)

    # -- alerts --------------------------------------------------------------------------
    def check_stale_holds(self, older_than: timedelta) -> list[Alert]:
        """Alert on every unresolved hold created ``older_than`` ago or earlier that has not
        alerted yet (once per hold, across processes); returns those alerts, also sent to
        the sinks when alerts are on. Call it from a scheduler or a cron job."""
        at, holds = self.ledger.flag_stale_holds(older_than)
        alerts = [stale_hold_alert(hold, at, older_than) for hold in holds]
        if self.alerter is not None:
            self.alerter.publish(alerts)
        return alerts

    def flush_alerts(self, timeout: float | None = 5.0) -> bool:
        """Wait until queued alerts reached their sinks; ``False`` if ``timeout`` ran out."""
        return True if self.alerter is None else self.alerter.flush(timeout)
