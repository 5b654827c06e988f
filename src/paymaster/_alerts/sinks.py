"""What an alert is (:class:`Alert`) and where it goes: the sinks, and the background
thread that feeds them from a bounded queue (never on a governed call's path)."""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from .._money import Money

__all__ = ["Alert", "AlertKind", "AlertSink", "CallbackSink", "LoggingSink", "WebhookSink"]

log = logging.getLogger("paymaster.alerts")

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
