"""The audit log's tamper-evident write path: scrubbing secrets from a row, hashing it
into its agent type's chain, and appending it under the chain head's lock."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .. import _driver
from .. import _statements as S
from .._schema import audit, audit_chain
from .._storable import TEXT_LIMIT, storable
from .._storable import row as storable_row
from .records import AuditEntry, AuditRecord

MAX_ERROR_CHARS = TEXT_LIMIT
GENESIS = "0" * 64

_SECRETS = [
    (re.compile(r"\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]{6,}"), "[redacted key]"),
    (re.compile(r"\bpmk_[A-Za-z0-9_\-]{6,}"), "[redacted key]"),
    (re.compile(r"(?i)bearer\s+[A-Za-z0-9._\-]{8,}"), "Bearer [redacted]"),
    (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[redacted number]"),
]


def scrub(text: str | None) -> str | None:
    """Remove API keys, bearer tokens and card-like numbers; make the rest storable (a long
    text is cut to :data:`MAX_ERROR_CHARS`, keeping the redacted text's digest)."""
    if text is None:
        return None
    text = str(text)  # an exception or a code given where a message was expected
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return storable(text, MAX_ERROR_CHARS)


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


def append(
    conn: Connection,
    entry: AuditEntry,
    at: datetime,
    token: str | None = None,
    *,
    last: bool = False,
) -> None:
    """Append one row in the caller's transaction. ``token`` (unhashed) lets a retry after
    a lost COMMIT reply find this very row (:data:`paymaster._statements.AUDIT_WRITTEN`).
    ``last``: nothing follows in the transaction, so on PostgreSQL the COMMIT goes with the
    row (:func:`paymaster._driver.run`) and the chain head is locked one round trip less.

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
    head = _driver.run(conn, S.CHAIN_NEXT, {"p_chain": chain}).first()
    if head is None:  # the chain's first row
        dialect_insert = pg_insert if postgres else sqlite_insert
        conn.execute(
            dialect_insert(audit_chain)
            .values(chain=chain, seq=0, head=GENESIS)
            .on_conflict_do_nothing(index_elements=["chain"])
        )
        head = _driver.run(conn, S.CHAIN_NEXT, {"p_chain": chain}).one()
    values.update(seq=int(head.seq), prev_hash=str(head.head))
    values["hash"] = row_hash(values)
    values["write_token"] = token
    if postgres:
        params = {f"a_{name}": value for name, value in values.items()}
        params.update(p_chain=chain, p_head=values["hash"])
        _driver.run(conn, S.audit_insert_and_head(), params, last=last)
    else:
        _driver.run(conn, S.AUDIT_INSERT, values)
        _driver.run(conn, S.CHAIN_SET_HEAD, {"p_chain": chain, "p_head": values["hash"]})
