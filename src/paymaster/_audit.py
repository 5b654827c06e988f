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
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import _statements as S
from ._db import read_only
from ._errors import PaymasterError
from ._money import Money
from ._outcome import Outcome
from ._schema import AUDIT_RECORD_COLUMNS, audit, audit_chain, hold
from ._storable import TEXT_LIMIT, storable
from ._storable import field as storable_field
from ._storable import row as storable_row

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

MAX_ERROR_CHARS = TEXT_LIMIT
GENESIS = "0" * 64

_SECRETS = [
    (re.compile(r"\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]{6,}"), "[redacted key]"),
    (re.compile(r"\bpmk_[A-Za-z0-9_\-]{6,}"), "[redacted key]"),
    (re.compile(r"(?i)bearer\s+[A-Za-z0-9._\-]{8,}"), "Bearer [redacted]"),
    (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[redacted number]"),
]


def _outcome(value: str | Outcome) -> str:
    """``value`` as a stored outcome, or a ``ValueError`` that lists the outcomes."""
    try:
        return Outcome(value).value
    except ValueError:
        known = ", ".join(o.value for o in Outcome)
        raise ValueError(f"outcome {value!r} is not an outcome; use one of: {known}") from None


#: The largest ``duration_ms`` a row stores (the column is a 32-bit integer: 24 days).
MAX_DURATION_MS = 2**31 - 1


def row_number_problem(*, http_status: object = None, duration_ms: object = None) -> str | None:
    """What is wrong with a row's ``http_status`` or ``duration_ms``, or ``None``: each is
    an int in its range (an HTTP status 100-599; 0 to :data:`MAX_DURATION_MS`)."""
    for name, value, low, high in (
        ("http_status", http_status, 100, 599),
        ("duration_ms", duration_ms, 0, MAX_DURATION_MS),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"{name} must be an int from {low} to {high}, not {value!r}"
    return None


#: Rows that record an operator's or a reconciler's act on an earlier attempt's hold.
_NOT_ATTEMPTS = frozenset({Outcome.RECONCILED.value, Outcome.ACKNOWLEDGED.value})


def scrub(text: str | None) -> str | None:
    """Remove API keys, bearer tokens and card-like numbers; make the rest storable (a long
    text is cut to :data:`MAX_ERROR_CHARS`, keeping the redacted text's digest)."""
    if text is None:
        return None
    text = str(text)  # an exception or a code given where a message was expected
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return storable(text, MAX_ERROR_CHARS)


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
    a lost COMMIT reply find this very row (:data:`paymaster._statements.AUDIT_WRITTEN`).

    The row is built before the agent type's chain head is locked; the lock is taken by
    ``UPDATE ... SET seq = seq + 1 RETURNING seq, head`` (``head`` is still the previous
    row's hash), so a chain never forks and its head is held for two statements. On
    PostgreSQL the row insert and the head update are one statement.
    """
    values: dict[str, Any] = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    values.update(outcome=str(entry.outcome), error=scrub(entry.error), at=at)
    # Every text as the row stores it, on every backend (what the hash covers, too).
    values = storable_row(audit, values)
    chain = values["chain"] = values["agent"]
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
class VerifyProblem:
    """One thing :meth:`AuditLog.verify` found wrong. ``row_id`` is the audit row it is
    about; ``None`` for what no stored row shows (a deleted chain, a hold no row names, a
    checkpoint's signature)."""

    reason: str
    row_id: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :meth:`AuditLog.verify`. ``first_bad_id`` and ``reason`` describe
    the first of ``problems``: problems with a row first (lowest id), then the others."""

    ok: bool
    rows_checked: int
    chains: int
    first_bad_id: int | None = None
    reason: str | None = None
    problems: tuple[VerifyProblem, ...] = ()
    """Every problem found, up to :data:`MAX_PROBLEMS` (one per chain at most from the
    chain walk: a chain is not read past its first bad row)."""
    checkpoint_heads: int = 0
    """How many chain heads of a checkpoint were checked (0 without a checkpoint)."""


#: At most this many problems are reported (a wiped log would otherwise list every hold).
MAX_PROBLEMS = 100
_SAMPLE = 20  # rows or holds listed per cross-check

CHECKPOINT_FORMAT = "paymaster-audit-checkpoint/1"
CHECKPOINT_MAC = "HMAC-SHA256"
#: The shortest checkpoint key accepted, in bytes.
MIN_KEY_BYTES = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(PaymasterError, ValueError):
    """A checkpoint that cannot be read, or a checkpoint key that cannot be used."""


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _mac(key: bytes, payload: dict[str, Any]) -> str:
    """HMAC-SHA256 (hex) of the payload's canonical JSON: sorted keys, no spaces, ASCII."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def load_key(path: str | Path) -> bytes:
    """The checkpoint key kept in a file: its bytes, surrounding whitespace removed (so a
    key written by ``head -c 32 /dev/urandom | base64 > FILE`` works as it is)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise CheckpointError(
            f"the key file {path} holds {len(key)} bytes; a checkpoint key needs at least "
            f"{MIN_KEY_BYTES} random bytes (head -c 32 /dev/urandom | base64 > {path})"
        )
    return key


@dataclass(frozen=True)
class ChainHead:
    """One chain's head as a checkpoint records it."""

    chain: str
    seq: int
    hash: str
    at: datetime | None = None
    """When the chain's newest row was written."""


@dataclass(frozen=True)
class Checkpoint:
    """Every chain's head at one moment, to keep outside the database, as Certificate
    Transparency logs publish signed tree heads: :meth:`AuditLog.verify` given it proves
    that no row up to these heads was removed or altered since, even by someone who can
    rewrite the database and recompute every hash. Signed (:meth:`signed`) with a key the
    database never sees, it cannot be replaced by a forged one either."""

    created_at: datetime
    heads: tuple[ChainHead, ...]
    signature: str | None = None
    """Hex HMAC-SHA256 of :meth:`payload`'s canonical JSON; ``None`` if unsigned."""

    def payload(self) -> dict[str, Any]:
        """The signed part: everything but the signature."""
        return {
            "format": CHECKPOINT_FORMAT,
            "created_at": _iso(self.created_at),
            "chains": [
                {
                    "chain": head.chain,
                    "seq": head.seq,
                    "hash": head.hash,
                    "at": None if head.at is None else _iso(head.at),
                }
                for head in self.heads
            ],
        }

    def signed(self, key: bytes) -> Checkpoint:
        return replace(self, signature=_mac(key, self.payload()))

    def signature_matches(self, key: bytes) -> bool:
        expected = _mac(key, self.payload())
        return self.signature is not None and hmac.compare_digest(self.signature, expected)

    def to_json(self) -> str:
        document = self.payload()
        if self.signature is not None:
            document["signature"] = {"alg": CHECKPOINT_MAC, "mac": self.signature}
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        """Read a checkpoint written by :meth:`to_json`; :class:`CheckpointError` names
        what is wrong with one that is not."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"a checkpoint is JSON; this is not: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a paymaster audit checkpoint ({CHECKPOINT_FORMAT})")
        unknown = set(document) - {"format", "created_at", "chains", "signature"}
        if unknown:
            raise CheckpointError(f"the checkpoint has unknown fields: {sorted(unknown)}")
        signature = document.get("signature")
        if signature is not None:
            if (
                not isinstance(signature, dict)
                or signature.get("alg") != CHECKPOINT_MAC
                or not _HEX64.fullmatch(str(signature.get("mac")))
            ):
                raise CheckpointError(
                    f'the checkpoint\'s signature is not {{"alg": "{CHECKPOINT_MAC}", '
                    '"mac": "<64 hex digits>"}'
                )
            signature = str(signature["mac"])
        chains = document.get("chains")
        if not isinstance(chains, list):
            raise CheckpointError('the checkpoint has no "chains" list')
        heads: list[ChainHead] = []
        for item in chains:
            if (
                not isinstance(item, dict)
                or set(item) != {"chain", "seq", "hash", "at"}
                or not isinstance(item["chain"], str)
                or type(item["seq"]) is not int
                or item["seq"] < 0
                or not _HEX64.fullmatch(str(item["hash"]))
            ):
                raise CheckpointError(f"a chain head in the checkpoint is malformed: {item!r}")
            at = None if item["at"] is None else _parse_time(item["at"], "a chain head's at")
            heads.append(ChainHead(item["chain"], item["seq"], item["hash"], at))
        if len({head.chain for head in heads}) != len(heads):
            raise CheckpointError("the checkpoint names a chain twice")
        created_at = _parse_time(document.get("created_at"), "created_at")
        return cls(created_at, tuple(heads), signature)


def _parse_time(value: Any, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise CheckpointError(f"the checkpoint's {what} is not an ISO time with its offset")
    return parsed


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
        """
        problems: list[VerifyProblem] = []
        if checkpoint is not None and key is not None:
            if checkpoint.signature is None:
                problems.append(
                    VerifyProblem("the checkpoint is not signed, but a key was given to check it")
                )
            elif not checkpoint.signature_matches(key):
                problems.append(
                    VerifyProblem(
                        "the checkpoint's signature does not match the key: the checkpoint "
                        "was altered, or signed with another key"
                    )
                )
        outside = (
            select(func.min(audit.c.id))
            .where(
                audit.c.chain == audit_chain.c.chain,
                or_(audit.c.seq > audit_chain.c.seq, audit.c.seq < 1),
            )
            .correlate(audit_chain)
            .scalar_subquery()
        )
        headless = (
            select(audit.c.chain, func.min(audit.c.id).label("first_id"))
            .select_from(audit.outerjoin(audit_chain, audit_chain.c.chain == audit.c.chain))
            .where(audit_chain.c.chain.is_(None))
            .group_by(audit.c.chain)
        )
        with read_only(self._engine) as conn:
            # One statement each: a row and its chain head commit together, so a call
            # landing meanwhile is seen whole or not at all.
            heads = {
                row.chain: (int(row.seq), str(row.head), row.outside)
                for row in conn.execute(select(audit_chain, outside.label("outside")))
            }
            orphans = {row.chain: int(row.first_id) for row in conn.execute(headless)}
        for chain, first_id in orphans.items():
            problems.append(VerifyProblem(f"chain {chain!r} has rows but no head row", first_id))
        checked = 0
        for chain in sorted(heads):
            head_seq, head_hash, outside_id = heads[chain]
            n, problem = self._verify_chain(chain, head_seq, head_hash, batch)
            checked += n
            if problem is not None:
                problems.append(problem)
            if outside_id is not None:
                problems.append(
                    VerifyProblem(
                        f"chain {chain!r}: a row lies outside seq 1..{head_seq}, the chain "
                        "head's range (was the head wound back?)",
                        int(outside_id),
                    )
                )
        if checkpoint is not None:
            live = {chain: seq for chain, (seq, _, _) in heads.items()}
            problems += self._verify_checkpoint(checkpoint, live, set(orphans))
        problems += self._verify_holds()
        problems.sort(key=lambda p: (p.row_id is None, p.row_id or 0))
        del problems[MAX_PROBLEMS:]
        heads_checked = 0 if checkpoint is None else len(checkpoint.heads)
        chains = len(heads.keys() | orphans.keys())
        if problems:
            first = problems[0]
            return VerifyResult(
                False, checked, chains, first.row_id, first.reason, tuple(problems), heads_checked
            )
        return VerifyResult(True, checked, chains, checkpoint_heads=heads_checked)

    def _verify_chain(
        self, chain: str, head_seq: int, head_hash: str, batch: int
    ) -> tuple[int, VerifyProblem | None]:
        expected_seq, prev, last_id, checked = 1, GENESIS, None, 0
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
                    return checked, VerifyProblem(
                        f"chain {chain!r}: row(s) missing before seq {record.seq}", record.id
                    )
                if record.prev_hash != prev:
                    return checked, VerifyProblem(
                        f"chain {chain!r}: prev_hash does not match the row before", record.id
                    )
                if row_hash(_hashed_fields(record)) != record.hash:
                    return checked, VerifyProblem(
                        f"chain {chain!r}: row content does not match its hash", record.id
                    )
                if record.agent != chain:
                    return checked, VerifyProblem(
                        f"chain {chain!r}: a row of agent type {record.agent!r}", record.id
                    )
                expected_seq, prev, last_id = record.seq + 1, record.hash, record.id
            if len(rows) < batch:
                break
        if expected_seq - 1 != head_seq:
            return checked, VerifyProblem(
                f"chain {chain!r}: rows after seq {expected_seq - 1} are missing (the chain "
                f"head is at seq {head_seq})",
                last_id,
            )
        if prev != head_hash:
            return checked, VerifyProblem(
                f"chain {chain!r}: the chain head does not match the row at seq {head_seq}",
                last_id,
            )
        return checked, None

    def _verify_holds(self) -> list[VerifyProblem]:
        """Rows naming no hold, and holds that left ``pending`` with no row naming them
        (each one statement, so a call committing meanwhile is seen whole or not at all)."""
        rows_without_hold = (
            select(audit.c.id, audit.c.hold_id)
            .select_from(audit.outerjoin(hold, hold.c.id == audit.c.hold_id))
            .where(audit.c.hold_id.is_not(None), hold.c.id.is_(None))
            .order_by(audit.c.id)
            .limit(_SAMPLE)
        )
        # A LEFT JOIN rather than NOT EXISTS: SQLite then builds an index on hold_id for
        # the query instead of scanning the audit table once per hold.
        holds_without_row = (
            select(hold.c.id, hold.c.state)
            .select_from(hold.outerjoin(audit, audit.c.hold_id == hold.c.id))
            .where(hold.c.state != "pending", audit.c.id.is_(None))
            .order_by(hold.c.created_at, hold.c.id)
            .limit(_SAMPLE)
        )
        with read_only(self._engine) as conn:
            orphan_rows = conn.execute(rows_without_hold).all()
            bare_holds = conn.execute(holds_without_row).all()
        problems = [
            VerifyProblem(
                f"audit row {row.id} names hold {row.hold_id!r}, which does not exist "
                "(a forged row, or its hold was deleted)",
                int(row.id),
            )
            for row in orphan_rows
        ]
        problems += [
            VerifyProblem(
                f"hold {held.id!r} is {held.state} but no audit row names it (its rows were "
                "deleted)"
            )
            for held in bare_holds
        ]
        return problems

    def _verify_checkpoint(
        self, checkpoint: Checkpoint, heads: dict[str, int], headless: set[str]
    ) -> list[VerifyProblem]:
        problems: list[VerifyProblem] = []
        when = _iso(checkpoint.created_at)
        with read_only(self._engine) as conn:
            for head in checkpoint.heads:
                where = f"chain {head.chain!r} (seq {head.seq} in the checkpoint of {when})"
                if head.chain not in heads and head.chain not in headless:
                    problems.append(
                        VerifyProblem(f"{where} is missing: its rows and its head were deleted")
                    )
                    continue
                seq = heads.get(head.chain)
                if seq is not None and seq < head.seq:
                    problems.append(
                        VerifyProblem(
                            f"{where}: its head is at seq {seq}, below the checkpoint's: rows "
                            "were removed and the head wound back"
                        )
                    )
                if head.seq == 0:
                    continue
                row = conn.execute(
                    select(audit.c.id, audit.c.hash).where(
                        audit.c.chain == head.chain, audit.c.seq == head.seq
                    )
                ).first()
                if row is None:
                    problems.append(VerifyProblem(f"{where}: the row at seq {head.seq} is gone"))
                elif row.hash != head.hash:
                    problems.append(
                        VerifyProblem(
                            f"{where}: the row at seq {head.seq} has another hash than the "
                            "checkpoint's: it, or a row before it, was rewritten",
                            int(row.id),
                        )
                    )
        return problems

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
