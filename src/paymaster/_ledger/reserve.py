"""Reserve: in one transaction, check the call may run (:mod:`.refusals`), write its
pending hold, and take its estimate from every budget it counts against with the
conditional UPDATE whose row lock keeps the cap under any concurrency (:meth:`_take`);
retried under contention and after a lost COMMIT reply."""

from __future__ import annotations

import time
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection, and_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError

from .. import _driver
from .. import _statements as S
from .._db import unavailable_on_error
from .._errors import GovernanceUnavailable, ViolationCode
from .._money import Money
from .._schema import budget, vault_key_id
from ._core import (
    _ATTEMPTS,
    _MAX_CACHED_BUDGETS,
    CALL_NOT_MADE,
    _frozen_by,
    _new_id,
    _Notes,
    _Retry,
    _StaleBudgetId,
)
from .denials import _Recording
from .models import Hold, HoldState, Reservation, ReserveRequest, hold_key
from .observer import LedgerObserver
from .refusals import _budget_ref, _Denied, _Refusals

#: A budget as a reserve takes it: (its key, its id, the call's run).
_Budget = tuple[tuple[str, ...], int, "str | None"]

#: A PostgreSQL reserve that took longer than this (seconds, on a monotonic timer) checks
#: the kill switch and its vault key again as its last statement before COMMIT. The day's
#: UPDATE checks them as of the statement's start (READ COMMITTED), and the transaction
#: may then wait on a lock for as long as another transaction holds it (the budget row,
#: an alert row a concurrent refusal wrote): without this, a revoke, or a key's expiry,
#: during a long wait would not stop the call. A reserve this short is an ordinary call
#: in flight at the revoke.
RECHECK_AFTER = 0.020

#: The timer the wait is measured on (not the ledger's clock, which may be simulated).
_monotonic = time.monotonic


def _hold_fields(
    req: ReserveRequest, now: datetime, daily_id: int, run_id: int | None
) -> dict[str, Any]:
    """The columns of the call's pending hold (all but its id and key)."""
    policy = req.policy
    return {
        "agent": req.agent,
        "run": req.run,
        "vendor": req.vendor,
        "endpoint": req.endpoint,
        "method": req.method,
        "customer": req.customer,
        "currency": req.estimate.currency,
        "estimate": req.estimate.amount,
        "actual": None,
        "daily_budget_id": daily_id,
        "run_budget_id": run_id,
        "policy_id": policy.policy_id,
        "policy_hash": policy.hash,
        "state": HoldState.PENDING.value,
        "created_at": now,
        "resolved_at": None,
        "resolved_by": None,
        "resolution": None,
        "tool_call_id": req.tool_call_id,
        "vendor_key": req.idempotency_key,
        "subject": req.subject,
        "attempts": 1,
        "holders": 1,
        "overrun": None,
        "overrun_acknowledged_at": None,
        "overrun_acknowledged_by": None,
        "overrun_acknowledgement": None,
    }


def _reserved_hold(
    req: ReserveRequest, hold_id: str, now: datetime, daily_id: int, run_id: int | None
) -> Hold:
    """The hold a reserve just wrote, as the ledger now has it."""
    policy = req.policy
    return Hold(
        id=hold_id,
        idempotency_key=req.idempotency_key,
        agent=req.agent,
        run=req.run,
        vendor=req.vendor,
        endpoint=req.endpoint,
        method=req.method,
        customer=req.customer,
        estimate=req.estimate,
        actual=None,
        daily_budget_id=daily_id,
        run_budget_id=run_id,
        policy_id=policy.policy_id,
        policy_hash=policy.hash,
        state=HoldState.PENDING,
        created_at=now,
        resolved_at=None,
        resolved_by=None,
        resolution=None,
        tool_call_id=req.tool_call_id,
    )


