"""What every part of the ledger shares: the base class holding the engine, the clock,
the observer and the budget id cache; one write transaction with its retry on a dead
connection; and the small helpers for lost-commit retries."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .. import _driver
from .. import _statements as S
from .._db import unavailable_on_error
from .._money import Money
from .models import BudgetRef, Hold
from .observer import LedgerObserver

T = TypeVar("T")


def _token() -> str:
    """A write's own token, stored (unhashed) on the audit row it writes."""
    return uuid.uuid4().hex


def _written(conn: Connection, at: datetime, token: str) -> bool:
    """Whether the write holding ``token`` committed its audit row (its reply was lost)."""
    return _driver.run(conn, S.AUDIT_WRITTEN, {"p_at": at, "p_token": token}).first() is not None


def _frozen_by(found: Hold) -> bool:
    """Whether ``found`` has an overrun still awaiting acknowledgement (its budgets are
    frozen by it already)."""
    return found.overrun is not None and found.overrun_acknowledged_at is None


def _joined(*parts: str | None) -> str | None:
    text = "; ".join(part for part in parts if part)
    return text or None


class _Retry(Exception):
    """The transaction saw a state that changed under it; run it again."""


class _StaleBudgetId(Exception):
    """A cached budget id no longer exists (the database was reset); look it up again."""


def _new_id() -> str:
    return uuid.uuid4().hex


_ATTEMPTS = 5
#: ``p_max_holders`` for resolutions that any number of holders may make.
_ANY_HOLDERS = 2**31 - 1
log = logging.getLogger("paymaster")
_MAX_CACHED_BUDGETS = 10_000
CALL_NOT_MADE = "so the call was not made"


def _not_recorded(hold_id: str) -> str:
    return (
        f"so the call's outcome was NOT recorded: hold {hold_id} stays counted against its "
        "budget until it is resolved; do not retry without checking the vendor"
    )


@dataclass
class _Notes:
    """What the observer noted in one write transaction: handed back once it commits."""

    observer: LedgerObserver
    notes: list[Any] = field(default_factory=list)

    def budget_rose(
        self,
        conn: Connection,
        budget_id: int,
        committed: int,
        cap: int,
        at: datetime,
        budget: Callable[[], BudgetRef],
        refused: Money | None = None,
    ) -> None:
        note = self.observer.budget_rose(conn, budget_id, committed, cap, at, budget, refused)
        if note is not None:
            self.notes.append(note)

    def committed(self) -> None:
        for note in self.notes:
            self.observer.after_commit(note)


class _LedgerCore:
    """The state every part of :class:`~paymaster._ledger.Ledger` works on."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        observer: LedgerObserver | None = None,
    ) -> None:
        self._engine = engine
        #: Told of each operation, and of budgets rising inside its transactions (alerts,
        #: telemetry); ``None``: no observer work at all.
        self.observer = observer
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        # Ids of committed budget rows only: an id seen inside a transaction that rolled
        # back may be handed to another budget (SQLite reuses rowids).
        self._budget_ids: dict[tuple[str, ...], int] = {}
        #: (hold, attempt) -> (at, write token) of that attempt's resolutions that raised
        #: but may have committed (:meth:`~paymaster._ledger.Ledger.settle` ``attempt``).
        self._unconfirmed: dict[tuple[str, str], list[tuple[datetime, str]]] = {}

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
