"""The audit log: one row per attempt, in a hash chain per agent type.

Layout, one job per module:

* :mod:`.records`: the row types (:class:`AuditEntry` to write, :class:`AuditRecord` as
  stored, :class:`RunSummary`) and the bounds on a row's numbers.
* :mod:`.chain`: the hash chain: secrets scrubbed, a row's hash, and the append under the
  chain head's lock (the only writer of audit rows).
* :mod:`.log`: :class:`AuditLog`, the read side (tail, query, count, run summary, export)
  with :class:`AuditFilter`; ``verify`` and ``checkpoint`` delegate to the next two.
* :mod:`.verify`: walking every chain and cross-checking holds and checkpoints.
* :mod:`.checkpoint`: chain heads kept outside the database, optionally signed.
"""

from __future__ import annotations

from .log import (
    AuditEntry,
    AuditFilter,
    AuditLog,
    AuditRecord,
    ChainHead,
    Checkpoint,
    CheckpointError,
    Outcome,
    RunSummary,
    VerifyProblem,
    VerifyResult,
    load_key,
)

__all__ = [
    "AuditEntry",
    "AuditFilter",
    "AuditLog",
    "AuditRecord",
    "ChainHead",
    "Checkpoint",
    "CheckpointError",
    "Outcome",
    "RunSummary",
    "VerifyProblem",
    "VerifyResult",
    "load_key",
]
