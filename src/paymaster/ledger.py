"""The shared ledger: budgets, holds and revocations, and their atomic operations.

* **reserve** (one transaction): revocation check; for every budget the call counts
  against, ``committed = committed + x WHERE committed + x <= cap`` (the row lock of that
  conditional UPDATE is what keeps the cap under any concurrency); a pending hold.
* **settle** / **release** / **mark_unknown** (one transaction each): resolve the hold
  exactly once, correct ``committed`` by the difference, append the call's audit row.

``committed`` counts pending estimates plus settled actuals (plus holds of unknown
outcome), so a settle at exactly its estimate never touches the hot budget row. Holds
never expire: a crashed holder's hold stays counted until someone resolves it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine, and_, case, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import audit as audit_log
from . import statements as S
from .alerts import AlertBatch, Alerter, BudgetRef, denial_alert, revoke_alert
from .audit import AuditEntry, Outcome
from .db import read_only, unavailable_on_error
from .errors import (
    GovernanceUnavailable,
    HoldAlreadyResolved,
    HoldNotFound,
    PolicyViolation,
    ViolationCode,
)
from .money import Money
from .policy import EffectivePolicy
from .schema import budget, hold, revocation

__all__ = [
    "BudgetStatus",
    "Hold",
    "HoldState",
    "Ledger",
    "LedgerObserver",
    "Reservation",
    "ReserveRequest",
    "Revocation",
    "RevocationScope",
]


T = TypeVar("T")


class HoldState(str, Enum):
    PENDING = "pending"
    SETTLED = "settled"
    RELEASED = "released"
    UNKNOWN = "unknown"  # outcome not known (cancelled or timed out mid-call): still counted

    def __str__(self) -> str:
        return self.value


class RevocationScope(str, Enum):
    ALL = "all"
    AGENT = "agent"
    RUN = "run"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ReserveRequest:
    """One call to reserve for, already checked against ``policy``'s pure rules."""

    agent: str
    vendor: str
    endpoint: str
    method: str
    estimate: Money
    policy: EffectivePolicy
    run: str | None = None
    customer: str | None = None
    idempotency_key: str | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Hold:
    """A reserved call: its estimate counts against its budgets until it is resolved."""

    id: str
    idempotency_key: str | None
    agent: str
    run: str | None
    vendor: str
    endpoint: str
    method: str
    customer: str | None
    estimate: Money
    actual: Money | None
    daily_budget_id: int
    run_budget_id: int | None
    policy_id: str
    policy_hash: str
    state: HoldState
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None
    tool_call_id: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Hold:
        m = row._mapping
        return cls(
            id=m["id"], idempotency_key=m["idempotency_key"], agent=m["agent"], run=m["run"],
            vendor=m["vendor"], endpoint=m["endpoint"], method=m["method"],
            customer=m["customer"], estimate=Money(int(m["estimate"]), m["currency"]),
            actual=None if m["actual"] is None else Money(int(m["actual"]), m["currency"]),
            daily_budget_id=int(m["daily_budget_id"]),
            run_budget_id=None if m["run_budget_id"] is None else int(m["run_budget_id"]),
            policy_id=m["policy_id"], policy_hash=m["policy_hash"],
            state=HoldState(m["state"]), created_at=m["created_at"],
            resolved_at=m["resolved_at"], resolved_by=m["resolved_by"],
            resolution=m["resolution"], tool_call_id=m.get("tool_call_id"),
        )  # fmt: skip


@dataclass(frozen=True)
class Reservation:
    """The result of a successful reserve."""

    hold: Hold
    remaining: Money  # what is left of the daily budget after this reservation
    run_remaining: Money | None  # of the run's budget, if it has a money cap
    resumed: bool = False  # an existing pending hold was found by its idempotency key


@dataclass(frozen=True)
class Revocation:
    id: int
    scope: RevocationScope
    target: str
    reason: str
    revoked_by: str
    revoked_at: datetime
    lifted_at: datetime | None


@dataclass(frozen=True)
class BudgetStatus:
    """One budget window as the ledger sees it now."""

    id: int
    kind: str
    agent: str
    vendor: str
    run: str
    window: str
    cap: Money | None
    committed: Money
    settled: Money
    pending: Money  # pending and unknown holds' estimates
    calls: int
    calls_cap: int | None

    @property
    def remaining(self) -> Money | None:
        return None if self.cap is None else self.cap - self.committed


class LedgerObserver(Protocol):
    """Told of each ledger operation once it ends (telemetry); must not raise."""

    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None: ...

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None: ...

    def denied(self, entry: AuditEntry) -> None: ...


@dataclass(frozen=True)
class _Exhausted:
    """The budget that refused a reserve for its cap, as the refusal saw it."""

    budget: BudgetRef
    committed: int
    cap: int
    refused: Money


class _Denied(Exception):
    def __init__(self, violation: PolicyViolation, exhausted: _Exhausted | None = None) -> None:
        self.violation = violation
        self.exhausted = exhausted


class _Retry(Exception):
    """The transaction saw a state that changed under it; run it again."""