class _Reserving(_Refusals, _Recording):
    """:meth:`reserve` and its steps."""

    # -- reserve -------------------------------------------------------------------------
    def reserve(self, request: ReserveRequest) -> Reservation:
        """Reserve the call's estimate against every budget it counts against.

        Raises :class:`PolicyViolation` (revoked, cap exceeded, call limit, ...) having
        written nothing but the denial's audit row, or :class:`GovernanceUnavailable`.
        """
        observer = self.observer
        if observer is None:
            return self._reserve_with_retries(request, None)
        started, ok = time.perf_counter(), False
        try:
            reservation = self._reserve_with_retries(request, observer)
            ok = True
            return reservation
        finally:
            observer.reserved(request, time.perf_counter() - started, ok)

    def _reserve_with_retries(
        self, request: ReserveRequest, observer: LedgerObserver | None
    ) -> Reservation:
        # Fixed across attempts, so that a retry can recognise a hold that an attempt whose
        # COMMIT reply was lost did write: pending, and created at exactly this instant.
        hold_id, now, started = _new_id(), self.now(), _monotonic()
        written: list[str] = []
        with unavailable_on_error(self._engine, "reserving", CALL_NOT_MADE):
            for attempt in range(_ATTEMPTS):
                new_ids: dict[tuple[str, ...], int] = {}
                notes = None if observer is None else _Notes(observer)
                try:
                    with self._engine.begin() as conn:
                        for candidate in written if attempt > 0 else ():
                            mine = _driver.run(
                                conn, S.HOLD_BY_ID_LOCKED, {"p_id": candidate}
                            ).first()
                            if (
                                mine is not None
                                and mine.state == HoldState.PENDING.value
                                and mine.created_at == now
                            ):
                                return self._reservation_of(conn, Hold.from_row(mine))
                        reservation = self._reserve(
                            conn, request, now, new_ids, hold_id, written, notes, started
                        )
                except _Denied as denied:
                    self.record_denial(request, denied.violation, exhausted=denied.exhausted)
                    raise denied.violation from None
                except IntegrityError:
                    # A concurrent reserve with the same idempotency key committed first, or
                    # our own earlier attempt's commit landed meanwhile: the next attempt
                    # finds that hold.
                    # Or a call on the same subject did: the next attempt refuses it.
                    keyless = request.idempotency_key is None and request.subject is None
                    if keyless and attempt == 0:
                        raise
                except _StaleBudgetId:
                    self._budget_ids.clear()
                    if observer is not None:
                        observer.budgets_reset()
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
                    if notes is not None and notes.notes:
                        notes.committed()
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
        notes: _Notes | None = None,
        started: float | None = None,
    ) -> Reservation:
        """Reserve ``req`` in ``conn``'s transaction. ``started``: when the reserve began
        (:data:`_monotonic`); default now."""
        started = _monotonic() if started is None else started
        existing, key, resumed = self._existing(conn, req)
        if resumed is not None:
            return resumed
        daily, run = self._budgets_of(conn, req, now, new_ids)
        fields = _hold_fields(req, now, daily[1], None if run is None else run[1])
        if req.subject is not None:
            self._check_subject_free(conn, req, None if existing is None else existing.id)
        if existing is None:
            hold_id = new_hold_id
            written.append(hold_id)
            _driver.run(conn, S.INSERT_HOLD, {"id": hold_id, "idempotency_key": key, **fields})
        else:  # a released hold retried with its key: reserve it again
            hold_id = existing.id
            written.append(hold_id)
            rearm = {f"p_{k}": v for k, v in fields.items() if k not in ("attempts", "holders")}
            rearmed = _driver.run(conn, S.REARM_HOLD, {"p_id": hold_id, **rearm})
            if rearmed.rowcount != 1:
                raise _Retry
        daily_left, run_left = self._take_budgets(conn, req, new_ids, daily, run, notes, now)
        if self._postgres and _monotonic() - started > RECHECK_AFTER:
            self._check_revoked(conn, req)  # the transaction's last statement: see RECHECK_AFTER
        reserved = _reserved_hold(req, hold_id, now, daily[1], fields["run_budget_id"])
        return Reservation(reserved, daily_left, run_left)

    def _existing(
        self, conn: Connection, req: ReserveRequest
    ) -> tuple[Any, str | None, Reservation | None]:
        """The hold row the call's idempotency key names (``None`` if none) and the key;
        or, for a retry of a call whose hold still counts, its resumed reservation."""
        existing = None
        key = None
        if req.idempotency_key is not None:
            key = hold_key(req.agent, req.run, req.idempotency_key)
            existing = _driver.run(conn, S.HOLD_BY_KEY, {"p_key": key}).first()
        if existing is not None:
            found = Hold.from_row(existing)
            self._check_same_call(found, req)
            if found.state in (HoldState.PENDING, HoldState.UNKNOWN):
                return existing, key, self._resume(conn, req, found)
            if _frozen_by(found):  # released with its overrun still unacknowledged
                self._refuse_if_frozen(conn, req, found.daily_budget_id, 1, daily=True)
            if found.state is HoldState.SETTLED:
                raise _Denied(
                    self._violation(
                        req,
                        ViolationCode.ALREADY_COMPLETED,
                        f"the call with idempotency key {req.idempotency_key!r} already settled "
                        f"at {found.resolved_at}; it is not repeated",
                    )
                )
        return existing, key, None

    def _budgets_of(
        self,
        conn: Connection,
        req: ReserveRequest,
        now: datetime,
        new_ids: dict[tuple[str, ...], int],
    ) -> tuple[_Budget, _Budget | None]:
        """The call's daily budget and, if it has one, its run's budget (found or created)."""
        policy = req.policy
        daily_key = ("daily", req.agent, req.vendor, policy.currency, "", now.date().isoformat())
        daily_id = self._budget_id(conn, daily_key, now, new_ids)
        run_id = run_key = None
        if policy.has_run_budget and req.run is None:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.RUN_CAP_EXCEEDED,
                    "the run policy sets a run budget but the call names no run",
                )
            )
        if req.run is not None:
            run_key = ("run", req.agent, req.vendor, policy.currency, req.run, "")
            # Once a run has a budget, it binds every call of the run, with or without a
            # run policy: look for it even when this call brings none.
            run_id = self._budget_id(conn, run_key, now, new_ids, create=policy.has_run_budget)
        run = None if run_id is None or run_key is None else (run_key, run_id, req.run)
        return (daily_key, daily_id, req.run), run

    def _take_budgets(
        self,
        conn: Connection,
        req: ReserveRequest,
        new_ids: dict[tuple[str, ...], int],
        daily: _Budget,
        run: _Budget | None,
        notes: _Notes | None,
        now: datetime,
    ) -> tuple[Money, Money | None]:
        """Take the estimate from the call's budgets; what is left of each (run's: ``None``
        if it has no money cap)."""
        policy = req.policy
        # Budget rows last, and the hottest (the agent type's day) last of all, so its row
        # lock is held only until the commit. Every transaction that touches both takes
        # the run's row before the day's: no lock cycles. The day's UPDATE also checks the
        # revocations, so a revoke committed before this statement started refuses it.
        run_left = run_cap = None
        if run is not None:
            run_key, run_id, _ = run
            run_cap, run_calls = self._run_limits(conn, req, run_id)
            run_left = self._take(
                conn,
                req,
                run_id,
                run_cap,
                run_calls,
                check_revoked=False,
                code=ViolationCode.RUN_CAP_EXCEEDED,
                key=run_key,
                created=run_key in new_ids,
            )
        daily_key, daily_id, _ = daily
        daily_left = self._take(
            conn,
            req,
            daily_id,
            policy.daily_cap,
            policy.max_calls_per_day,
            check_revoked=True,
            code=ViolationCode.CAP_EXCEEDED,
            key=daily_key,
            created=daily_key in new_ids,
        )
        assert daily_left is not None
        if notes is not None:  # threshold alerts, once every budget row is taken
            if run is not None and run_left is not None and run_cap is not None:
                self._budget_rose(conn, notes, run, run_cap, run_left, now)
            self._budget_rose(conn, notes, daily, policy.daily_cap, daily_left, now)
        return daily_left, run_left

    def _resume(self, conn: Connection, req: ReserveRequest, found: Hold) -> Reservation:
        """A retry of a call whose hold is still counted: no second reservation, one more
        attempt holding the hold (so that no single attempt may now release it). The kill
        switch, and a frozen budget, apply to retries too."""
        self._check_revoked(conn, req)
        for budget_id in (found.run_budget_id, found.daily_budget_id):
            state = (
                None
                if budget_id is None
                else _driver.run(conn, S.BUDGET_STATE, {"p_bid": budget_id}).first()
            )
            if state is not None:
                daily = budget_id == found.daily_budget_id
                self._refuse_if_frozen(conn, req, budget_id, int(state.frozen), daily)  # type: ignore[arg-type]
        row = _driver.run(conn, S.RESUME_HOLD, {"p_id": found.id}).first()
        if row is None:
            raise _Retry
        return self._reservation_of(conn, Hold.from_row(row), resumed=True)

    def _reservation_of(self, conn: Connection, found: Hold, resumed: bool = False) -> Reservation:
        """A reservation for a hold that already counts against its budgets."""
        daily = self._left(conn, found.daily_budget_id, found.estimate.currency)
        assert daily is not None
        run = None
        if found.run_budget_id is not None:
            run = self._left(conn, found.run_budget_id, found.estimate.currency)
        return Reservation(found, daily, run, resumed=resumed)

    def _left(self, conn: Connection, budget_id: int, currency: str) -> Money | None:
        row = _driver.run(conn, S.BUDGET_STATE, {"p_bid": budget_id}).first()
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
        """Take the estimate from one budget row with its conditional UPDATE; what is left
        of its cap (``None``: it has none). Refused, :meth:`_refused` raises why."""
        currency = req.policy.currency
        x = req.estimate.amount
        cap = None if cap_money is None else cap_money.amount
        params: dict[str, Any] = {
            "p_bid": budget_id,
            "p_x": x,
            "p_cap": cap,
            "p_calls_cap": calls_cap,
        }
        if check_revoked:
            params.update(
                p_agent=req.agent,
                p_run=req.run,
                p_vault_key=vault_key_id(req.credential),
                p_now=self.now(),
            )
        stmt = S.take_budget(
            capped=cap is not None, call_capped=calls_cap is not None, check_revoked=check_revoked
        )
        taken = _driver.run(conn, stmt, params).first()
        if taken is not None:
            return None if cap is None else Money(cap - int(taken.committed), currency)
        self._refused(
            conn,
            req,
            budget_id,
            cap,
            calls_cap,
            check_revoked=check_revoked,
            code=code,
            key=key,
            created=created,
        )

    def _budget_rose(
        self,
        conn: Connection,
        notes: _Notes,
        budget: _Budget,
        cap: Money,
        left: Money,
        now: datetime,
    ) -> None:
        """Tell the observer the budget (key, id, the call's run) this reserve took to
        ``cap - left``: it does no I/O unless that reaches a threshold this process has not
        seen fire."""
        committed = cap.amount - left.amount
        describe = partial(_budget_ref, *budget)
        notes.budget_rose(conn, budget[1], committed, cap.amount, now, describe)

    def _budget_id(
        self,
        conn: Connection,
        key: tuple[str, ...],
        now: datetime,
        new_ids: dict[tuple[str, ...], int],
        *,
        create: bool = True,
    ) -> Any:
        """The id of the budget row ``key`` names, created race-free if absent (or, with
        ``create=False``, ``None`` if absent)."""
        cached = self._budget_ids.get(key) or new_ids.get(key)
        if cached is not None:
            return cached
        kind, agent, vendor, currency, run, window = key
        where = and_(
            budget.c.kind == kind,
            budget.c.agent == agent,
            budget.c.vendor == vendor,
            budget.c.currency == currency,
            budget.c.run == run,
            budget.c.window == window,
        )
        found = conn.execute(select(budget.c.id).where(where)).scalar()
        if found is None and not create:
            return None
        if found is None:
            dialect_insert = pg_insert if self._postgres else sqlite_insert
            conn.execute(
                dialect_insert(budget)
                .values(
                    kind=kind,
                    agent=agent,
                    vendor=vendor,
                    currency=currency,
                    run=run,
                    window=window,
                    committed=0,
                    calls=0,
                    created_at=now,
                )
                .on_conflict_do_nothing()
            )
            found = conn.execute(select(budget.c.id).where(where)).scalar_one()
        new_ids[key] = int(found)  # cached by reserve() only once this transaction commits
        return int(found)
