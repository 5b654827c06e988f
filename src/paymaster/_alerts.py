"""Budget alerts: events from the ledger, sent to callbacks, logs and webhooks.

::

    gov = Governor(url, policies=..., alerts=AlertConfig(
        thresholds=(0.5, 0.8, 1.0),
        sinks=[CallbackSink(page_someone), LoggingSink(), WebhookSink("https://...")],
    ))

Four kinds of :class:`Alert`:

* ``threshold``: a budget's ``committed`` (pending estimates + settled actuals) reached a
  fraction of its cap. Each threshold fires **once per budget window** (a UTC day of an
  agent type's budget, or a run's budget) across every process on the ledger. It is
  decided in the ledger transaction that takes the budget there (a reserve's conditional
  UPDATE, or a settle above its estimate), under that budget row's lock: the transaction
  inserts a ``paymaster_alert`` row whose unique key is ``(budget_id, threshold)``, and
  only the process whose insert lands emits the alert. A release that lowers
  ``committed`` does not re-arm a threshold. The 100% threshold means the budget is
  exhausted: a reserve landed exactly on the cap, or, whichever comes first, a reserve
  was refused because it would have gone over it (the refusal's audit transaction
  inserts the row). Each process remembers the thresholds it saw recorded, so a reserve
  runs no extra statement unless it reaches one this process has not seen.
* ``denial``: a call was refused (any :class:`~paymaster.ViolationCode`).
* ``revoke``: this process revoked an agent type, a run or everything.
* ``stale_hold``: :meth:`paymaster.Governor.check_stale_holds` found a hold unresolved for
  longer than a limit; each hold alerts once.

Alerts are emitted only after their transaction commits and never on the governed call's
path: sinks run in a background thread fed by a bounded queue (an alert that finds it full
is dropped and logged), and a :class:`WebhookSink` posts from a thread of its own, with a
timeout and retries, so a slow or dead receiver delays nothing else. Delivery is at most
once: an alert whose process dies before sending it, or whose transaction's COMMIT reply
was lost (the ledger's retry finds the commit but not the alerts it decided), is not sent
(the ``paymaster_alert`` row still records that the threshold fired).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from sqlalchemy import Connection

from . import _statements as S
from ._money import Money

if TYPE_CHECKING:
    from ._audit import AuditEntry
    from ._errors import PolicyViolation
    from ._ledger import Hold

__all__ = [
    "Alert",
    "AlertConfig",
    "AlertKind",
    "AlertSink",
    "Alerter",
    "CallbackSink",
    "LoggingSink",
    "WebhookSink",
]

log = logging.getLogger("paymaster.alerts")

FULL = 10_000  # basis points: the cap itself
_MAX_CACHED = 10_000

T = TypeVar("T")


class AlertKind(str, Enum):
    THRESHOLD = "threshold"
    DENIAL = "denial"
    REVOKE = "revoke"
    STALE_HOLD = "stale_hold"
    OVERRUN = "overrun"

    def __str__(self) -> str:
        return self.value


def _money(value: Money | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"amount": value.amount, "currency": value.currency, "formatted": str(value)}


@dataclass(frozen=True)
class Alert:
    """One event worth telling someone about, as the ledger saw it when it happened."""

    kind: AlertKind
    message: str
    at: datetime
    agent: str | None = None
    vendor: str | None = None
    run: str | None = None  # a threshold's: the run of the call that took the budget there
    budget: str | None = None  # "daily" (an agent type's UTC day) or "run"
    window: str | None = None  # the UTC day "YYYY-MM-DD" of a daily budget
    threshold: float | None = None  # a fraction of the cap: 0.8 is 80%
    committed: Money | None = None  # the budget's pending + settled amount
    cap: Money | None = None
    amount: Money | None = None  # the refused call's estimate, or the stale hold's
    code: str | None = None  # a denial's violation code
    endpoint: str | None = None
    hold_id: str | None = None
    budget_id: int | None = None
    policy_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: amounts as ``{"amount": minor units, "currency", "formatted"}``."""
        data = asdict(self)
        data.update(
            kind=self.kind.value,
            at=self.at.isoformat(),
            committed=_money(self.committed),
            cap=_money(self.cap),
            amount=_money(self.amount),
        )
        return data


@runtime_checkable
class AlertSink(Protocol):
    """Where alerts go. ``send`` runs in the alert thread, never on a governed call's path."""

    def send(self, alert: Alert) -> None: ...


class CallbackSink:
    """Calls ``fn(alert)`` (in the alert thread)."""

    def __init__(self, fn: Callable[[Alert], object]) -> None:
        self._fn = fn

    def send(self, alert: Alert) -> None:
        self._fn(alert)