class _StaleBudgetId(Exception):
    """A cached budget id no longer exists (the database was reset); look it up again."""


def _template(outcome: Outcome, **fields: Any) -> AuditEntry:
    """An audit entry whose call fields :meth:`Ledger._resolve` fills from the hold."""
    return AuditEntry(agent="", vendor="", endpoint="", method="", outcome=outcome, **fields)


def _new_id() -> str:
    return uuid.uuid4().hex


def _budget_ref(key: tuple[str, ...], budget_id: int, run: str | None) -> BudgetRef:
    kind, agent, vendor, currency, _, window = key
    return BudgetRef(budget_id, kind, agent, vendor, currency, run, window or None)


_ATTEMPTS = 5
# A settle records what the vendor charged even if another attempt with the same
# idempotency key already marked the hold unknown. A release never starts from unknown:
# that attempt's vendor call may have moved money.
_OWNER_CAN_RESOLVE = (HoldState.PENDING, HoldState.UNKNOWN)
_MAX_CACHED_BUDGETS = 10_000
CALL_NOT_MADE = "so the call was not made"


def _not_recorded(hold_id: str) -> str:
    return (
        f"so the call's outcome was NOT recorded: hold {hold_id} stays counted against its "
        "budget until it is resolved; do not retry without checking the vendor"
    )


