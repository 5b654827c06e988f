"""Deciding alerts: :class:`AlertConfig`, and :class:`Alerter`, the ledger observer that
decides threshold crossings inside the ledger's transactions and publishes every alert
to the sinks once its transaction committed; and the alerts' builders."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from .. import _driver
from .. import _statements as S
from .._money import Money
from .sinks import Alert, AlertKind, AlertSink, CallbackSink, _Worker

if TYPE_CHECKING:
    from .._audit import AuditEntry
    from .._errors import PolicyViolation
    from .._ledger import BudgetRef, Hold, HoldState, ReserveRequest, RevocationScope

__all__ = ["AlertBatch", "AlertConfig", "Alerter"]

log = logging.getLogger("paymaster.alerts")

FULL = 10_000  # basis points: the cap itself
_MAX_CACHED = 10_000


def _basis_points(threshold: float | Decimal | str) -> int:
    if isinstance(threshold, bool):
        raise TypeError("a threshold is a fraction of the cap, such as 0.8")
    bp = Decimal(str(threshold)) * FULL
    if bp != bp.to_integral_value() or not 0 < bp <= FULL:
        raise ValueError(
            f"threshold {threshold!r} must be a fraction of the cap in (0, 1], "
            "to a hundredth of a percent (0.8 is 80%)"
        )
    return int(bp)


@dataclass(frozen=True)
class AlertConfig:
    """What to alert on and where to send it.

    ``thresholds`` are fractions of a budget's cap (``()`` for none); ``denials`` and
    ``revokes`` turn those kinds on or off; ``sinks`` are :class:`AlertSink` objects or plain
    callables; ``queue_size`` bounds the alerts waiting for the sinks; ``close_timeout`` is
    how long :meth:`paymaster.Governor.close` waits for queued alerts to be delivered.
    """

    thresholds: Sequence[float | Decimal | str] = (0.5, 0.8, 1.0)
    sinks: Sequence[AlertSink | Callable[[Alert], object]] = ()
    denials: bool = True
    revokes: bool = True
    queue_size: int = 10_000
    close_timeout: float = 5.0
    threshold_bps: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bps = tuple(sorted({_basis_points(t) for t in self.thresholds}))
        object.__setattr__(self, "threshold_bps", bps)


@dataclass
class AlertBatch:
    """What one ledger transaction fired; published only once it commits."""

    alerts: list[Alert] = field(default_factory=list)
    seen: list[tuple[int, int]] = field(default_factory=list)  # (budget id, threshold bp)


def _percent(bp: int) -> str:
    return f"{(Decimal(bp) / 100).normalize():f}%"  # 5000 -> "50%", 8250 -> "82.5%"


class Alerter:
    """The ledger's side of alerts: decides threshold crossings inside its transactions
    (one insert per threshold, and only when ``committed`` first reaches one this process
    has not seen fire: the reserve path runs no extra statement otherwise) and publishes
    alerts to the sinks after commit."""

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self._bps = config.threshold_bps
        self._amounts: dict[int, tuple[int, ...]] = {}  # cap -> each threshold's amount
        self._fired: dict[int, set[int]] = {}  # budget id -> thresholds known recorded
        self._sinks: list[AlertSink] = [
            s if isinstance(s, AlertSink) else CallbackSink(s) for s in config.sinks
        ]
        self._dispatch: _Worker[Alert] = _Worker("paymaster-alerts", self._send, config.queue_size)

    # -- the ledger's observer (paymaster._ledger.LedgerObserver) ------------------------
    def budget_rose(
        self,
        conn: Connection,
        budget_id: int,
        committed: int,
        cap: int,
        at: datetime,
        budget: Callable[[], BudgetRef],
        refused: Money | None = None,
    ) -> AlertBatch | None:
        """Inside the ledger's transaction: record the thresholds ``committed`` reached
        (with ``refused``, also 100%) that this process has not seen fire; no I/O if none."""
        due = self.due(budget_id, committed, cap, refused=refused is not None)
        if not due:
            return None
        batch = AlertBatch()
        self.record(
            conn, batch, budget(), due, committed=committed, cap=cap, at=at, refused=refused
        )
        return batch

    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None:
        """Not alerted on."""

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None:
        """Not alerted on (an overrun is: :meth:`overran`)."""

    def overran(self, hold: Hold, at: datetime) -> None:
        self.publish([overrun_alert(hold, at)])

    def denied(self, entry: AuditEntry, violation: PolicyViolation, at: datetime) -> None:
        self.publish([denial_alert(entry, violation, at)])

    def revoked(
        self, scope: RevocationScope, target: str, *, reason: str, by: str, at: datetime
    ) -> None:
        self.publish([revoke_alert(scope.value, target, reason=reason, by=by, at=at)])

    # -- inside the ledger's transaction -------------------------------------------------
    def due(self, budget_id: int, committed: int, cap: int, *, refused: bool = False) -> list[int]:
        """Thresholds ``committed`` has reached (with ``refused``, also 100%) that this
        process has not seen recorded; no I/O."""
        if not self._bps or cap <= 0:
            return []
        amounts = self._amounts.get(cap)
        if amounts is None:
            if len(self._amounts) > _MAX_CACHED:
                self._amounts.clear()
            # committed >= ceil(cap * bp / 10000), in exact integers
            amounts = self._amounts[cap] = tuple(-(-cap * bp // FULL) for bp in self._bps)
        if committed < amounts[0] and not refused:
            return []
        known = self._fired.get(budget_id, ())
        if len(known) == len(self._bps):  # every threshold of this budget has fired
            return []
        return [
            bp
            for bp, amount in zip(self._bps, amounts, strict=True)
            if (committed >= amount or (refused and bp == FULL)) and bp not in known
        ]

    def record(
        self,
        conn: Connection,
        batch: AlertBatch,
        budget: BudgetRef,
        bps: Iterable[int],
        *,
        committed: int,
        cap: int,
        at: datetime,
        refused: Money | None = None,
    ) -> None:
        """Insert each threshold's row in the caller's transaction; the ones that land are
        this transaction's to announce."""
        insert = S.alert_insert(conn.dialect.name == "postgresql")
        for bp in bps:
            row = {"budget_id": budget.id, "threshold_bp": bp, "committed": committed}
            landed = _driver.run(conn, insert, {**row, "cap": cap, "at": at}).first() is not None
            batch.seen.append((budget.id, bp))
            if landed:
                batch.alerts.append(self._threshold_alert(budget, bp, committed, cap, at, refused))

    def after_commit(self, batch: AlertBatch) -> None:
        """The transaction that filled ``batch`` committed: remember, then publish."""
        if len(self._fired) > _MAX_CACHED:
            self._fired.clear()
        for budget_id, bp in batch.seen:
            self._fired.setdefault(budget_id, set()).add(bp)
        self.publish(batch.alerts)

    def budgets_reset(self) -> None:
        """The database was reset (budget ids are no longer what they were)."""
        self._fired.clear()

    # -- after commit --------------------------------------------------------------------
    def publish(self, alerts: Iterable[Alert]) -> None:
        """Queue alerts for the sinks; never blocks (a full queue drops, with a log line)."""
        for alert in alerts:
            if (alert.kind is AlertKind.DENIAL and not self.config.denials) or (
                alert.kind is AlertKind.REVOKE and not self.config.revokes
            ):
                continue
            if not self._dispatch.put(alert):
                log.warning("alert queue full: dropped %s alert: %s", alert.kind, alert.message)

    def _send(self, alert: Alert) -> None:
        for sink in self._sinks:
            try:
                sink.send(alert)
            except Exception:
                log.exception("alert sink %r failed", sink)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until queued alerts reached every sink (webhooks: were sent or given up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._dispatch.flush(timeout)
        for sink in self._sinks:
            sink_flush = getattr(sink, "flush", None)
            if sink_flush is not None:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                done = bool(sink_flush(left)) and done
        return done

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the threads."""
        deadline = None if timeout is None else time.monotonic() + timeout
        dropped = self._dispatch.close(timeout)
        if dropped:
            log.warning("gave up on %d undelivered alert(s) at close", dropped)
        for sink in self._sinks:
            sink_close = getattr(sink, "close", None)
            if sink_close is not None:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                sink_close(left)

    # -- building alerts -----------------------------------------------------------------
    @staticmethod
    def _threshold_alert(
        budget: BudgetRef, bp: int, committed: int, cap: int, at: datetime, refused: Money | None
    ) -> Alert:
        used, limit = Money(committed, budget.currency), Money(cap, budget.currency)
        label = f"daily budget ({budget.window})" if budget.kind == "daily" else "run budget"
        scope = f"{budget.agent}/{budget.vendor}"
        if budget.kind == "run":
            scope += f" run {budget.run!r}"
        if refused is not None and committed < cap:
            message = (
                f"{scope}: {label} exhausted: a call of {refused.format()} was refused with "
                f"{used.format()} of {limit.format()} committed"
            )
        else:
            message = (
                f"{scope}: {_percent(bp)} of the {label} reached: "
                f"{used.format()} of {limit.format()} committed"
            )
        return Alert(
            kind=AlertKind.THRESHOLD,
            message=message,
            at=at,
            agent=budget.agent,
            vendor=budget.vendor,
            run=budget.run,
            budget=budget.kind,
            window=budget.window,
            threshold=bp / FULL,
            committed=used,
            cap=limit,
            amount=refused,
            budget_id=budget.id,
        )


def denial_alert(entry: AuditEntry, violation: PolicyViolation, at: datetime) -> Alert:
    """The alert for a refused call, from its audit entry."""
    amount = Money(entry.estimate, entry.currency) if entry.currency else None
    return Alert(
        kind=AlertKind.DENIAL,
        at=at,
        agent=entry.agent,
        vendor=entry.vendor,
        run=entry.run,
        endpoint=entry.endpoint,
        code=violation.code.value,
        amount=amount,
        policy_id=entry.policy_id,
        message=(
            f"{entry.agent}/{entry.vendor} {entry.method} {entry.endpoint} refused "
            f"({violation.code.value}): {violation.message}"
        ),
    )


def revoke_alert(scope: str, target: str, *, reason: str, by: str, at: datetime) -> Alert:
    """The alert for a revocation this process committed."""
    what = "everything" if scope == "all" else f"{scope} {target!r}"
    return Alert(
        kind=AlertKind.REVOKE,
        at=at,
        message=f"{what} revoked by {by}: {reason}",
        agent=target if scope == "agent" else None,
        run=target if scope == "run" else None,
    )


def stale_hold_alert(hold: Hold, at: datetime, older_than: timedelta) -> Alert:
    """The alert for a hold left unresolved for longer than ``older_than``."""
    age = at - hold.created_at
    return Alert(
        kind=AlertKind.STALE_HOLD,
        at=at,
        agent=hold.agent,
        vendor=hold.vendor,
        run=hold.run,
        endpoint=hold.endpoint,
        amount=hold.estimate,
        hold_id=hold.id,
        policy_id=hold.policy_id,
        message=(
            f"hold {hold.id} ({hold.agent}/{hold.vendor} {hold.method} {hold.endpoint}, "
            f"{hold.estimate.format()}) is still {hold.state} after {age} "
            f"(limit {older_than}); resolve it with resolve_hold()"
        ),
    )


def overrun_alert(hold: Hold, at: datetime) -> Alert:
    """The alert for a hold that moved money its reservation did not cover (settled above
    it, or counted late past its budget's cap): its budgets are frozen."""
    return Alert(
        kind=AlertKind.OVERRUN,
        at=at,
        agent=hold.agent,
        vendor=hold.vendor,
        run=hold.run,
        endpoint=hold.endpoint,
        amount=hold.overrun,
        hold_id=hold.id,
        policy_id=hold.policy_id,
        message=(
            f"overrun: hold {hold.id} ({hold.agent}/{hold.vendor} {hold.method} "
            f"{hold.endpoint}) moved {hold.overrun} that its reservation of "
            f"{hold.estimate} did not cover; its budgets are frozen until acknowledged with "
            f"`paymaster holds acknowledge {hold.id} --reason ...`"
        ),
    )
