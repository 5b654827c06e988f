"""Resolve, step one: the hold's state transition. Moves a hold to settled, released or
unknown as the rules allow (exactly once for an operator; an attempt that finds another
attempt got there first records its own truth on top, :meth:`_late`), and says what
that did to its budgets and what the attempt's audit row counts (:class:`_Step`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from .. import _driver
from .. import _statements as S
from .._audit import Outcome
from .._errors import HoldAlreadyResolved, HoldNotFound
from .._money import Money
from ._core import _ANY_HOLDERS, _frozen_by, _LedgerCore
from .models import Hold, HoldState


@dataclass
class _Step:
    """What resolving one attempt did: the hold as it now is, the change to its budgets'
    ``committed``, whether it froze them (an overrun), and what the attempt's audit row
    says (the amount it adds to what the ledger counts, and a note)."""

    hold: Hold
    delta: int
    counted: int
    note: str | None = None
    freeze: int = 0
    outcome: Outcome | None = None


class _Transitions(_LedgerCore):
    """How a hold moves from state to state."""

    def _transition(
        self,
        conn: Connection,
        hold_id: str,
        state: HoldState,
        amount: int,
        now: datetime,
        by: str | None,
        reason: str | None,
        operator: bool,
    ) -> _Step:
        """Move the hold to ``state`` as the rules allow, and say what that did to its
        budgets (``delta``), whether it froze them, and what the attempt's row counts."""
        settle = state is HoldState.SETTLED
        if operator or settle:
            sources: tuple[HoldState, ...] = (HoldState.PENDING, HoldState.UNKNOWN)
        else:
            sources = (HoldState.PENDING,)
        # A release is an attempt saying "nothing I did moved money": it frees the hold
        # only if no other attempt still holds it (those that ended before it said the
        # same, or the hold would be settled or unknown). An operator decides for all.
        max_holders = 1 if state is HoldState.RELEASED and not operator else _ANY_HOLDERS
        for previous in sources:
            # Only an unknown hold can carry an overrun already (money counted late past
            # its cap): that one stays as it is, neither frozen again nor acknowledged.
            prior = self._locked(conn, hold_id) if previous is HoldState.UNKNOWN else None
            row = _driver.run(
                conn,
                S.RESOLVE_HOLD,
                {
                    "p_id": hold_id,
                    "p_from": previous.value,
                    "p_state": state.value,
                    "p_actual": amount if settle else None,
                    "p_at": now,
                    "p_by": by,
                    "p_reason": reason,
                    "p_max_holders": max_holders,
                    "p_done": 0 if operator else 1,
                },
            ).first()
            if row is None:
                continue
            return self._moved(conn, row, prior, previous, state, amount, now, by, reason, operator)
        return self._found_resolved(conn, hold_id, state, amount, now, operator)

    def _moved(
        self,
        conn: Connection,
        row: Any,
        prior: Hold | None,
        previous: HoldState,
        state: HoldState,
        amount: int,
        now: datetime,
        by: str | None,
        reason: str | None,
        operator: bool,
    ) -> _Step:
        """The step of a hold this resolve moved from ``previous`` to ``state`` (``row``:
        the hold as moved; ``prior``: as it was, when it was unknown)."""
        settle = state is HoldState.SETTLED
        resolved = Hold.from_row(row)
        estimate = resolved.estimate.amount
        delta = amount - estimate if settle else (-estimate if state is HoldState.RELEASED else 0)
        step = _Step(resolved, delta, counted=amount if settle else 0)
        if previous is HoldState.UNKNOWN and operator:
            step.outcome = Outcome.RECONCILED
        if prior is not None and prior.overrun is not None:
            # Money was counted past its cap already: the larger of the two facts
            # stands, and only more than was recorded freezes (or is acknowledged).
            new_over = 0 if resolved.overrun is None else resolved.overrun.amount
            step.hold, step.freeze = self._overrun_again(
                conn, prior, resolved, new_over, now, by, reason, operator
            )
        elif resolved.overrun is not None:
            if operator:  # the operator saw the amount: recorded, acknowledged
                step.hold = self._acknowledged(conn, resolved, now, by, reason)
            else:
                step.freeze = 1
        return step

    def _found_resolved(
        self,
        conn: Connection,
        hold_id: str,
        state: HoldState,
        amount: int,
        now: datetime,
        operator: bool,
    ) -> _Step:
        """The hold was not in a state this resolve moves from: another attempt holding it
        (or an operator) resolved it first. Refused to an operator; an attempt drops its
        hold on it and records its own truth on top (:meth:`_late`)."""
        current = _driver.run(conn, S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
        if current is None:
            raise HoldNotFound(f"no hold {hold_id!r}")
        found = Hold.from_row(current)
        if operator:
            raise HoldAlreadyResolved(
                f"hold {hold_id} is already {found.state} (at {found.resolved_at}); "
                "a hold resolves exactly once"
            )
        dropped = _driver.run(conn, S.DROP_HOLDER, {"p_id": hold_id, "p_done": 1}).one()
        return self._late(conn, Hold.from_row(dropped), state, amount, now)

    @staticmethod
    def _locked(conn: Connection, hold_id: str) -> Hold | None:
        row = _driver.run(conn, S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
        return None if row is None else Hold.from_row(row)

    def _overrun_again(
        self,
        conn: Connection,
        prior: Hold,
        now_hold: Hold,
        new_over: int,
        now: datetime,
        by: str | None,
        reason: str | None,
        operator: bool,
    ) -> tuple[Hold, int]:
        """A hold that carried an overrun (``prior``) is resolved again as ``now_hold``
        with ``new_over`` beyond what it covered: keep the larger amount. More than was
        recorded is a new overrun: it freezes (unless one still awaiting acknowledgement
        freezes already), or an operator's own settle acknowledges it. Returns the hold
        and the freeze to apply."""
        assert prior.overrun is not None
        recorded = prior.overrun.amount
        waiting = _frozen_by(prior)
        actual = None if now_hold.actual is None else now_hold.actual.amount
        if new_over <= recorded:  # nothing new: the prior overrun stands as it was
            keep = Money(recorded, prior.estimate.currency)
            return self._set(conn, now_hold, now_hold.state, actual, now, keep, prior), 0
        larger = Money(new_over, prior.estimate.currency)
        hold_now = self._set(conn, now_hold, now_hold.state, actual, now, larger)
        if operator and not waiting:
            return self._acknowledged(conn, hold_now, now, by, reason), 0
        return hold_now, 0 if waiting else 1

    def _late(
        self, conn: Connection, found: Hold, state: HoldState, amount: int, now: datetime
    ) -> _Step:
        """An attempt ends after another attempt holding the same hold (or an operator)
        resolved it. Its own row is written whatever it finds; money it reports that the
        hold does not count yet is counted (the ledger never counts less than moved)."""
        estimate = found.estimate.amount
        if state is HoldState.RELEASED:
            if found.state is HoldState.PENDING:  # shared: another attempt may pay
                note = (
                    f"this attempt moved no money, but {found.holders} other attempt(s) "
                    "still hold this hold: it stays counted until they end"
                )
            else:
                note = f"the hold was already {found.state} by another attempt"
            return _Step(found, 0, counted=0, note=note)
        if state is HoldState.UNKNOWN:
            if found.state is HoldState.RELEASED:  # released under this attempt: recount
                hold_now = self._set(
                    conn, found, HoldState.UNKNOWN, None, now, found.overrun, found
                )
                note = "the hold had been released, but this attempt may have paid: counted again"
                return _Step(hold_now, estimate, counted=0, note=note)
            note = f"the hold was already {found.state} by another attempt"
            return _Step(found, 0, counted=0, note=note)
        # A settle: the vendor says this attempt's call cost ``amount``.
        if found.state is HoldState.SETTLED:
            settled = found.actual.amount if found.actual is not None else 0
            if amount <= settled:
                note = f"another attempt settled this hold at {found.actual}; the vendor acted once"
                return _Step(found, 0, counted=0, note=note)
            base, note = settled, f"another attempt settled this hold at {found.actual}; raised"
        else:  # released (by an operator, say) while this attempt's call paid
            base, note = estimate, "the hold had been released, but this attempt paid"
        delta = amount - base if found.state is HoldState.SETTLED else amount
        over = max(amount - estimate, 0)
        if found.overrun is not None:
            hold_now, freeze = self._overrun_again(
                conn, found, found, over, now, None, None, operator=False
            )
            hold_now = self._set(
                conn, hold_now, HoldState.SETTLED, amount, now, hold_now.overrun, hold_now
            )
            return _Step(hold_now, delta, counted=delta, note=note, freeze=freeze)
        overrun = Money(over, found.estimate.currency) if over else None
        hold_now = self._set(conn, found, HoldState.SETTLED, amount, now, overrun)
        return _Step(hold_now, delta, counted=delta, note=note, freeze=int(over > 0))

    def _set(
        self,
        conn: Connection,
        found: Hold,
        state: HoldState,
        actual: int | None,
        now: datetime,
        overrun: Money | None,
        acknowledged: Hold | None = None,
    ) -> Hold:
        """Rewrite a locked hold's resolution: its overrun awaiting acknowledgement, or
        acknowledged as ``acknowledged``'s was."""
        ack = acknowledged
        row = _driver.run(
            conn,
            S.SET_HOLD_RESOLUTION,
            {
                "p_id": found.id,
                "p_state": state.value,
                "p_actual": actual,
                "p_at": now,
                "p_by": found.resolved_by,
                "p_reason": found.resolution,
                "p_overrun": None if overrun is None else overrun.amount,
                "p_ack_at": None if ack is None else ack.overrun_acknowledged_at,
                "p_ack_by": None if ack is None else ack.overrun_acknowledged_by,
                "p_ack_reason": None if ack is None else ack.overrun_acknowledgement,
            },
        ).one()
        return Hold.from_row(row)

    def _acknowledged(
        self, conn: Connection, found: Hold, now: datetime, by: str | None, reason: str | None
    ) -> Hold:
        return Hold.from_row(
            _driver.run(
                conn,
                S.SET_HOLD_RESOLUTION,
                {
                    "p_id": found.id,
                    "p_state": found.state.value,
                    "p_actual": None if found.actual is None else found.actual.amount,
                    "p_at": found.resolved_at,
                    "p_by": found.resolved_by,
                    "p_reason": found.resolution,
                    "p_overrun": None if found.overrun is None else found.overrun.amount,
                    "p_ack_at": now,
                    "p_ack_by": by,
                    "p_ack_reason": reason,
                },
            ).one()
        )