class Ledger:
    """Atomic ledger operations over one database (SQLite or PostgreSQL)."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        alerts: Alerter | None = None,
        observer: LedgerObserver | None = None,
    ) -> None:
        self._engine = engine
        #: Decides threshold alerts in the ledger's transactions; ``None``: no alert work.
        self.alerts = alerts
        #: Told of each operation (telemetry); ``None``: nothing measured.
        self.observer = observer
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        # Ids of committed budget rows only: an id seen inside a transaction that rolled
        # back may be handed to another budget (SQLite reuses rowids).
        self._budget_ids: dict[tuple[str, ...], int] = {}

    def now(self) -> datetime:
        """The injected clock, in UTC (audit hashes and UTC days depend on it)."""
        return self._clock().astimezone(timezone.utc)

    def _write(self, action: str, consequence: str, work: Callable[[Connection, bool], T]) -> T:
        """Run ``work`` in one write transaction; once more on a fresh connection if the
        pooled one turned out dead (``work`` is told it is a retry, for lost commits)."""
        with unavailable_on_error(self._engine, action, consequence):
            for attempt in range(2):
                try:
                    with self._engine.begin() as conn:
                        return work(conn, attempt > 0)
                except DBAPIError as exc:
                    if not exc.connection_invalidated or attempt > 0:
                        raise
        raise AssertionError("unreachable")

    # -- reserve -------------------------------------------------------------------------
    def reserve(self, request: ReserveRequest) -> Reservation:
        """Reserve the call's estimate against every budget it counts against.

        Raises :class:`PolicyViolation` (revoked, cap exceeded, call limit, ...) having
        written nothing but the denial's audit row, or :class:`GovernanceUnavailable`.
        """
        observer = self.observer
        if observer is None:
            return self._reserve_with_retries(request)
        started, ok = time.perf_counter(), False
        try:
            reservation = self._reserve_with_retries(request)
            ok = True
            return reservation
        finally:
            observer.reserved(request, time.perf_counter() - started, ok)

    def _reserve_with_retries(self, request: ReserveRequest) -> Reservation:
        # Fixed across attempts, so that a retry can recognise a hold that an attempt whose
        # COMMIT reply was lost did write: pending, and created at exactly this instant.
        hold_id, now = _new_id(), self.now()
        written: list[str] = []
        with unavailable_on_error(self._engine, "reserving", CALL_NOT_MADE):
            for attempt in range(_ATTEMPTS):
                new_ids: dict[tuple[str, ...], int] = {}
                batch = None if self.alerts is None else AlertBatch()
                try:
                    with self._engine.begin() as conn:
                        for candidate in written if attempt > 0 else ():
                            mine = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": candidate}).first()
                            if (
                                mine is not None
                                and mine.state == HoldState.PENDING.value
                                and mine.created_at == now
                            ):
                                return self._reservation_of(conn, Hold.from_row(mine))
                        reservation = self._reserve(
                            conn, request, now, new_ids, hold_id, written, batch
                        )
                except _Denied as denied:
                    self.record_denial(request, denied.violation, exhausted=denied.exhausted)
                    raise denied.violation from None
                except IntegrityError:
                    # A concurrent reserve with the same idempotency key committed first, or
                    # our own earlier attempt's commit landed meanwhile: the next attempt
                    # finds that hold.
                    if request.idempotency_key is None and attempt == 0:
                        raise
                except _StaleBudgetId:
                    self._budget_ids.clear()
                    if self.alerts is not None:
                        self.alerts.forget()
                except _Retry:
                    pass
                except DBAPIError as exc:
                    # A pooled connection that died (database restarted): one fresh try.
                    if not exc.connection_invalidated or attempt > 0:
                        raise
                else:
                    if len(self._budget_ids) > _MAX_CACHED_BUDGETS:  # one entry per run
                        self._budget_ids.clear()
                    self._budget_ids.update(new_ids)
                    if batch is not None and batch.seen:
                        assert self.alerts is not None
                        self.alerts.committed(batch)
                    return reservation
        raise GovernanceUnavailable(
            f"could not reserve after {_ATTEMPTS} attempts under contention, {CALL_NOT_MADE}"
        )

    def _reserve(
        self,
        conn: Connection,
        req: ReserveRequest,
        now: datetime,
        new_ids: dict[tuple[str, ...], int],
        new_hold_id: str,
        written: list[str],
        batch: AlertBatch | None = None,
    ) -> Reservation:
        policy = req.policy
        x = req.estimate.amount
        existing = None
        if req.idempotency_key is not None:
            existing = conn.execute(S.HOLD_BY_KEY, {"p_key": req.idempotency_key}).first()
        if existing is not None:
            found = Hold.from_row(existing)
            self._check_same_call(found, req)
            if found.state in (HoldState.PENDING, HoldState.UNKNOWN):
                return self._resume(conn, req, found)
            if found.state is HoldState.SETTLED:
                raise _Denied(self._violation(
                    req, ViolationCode.ALREADY_COMPLETED,
                    f"the call with idempotency key {req.idempotency_key!r} already settled "
                    f"at {found.resolved_at}; it is not repeated",
                ))  # fmt: skip
        daily_key = ("daily", req.agent, req.vendor, policy.currency, "", now.date().isoformat())
        daily_id = self._budget_id(conn, daily_key, now, new_ids)
        run_id = run_key = None
        if policy.has_run_budget:
            if req.run is None:
                raise _Denied(self._violation(
                    req, ViolationCode.RUN_CAP_EXCEEDED,
                    "the run policy sets a run budget but the call names no run",
                ))  # fmt: skip
            run_key = ("run", req.agent, req.vendor, policy.currency, req.run, "")
            run_id = self._budget_id(conn, run_key, now, new_ids)
        fields = {
            "agent": req.agent, "run": req.run, "vendor": req.vendor,
            "endpoint": req.endpoint, "method": req.method, "customer": req.customer,
            "currency": req.estimate.currency, "estimate": x, "actual": None,
            "daily_budget_id": daily_id, "run_budget_id": run_id,
            "policy_id": policy.policy_id, "policy_hash": policy.hash,
            "state": HoldState.PENDING.value, "created_at": now, "resolved_at": None,
            "resolved_by": None, "resolution": None, "tool_call_id": req.tool_call_id,
        }  # fmt: skip
        if existing is None:
            hold_id = new_hold_id
            written.append(hold_id)
            conn.execute(
                S.INSERT_HOLD, {"id": hold_id, "idempotency_key": req.idempotency_key, **fields}
            )
        else:  # a released hold retried with its key: reserve it again
            hold_id = existing.id
            written.append(hold_id)
            rearmed = conn.execute(
                S.REARM_HOLD, {"p_id": hold_id, **{f"p_{k}": v for k, v in fields.items()}}
            )
            if rearmed.rowcount != 1:
                raise _Retry
        # Budget rows last, and the hottest (the agent type's day) last of all, so its row
        # lock is held only until the commit. Every transaction that touches both takes
        # the run's row before the day's: no lock cycles. The day's UPDATE also checks the
        # revocations, so a revoke committed before this statement started refuses it.
        run_left = None
        if run_id is not None:
            assert run_key is not None
            run_left = self._take(
                conn, req, run_id, policy.run_cap, policy.run_max_calls,
                check_revoked=False, code=ViolationCode.RUN_CAP_EXCEEDED, key=run_key,
                created=run_key in new_ids,
            )  # fmt: skip
        daily_left = self._take(
            conn, req, daily_id, policy.daily_cap, policy.max_calls_per_day,
            check_revoked=True, code=ViolationCode.CAP_EXCEEDED, key=daily_key,
            created=daily_key in new_ids,
        )  # fmt: skip
        assert daily_left is not None
        if batch is not None:  # threshold alerts, once every budget row is taken
            if run_left is not None and policy.run_cap is not None:
                assert run_key is not None
                assert run_id is not None
                run_budget = (run_key, run_id, req.run)
                self._alert_thresholds(conn, batch, run_budget, policy.run_cap, run_left, now)
            daily_budget = (daily_key, daily_id, req.run)
            self._alert_thresholds(conn, batch, daily_budget, policy.daily_cap, daily_left, now)
        reserved = Hold(
            id=hold_id, idempotency_key=req.idempotency_key, agent=req.agent, run=req.run,
            vendor=req.vendor, endpoint=req.endpoint, method=req.method,
            customer=req.customer, estimate=req.estimate, actual=None,
            daily_budget_id=daily_id, run_budget_id=run_id, policy_id=policy.policy_id,
            policy_hash=policy.hash, state=HoldState.PENDING, created_at=now,
            resolved_at=None, resolved_by=None, resolution=None,
            tool_call_id=req.tool_call_id,
        )  # fmt: skip
        return Reservation(reserved, daily_left, run_left)

    def _check_same_call(self, found: Hold, req: ReserveRequest) -> None:
        """An idempotency key names one call: a different call reusing it is refused."""
        mine = (req.agent, req.vendor, req.endpoint, req.method, req.customer, req.estimate)
        theirs = (
            found.agent, found.vendor, found.endpoint, found.method, found.customer,
            found.estimate,
        )  # fmt: skip
        if mine != theirs:
            raise _Denied(self._violation(
                req, ViolationCode.IDEMPOTENCY_KEY_REUSED,
                f"idempotency key {req.idempotency_key!r} belongs to another call "
                f"({found.agent} {found.method} {found.endpoint} {found.estimate}); "
                "use a new key for a new call",
            ))  # fmt: skip

    def _resume(self, conn: Connection, req: ReserveRequest, found: Hold) -> Reservation:
        """A retry of a call whose hold is still counted: no second reservation. The kill
        switch applies to retries too."""
        self._check_revoked(conn, req)
        if found.state is HoldState.UNKNOWN:
            row = conn.execute(
                S.RESOLVE_HOLD,
                {
                    "p_id": found.id, "p_from": HoldState.UNKNOWN.value,
                    "p_state": HoldState.PENDING.value, "p_actual": None, "p_at": None,
                    "p_by": None, "p_reason": None,
                },
            ).first()  # fmt: skip
            if row is None:
                raise _Retry
            found = Hold.from_row(row)
        return self._reservation_of(conn, found, resumed=True)

    def _reservation_of(self, conn: Connection, found: Hold, resumed: bool = False) -> Reservation:
        """A reservation for a hold that already counts against its budgets."""
        daily = self._left(conn, found.daily_budget_id, found.estimate.currency)
        assert daily is not None
        run = None
        if found.run_budget_id is not None:
            run = self._left(conn, found.run_budget_id, found.estimate.currency)
        return Reservation(found, daily, run, resumed=resumed)

    def _left(self, conn: Connection, budget_id: int, currency: str) -> Money | None:
        row = conn.execute(S.BUDGET_STATE, {"p_bid": budget_id}).first()
        if row is None or row.cap is None:
            return None
        return Money(int(row.cap) - int(row.committed), currency)

    def _take(
        self,
        conn: Connection,
        req: ReserveRequest,
        budget_id: int,
        cap_money: Money | None,
        calls_cap: int | None,
        *,
        check_revoked: bool,
        code: ViolationCode,
        key: tuple[str, ...],
        created: bool = False,
    ) -> Money | None:
        currency = req.policy.currency
        label = key[0]  # daily | run
        x = req.estimate.amount
        cap = None if cap_money is None else cap_money.amount
        params: dict[str, Any] = {
            "p_bid": budget_id,
            "p_x": x,
            "p_cap": cap,
            "p_calls_cap": calls_cap,
        }
        if check_revoked:
            params.update(p_agent=req.agent, p_run=req.run)
        stmt = S.take_budget(
            capped=cap is not None, call_capped=calls_cap is not None, check_revoked=check_revoked
        )
        taken = conn.execute(stmt, params).first()
        if taken is not None:
            return None if cap is None else Money(cap - int(taken.committed), currency)
        # Refused: say why, in this order. A state that no longer refuses means another
        # transaction freed room since the UPDATE ran: run the reserve again.
        self._check_revoked(conn, req)
        row = conn.execute(S.BUDGET_STATE, {"p_bid": budget_id}).first()
        if row is None:
            raise _StaleBudgetId
        committed, calls = int(row.committed), int(row.calls)
        policy = req.policy
        if cap is not None and committed + x > cap:
            left = Money(max(cap - committed, 0), currency)
            scope = f"run {req.run!r}" if label == "run" else "today"
            # A budget this transaction created (and will roll back), or one nothing was
            # spent from, is not exhausted: the call alone is too big for its cap.
            exhausted = (
                None
                if created or committed == 0
                else _Exhausted(_budget_ref(key, budget_id, req.run), committed, cap, req.estimate)
            )
            raise _Denied(PolicyViolation(
                code,
                f"{req.estimate.format()} would exceed the {label} cap of "
                f"{Money(cap, currency).format()} for {req.agent}/{req.vendor} ({scope}): "
                f"{Money(committed, currency).format()} already committed, "
                f"{left.format()} remaining",
                policy_id=policy.policy_id, agent=req.agent, run=req.run, vendor=req.vendor,
                endpoint=req.endpoint, remaining=left,
            ), exhausted)  # fmt: skip
        if calls_cap is not None and calls >= calls_cap:
            raise _Denied(PolicyViolation(
                ViolationCode.CALL_LIMIT,
                f"the {label} limit of {calls_cap} calls for {req.agent}/{req.vendor} is "
                f"reached ({calls} made)",
                policy_id=policy.policy_id, agent=req.agent, run=req.run, vendor=req.vendor,
                endpoint=req.endpoint, calls_remaining=0,
                remaining=None if cap is None else Money(cap - committed, currency),
            ))  # fmt: skip
        raise _Retry

    def _alert_thresholds(
        self,
        conn: Connection,
        batch: AlertBatch,
        budget: tuple[tuple[str, ...], int, str | None],
        cap: Money,
        left: Money,
        now: datetime,
    ) -> None:
        """Record the thresholds this reserve took the budget (key, id, the call's run) to:
        no I/O unless one is reached that this process has not seen fire."""
        assert self.alerts is not None
        committed = cap.amount - left.amount
        due = self.alerts.due(budget[1], committed, cap.amount)
        if due:
            ref = _budget_ref(*budget)
            self.alerts.record(conn, batch, ref, due, committed=committed, cap=cap.amount, at=now)

    def _budget_id(
        self,
        conn: Connection,
        key: tuple[str, ...],
        now: datetime,
        new_ids: dict[tuple[str, ...], int],
    ) -> int:
        cached = self._budget_ids.get(key) or new_ids.get(key)
        if cached is not None:
            return cached
        kind, agent, vendor, currency, run, window = key
        where = and_(
            budget.c.kind == kind, budget.c.agent == agent, budget.c.vendor == vendor,
            budget.c.currency == currency, budget.c.run == run, budget.c.window == window,
        )  # fmt: skip
        found = conn.execute(select(budget.c.id).where(where)).scalar()
        if found is None:
            dialect_insert = pg_insert if self._postgres else sqlite_insert
            conn.execute(
                dialect_insert(budget)
                .values(
                    kind=kind, agent=agent, vendor=vendor, currency=currency, run=run,
                    window=window, committed=0, calls=0, created_at=now,
                )
                .on_conflict_do_nothing()
            )  # fmt: skip
            found = conn.execute(select(budget.c.id).where(where)).scalar_one()
        new_ids[key] = int(found)  # cached by reserve() only once this transaction commits
        return int(found)

    def _check_revoked(self, conn: Connection, req: ReserveRequest) -> None:
        row = conn.execute(S.ACTIVE_REVOCATION, {"p_agent": req.agent, "p_run": req.run}).first()
        if row is not None:
            what = "everything" if row.kind == "all" else f"{row.kind} {row.target!r}"
            raise _Denied(
                self._violation(req, ViolationCode.REVOKED, f"{what} is revoked: {row.reason}")
            )

    @staticmethod
    def _violation(req: ReserveRequest, code: ViolationCode, message: str) -> PolicyViolation:
        return PolicyViolation(
            code, message, policy_id=req.policy.policy_id, agent=req.agent, run=req.run,
            vendor=req.vendor, endpoint=req.endpoint,
        )  # fmt: skip

    def active_revocation(self, agent: str, run: str | None) -> str | None:
        """Why ``agent`` (or ``run``) is revoked now, or ``None``: the kill switch for
        calls that reserve nothing."""
        with (
            unavailable_on_error(self._engine, "reading revocations", CALL_NOT_MADE),
            read_only(self._engine) as conn,
        ):
            row = conn.execute(S.ACTIVE_REVOCATION, {"p_agent": agent, "p_run": run}).first()
        if row is None:
            return None
        what = "everything" if row.kind == "all" else f"{row.kind} {row.target!r}"
        return f"{what} is revoked: {row.reason}"

    def record(self, entry: AuditEntry) -> None:
        """Append the audit row of a call that reserved nothing (a free tool's call).
        After a lost COMMIT reply the row may be written twice; it moves no budget."""
        at = self.now()
        self._write(
            "auditing a free call",
            "so this free call's audit row was not written",
            lambda conn, retrying: audit_log.append(conn, entry, at),
        )

    def record_denial(
        self,
        request: ReserveRequest | None,
        violation: PolicyViolation,
        *,
        entry: AuditEntry | None = None,
        exhausted: _Exhausted | None = None,
    ) -> None:
        """Append the audit row of a refused call (nothing else is written but, with alerts
        on, the 100% threshold of the budget whose cap refused it, the first time)."""
        if entry is None:
            assert request is not None
            entry = AuditEntry(
                agent=request.agent, run=request.run, vendor=request.vendor,
                endpoint=request.endpoint, method=request.method, customer=request.customer,
                outcome=Outcome.DENIED, currency=request.estimate.currency,
                estimate=request.estimate.amount, actual=0,
                policy_id=request.policy.policy_id, policy_hash=request.policy.hash,
                violation_code=violation.code.value, error=violation.message,
                tool_call_id=request.tool_call_id,
            )  # fmt: skip
        consequence = f"the call was refused ({violation.code}) but its audit row was not written"
        at = self.now()
        alerts = self.alerts
        batches: list[AlertBatch] = []

        def work(conn: Connection, retrying: bool) -> None:
            batches.clear()
            if retrying:  # written already by an attempt whose COMMIT reply was lost?
                params = {"p_chain": entry.agent, "p_at": at, "p_endpoint": entry.endpoint}
                if conn.execute(S.DENIAL_AT, {**params, "p_code": entry.violation_code}).first():
                    return
            if alerts is not None and exhausted is not None:
                # Before the audit append: alert rows, then the chain head (one lock order).
                ref, committed, cap = exhausted.budget, exhausted.committed, exhausted.cap
                due = alerts.due(ref.id, committed, cap, refused=True)
                if due:
                    batch = AlertBatch()
                    batches.append(batch)
                    alerts.record(
                        conn, batch, ref, due, committed=committed, cap=cap, at=at,
                        refused=exhausted.refused,
                    )  # fmt: skip
            audit_log.append(conn, entry, at)

        self._write("auditing a denial", consequence, work)
        if alerts is not None:
            for batch in batches:
                alerts.committed(batch)
            alerts.publish([denial_alert(entry, violation, at)])
        if self.observer is not None:
            self.observer.denied(entry)

    # -- resolve -------------------------------------------------------------------------
    def settle(
        self,
        hold_id: str,
        actual: Money,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        duration_ms: int | None = None,
        error: str | None = None,
    ) -> Hold:
        """The call succeeded and cost ``actual`` (which may differ from the estimate)."""
        return self._resolve(
            hold_id, HoldState.SETTLED, actual,
            _template(
                Outcome.ALLOWED, http_status=http_status, vendor_request_id=vendor_request_id,
                duration_ms=duration_ms, error=error,
            ),
            allowed_from=_OWNER_CAN_RESOLVE,
        )  # fmt: skip

    def release(
        self,
        hold_id: str,
        *,
        outcome: Outcome = Outcome.FAILED,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        duration_ms: int | None = None,
        error: str | None = None,
    ) -> Hold:
        """The call failed and no money moved: free its estimate."""
        return self._resolve(
            hold_id, HoldState.RELEASED, None,
            _template(
                outcome, http_status=http_status, vendor_request_id=vendor_request_id,
                duration_ms=duration_ms, error=error,
            ),
        )  # fmt: skip

    def mark_unknown(self, hold_id: str, *, error: str, duration_ms: int | None = None) -> Hold:
        """Whether money moved is unknown: keep the hold counted, flag it for reconciliation."""
        return self._resolve(
            hold_id, HoldState.UNKNOWN, None,
            _template(Outcome.UNKNOWN, duration_ms=duration_ms, error=error),
        )  # fmt: skip

    def resolve_hold(
        self,
        hold_id: str,
        *,
        settle: Money | None = None,
        release: bool = False,
        reason: str,
        by: str,
    ) -> Hold:
        """An operator resolves a pending or unknown hold (e.g. one left by a crash)."""
        if (settle is None) == (not release):
            raise ValueError("resolve a hold with exactly one of settle=<Money> or release=True")
        if not reason.strip():
            raise ValueError("a reason is required to resolve a hold")
        state = HoldState.SETTLED if settle is not None else HoldState.RELEASED
        outcome = Outcome.ALLOWED if settle is not None else Outcome.FAILED
        return self._resolve(
            hold_id, state, settle,
            _template(outcome, error=f"resolved by {by}: {reason}"),
            by=by, reason=reason, allowed_from=(HoldState.PENDING, HoldState.UNKNOWN),
        )  # fmt: skip

    def _resolve(
        self,
        hold_id: str,
        state: HoldState,
        actual: Money | None,
        template: AuditEntry,
        *,
        by: str | None = None,
        reason: str | None = None,
        allowed_from: Sequence[HoldState] = (HoldState.PENDING,),
    ) -> Hold:
        if actual is not None and actual.amount < 0:
            raise ValueError(f"a call cannot cost a negative amount ({actual})")
        amount = actual.amount if actual is not None else 0
        now = self.now()
        action = f"recording hold {hold_id} as {state}"
        alerts = self.alerts
        batches: list[AlertBatch] = []

        def work(conn: Connection, retrying: bool) -> Hold:
            batches.clear()
            if retrying:  # the first attempt may have committed with its reply lost
                mine = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
                ours = conn.execute(S.AUDIT_OF_HOLD_AT, {"p_hold": hold_id, "p_at": now}).first()
                if mine is not None and ours is not None:
                    return Hold.from_row(mine)
            row, previous = None, HoldState.PENDING
            for previous in allowed_from:
                row = conn.execute(
                    S.RESOLVE_HOLD,
                    {
                        "p_id": hold_id, "p_from": previous.value, "p_state": state.value,
                        "p_actual": amount if state is HoldState.SETTLED else None,
                        "p_at": now, "p_by": by, "p_reason": reason,
                    },
                ).first()  # fmt: skip
                if row is not None:
                    break
            if row is None:
                current = conn.execute(S.HOLD_BY_ID, {"p_id": hold_id}).first()
                if current is None:
                    raise HoldNotFound(f"no hold {hold_id!r}")
                raise HoldAlreadyResolved(
                    f"hold {hold_id} is already {current.state} (at {current.resolved_at}); "
                    "a hold resolves exactly once"
                )
            resolved = Hold.from_row(row)
            currency = resolved.estimate.currency
            if actual is not None and actual.currency != currency:
                raise ValueError(  # rolls the transaction back
                    f"hold {hold_id} is in {currency}; cannot settle it in {actual.currency}"
                )
            if state is HoldState.SETTLED:
                delta = amount - resolved.estimate.amount
            elif state is HoldState.RELEASED:
                delta = -resolved.estimate.amount
            else:
                delta = 0
            if delta:
                # The reserve's order (run, then day): no lock cycles.
                rising = alerts is not None and delta > 0  # may cross a threshold
                adjusted = []
                for budget_id in (resolved.run_budget_id, resolved.daily_budget_id):
                    if budget_id is None:
                        continue
                    params = {"p_bid": budget_id, "p_delta": delta}
                    if rising:
                        adjusted.append(conn.execute(S.ADJUST_BUDGET_RETURNING, params).one())
                    else:
                        conn.execute(S.ADJUST_BUDGET, params)
                if adjusted:
                    batches.append(AlertBatch())
                    self._alert_adjusted(conn, batches[0], resolved, adjusted, now)
            error = template.error
            if state is HoldState.SETTLED and delta > 0:
                over = Money(delta, currency).format()
                error = (error + "; " if error else "") + f"actual exceeded estimate by {over}"
            entry = replace(
                template,
                agent=resolved.agent, run=resolved.run, vendor=resolved.vendor,
                endpoint=resolved.endpoint, method=resolved.method,
                customer=resolved.customer, currency=currency,
                estimate=resolved.estimate.amount, actual=amount,
                policy_id=resolved.policy_id, policy_hash=resolved.policy_hash,
                hold_id=hold_id, error=error, tool_call_id=resolved.tool_call_id,
                outcome=(
                    Outcome.RECONCILED if previous is HoldState.UNKNOWN else template.outcome
                ),
            )  # fmt: skip
            audit_log.append(conn, entry, now)
            return resolved

        observer = self.observer
        started, done = time.perf_counter(), None
        try:
            done = self._write(action, _not_recorded(hold_id), work)
        finally:
            if observer is not None:
                observer.resolved(state, done, time.perf_counter() - started)
        if alerts is not None:
            for batch in batches:
                alerts.committed(batch)
        return done

    def _alert_adjusted(
        self, conn: Connection, batch: AlertBatch, hold: Hold, rows: list[Any], now: datetime
    ) -> None:
        """Thresholds crossed by a settle above its estimate (budget rows as adjusted)."""
        assert self.alerts is not None
        currency = hold.estimate.currency
        for row in rows:
            if row.cap is None:
                continue
            committed, cap = int(row.committed), int(row.cap)
            due = self.alerts.due(int(row.id), committed, cap)
            if due:
                ref = BudgetRef(
                    int(row.id), row.kind, hold.agent, hold.vendor, currency, hold.run,
                    row.window or None,
                )  # fmt: skip
                self.alerts.record(conn, batch, ref, due, committed=committed, cap=cap, at=now)

    # -- revocations ---------------------------------------------------------------------
    def revoke(self, scope: RevocationScope, target: str | None, *, reason: str, by: str) -> int:
        """Refuse every later reserve in ``scope`` until restored; returns the revocation id."""
        scope = RevocationScope(scope)
        if scope is not RevocationScope.ALL and not target:
            raise ValueError(f"revoking a {scope} needs its name")
        if not reason.strip():
            raise ValueError("a revocation needs a reason")
        at, name = self.now(), "" if scope is RevocationScope.ALL else str(target)
        fields = {"kind": scope.value, "target": name, "reason": reason, "revoked_by": by}

        def work(conn: Connection, retrying: bool) -> int:
            if retrying:  # written already by an attempt whose COMMIT reply was lost?
                found = conn.execute(
                    select(revocation.c.id).where(
                        *(revocation.c[k] == v for k, v in fields.items()),
                        revocation.c.revoked_at == at,
                    )
                ).scalar()
                if found is not None:
                    return int(found)
            inserted = insert(revocation).values(**fields, revoked_at=at)
            return int(conn.execute(inserted.returning(revocation.c.id)).scalar_one())

        revocation_id = self._write("revoking", "so nothing was revoked", work)
        if self.alerts is not None:
            self.alerts.publish([revoke_alert(scope.value, name, reason=reason, by=by, at=at)])
        return revocation_id

    def restore(self, scope: RevocationScope, target: str | None, *, reason: str, by: str) -> int:
        """Lift the active revocations of exactly this scope; returns how many."""
        scope = RevocationScope(scope)
        at, name = self.now(), "" if scope is RevocationScope.ALL else str(target)
        same_scope = (revocation.c.kind == scope.value, revocation.c.target == name)

        def work(conn: Connection, retrying: bool) -> int:
            earlier = 0
            if retrying:  # lifted already by an attempt whose COMMIT reply was lost?
                earlier = int(
                    conn.execute(
                        select(func.count()).where(
                            *same_scope, revocation.c.lifted_at == at, revocation.c.lifted_by == by
                        )
                    ).scalar_one()
                )
            lifted = conn.execute(
                update(revocation)
                .where(revocation.c.lifted_at.is_(None), *same_scope)
                .values(lifted_at=at, lifted_by=by, lift_reason=reason)
            )
            return earlier + int(lifted.rowcount)

        return self._write("restoring", "so nothing was restored", work)

    def revocations(self, *, active_only: bool = True) -> list[Revocation]:
        query = select(revocation).order_by(revocation.c.id)
        if active_only:
            query = query.where(revocation.c.lifted_at.is_(None))
        with read_only(self._engine) as conn:
            return [
                Revocation(
                    id=int(r.id), scope=RevocationScope(r.kind), target=r.target,
                    reason=r.reason, revoked_by=r.revoked_by, revoked_at=r.revoked_at,
                    lifted_at=r.lifted_at,
                )
                for r in conn.execute(query)
            ]  # fmt: skip

    def flag_stale_holds(self, older_than: timedelta) -> tuple[datetime, list[Hold]]:
        """Mark the unresolved holds created ``older_than`` ago or earlier that were never
        flagged, and return when and which: each hold is returned once, to one caller, of
        all processes on the ledger (until it is released and reserved again)."""
        if older_than < timedelta(0):
            raise ValueError("older_than must not be negative")
        at = self.now()

        def work(conn: Connection, retrying: bool) -> list[Hold]:
            if retrying:  # flagged already by an attempt whose COMMIT reply was lost?
                mine = conn.execute(select(hold).where(hold.c.stale_alerted_at == at)).all()
                if mine:
                    return [Hold.from_row(row) for row in mine]
            rows = conn.execute(S.STALE_HOLDS, {"p_cutoff": at - older_than, "p_at": at}).all()
            return sorted((Hold.from_row(row) for row in rows), key=lambda h: h.created_at)

        return at, self._write("flagging stale holds", "so no hold was flagged", work)

    # -- inspection ----------------------------------------------------------------------
    def hold_for_key(self, idempotency_key: str) -> Hold | None:
        """The hold an idempotency key names, if any: a retry is priced as the call it
        repeats, not re-priced from a world its first attempt may have changed."""
        with (
            unavailable_on_error(self._engine, "reading a hold by its idempotency key"),
            read_only(self._engine) as conn,
        ):
            row = conn.execute(
                select(hold).where(hold.c.idempotency_key == idempotency_key)
            ).first()
        return None if row is None else Hold.from_row(row)

    def get_hold(self, hold_id: str) -> Hold:
        with read_only(self._engine) as conn:
            row = conn.execute(select(hold).where(hold.c.id == hold_id)).first()
        if row is None:
            raise HoldNotFound(f"no hold {hold_id!r}")
        return Hold.from_row(row)

    def holds(
        self,
        *,
        states: Sequence[HoldState] = (HoldState.PENDING, HoldState.UNKNOWN),
        older_than: timedelta | None = None,
        run: str | None = None,
    ) -> list[Hold]:
        """Holds in the given states (by default the unresolved ones), oldest first."""
        query = select(hold).where(hold.c.state.in_([s.value for s in states]))
        if older_than is not None:
            query = query.where(hold.c.created_at <= self.now() - older_than)
        if run is not None:
            query = query.where(hold.c.run == run)
        with read_only(self._engine) as conn:
            return [Hold.from_row(r) for r in conn.execute(query.order_by(hold.c.created_at))]

    def budgets(self, *, day: date | None = None) -> list[BudgetStatus]:
        """Budgets of one UTC day (default today) and the runs with holds that day."""
        window = (day or self.now().date()).isoformat()
        with read_only(self._engine) as conn:
            daily = conn.execute(
                select(budget).where(budget.c.kind == "daily", budget.c.window == window)
            ).all()
            daily_ids = [int(r.id) for r in daily]
            run_ids = (
                conn.execute(
                    select(hold.c.run_budget_id)
                    .where(hold.c.daily_budget_id.in_(daily_ids), hold.c.run_budget_id.is_not(None))
                    .distinct()
                )
                .scalars()
                .all()
            )
            runs = conn.execute(select(budget).where(budget.c.id.in_(run_ids))).all()
            sums: dict[int, tuple[int, int]] = {}
            for column in (hold.c.daily_budget_id, hold.c.run_budget_id):
                for row in conn.execute(
                    select(
                        column.label("bid"),
                        func.sum(case((hold.c.state == "settled", hold.c.actual), else_=0)),
                        func.sum(
                            case(
                                (hold.c.state.in_(["pending", "unknown"]), hold.c.estimate), else_=0
                            )
                        ),
                    )
                    .where(column.in_(daily_ids + list(run_ids)))
                    .group_by(column)
                ):
                    sums[int(row[0])] = (int(row[1] or 0), int(row[2] or 0))
        result = []
        for row in [*daily, *runs]:
            settled, pending = sums.get(int(row.id), (0, 0))
            result.append(
                BudgetStatus(
                    id=int(row.id), kind=row.kind, agent=row.agent, vendor=row.vendor,
                    run=row.run, window=row.window,
                    cap=None if row.cap is None else Money(int(row.cap), row.currency),
                    committed=Money(int(row.committed), row.currency),
                    settled=Money(settled, row.currency), pending=Money(pending, row.currency),
                    calls=int(row.calls),
                    calls_cap=None if row.calls_cap is None else int(row.calls_cap),
                )
            )  # fmt: skip
        return result
