"""The per-call audit log: one row per governed call, with tamper evidence.

Every call leaves exactly one call row, whatever happened: ``allowed`` (settled),
``failed`` (the vendor refused; the hold was released), ``errored`` (an exception in the
caller's code; released), ``denied`` (a policy violation; nothing reserved) or
``unknown`` (cancelled or timed out mid-call; the hold stays counted for reconciliation).
An operator's later resolution of an ``unknown`` hold adds a ``reconciled`` event row.

Tamper evidence is a SHA-256 hash chain *per agent type*: each row carries its chain's
sequence number and the previous row's hash, and the chain's head lives in one small row.
A per-agent chain was chosen over batch sealing because every row is protected the moment
it commits, and the only calls that queue on a chain head are one agent type's, which
already queue on that type's budget row; unrelated agents never share a lock.

The log's parts live in private sibling modules, all importable from here: the row types
(:mod:`.records`), scrubbing, hashing and appending a row
(:mod:`.chain`), checkpoints (:mod:`.checkpoint`) and verification
(:mod:`.verify`). This module holds the queries over the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, Select, and_, func, select

from .._db import read_only
from .._money import Money
from .._outcome import Outcome
from .._schema import AUDIT_RECORD_COLUMNS, audit, audit_chain
from .._storable import field as storable_field
from . import verify as _audit_verify
from .checkpoint import ChainHead, Checkpoint, CheckpointError, load_key
from .records import _NOT_ATTEMPTS, AuditEntry, AuditRecord, RunSummary, _outcome
from .verify import VerifyProblem, VerifyResult

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


@dataclass(frozen=True)
class AuditFilter:
    """Filters over audit rows; ``None`` matches anything. ``until`` is exclusive.

    A filter is compared with text as it was stored (cut to its column, NUL and lone
    surrogates escaped; :mod:`paymaster._storable`), so it finds what it names and never
    fails the read. An unknown ``outcome`` is a ``ValueError`` listing the outcomes."""

    run: str | None = None
    agent: str | None = None
    vendor: str | None = None
    outcome: str | Outcome | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        """``query`` restricted to the rows these filters match."""
        if self.run is not None:
            query = query.where(audit.c.run == storable_field("run", self.run))
        if self.agent is not None:
            query = query.where(audit.c.agent == storable_field("agent", self.agent))
        if self.vendor is not None:
            query = query.where(audit.c.vendor == storable_field("vendor", self.vendor))
        if self.outcome is not None:
            query = query.where(audit.c.outcome == _outcome(self.outcome))
        if self.since is not None:
            query = query.where(audit.c.at >= self.since)
        if self.until is not None:
            query = query.where(audit.c.at < self.until)
        return query


class AuditLog:
    """Queries over the audit log (reads never take the SQLite write lock)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _filtered(self, **filters: Any) -> Any:
        return AuditFilter(**filters).apply(select(*AUDIT_RECORD_COLUMNS))

    def query(
        self,
        *,
        run: str | None = None,
        agent: str | None = None,
        vendor: str | None = None,
        outcome: str | Outcome | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        """Rows matching every given filter, oldest first unless ``newest_first``."""
        query = self._filtered(
            run=run, agent=agent, vendor=vendor, outcome=outcome, since=since, until=until
        )
        query = query.order_by(audit.c.id.desc() if newest_first else audit.c.id)
        if limit is not None:
            query = query.limit(limit)
        with read_only(self._engine) as conn:
            return [AuditRecord(**row._mapping) for row in conn.execute(query)]

    def iter_records(
        self, *, since: datetime | None = None, until: datetime | None = None, batch: int = 1000
    ) -> Iterator[AuditRecord]:
        """Stream rows in id order with constant memory (keyset pagination)."""
        last_id = 0
        while True:
            query = (
                self._filtered(since=since, until=until)
                .where(audit.c.id > last_id)
                .order_by(audit.c.id)
                .limit(batch)
            )
            with read_only(self._engine) as conn:
                rows = [AuditRecord(**row._mapping) for row in conn.execute(query)]
            yield from rows
            if len(rows) < batch:
                return
            last_id = rows[-1].id

    def count(self, **filters: Any) -> int:
        query = select(func.count()).select_from(self._filtered(**filters).subquery())
        with read_only(self._engine) as conn:
            return int(conn.execute(query).scalar_one())

    def run_summary(self, run: str) -> RunSummary:
        """Counts per outcome and settled spend per currency of one run."""
        summary = RunSummary(run=run)
        run = storable_field("run", run)
        with read_only(self._engine) as conn:
            rows = conn.execute(
                select(
                    audit.c.outcome,
                    audit.c.currency,
                    func.count().label("n"),
                    func.sum(audit.c.actual).label("spent"),
                    func.min(audit.c.at).label("first"),
                    func.max(audit.c.at).label("last"),
                )
                .where(audit.c.run == run)
                .group_by(audit.c.outcome, audit.c.currency)
            ).all()
            summary.agents = sorted(
                conn.execute(select(audit.c.agent).where(audit.c.run == run).distinct()).scalars()
            )
            summary.vendors = sorted(
                conn.execute(select(audit.c.vendor).where(audit.c.run == run).distinct()).scalars()
            )
        for row in rows:
            if row.outcome not in _NOT_ATTEMPTS:
                summary.calls += int(row.n)
            summary.outcomes[row.outcome] = summary.outcomes.get(row.outcome, 0) + int(row.n)
            if row.currency and row.spent:
                spent = Money(int(row.spent), row.currency)
                previous = summary.spend.get(row.currency)
                summary.spend[row.currency] = spent if previous is None else previous + spent
            first, last = _aware(row.first), _aware(row.last)
            summary.first_at = min(filter(None, (summary.first_at, first)), default=None)
            summary.last_at = max(filter(None, (summary.last_at, last)), default=None)
        return summary

    def verify(
        self,
        *,
        batch: int = 1000,
        checkpoint: Checkpoint | None = None,
        key: bytes | None = None,
        since_checkpoint: bool = False,
    ) -> VerifyResult:
        """Check the whole log; name the first bad row (lowest id) and every problem found.

        Each chain must run from seq 1 up to its head with no gap, each row naming the
        hash of the row before and matching its own hash, the last row's hash being the
        head; no row may lie outside 1..head or in a chain without a head. Every row's
        ``hold_id`` must name a hold, and every hold that left ``pending`` (settled,
        released, unknown) must be named by a row: a hold changes state only in the
        transaction that writes the attempt's row. So removing rows is caught even with
        the chain head wound back, unless the holds went too.

        With a ``checkpoint`` (:meth:`checkpoint`, kept outside the database), every chain
        in it must still exist, reach its seq, and have its hash at that seq: nothing up
        to it was removed or rewritten. With ``key``, the checkpoint must be signed with it.

        Each chain is checked up to the head read at the start, so calls that land while
        it runs are neither flagged nor needed.

        With ``since_checkpoint`` (a checkpoint is then required), only what was written
        since the checkpoint is walked, so the check costs what was written since, however
        long the log: each chain from the checkpoint's head (whose row must still have the
        checkpoint's hash, so nothing up to it was rewritten with the hashes recomputed)
        to its head now, with the same checks of the rows, of the chain heads and of the
        checkpoint; and every row walked must name a hold that exists. Not checked: the
        rows up to the checkpoint themselves (a row edited in place, its hash left as it
        was) and holds whose rows were all deleted. A full :meth:`verify` finds those: run
        one now and then, and this one on the schedule between (``paymaster audit verify
        --checkpoint FILE --since-checkpoint``).
        """
        return _audit_verify.verify(
            self._engine,
            batch=batch,
            checkpoint=checkpoint,
            key=key,
            since_checkpoint=since_checkpoint,
        )

    def checkpoint(self, *, key: bytes | None = None, at: datetime | None = None) -> Checkpoint:
        """Every chain's head now (chain, seq, hash, when its newest row was written), to
        keep outside the database and pass to :meth:`verify` later; signed with ``key``
        (HMAC-SHA256) if given. Run :meth:`verify` first: a checkpoint vouches for the log
        as it is."""
        newest = audit.alias("newest")
        query = (
            select(audit_chain.c.chain, audit_chain.c.seq, audit_chain.c.head, newest.c.at)
            .select_from(
                audit_chain.outerjoin(
                    newest,
                    and_(newest.c.chain == audit_chain.c.chain, newest.c.seq == audit_chain.c.seq),
                )
            )
            .order_by(audit_chain.c.chain)
        )
        with read_only(self._engine) as conn:
            heads = tuple(
                ChainHead(row.chain, int(row.seq), str(row.head), row.at)
                for row in conn.execute(query)
            )
        made = Checkpoint(at or datetime.now(timezone.utc), heads)
        return made if key is None else made.signed(key)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite aggregates come back as text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
