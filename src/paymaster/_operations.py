"""Read helpers for operating a ledger: schema revisions, following and exporting the
audit log with constant memory.

These sit beside :class:`~paymaster.AuditLog` and are what the ``paymaster``
command uses; they only read (except :func:`upgrade_schema`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal, TextIO

from sqlalchemy import Engine, Select, func, select

from ._audit import AuditFilter, AuditRecord
from ._db import ensure_schema, read_only
from ._schema import AUDIT_RECORD_COLUMNS, audit

if TYPE_CHECKING:  # alembic is imported by the functions that need it (start-up time)
    from alembic.script import ScriptDirectory

__all__ = [
    "EXPORT_FIELDS",
    "AuditFilter",
    "AuditFollower",
    "ExportFormat",
    "SchemaState",
    "export_audit",
    "latest_audit",
    "max_audit_id",
    "schema_state",
    "upgrade_schema",
]

ExportFormat = Literal["csv", "jsonl"]

#: The columns of an export, in order: every stored field of an audit row.
EXPORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))


# -- schema --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against this version of paymaster."""

    current: str | None  # None: no paymaster schema yet
    head: str
    known: bool  # whether this paymaster knows ``current`` (False: a newer paymaster's)

    @property
    def is_head(self) -> bool:
        return self.current == self.head


def _script() -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(files("paymaster") / "migrations"))
    return ScriptDirectory.from_config(config)


def schema_state(engine: Engine) -> SchemaState:
    """The database's schema revision and this paymaster's head, without changing anything."""
    script = _script()
    head = script.get_current_head()
    assert head is not None
    from alembic.runtime.migration import MigrationContext

    with read_only(engine) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    known = current is None or current in {rev.revision for rev in script.walk_revisions()}
    return SchemaState(current=current, head=head, known=known)


def upgrade_schema(engine: Engine) -> tuple[str | None, str]:
    """Create or upgrade the schema to the head; returns (revision before, revision now).

    Raises :class:`~paymaster.SchemaVersionError` for a database written by a newer
    paymaster.
    """
    before = schema_state(engine).current
    return before, ensure_schema(engine, upgrade=True)


# -- audit queries -------------------------------------------------------------------------
def _records(engine: Engine, query: Select[Any]) -> list[AuditRecord]:
    with read_only(engine) as conn:
        return [AuditRecord(**row._mapping) for row in conn.execute(query)]


def latest_audit(
    engine: Engine, where: AuditFilter, limit: int, *, before_id: int | None = None
) -> list[AuditRecord]:
    """The ``limit`` newest matching rows (below ``before_id`` if given), oldest first."""
    query = where.apply(select(*AUDIT_RECORD_COLUMNS))
    if before_id is not None:
        query = query.where(audit.c.id < before_id)
    query = query.order_by(audit.c.id.desc()).limit(limit)
    return list(reversed(_records(engine, query)))


def max_audit_id(engine: Engine) -> int:
    """The highest audit row id (0 for an empty log)."""
    with read_only(engine) as conn:
        return int(conn.execute(select(func.coalesce(func.max(audit.c.id), 0))).scalar_one())


class AuditFollower:
    """Polls for audit rows not seen yet, by id (after ``after_id``; default the highest
    id now).

    On PostgreSQL ids are handed out when a row is inserted, not when its transaction
    commits, so a row may become visible after a higher id did. Each poll therefore looks
    back ``lookback`` ids below the highest one seen and skips the ids already returned:
    a row is returned exactly once unless more than ``lookback`` ids were handed out while
    its transaction was open.
    """

    def __init__(
        self,
        engine: Engine,
        where: AuditFilter,
        *,
        after_id: int | None = None,
        lookback: int = 1000,
        batch: int = 1000,
    ) -> None:
        self._engine = engine
        self._where = where
        self._high = max_audit_id(engine) if after_id is None else after_id
        self._lookback = lookback
        self._batch = batch
        self._seen: set[int] = set()

    def _mark_seen(self, records: Iterable[AuditRecord]) -> None:
        for record in records:
            self._seen.add(record.id)
            self._high = max(self._high, record.id)

    def tail(self, limit: int) -> list[AuditRecord]:
        """Start following: the ``limit`` newest matching rows, oldest first. Every row
        visible now counts as seen, shown or not, so :meth:`poll` returns only rows that
        become visible later."""
        window = self.poll()
        if len(window) >= limit:
            return window[len(window) - limit :]
        before = window[0].id if window else self._high + 1
        older = latest_audit(self._engine, self._where, limit - len(window), before_id=before)
        return older + window

    def poll(self) -> list[AuditRecord]:
        """Matching rows that became visible since the last poll, in id order."""
        new: list[AuditRecord] = []
        low = max(self._high - self._lookback, 0)
        while True:
            query = (
                self._where.apply(select(*AUDIT_RECORD_COLUMNS))
                .where(audit.c.id > low)
                .order_by(audit.c.id)
                .limit(self._batch)
            )
            rows = _records(self._engine, query)
            new.extend(r for r in rows if r.id not in self._seen)
            if len(rows) < self._batch:
                break
            low = rows[-1].id
        self._mark_seen(new)
        floor = self._high - self._lookback
        self._seen = {i for i in self._seen if i > floor}
        return new


# -- export --------------------------------------------------------------------------------
def _export_row(record: AuditRecord) -> dict[str, Any]:
    data = {name: getattr(record, name) for name in EXPORT_FIELDS}
    data["at"] = record.at.isoformat()
    return data


def _csv_rows(records: Iterable[AuditRecord]) -> Iterator[list[Any]]:
    for record in records:
        row = _export_row(record)
        yield ["" if row[name] is None else row[name] for name in EXPORT_FIELDS]


def export_audit(records: Iterable[AuditRecord], fmt: ExportFormat, out: TextIO) -> int:
    """Write ``records`` to ``out`` as CSV (with a header) or JSON Lines, one row at a time,
    and return how many were written.

    Memory stays constant whatever the number of rows as long as ``records`` is lazy, such
    as :meth:`AuditLog.iter_records <paymaster.AuditLog.iter_records>`. Amounts are
    integers in minor units with their ``currency``; ``at`` is ISO 8601 UTC.
    """
    count = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(EXPORT_FIELDS)
        for row in _csv_rows(records):
            writer.writerow(row)
            count += 1
        return count
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(_export_row(record), ensure_ascii=False, separators=(",", ":")))
            out.write("\n")
            count += 1
        return count
    raise ValueError(f"unknown export format {fmt!r}: use 'csv' or 'jsonl'")
