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
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import statements as S
from .db import read_only
from .money import Money
from .schema import AUDIT_RECORD_COLUMNS, audit, audit_chain

__all__ = ["AuditEntry", "AuditLog", "AuditRecord", "Outcome", "RunSummary", "VerifyResult"]

MAX_ERROR_CHARS = 2000
GENESIS = "0" * 64

_SECRETS = [
    (re.compile(r"\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]{6,}"), "[redacted key]"),
    (re.compile(r"\bpmk_[A-Za-z0-9_\-]{6,}"), "[redacted key]"),
    (re.compile(r"(?i)bearer\s+[A-Za-z0-9._\-]{8,}"), "Bearer [redacted]"),
    (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[redacted number]"),
]


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


#: Rows that record an operator's or a reconciler's act on an earlier attempt's hold.
_NOT_ATTEMPTS = frozenset({Outcome.RECONCILED.value, Outcome.ACKNOWLEDGED.value})


def scrub(text: str | None) -> str | None:
    """Remove API keys, bearer tokens and card-like numbers; truncate long texts."""
    if text is None:
        return None
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 15] + "...[truncated]"
    return text


@dataclass(frozen=True)
class AuditEntry:
    """What the governor knows about a call when it writes the call's row."""

    agent: str
    vendor: str
    endpoint: str
    method: str
    outcome: Outcome
    run: str | None = None
    customer: str | None = None
    http_status: int | None = None
    vendor_request_id: str | None = None
    currency: str | None = None
    estimate: int = 0
    actual: int = 0
    policy_id: str | None = None
    policy_hash: str | None = None
    violation_code: str | None = None
    error: str | None = None
    hold_id: str | None = None
    duration_ms: int | None = None
    tool_call_id: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One stored audit row."""

    id: int
    at: datetime
    run: str | None
    agent: str
    vendor: str
    endpoint: str
    method: str
    customer: str | None
    outcome: str
    http_status: int | None
    vendor_request_id: str | None
    currency: str | None
    estimate: int
    actual: int
    policy_id: str | None
    policy_hash: str | None
    violation_code: str | None
    error: str | None
    hold_id: str | None
    duration_ms: int | None
    chain: str
    seq: int
    prev_hash: str
    hash: str
    tool_call_id: str | None = None
    credential: str | None = None
    """What the call was presented with: a proxy's vault key id."""

    @property
    def cost(self) -> Money | None:
        """The actual cost, or ``None`` for a row without a currency."""
        return Money(self.actual, self.currency) if self.currency else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


_HASHED = (
    "chain seq prev_hash at run agent vendor endpoint method customer outcome http_status "
    "vendor_request_id currency estimate actual policy_id policy_hash violation_code error "
    "hold_id duration_ms"
).split()


