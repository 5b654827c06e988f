"""The shared ledger: budgets, holds and revocations, and their atomic operations.

* **reserve** (one transaction): revocation check; for every budget the call counts
  against, ``committed = committed + x WHERE committed + x <= cap`` (the row lock of that
  conditional UPDATE is what keeps the cap under any concurrency); a pending hold.
* **settle** / **release** / **mark_unknown** (one transaction each): resolve the hold
  exactly once, correct ``committed`` by the difference, append the call's audit row.

``committed`` counts pending estimates plus settled actuals (plus holds of unknown
outcome), so a settle at exactly its estimate never touches the hot budget row. Holds
never expire: a crashed holder's hold stays counted until someone resolves it.

Layout: :class:`Ledger` is one class assembled from one part per job, each in its module:

* :mod:`.models`: the value types (:class:`Hold`, :class:`HoldState`,
  :class:`ReserveRequest`, :class:`Reservation`, :class:`Revocation`,
  :class:`BudgetStatus`, :class:`BudgetRef`) and pure helpers (:func:`hold_key`,
  :func:`check_amount`); no I/O.
* :mod:`.observer`: :class:`LedgerObserver`, the one interface through which alerts and
  telemetry follow the ledger (the ledger imports neither), and :func:`observing`.
* :mod:`._core`: the base every part shares: engine, clock, observer, budget id cache,
  the write transaction with its dead-connection retry, lost-commit helpers.
* :mod:`.reserve`: :meth:`Ledger.reserve` with its retries, the hold's insert and the
  budgets' conditional UPDATEs (``_take``).
* :mod:`.refusals`: why a reserve is refused (revoked, frozen, over a cap, ...).
* :mod:`.denials`: audit rows of calls that reserved nothing, refusals included.
* :mod:`.resolve`: settle, release, mark_unknown and an operator's resolution, in three
  steps: the state transition (:mod:`.transitions`), the budget adjustment with the
  observer told of rising budgets, and the audit row.
* :mod:`.transitions`: how a hold moves between states, overruns included.
* :mod:`.operators`: acknowledging overruns and flagging stale holds.
* :mod:`.revocations`: the kill switch.
* :mod:`.queries`: read-only views of holds and budgets.
"""

from __future__ import annotations

from .models import (
    BudgetRef,
    BudgetStatus,
    Hold,
    HoldState,
    Reservation,
    ReserveRequest,
    Revocation,
    RevocationScope,
    check_amount,
    hold_key,
)
from .observer import LedgerObserver, Observers, observing
from .operators import _Operating
from .queries import _Queries
from .reserve import _Reserving
from .resolve import _Resolving
from .revocations import _Revoking

__all__ = [
    "BudgetRef",
    "BudgetStatus",
    "Hold",
    "HoldState",
    "Ledger",
    "LedgerObserver",
    "Observers",
    "Reservation",
    "ReserveRequest",
    "Revocation",
    "RevocationScope",
    "check_amount",
    "hold_key",
    "observing",
]


class Ledger(_Reserving, _Resolving, _Operating, _Revoking, _Queries):
    """Atomic ledger operations over one database (SQLite or PostgreSQL)."""
