"""The outcome of an audited call, in a module of its own (no SQLAlchemy): the CLI offers
its values as choices without importing the audit log. Import it from
:mod:`paymaster._audit` (or :mod:`paymaster`)."""

from __future__ import annotations

from enum import Enum

__all__ = ["Outcome"]


class Outcome(str, Enum):
    ALLOWED = "allowed"
    FAILED = "failed"
    ERRORED = "errored"
    DENIED = "denied"
    UNKNOWN = "unknown"
    RECONCILED = "reconciled"
    OVERRUN = "overrun"
    """Settled above its reservation: recorded as spent, its budgets frozen."""
    ACKNOWLEDGED = "acknowledged"
    """An operator acknowledged an overrun, unfreezing its budgets."""

    def __str__(self) -> str:
        return self.value