def row_hash(values: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of a row's hashed fields."""
    payload = [
        values[name].isoformat(timespec="microseconds") if name == "at" else values[name]
        for name in _HASHED
    ]
    # Added in schema revision 0002: hashed only when set, so older rows verify as before.
    if values.get("tool_call_id") is not None:
        payload.append(values["tool_call_id"])
    # Added in revision 0006, hashed only when set, as an object so that it can never be
    # read as a tool call id.
    if values.get("credential") is not None:
        payload.append({"credential": values["credential"]})
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def _hashed_fields(record: AuditRecord) -> dict[str, Any]:
    """What :func:`row_hash` hashed when the row was written: the same function reads the
    same fields at verification, ``tool_call_id`` included."""
    values = {name: getattr(record, name) for name in _HASHED}
    values["tool_call_id"] = record.tool_call_id
    values["credential"] = record.credential
    return values


_ENTRY_FIELDS = tuple(f.name for f in fields(AuditEntry))


def append(conn: Connection, entry: AuditEntry, at: datetime, token: str | None = None) -> None:
    """Append one row in the caller's transaction. ``token`` (unhashed) lets a retry after
    a lost COMMIT reply find this very row (:data:`paymaster.statements.AUDIT_WRITTEN`).

    The row is built before the agent type's chain head is locked; the lock is taken by
    ``UPDATE ... SET seq = seq + 1 RETURNING seq, head`` (``head`` is still the previous
    row's hash), so a chain never forks and its head is held for two statements. On
    PostgreSQL the row insert and the head update are one statement.
    """
    chain = entry.agent
    values: dict[str, Any] = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    values.update(outcome=str(entry.outcome), error=scrub(entry.error), at=at, chain=chain)
    postgres = conn.dialect.name == "postgresql"
    head = conn.execute(S.CHAIN_NEXT, {"p_chain": chain}).first()
    if head is None:  # the chain's first row
        dialect_insert = pg_insert if postgres else sqlite_insert
        conn.execute(
            dialect_insert(audit_chain)
            .values(chain=chain, seq=0, head=GENESIS)
            .on_conflict_do_nothing(index_elements=["chain"])
        )
        head = conn.execute(S.CHAIN_NEXT, {"p_chain": chain}).one()
    values.update(seq=int(head.seq), prev_hash=str(head.head))
    values["hash"] = row_hash(values)
    values["write_token"] = token
    if postgres:
        params = {f"a_{name}": value for name, value in values.items()}
        conn.execute(
            S.audit_insert_and_head(), {**params, "p_chain": chain, "p_head": values["hash"]}
        )
    else:
        conn.execute(S.AUDIT_INSERT, values)
        conn.execute(S.CHAIN_SET_HEAD, {"p_chain": chain, "p_head": values["hash"]})


@dataclass
class RunSummary:
    """Counts per outcome and spend per currency for one run."""

    run: str
    calls: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    spend: dict[str, Money] = field(default_factory=dict)
    agents: list[str] = field(default_factory=list)
    vendors: list[str] = field(default_factory=list)
    first_at: datetime | None = None
    last_at: datetime | None = None


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :meth:`AuditLog.verify`."""

    ok: bool
    rows_checked: int
    chains: int
    first_bad_id: int | None = None
    reason: str | None = None


class AuditLog:
    """Queries over the audit log (reads never take the SQLite write lock)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _filtered(
        self,
        *,
        run: str | None = None,
        agent: str | None = None,
        vendor: str | None = None,
        outcome: str | Outcome | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Any:
        query = select(*AUDIT_RECORD_COLUMNS)
        if run is not None:
            query = query.where(audit.c.run == run)
        if agent is not None:
            query = query.where(audit.c.agent == agent)
        if vendor is not None:
            query = query.where(audit.c.vendor == vendor)
        if outcome is not None:
            query = query.where(audit.c.outcome == str(outcome))
        if since is not None:
            query = query.where(audit.c.at >= since)
        if until is not None:
            query = query.where(audit.c.at < until)
        return query

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

    def verify(self, *, batch: int = 1000) -> VerifyResult:
        """Recompute every chain; name the first bad row (lowest id) if any.

        Each chain is checked up to the head read at the start, so calls that land while
        it runs are neither flagged nor needed. A chain whose head row is missing is bad.
        """
        with read_only(self._engine) as conn:
            heads = {
                row.chain: (int(row.seq), str(row.head))
                for row in conn.execute(select(audit_chain))
            }
            chains = set(conn.execute(select(audit.c.chain).distinct()).scalars())
        first_bad: tuple[int, str] | None = None
        checked = 0
        for chain in sorted(chains | set(heads)):
            if chain not in heads:
                with read_only(self._engine) as conn:
                    first_id = conn.execute(
                        select(func.min(audit.c.id)).where(audit.c.chain == chain)
                    ).scalar_one()
                bad: tuple[int, str] | None = (
                    int(first_id),
                    f"chain {chain!r} has rows but no head row",
                )
            else:
                n, bad = self._verify_chain(chain, *heads[chain], batch)
                checked += n
            if bad and (first_bad is None or bad[0] < first_bad[0]):
                first_bad = bad
        if first_bad:
            return VerifyResult(False, checked, len(chains | set(heads)), *first_bad)
        return VerifyResult(True, checked, len(heads))

    def _verify_chain(
        self, chain: str, head_seq: int, head_hash: str, batch: int
    ) -> tuple[int, tuple[int, str] | None]:
        expected_seq, prev, last_id, checked = 1, GENESIS, 0, 0
        while True:
            query = (
                select(*AUDIT_RECORD_COLUMNS)
                .where(
                    audit.c.chain == chain,
                    audit.c.seq >= expected_seq,
                    audit.c.seq <= head_seq,
                )
                .order_by(audit.c.seq)
                .limit(batch)
            )
            with read_only(self._engine) as conn:
                rows = [AuditRecord(**r._mapping) for r in conn.execute(query)]
            for record in rows:
                checked += 1
                if record.seq != expected_seq:
                    return checked, (
                        record.id,
                        f"chain {chain!r}: row(s) missing before seq {record.seq}",
                    )
                if record.prev_hash != prev:
                    return checked, (
                        record.id,
                        f"chain {chain!r}: prev_hash does not match the row before",
                    )
                if row_hash(_hashed_fields(record)) != record.hash:
                    return checked, (
                        record.id,
                        f"chain {chain!r}: row content does not match its hash",
                    )
                expected_seq, prev, last_id = record.seq + 1, record.hash, record.id
            if len(rows) < batch:
                break
        if expected_seq - 1 != head_seq or prev != head_hash:
            return checked, (
                last_id,
                f"chain {chain!r}: rows after seq {expected_seq - 1} are missing",
            )
        return checked, None


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite aggregates come back as text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
