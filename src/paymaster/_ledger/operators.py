"""What operators and schedulers do to holds outside a call: acknowledge an overrun (its
budgets unfreeze) and flag holds left unresolved too long (each flagged once)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, select

from .. import _driver
from .. import _statements as S
from .. import _storable as storable
from .._audit import AuditEntry, Outcome
from .._audit import chain as audit_chain
from .._errors import HoldNotFound
from .._schema import hold
from .models import Hold
from .transitions import _Transitions


class _Operating(_Transitions):
    """Operator actions on holds."""

    def acknowledge_overrun(self, hold_id: str, *, reason: str, by: str) -> Hold:
        """An operator has looked at an overrun: unfreeze the budgets it froze (they keep
        counting what was spent). Audited. Raises :class:`ValueError` if the hold has no
        overrun awaiting acknowledgement."""
        if not reason.strip():
            raise ValueError("acknowledging an overrun needs a reason")
        reason, by = storable.field("reason", reason), storable.field("by", by)
        now = self.now()

        def work(conn: Connection, retrying: bool) -> Hold:
            row = _driver.run(conn, S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
            if row is None:
                raise HoldNotFound(f"no hold {hold_id!r}")
            found = Hold.from_row(row)
            if retrying and found.overrun_acknowledged_at == now:
                return found
            if found.overrun is None or found.overrun_acknowledged_at is not None:
                raise ValueError(
                    f"hold {hold_id} has no overrun awaiting acknowledgement"
                    + (
                        f" (acknowledged by {found.overrun_acknowledged_by} at "
                        f"{found.overrun_acknowledged_at})"
                        if found.overrun_acknowledged_at is not None
                        else ""
                    )
                )
            acknowledged = self._acknowledged(conn, found, now, by, reason)
            for budget_id in (found.run_budget_id, found.daily_budget_id):
                if budget_id is not None:
                    _driver.run(
                        conn, S.ADJUST_BUDGET, {"p_bid": budget_id, "p_delta": 0, "p_freeze": -1}
                    )
            audit_chain.append(
                conn,
                AuditEntry(
                    agent=found.agent,
                    run=found.run,
                    vendor=found.vendor,
                    endpoint=found.endpoint,
                    method=found.method,
                    customer=found.customer,
                    outcome=Outcome.ACKNOWLEDGED,
                    currency=found.estimate.currency,
                    estimate=found.estimate.amount,
                    actual=0,
                    policy_id=found.policy_id,
                    policy_hash=found.policy_hash,
                    hold_id=found.id,
                    tool_call_id=found.tool_call_id,
                    error=f"overrun of {found.overrun} acknowledged by {by}: {reason}",
                ),
                now,
            )
            return acknowledged

        return self._write(
            f"acknowledging the overrun of hold {hold_id}", "so its budgets stay frozen", work
        )

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
            rows = _driver.run(conn, S.STALE_HOLDS, {"p_cutoff": at - older_than, "p_at": at}).all()
            return sorted((Hold.from_row(row) for row in rows), key=lambda h: h.created_at)

        return at, self._write("flagging stale holds", "so no hold was flagged", work)
