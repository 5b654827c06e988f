"""The one interface through which others follow the ledger: :class:`LedgerObserver`.

Alerts (:mod:`paymaster._alerts`) and telemetry (:mod:`paymaster._telemetry`) hang off
the ledger's transactions through these events only: the ledger imports nothing of
theirs, so nothing imports back up. A ledger has one observer; :func:`observing` makes
one of several (each told in turn, in the order given).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from .._audit import AuditEntry
    from .._errors import PolicyViolation
    from .._money import Money
    from .models import BudgetRef, Hold, HoldState, ReserveRequest, RevocationScope

__all__ = ["LedgerObserver", "Observers", "observing"]


class LedgerObserver(Protocol):
    """Told of what the ledger does, as it does it.

    :meth:`budget_rose` runs inside a write transaction; every other event once its
    operation ended (committed, or, for :meth:`reserved` and :meth:`resolved`, failed
    too), and must not raise.
    """

    # -- inside a write transaction ------------------------------------------------------
    def budget_rose(
        self,
        conn: Connection,
        budget_id: int,
        committed: int,
        cap: int,
        at: datetime,
        budget: Callable[[], BudgetRef],
        refused: Money | None = None,
    ) -> Any:
        """A capped budget's ``committed`` rose to ``committed`` (a reserve took it, or a
        settle above its estimate adjusted it), under that budget row's lock; with
        ``refused``, a reserve of that amount was refused at the cap instead. ``budget``
        describes the budget (built only if asked for).

        The observer may write through ``conn`` (committed or rolled back with the
        ledger's work) but must do no I/O when it has nothing to do: this runs on every
        reserve. Returns a note for :meth:`after_commit`, or ``None``."""
        ...

    def after_commit(self, note: Any) -> None:
        """The transaction that :meth:`budget_rose` returned ``note`` in committed."""
        ...

    def budgets_reset(self) -> None:
        """Budget ids seen so far no longer name the same budgets (the database was reset)."""
        ...

    # -- once an operation ended ---------------------------------------------------------
    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None:
        """A reserve ended (``ok``: it reserved) after ``seconds`` in the ledger."""
        ...

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None:
        """A settle, release or mark-unknown ended (``hold`` ``None``: it failed)."""
        ...

    def overran(self, hold: Hold, at: datetime) -> None:
        """A resolve committed an overrun on ``hold``: its budgets are frozen."""
        ...

    def denied(self, entry: AuditEntry, violation: PolicyViolation, at: datetime) -> None:
        """A refused call's audit row (``entry``) was committed."""
        ...

    def revoked(
        self, scope: RevocationScope, target: str, *, reason: str, by: str, at: datetime
    ) -> None:
        """A revocation was committed (``target`` as stored: ``""`` for everything)."""
        ...


class Observers:
    """Several observers as one: each is told every event, in turn."""

    def __init__(self, *observers: LedgerObserver) -> None:
        self.observers = observers

    def budget_rose(
        self,
        conn: Connection,
        budget_id: int,
        committed: int,
        cap: int,
        at: datetime,
        budget: Callable[[], BudgetRef],
        refused: Money | None = None,
    ) -> list[tuple[LedgerObserver, Any]] | None:
        notes = []
        for observer in self.observers:
            note = observer.budget_rose(conn, budget_id, committed, cap, at, budget, refused)
            if note is not None:
                notes.append((observer, note))
        return notes or None

    def after_commit(self, note: list[tuple[LedgerObserver, Any]]) -> None:
        for observer, own in note:
            observer.after_commit(own)

    def budgets_reset(self) -> None:
        for observer in self.observers:
            observer.budgets_reset()

    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None:
        for observer in self.observers:
            observer.reserved(request, seconds, ok)

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None:
        for observer in self.observers:
            observer.resolved(state, hold, seconds)

    def overran(self, hold: Hold, at: datetime) -> None:
        for observer in self.observers:
            observer.overran(hold, at)

    def denied(self, entry: AuditEntry, violation: PolicyViolation, at: datetime) -> None:
        for observer in self.observers:
            observer.denied(entry, violation, at)

    def revoked(
        self, scope: RevocationScope, target: str, *, reason: str, by: str, at: datetime
    ) -> None:
        for observer in self.observers:
            observer.revoked(scope, target, reason=reason, by=by, at=at)


def observing(*observers: LedgerObserver | None) -> LedgerObserver | None:
    """The one observer to give a ledger: ``None`` for none, the only one given, or
    :class:`Observers` of them all (``None`` entries are skipped)."""
    present = [observer for observer in observers if observer is not None]
    if len(present) <= 1:
        return present[0] if present else None
    return Observers(*present)