class LoggingSink:
    """Logs each alert (logger ``paymaster._alerts``, WARNING by default); the alert's fields
    are on the record as ``record.paymaster_alert``."""

    def __init__(
        self, logger: str | logging.Logger = "paymaster.alerts", level: int = logging.WARNING
    ) -> None:
        self._logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self._level = level

    def send(self, alert: Alert) -> None:
        self._logger.log(
            self._level,
            "paymaster %s alert: %s",
            alert.kind.value,
            alert.message,
            extra={"paymaster_alert": alert.to_dict()},
        )


class _Worker(Generic[T]):
    """A daemon thread handling items of a bounded queue in order (started on first use)."""

    def __init__(self, name: str, handle: Callable[[T], None], maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a queue size must be at least 1")
        self._name, self._handle, self._maxsize = name, handle, maxsize
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.abandon = threading.Event()  # set when close() gives up waiting

    def put(self, item: T) -> bool:
        """Queue ``item``; ``False`` (and nothing queued) if the queue is full."""
        with self._cond:
            if len(self._items) >= self._maxsize:
                return False
            self._items.append(item)
            if self._thread is None:
                self._stopping = False
                self.abandon.clear()
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if not self._items:
                    self._thread = None
                    self._cond.notify_all()
                    return
                item = self._items.popleft()
                self._busy = True
            try:
                self._handle(item)
            except Exception:
                log.exception("%s: handling an alert failed", self._name)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued was handled; ``False`` if ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> int:
        """Flush (up to ``timeout``), stop the thread, and return how many queued items
        were given up on. A later :meth:`put` starts a new thread."""
        done = self.flush(timeout)
        with self._cond:
            dropped = 0 if done else len(self._items)
            if not done:
                self.abandon.set()
                self._items.clear()
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and done:
            thread.join(timeout)
        return dropped


class WebhookSink:
    """POSTs each alert as JSON (:meth:`Alert.to_dict`) to ``url`` from a background thread.

    Each alert is tried ``1 + retries`` times (on a connection error, a timeout, a 408, a
    429 or a 5xx), waiting ``backoff``, then twice that, ... between attempts; each attempt
    gives up after ``timeout`` seconds. Uses httpx when it is installed, else urllib. At
    most ``queue_size`` alerts wait; one more is dropped and logged.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.5,
        queue_size: int = 1000,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a webhook URL must be http:// or https://, got {url!r}")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._worker: _Worker[Alert] = _Worker("paymaster-webhook", self._deliver, queue_size)
        self._client: Any = None

    def send(self, alert: Alert) -> None:
        if not self._worker.put(alert):
            log.warning(
                "webhook %s: queue full, dropped %s alert: %s", self.url, alert.kind, alert.message
            )

    def flush(self, timeout: float | None = None) -> bool:
        return self._worker.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        dropped = self._worker.close(timeout)
        if dropped:
            log.warning(
                "webhook %s: gave up on %d undelivered alert(s) at close", self.url, dropped
            )
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _deliver(self, alert: Alert) -> None:
        body = json.dumps(alert.to_dict(), default=str).encode()
        error = ""
        for attempt in range(self.retries + 1):
            if attempt and self._worker.abandon.wait(self.backoff * 2 ** (attempt - 1)):
                break
            try:
                status = self._post(body)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if status < 300:
                return
            error = f"HTTP {status}"
            if status < 500 and status not in (408, 429):
                break  # the receiver refuses it: trying again will not help
        log.warning(
            "webhook %s: %s alert not delivered (%s): %s",
            self.url,
            alert.kind,
            error,
            alert.message,
        )

    def _post(self, body: bytes) -> int:
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx is usually installed
            return self._post_urllib(body)
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout)
        return int(self._client.post(self.url, content=body, headers=self.headers).status_code)

    def _post_urllib(self, body: bytes) -> int:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")  # noqa: S310 - scheme checked in __init__
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


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


@dataclass(frozen=True)
class BudgetRef:
    """The budget window a threshold alert is about."""

    id: int
    kind: str  # daily | run
    agent: str
    vendor: str
    currency: str
    run: str | None
    window: str | None


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
            landed = conn.execute(insert, {**row, "cap": cap, "at": at}).first() is not None
            batch.seen.append((budget.id, bp))
            if landed:
                batch.alerts.append(self._threshold_alert(budget, bp, committed, cap, at, refused))

    def committed(self, batch: AlertBatch) -> None:
        """The transaction that filled ``batch`` committed: remember, then publish."""
        if len(self._fired) > _MAX_CACHED:
            self._fired.clear()
        for budget_id, bp in batch.seen:
            self._fired.setdefault(budget_id, set()).add(bp)
        self.publish(batch.alerts)

    def forget(self) -> None:
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
