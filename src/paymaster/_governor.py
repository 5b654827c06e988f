"""The facade users hold: policies + ledger + audit log.

::

    gov = Governor("sqlite:///paymaster.db", policies=load_policies("policies.yaml"))
    with gov.guard(agent="refund-agent", run="run-42", vendor="stripe",
                   endpoint="/v1/refunds", method="POST", customer="cus_1",
                   estimate=Money.parse("25.00 USD")) as call:
        refund = stripe_client.refunds.create(...)   # outside any transaction
        call.settle(actual=refund.amount, http_status=200, vendor_request_id=...)
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import getpass
import inspect
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sqlalchemy import Engine

from . import _storable as storable
from ._alerts import Alert, AlertConfig, Alerter, stale_hold_alert
from ._audit import AuditEntry, AuditLog, Outcome, row_number_problem
from ._db import SQLiteSync, connect, ensure_schema, is_configured
from ._errors import HoldAlreadyResolved, PolicyError, PolicyViolation, SpecError, ViolationCode
from ._ledger import (
    BudgetStatus,
    Hold,
    Ledger,
    Reservation,
    ReserveRequest,
    Revocation,
    RevocationScope,
    check_amount,
)
from ._loading import load_policies
from ._money import Money
from ._outcomes import OUTCOME_UNKNOWN_EXCEPTIONS, Resolution, Verdict, decide, describe
from ._policy import EffectivePolicy, Policy, PolicySet, RunPolicy, effective_policy

if TYPE_CHECKING:
    from ._telemetry import Telemetry

__all__ = ["AsyncGovernedCall", "AsyncGuard", "GovernedCall", "Governor"]

log = logging.getLogger("paymaster")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database in some containers
        return "unknown"


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
        if self._done:
            raise HoldAlreadyResolved(
                f"this call already recorded its outcome (hold {self.hold.id} is "
                f"{self.hold.state}); an attempt records it exactly once"
            )
        self._attempted = self._attempted or attempted
        self.hold = resolve()
        self._done = True
        return self.hold

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
            ),
            attempted=False,
        )


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
        self.ledger = Ledger(self.engine, clock, alerts=self.alerter)
        self.audit = AuditLog(self.engine)
        #: Spans and metrics (:func:`paymaster.instrument`); ``None`` when off.
        self.telemetry: Telemetry | None = None
        if telemetry:
            from ._telemetry import Telemetry, instrument

            if isinstance(telemetry, Telemetry):
                self.telemetry = telemetry
                self.ledger.observer = telemetry
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

    def _prepare(
        self,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str,
        estimate: Money | None,
        customer: str | None,
        run: str | None,
        run_policy: RunPolicy | None,
        idempotency_key: str | None,
        pricing_lookup: bool = False,
        tool_call_id: str | None = None,
        credential: str | None = None,
        subject: str | None = None,
        accounts: Collection[str] = (),
        free: bool = False,
    ) -> ReserveRequest:
        """The pure checks; a violation is audited (the only I/O) and raised.

        The policy decides on the caller's text as given; the ledger stores, compares and
        audits its storable form only (:mod:`paymaster._storable`), on every backend."""
        method = method.upper()
        free = free or pricing_lookup
        asked = (agent, vendor, endpoint, method, customer)
        agent, vendor = storable.field("agent", agent), storable.field("vendor", vendor)
        endpoint, method = storable.field("endpoint", endpoint), storable.field("method", method)
        run, customer = storable.field("run", run), storable.field("customer", customer)
        idempotency_key = storable.field("idempotency_key", idempotency_key)
        tool_call_id = storable.field("tool_call_id", tool_call_id)
        credential = storable.field("credential", credential)
        subject = storable.field("subject", subject)

        def refuse(violation: PolicyViolation, cost: Money | None) -> None:
            """Audit a refusal made before anything is reserved (its row, as every
            attempt leaves one)."""
            self.record_refusal(
                violation,
                agent=agent,
                vendor=vendor,
                endpoint=endpoint,
                method=method,
                run=run,
                customer=customer,
                estimate=cost,
                tool_call_id=tool_call_id,
                credential=credential,
            )

        try:
            policy_set_entry = self.policies.require(asked[0], asked[1], run=run)
        except PolicyViolation as violation:
            refuse(violation, estimate if isinstance(estimate, Money) else None)
            raise
        try:
            _check_estimate(estimate, free)
            if run_policy is not None and not isinstance(run_policy, RunPolicy):
                raise TypeError(
                    f"run_policy must be a paymaster.RunPolicy, got {type(run_policy).__name__}"
                    ': build one, as in RunPolicy(cap="10.00", endpoints=["/v1/refunds"])'
                )
            policy = self._effective(policy_set_entry, run_policy)
        except (TypeError, ValueError) as bad:
            # Bad input is the caller's error, raised as it is; the attempt still leaves
            # its row (a refusal naming what was wrong).
            code = (
                ViolationCode.RUN_POLICY_WIDENED
                if isinstance(bad, PolicyError)
                else ViolationCode.INVALID_REQUEST
            )
            # A bad estimate is not written as the row's estimate.
            refuse(PolicyViolation(code, str(bad), agent=agent, run=run, vendor=vendor), None)
            raise
        cost = estimate if estimate is not None else Money.zero(policy.currency)
        request = ReserveRequest(
            agent=agent,
            vendor=vendor,
            endpoint=endpoint,
            method=method,
            estimate=cost,
            policy=policy,
            run=run,
            customer=customer,
            idempotency_key=idempotency_key,
            tool_call_id=tool_call_id,
            credential=credential,
            subject=subject,
            free=free,
        )
        try:
            canonical = policy.check(
                endpoint=asked[2],
                method=asked[3],
                customer=asked[4],
                estimate=cost,
                now=self.ledger.now(),
                run=run,
                customer_checked_later=pricing_lookup,
                accounts=accounts,
            )
        except PolicyViolation as violation:
            self.ledger.record_denial(request, violation)
            raise
        if estimate is None and not free:
            # Every policy has a cap: a call that reserves nothing could settle anything.
            missing = PolicyViolation(
                ViolationCode.ESTIMATE_REQUIRED,
                f"{agent}/{vendor} {method} {endpoint} carries no estimate, and its policy "
                f"{policy.policy_id!r} has a cap: pass estimate=Money(...) (what the call may "
                "cost at most), or free=True for a call that moves no money",
                policy_id=policy.policy_id,
                agent=agent,
                run=run,
                vendor=vendor,
                endpoint=endpoint,
            )
            self.ledger.record_denial(request, missing)
            raise missing
        return dataclasses.replace(request, endpoint=storable.field("endpoint", canonical))

    def record_refusal(
        self,
        violation: PolicyViolation,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str,
        run: str | None = None,
        customer: str | None = None,
        estimate: Money | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> PolicyViolation:
        """Audit a call refused before any policy applied (no policy for the agent, or a
        vendor operation paymaster cannot govern); returns ``violation`` for raising."""
        self.ledger.record_denial(
            None,
            violation,
            entry=AuditEntry(
                agent=agent,
                run=run,
                vendor=vendor,
                endpoint=endpoint,
                method=method.upper(),
                customer=customer,
                outcome=Outcome.DENIED,
                currency=estimate.currency if estimate else None,
                estimate=estimate.amount if estimate else 0,
                violation_code=violation.code.value,
                error=violation.message,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
        )
        return violation

    def record_error(
        self,
        error: str,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str,
        run: str | None = None,
        customer: str | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> None:
        """Audit an attempt that ended in an error before anything was reserved (a tool's
        spec that raised, say): one ``errored`` row with no hold, no budget moved."""
        self.ledger.record(
            AuditEntry(
                agent=agent,
                run=run,
                vendor=vendor,
                endpoint=endpoint,
                method=method.upper(),
                customer=customer,
                outcome=Outcome.ERRORED,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            )
        )

    def free_call(
        self,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str = "CALL",
        run: str | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> Callable[..., None]:
        """Admit a call that spends nothing and reserves nothing (an agent's tool marked
        free): refused, and audited, if its agent or run is revoked. Returns the function
        that writes its audit row once it is done: ``record(error=None, duration_ms=...)``,
        which also takes the row's ``http_status`` and ``vendor_request_id``. A free call
        has no hold. Given an ``http_status`` or ``duration_ms`` a row cannot hold, record()
        writes the row as ``errored``, saying so, then raises ``ValueError``.
        """
        base = AuditEntry(
            agent=agent,
            vendor=vendor,
            endpoint=endpoint,
            method=method.upper(),
            run=run,
            outcome=Outcome.ALLOWED,
            tool_call_id=tool_call_id,
            credential=credential,
        )
        revoked = self.ledger.active_revocation(agent, run)
        if revoked is not None:
            violation = PolicyViolation(
                ViolationCode.REVOKED,
                revoked,
                agent=agent,
                run=run,
                vendor=vendor,
                endpoint=endpoint,
            )
            self.ledger.record_denial(
                None,
                violation,
                entry=dataclasses.replace(
                    base,
                    outcome=Outcome.DENIED,
                    violation_code=violation.code.value,
                    error=violation.message,
                ),
            )
            raise violation

        written: list[bool] = []

        def record(
            error: str | None = None,
            duration_ms: int | None = None,
            *,
            http_status: int | None = None,
            vendor_request_id: str | None = None,
        ) -> None:
            if written:
                raise RuntimeError(
                    "record() was called already for this free call: each admitted call "
                    "writes one audit row; admit the next call with free_call() again"
                )
            written.append(True)
            problem = row_number_problem(http_status=http_status, duration_ms=duration_ms)
            if problem is not None:
                # The call was made: its row is written, saying what record() was given
                # that a row cannot hold, before the caller hears of the mistake.
                error, duration_ms, http_status = f"record(): {problem}", None, None
            outcome = Outcome.ERRORED if error else Outcome.ALLOWED
            self.ledger.record(
                dataclasses.replace(
                    base,
                    outcome=outcome,
                    error=error,
                    duration_ms=duration_ms,
                    http_status=http_status,
                    vendor_request_id=vendor_request_id,
                )
            )
            if problem is not None:
                raise ValueError(problem)

        return record

    @contextmanager
    def guard(
        self,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str = "POST",
        estimate: Money | None = None,
        customer: str | None = None,
        run: str | None = None,
        run_policy: RunPolicy | None = None,
        idempotency_key: str | None = None,
        pricing_lookup: bool = False,
        tool_call_id: str | None = None,
        credential: str | None = None,
        subject: str | None = None,
        accounts: Collection[str] = (),
        free: bool = False,
    ) -> Iterator[GovernedCall]:
        """Govern one call made inside the ``with`` block.

        Raises :class:`PolicyViolation` before the block runs if the call is refused, and
        :class:`GovernanceUnavailable` if the ledger cannot be reached (fail closed).
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
        """
        with self._span(agent, vendor, endpoint, method, run, estimate) as span:
            request = self._prepare(
                agent=agent,
                vendor=vendor,
                endpoint=endpoint,
                method=method,
                estimate=estimate,
                customer=customer,
                run=run,
                run_policy=run_policy,
                idempotency_key=idempotency_key,
                pricing_lookup=pricing_lookup,
                tool_call_id=tool_call_id,
                credential=credential,
                subject=subject,
                accounts=accounts,
                free=free,
            )
            call = GovernedCall(
                self.ledger,
                self.ledger.reserve(request),
                request.policy,
                free=request.free,
                tool_call_id=request.tool_call_id,
                credential=request.credential,
            )
            call.unknown_on = self._unknown_on
            span.started(call)
            try:
                yield call
            except BaseException as exc:
                _close_call(call, exc, self._unknown_on)
                raise
            _close_call(call, None, self._unknown_on)

    def _span(
        self,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str,
        run: str | None,
        estimate: Money | None,
    ) -> _NoSpan | CallSpan:
        if self.telemetry is None:
            return _NO_SPAN
        return self.telemetry.call_span(
            agent=agent,
            vendor=vendor,
            endpoint=endpoint,
            method=method,
            run=run,
            estimate=estimate,
        )

    def aguard(
        self,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str = "POST",
        estimate: Money | None = None,
        customer: str | None = None,
        run: str | None = None,
        run_policy: RunPolicy | None = None,
        idempotency_key: str | None = None,
        pricing_lookup: bool = False,
        tool_call_id: str | None = None,
        credential: str | None = None,
        subject: str | None = None,
        accounts: Collection[str] = (),
        free: bool = False,
    ) -> AsyncGuard:
        """:meth:`guard` for asyncio (``async with``): ledger work runs in worker threads,
        never on the loop.

        A task cancelled while its reserve is in flight releases the hold once the reserve
        lands (the call never ran); cancelled inside the block, the hold is kept and marked
        unknown, since the vendor may have acted.
        """
        prepare = functools.partial(
            self._prepare,
            agent=agent,
            vendor=vendor,
            endpoint=endpoint,
            method=method,
            estimate=estimate,
            customer=customer,
            run=run,
            run_policy=run_policy,
            idempotency_key=idempotency_key,
            pricing_lookup=pricing_lookup,
            tool_call_id=tool_call_id,
            credential=credential,
            subject=subject,
            accounts=accounts,
            free=free,
        )
        span = self._span(agent, vendor, endpoint, method, run, estimate)
        return AsyncGuard(self, prepare, span)

    async def in_worker(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Await blocking ``fn`` (a governed vendor call with its settle, say) run in the
        governor's worker threads, with this task's context variables.

        The work is never cut off half-way: if the awaiting task is cancelled, ``fn``
        still runs to completion in its thread and records its real outcome, while the
        task ends cancelled at once (an agent framework tearing down sibling tool calls
        need not wait for it). Work cancelled before a thread picks it up never starts.
        :meth:`close` waits for work in flight.
        """
        work = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.wrap_future(self._executor.submit(work))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run blocking ``fn`` in the governor's worker threads without waiting for it
        (an audit row that must be written although the asking task is being cancelled);
        :meth:`close` waits for it."""
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    async def _to_completion(
        self,
        fn: Callable[..., T],
        *args: Any,
        polling: bool = False,
        on_cancel: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> tuple[T, bool]:
        """Run ``fn`` in a worker thread and wait for it even if this task is cancelled
        meanwhile (a ledger write cannot be abandoned half-way); report the cancellation.

        A task being cancelled (``polling``, or once a cancellation arrives) waits by
        polling rather than by awaiting the thread, so that a framework draining
        cancelled tasks sees it make progress (the Agents SDK keeps waiting only for
        tasks whose next wake-up is a timer) instead of abandoning it mid-write.
        ``on_cancel`` runs once, when a cancellation is first seen: for work that must
        finish correctly even if this task is then abandoned and never resumes.
        """
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs)
        )
        cancelled = False
        if not polling:
            try:
                return await asyncio.shield(future), False
            except asyncio.CancelledError:
                if future.done() and future.cancelled():
                    raise
                cancelled = True
                if on_cancel is not None:
                    on_cancel()
        while not future.done():
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                cancelled = True
        return future.result(), cancelled

    async def _finish(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """:meth:`_to_completion`, then end cancelled if the task was cancelled meanwhile."""
        result, cancelled = await self._to_completion(fn, *args, **kwargs)
        if cancelled:
            raise asyncio.CancelledError
        return result

    def governed(
        self,
        *,
        agent: str,
        vendor: str,
        endpoint: str,
        method: str = "POST",
        estimate: Money | Callable[..., Money | None] | None = None,
        customer: str | Callable[..., str | None] | None = None,
        run: str | Callable[..., str | None] | None = None,
        actual: Callable[[Any], Money | int | None] | None = None,
        free: bool = False,
    ) -> Callable[[F], F]:
        """Decorate a function (sync or async) so each call of it is governed.

        ``estimate``, ``customer`` and ``run`` may be callables of the function's
        arguments; ``actual`` maps its result to the actual cost (default: the estimate).
        A function that moves no money passes ``free=True`` instead of an estimate.
        """
        if estimate is None and not free:
            raise ValueError(
                f"governed(agent={agent!r}, endpoint={endpoint!r}) needs estimate= (Money, or "
                "a function of the call's arguments returning Money): what one call may cost "
                "at most; or free=True if it moves no money"
            )
        if estimate is not None and not callable(estimate):
            check_amount(estimate, "estimate")  # refused when decorating, not at each call

        def resolve(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return value(*args, **kwargs) if callable(value) else value

        def decorate(fn: F) -> F:
            name = getattr(fn, "__qualname__", repr(fn))

            def spec(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
                try:
                    worked_out = {
                        "estimate": resolve(estimate, args, kwargs),
                        "customer": resolve(customer, args, kwargs),
                        "run": resolve(run, args, kwargs),
                    }
                except Exception as exc:
                    # A bug in the decorator's own arguments: nothing was reserved or
                    # sent, and the attempt still leaves its row.
                    message = (
                        f"estimate=, customer= or run= of {name} raised ({describe(exc)}); "
                        "nothing was reserved or sent: fix that function"
                    )
                    self.record_error(
                        f"SpecError: {message}",
                        agent=agent,
                        vendor=vendor,
                        endpoint=endpoint,
                        method=method,
                    )
                    raise SpecError(message, tool=name) from exc
                return {
                    "agent": agent,
                    "vendor": vendor,
                    "endpoint": endpoint,
                    "method": method,
                    "free": free,
                    **worked_out,
                }

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    async with self.aguard(**spec(args, kwargs)) as call:
                        result = await fn(*args, **kwargs)
                        await call.settle(_cost_of(call, fn, actual, result))
                        return result

                return cast(F, async_wrapper)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with self.guard(**spec(args, kwargs)) as call:
                    result = fn(*args, **kwargs)
                    call.settle(_cost_of(call, fn, actual, result))
                    return result

            return cast(F, wrapper)

        return decorate

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


class _ReserveJob:
    """A reserve run in a worker thread that frees its own hold if the task that asked
    for it was cancelled meanwhile (a framework may abandon that task, never resuming it
    to do so)."""

    def __init__(self, governor: Governor, prepare: Callable[[], ReserveRequest]) -> None:
        self._governor = governor
        # The checks run in the same job as the reserve, so a task cancelled during
        # either still leaves its attempt's row: a refusal, or the freed reservation.
        self._prepare = prepare
        self.request: ReserveRequest | None = None
        self._lock = threading.Lock()
        self.abandoned = False
        self._reservation: Reservation | None = None
        self._released = threading.Event()

    def run(self) -> Reservation:
        self.request = self._prepare()
        reservation = self._governor.ledger.reserve(self.request)
        with self._lock:
            self._reservation = reservation
            abandoned = self.abandoned
        if abandoned:
            self._release()
        return reservation

    def abandon(self) -> None:
        """The asking task was cancelled (on the event loop)."""
        with self._lock:
            self.abandoned = True
            landed = self._reservation is not None
        if landed:  # reserved already: free it in a worker, without waiting
            self._governor._executor.submit(self._release)

    def wait_released(self) -> None:
        self._released.wait()

    def _release(self) -> None:
        reservation = self._reservation
        try:
            if reservation is not None:  # the call never ran: give up this attempt's
                # share (a hold other attempts still hold stays counted for them)
                request = self.request
                self._governor.ledger.release(
                    reservation.hold.id,
                    outcome=Outcome.ERRORED,
                    error="task cancelled before the call was made",
                    tool_call_id=None if request is None else request.tool_call_id,
                    credential=None if request is None else request.credential,
                )
        except Exception:
            log.exception("could not free the hold of a cancelled call; it stays pending")
        finally:
            self._released.set()


class AsyncGuard:
    """The ``async with`` block of :meth:`Governor.aguard`.

    A class rather than an async generator: its awaits stay visible to frameworks that
    inspect a cancelled task to decide whether to wait for it (the Agents SDK), and an
    event loop shutting down has no generator of ours to close mid-write.
    """

    def __init__(
        self,
        governor: Governor,
        prepare: Callable[[], ReserveRequest],
        span: _NoSpan | CallSpan = _NO_SPAN,
    ) -> None:
        self._governor = governor
        self._prepare = prepare
        self._span = span
        self._call: AsyncGovernedCall | None = None

    async def __aenter__(self) -> AsyncGovernedCall:
        self._span.__enter__()
        try:
            call = await self._enter()
        except BaseException as exc:
            self._span.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._span.started(call)
        return call

    async def _enter(self) -> AsyncGovernedCall:
        gov = self._governor
        job = _ReserveJob(gov, self._prepare)
        try:
            reservation, cancelled = await gov._to_completion(job.run, on_cancel=job.abandon)
        except Exception as exc:
            if job.abandoned:  # refused (and audited) while the task was being cancelled
                raise asyncio.CancelledError from exc
            raise
        request = job.request
        assert request is not None
        if cancelled:
            # The job frees the hold in its worker thread (the call never ran), so it is
            # freed even if this task is abandoned now; wait for that when we can.
            await gov._to_completion(job.wait_released, polling=True)
            raise asyncio.CancelledError
        self._call = AsyncGovernedCall(gov.ledger, reservation, request.policy, gov)
        self._call.free = request.free
        self._call.tool_call_id = request.tool_call_id
        self._call.credential = request.credential
        self._call.unknown_on = gov._unknown_on
        return self._call

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        try:
            return await self._exit(exc)
        finally:
            self._span.__exit__(exc_type, exc, tb)

    async def _exit(self, exc: BaseException | None) -> bool:
        gov, call = self._governor, self._call
        assert call is not None
        if exc is None:
            await gov._finish(_close_call, call, None, gov._unknown_on)
            return False
        _, cancelled = await gov._to_completion(
            _close_call,
            call,
            exc,
            gov._unknown_on,
            polling=isinstance(exc, asyncio.CancelledError),
        )
        if cancelled and not isinstance(exc, asyncio.CancelledError):
            # Cancelled while recording: the task must still end cancelled.
            raise asyncio.CancelledError from exc
        return False


class AsyncGovernedCall(GovernedCall):
    """The call object of :meth:`Governor.aguard`: its resolving methods are awaitable."""

    def __init__(
        self,
        ledger: Ledger,
        reservation: Reservation,
        policy: EffectivePolicy,
        governor: Governor,
    ) -> None:
        super().__init__(ledger, reservation, policy)
        self._governor = governor

    async def settle(  # type: ignore[override]
        self,
        actual: Money | int | None = None,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
    ) -> Hold:
        return await self._governor._finish(
            GovernedCall.settle,
            self,
            actual,
            http_status=http_status,
            vendor_request_id=vendor_request_id,
        )

    async def fail(  # type: ignore[override]
        self,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        error: str | None = None,
    ) -> Hold:
        return await self._governor._finish(
            GovernedCall.fail,
            self,
            http_status=http_status,
            vendor_request_id=vendor_request_id,
            error=error,
        )

    async def unknown(self, error: str) -> Hold:  # type: ignore[override]
        return await self._governor._finish(GovernedCall.unknown, self, error)


def conclude(call: GovernedCall, verdict: Verdict) -> Hold:
    """Record ``verdict`` on ``call`` with the blocking methods (also for the call of an
    ``aguard``, from a worker thread)."""
    if verdict.resolution is Resolution.SETTLE:
        return GovernedCall.settle(call, verdict.actual)
    if verdict.resolution is Resolution.UNKNOWN:
        return GovernedCall.unknown(call, verdict.reason)
    return GovernedCall.fail(call, error=verdict.reason)


async def aconclude(call: GovernedCall, verdict: Verdict) -> Hold:
    """:func:`conclude` for the call of an ``aguard``, awaited on its event loop."""
    if not isinstance(call, AsyncGovernedCall):
        raise TypeError("aconclude takes the call of an aguard block; use conclude")
    if verdict.resolution is Resolution.SETTLE:
        return await call.settle(verdict.actual)
    if verdict.resolution is Resolution.UNKNOWN:
        return await call.unknown(verdict.reason)
    return await call.fail(error=verdict.reason)


def _check_estimate(estimate: Money | None, free: bool) -> None:
    if estimate is None:
        return
    check_amount(estimate, "estimate")
    if free and estimate.amount:
        raise ValueError(
            "a free call (free=True or pricing_lookup=True) cannot carry an "
            f"estimate of {estimate.format()}: drop free=True, or the estimate"
        )


def _cost_of(
    call: GovernedCall,
    fn: Callable[..., Any],
    actual: Callable[[Any], Money | int | None] | None,
    result: Any,
) -> Money | int | None:
    """What a decorated call cost, by its ``actual=``. The function has returned, so money
    may have moved: from here on a failure keeps the hold counted (unknown), never releases
    it, and a failing ``actual`` is a :class:`SpecError` naming the hold."""
    call._attempted = True
    if actual is None:
        return None
    try:
        return actual(result)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SpecError(
            f"actual= of {name} raised after the call returned ({describe(exc)}); hold "
            f"{call.hold_id} stays counted as unknown until an operator reconciles it: "
            "fix the actual function",
            tool=name,
            hold_id=call.hold_id,
        ) from exc


def _check_row_numbers(http_status: object) -> None:
    problem = row_number_problem(http_status=http_status)
    if problem is not None:
        raise ValueError(problem)


def _close_call(
    call: GovernedCall, exc: BaseException | None, unknown_on: tuple[type[BaseException], ...]
) -> None:
    """Resolve the hold as the block ended, if the block did not (runs off the event loop
    for ``aguard``, hence the base-class resolvers).

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
        GovernedCall.settle(call)
        return
    if exc is None:  # the block caught a failed settle/fail: the actual is not known
        text = "recording the outcome failed and the block went on"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        if resolution is Resolution.UNKNOWN:
            GovernedCall.unknown(call, f"outcome unknown, hold kept for reconciliation: {text}")
        else:
            call._release_errored(text)
    except Exception:
        # The user's exception must surface unchanged; the hold stays pending and counted.
        log.exception("could not record hold %s after %s; it stays pending", call.hold.id, text)
