"""Resolve: settle, release, mark unknown, and an operator's resolution, each one
transaction in three steps: the hold's state transition (:mod:`.transitions`), the
budget adjustment with the observer told of budgets rising (:meth:`_count`), and the
attempt's audit row (:meth:`_audit_row`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection

from .. import _driver
from .. import _statements as S
from .. import _storable as storable
from .._audit import AuditEntry, Outcome
from .._audit import chain as audit_chain
from .._money import CurrencyMismatch, Money
from ._core import _joined, _not_recorded, _Notes, _token, _written, log
from .models import BudgetRef, Hold, HoldState, check_amount
from .transitions import _Step, _Transitions

#: Attempts whose resolution's outcome is unconfirmed that one ledger remembers at most.
_MAX_UNCONFIRMED = 10_000


def _overrun_note(step: _Step, per_call_cap: Money | None) -> str | None:
    over = step.hold.overrun
    actual = step.hold.actual
    if not step.freeze or over is None or actual is None or actual <= step.hold.estimate:
        return None
    note = (
        f"overrun: settled {actual.format()} above its reservation of "
        f"{step.hold.estimate.format()} (by {over.format()})"
    )
    if per_call_cap is not None and actual > per_call_cap:
        note += f", above the per-call cap of {per_call_cap.format()}"
    return (
        note + f"; its budgets are frozen until an operator acknowledges it "
        f"(paymaster holds acknowledge {step.hold.id})"
    )


def _landed(conn: Connection, hold_id: str, writes: list[tuple[datetime, str]]) -> Hold | None:
    """The hold (locked), if one of ``writes`` (when, token) committed its audit row."""
    if not writes:
        return None
    mine = _driver.run(conn, S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
    if mine is not None and any(_written(conn, at, token) for at, token in writes):
        return Hold.from_row(mine)
    return None


def _template(outcome: Outcome, **fields: Any) -> AuditEntry:
    """An audit entry whose call fields :meth:`Ledger._resolve` fills from the hold."""
    return AuditEntry(agent="", vendor="", endpoint="", method="", outcome=outcome, **fields)


class _Resolving(_Transitions):
    """How attempts (and operators) end holds."""

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
        per_call_cap: Money | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
        attempt: str | None = None,
    ) -> Hold:
        """The call succeeded and cost ``actual``. Above the estimate it is an overrun:
        recorded as it is, and the hold's budgets are frozen until acknowledged
        (:meth:`acknowledge_overrun`). A hold another attempt already settled is raised
        to ``actual`` if that is more (the ledger never counts less than was moved)."""
        return self._resolve(
            hold_id,
            HoldState.SETTLED,
            actual,
            _template(
                Outcome.ALLOWED,
                http_status=http_status,
                vendor_request_id=vendor_request_id,
                duration_ms=duration_ms,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
            per_call_cap=per_call_cap,
            attempt=attempt,
        )

    def release(
        self,
        hold_id: str,
        *,
        outcome: Outcome = Outcome.FAILED,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        duration_ms: int | None = None,
        error: str | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
        attempt: str | None = None,
    ) -> Hold:
        """This attempt failed and moved no money: free the estimate, unless another
        attempt holds the hold too (then it stays counted; this attempt's row is written)."""
        return self._resolve(
            hold_id,
            HoldState.RELEASED,
            None,
            _template(
                outcome,
                http_status=http_status,
                vendor_request_id=vendor_request_id,
                duration_ms=duration_ms,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
            attempt=attempt,
        )

    def mark_unknown(
        self,
        hold_id: str,
        *,
        error: str,
        duration_ms: int | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
        attempt: str | None = None,
    ) -> Hold:
        """Whether money moved is unknown: keep the hold counted, flag it for reconciliation.

        ``tool_call_id`` (for each resolver) names the attempt on its audit row; ``None``:
        the hold's, as its first attempt gave it. ``credential`` names what the attempt
        was presented with (a proxy's vault key id). ``attempt`` (for each resolver) is the
        attempt's own id: if an earlier resolution by the same attempt raised but may have
        committed (its reply lost, the retry failed too), this one first looks for that
        commit, and if it landed, writes nothing (one row per attempt)."""
        return self._resolve(
            hold_id,
            HoldState.UNKNOWN,
            None,
            _template(
                Outcome.UNKNOWN,
                duration_ms=duration_ms,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
            attempt=attempt,
        )

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
        reason, by = storable.field("reason", reason), storable.field("by", by)
        state = HoldState.SETTLED if settle is not None else HoldState.RELEASED
        outcome = Outcome.ALLOWED if settle is not None else Outcome.FAILED
        return self._resolve(
            hold_id,
            state,
            settle,
            _template(outcome, error=f"resolved by {by}: {reason}"),
            by=by,
            reason=reason,
            operator=True,
        )

    def _resolve(
        self,
        hold_id: str,
        state: HoldState,
        actual: Money | None,
        template: AuditEntry,
        *,
        by: str | None = None,
        reason: str | None = None,
        operator: bool = False,
        per_call_cap: Money | None = None,
        attempt: str | None = None,
    ) -> Hold:
        """Record how one attempt (or an operator) ended a hold, with the attempt's audit
        row, in one transaction.

        An attempt finds its hold as it left it (pending, or unknown after a retry) in the
        common case: one UPDATE. Otherwise another attempt holding the same hold, or an
        operator, got there first, and :meth:`_late` records this attempt's truth on top."""
        if actual is not None:
            check_amount(actual, "actual")
        amount = actual.amount if actual is not None else 0
        now, token = self.now(), _token()
        action = f"recording hold {hold_id} as {state}"
        observer = self.observer
        notes = None if observer is None else _Notes(observer)
        overruns: list[Hold] = []
        # This attempt's earlier resolutions that raised but may have committed.
        earlier = [] if attempt is None else self._unconfirmed.get((hold_id, attempt), [])

        def work(conn: Connection, retrying: bool) -> Hold:
            if notes is not None:
                notes.notes.clear()
            overruns.clear()
            # The first try or an earlier resolution may have committed, its reply lost.
            landed = _landed(conn, hold_id, [*earlier, (now, token)] if retrying else earlier)
            if landed is not None:
                return landed
            step = self._transition(conn, hold_id, state, amount, now, by, reason, operator)
            currency = step.hold.estimate.currency
            if actual is not None and actual.currency != currency:
                raise CurrencyMismatch(  # rolls the transaction back
                    f"hold {hold_id} is in {currency}; cannot settle it in {actual.currency}"
                )
            if step.delta or step.freeze:
                self._count(conn, step, hold_id, now, operator, notes)
            if step.freeze:
                overruns.append(step.hold)
            self._audit_row(conn, step, template, hold_id, now, token, per_call_cap)
            return step.hold

        started, done = time.perf_counter(), None
        try:
            with self._remembered(hold_id, attempt, now, token):
                done = self._write(action, _not_recorded(hold_id), work)
        finally:
            if observer is not None:
                observer.resolved(state, done, time.perf_counter() - started)
        self._overran(overruns, notes, now)
        return done

    @contextmanager
    def _remembered(
        self, hold_id: str, attempt: str | None, at: datetime, token: str
    ) -> Iterator[None]:
        """Remember a resolution that raised after it may have committed, for the same
        attempt's next resolution of the hold to look for first; forget them once one
        is recorded.

        Whatever raised: a lost COMMIT reply (:class:`~paymaster.GovernanceUnavailable`),
        and just as well a ``KeyboardInterrupt`` or ``SystemExit`` delivered after the
        COMMIT returned, after which the guard records the attempt as of unknown outcome.
        A resolution that did not commit costs that next one a look-up that finds
        nothing."""
        try:
            yield
        except BaseException:
            if attempt is not None:
                if len(self._unconfirmed) > _MAX_UNCONFIRMED:  # attempts that never came back
                    self._unconfirmed.clear()
                self._unconfirmed.setdefault((hold_id, attempt), []).append((at, token))
            raise
        if attempt is not None:
            self._unconfirmed.pop((hold_id, attempt), None)

    def _count(
        self,
        conn: Connection,
        step: _Step,
        hold_id: str,
        now: datetime,
        operator: bool,
        notes: _Notes | None,
    ) -> None:
        """Resolve, step two: move the hold's budgets by what its transition did (the
        observer told of each budget that rose), and freeze them if counting money late
        took one past its cap."""
        resolved = step.hold
        currency = resolved.estimate.currency
        beyond = self._adjust(conn, resolved, step.delta, step.freeze, now, notes)
        recorded = 0 if resolved.overrun is None else resolved.overrun.amount
        if beyond > recorded and not operator and not step.freeze:
            # Money counted late (the hold had been freed under this attempt, and
            # the room given to other calls) took a budget past its cap: the cap
            # did not bound it, so it is an overrun like any other.
            step.hold, step.freeze = self._beyond_cap(conn, resolved, beyond, now)
            step.note = _joined(
                step.note,
                f"counting it took its budget {Money(beyond, currency).format()} past "
                "its cap: an overrun; its budgets are frozen until an operator "
                f"acknowledges it (paymaster holds acknowledge {hold_id})",
            )

    @staticmethod
    def _audit_row(
        conn: Connection,
        step: _Step,
        template: AuditEntry,
        hold_id: str,
        now: datetime,
        token: str,
        per_call_cap: Money | None,
    ) -> None:
        """Resolve, step three: append the attempt's audit row, its call fields from the
        hold (an overrun's outcome and note if it froze the budgets)."""
        resolved = step.hold
        entry = replace(
            template,
            agent=resolved.agent,
            run=resolved.run,
            vendor=resolved.vendor,
            endpoint=resolved.endpoint,
            method=resolved.method,
            customer=resolved.customer,
            currency=resolved.estimate.currency,
            estimate=resolved.estimate.amount,
            actual=step.counted,
            policy_id=resolved.policy_id,
            policy_hash=resolved.policy_hash,
            hold_id=hold_id,
            tool_call_id=template.tool_call_id or resolved.tool_call_id,
            error=_joined(template.error, step.note, _overrun_note(step, per_call_cap)),
            outcome=Outcome.OVERRUN if step.freeze else step.outcome or template.outcome,
        )
        audit_chain.append(conn, entry, now, token, last=True)

    @staticmethod
    def _overran(overruns: list[Hold], notes: _Notes | None, now: datetime) -> None:
        """After a resolve committed: log its overruns, then tell the observer what its
        transaction noted and of each overrun."""
        for over in overruns:
            log.warning(
                "overrun: hold %s (%s/%s %s %s) moved %s that its reservation of %s did not "
                "cover; its budgets are frozen until an operator acknowledges it",
                over.id,
                over.agent,
                over.vendor,
                over.method,
                over.endpoint,
                over.overrun,
                over.estimate,
            )
        if notes is not None:
            notes.committed()
            for over in overruns:
                notes.observer.overran(over, now)

    def _adjust(
        self,
        conn: Connection,
        resolved: Hold,
        delta: int,
        freeze: int,
        now: datetime,
        notes: _Notes | None,
    ) -> int:
        """Move the hold's budgets by ``delta`` (and freeze them), run's row first: the
        reserve's order, so no lock cycles. Returns how far this delta took a budget past
        its cap (0 when none)."""
        rising = delta > 0  # may cross a threshold, or the cap
        adjusted = []
        for budget_id in (resolved.run_budget_id, resolved.daily_budget_id):
            if budget_id is None:
                continue
            params = {"p_bid": budget_id, "p_delta": delta, "p_freeze": freeze}
            if rising:
                adjusted.append(_driver.run(conn, S.ADJUST_BUDGET_RETURNING, params).one())
            else:
                _driver.run(conn, S.ADJUST_BUDGET, params)
        if adjusted and notes is not None:
            self._budgets_rose(conn, notes, resolved, adjusted, now)
        beyond = [
            min(delta, int(row.committed) - int(row.cap)) for row in adjusted if row.cap is not None
        ]
        return max([0, *beyond])

    def _beyond_cap(
        self, conn: Connection, found: Hold, beyond: int, now: datetime
    ) -> tuple[Hold, int]:
        """Record on ``found`` (locked by this transaction) that money counted late went
        ``beyond`` its cap, freezing its budgets until that is acknowledged (unless an
        overrun of the hold freezes them already). Returns the hold and the freeze."""
        if found.overrun is not None:
            hold_now, freeze = self._overrun_again(
                conn, found, found, beyond, now, None, None, operator=False
            )
        else:
            actual = None if found.actual is None else found.actual.amount
            over = Money(beyond, found.estimate.currency)
            hold_now, freeze = self._set(conn, found, found.state, actual, now, over), 1
        if freeze:
            for budget_id in (found.run_budget_id, found.daily_budget_id):
                if budget_id is not None:
                    params = {"p_bid": budget_id, "p_delta": 0, "p_freeze": 1}
                    _driver.run(conn, S.ADJUST_BUDGET, params)
        return hold_now, freeze

    def _budgets_rose(
        self, conn: Connection, notes: _Notes, hold: Hold, rows: list[Any], now: datetime
    ) -> None:
        """Tell the observer of budgets a settle above its estimate raised (rows as
        adjusted): it may cross a threshold."""
        currency = hold.estimate.currency
        for row in rows:
            if row.cap is None:
                continue
            committed, cap = int(row.committed), int(row.cap)
            describe = partial(
                BudgetRef,
                int(row.id),
                row.kind,
                hold.agent,
                hold.vendor,
                currency,
                hold.run,
                row.window or None,
            )
            notes.budget_rose(conn, int(row.id), committed, cap, now, describe)
