"""Read-only queries: holds (by id, by idempotency key, unresolved, overrun) and the
budgets of a day, as the ledger has them now. No writes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from sqlalchemy import case, func, select

from .. import _storable as storable
from .._db import read_only, unavailable_on_error
from .._errors import HoldNotFound
from .._money import Money
from .._schema import budget, hold
from ._core import _LedgerCore
from .models import BudgetStatus, Hold, HoldState, hold_key


class _Queries(_LedgerCore):
    """What the ledger has now."""

    def overruns(self, *, acknowledged: bool = False) -> list[Hold]:
        """Holds settled above their reservation: by default those whose overrun still
        freezes their budgets, oldest first."""
        ack = hold.c.overrun_acknowledged_at
        query = select(hold).where(
            hold.c.overrun.is_not(None), ack.is_not(None) if acknowledged else ack.is_(None)
        )
        with read_only(self._engine) as conn:
            return [Hold.from_row(r) for r in conn.execute(query.order_by(hold.c.resolved_at))]

    # -- inspection ----------------------------------------------------------------------
    def hold_for_key(self, idempotency_key: str, *, agent: str, run: str | None) -> Hold | None:
        """The hold an idempotency key names for this agent type and run, if any: a retry
        is priced as the call it repeats, not re-priced from a world its first attempt may
        have changed."""
        key = hold_key(agent, run, idempotency_key)
        with (
            unavailable_on_error(self._engine, "reading a hold by its idempotency key"),
            read_only(self._engine) as conn,
        ):
            row = conn.execute(select(hold).where(hold.c.idempotency_key == key)).first()
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
            query = query.where(hold.c.run == storable.field("run", run))
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
                    id=int(row.id),
                    kind=row.kind,
                    agent=row.agent,
                    vendor=row.vendor,
                    run=row.run,
                    window=row.window,
                    cap=None if row.cap is None else Money(int(row.cap), row.currency),
                    committed=Money(int(row.committed), row.currency),
                    settled=Money(settled, row.currency),
                    pending=Money(pending, row.currency),
                    calls=int(row.calls),
                    calls_cap=None if row.calls_cap is None else int(row.calls_cap),
                    frozen=int(row.frozen) > 0,
                )
            )
        return result
