"""Text the ledger stores: one rule for every text field, the same on every backend.

Caller-supplied text (a run, an endpoint, a customer, an idempotency key, an error
message, an operator's reason...) may hold what a database refuses, and what one backend
accepts the other may not: PostgreSQL refuses a NUL character and enforces each
``VARCHAR(n)``, SQLite enforces neither, and neither driver can encode a lone UTF-16
surrogate (``json.loads('"\\ud800"')`` makes one from a model's tool arguments). Stored
as given, such text would fail the write of the attempt's audit row or hold.

So text is made storable once, where it enters the ledger, and the ledger then stores,
compares and hashes that form only (an idempotency key's same-call check compares what
was stored):

* a surrogate pair is joined into its character; a NUL or a lone surrogate is escaped
  visibly (``\\x00``, ``\\ud800``);
* text longer than its column is cut to the column's size, ending in a visible marker
  that keeps the digest of the whole original, ``…[cut, sha256:<hex>]``: the full 64-hex
  digest in a column of 158 characters or more (so distinct keys stay distinct), fewer
  digits in a narrower one (the marker takes at most half the column), and in a column
  under 46 characters ``<start>…<hex>``, half of it digest.

The rule is idempotent: storable text is stored as it is. Column sizes come from
:mod:`paymaster._schema`; a ``TEXT`` column is bounded at :data:`TEXT_LIMIT` characters.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any, overload

from sqlalchemy import Column, String, Table

from ._schema import audit, audit_chain, budget, hold, proxy_replay, revocation, vault_key

__all__ = ["FIELDS", "TEXT_LIMIT", "field", "limit", "limit_of", "row", "storable"]

#: The bound of a ``TEXT`` column (an error message, a reason): what the audit row's
#: error has always been cut to.
TEXT_LIMIT = 2000

#: What no backend stores: NUL (PostgreSQL) and UTF-16 surrogates (no UTF-8 encoding).
_REJECTED = re.compile("[\x00\ud800-\udfff]")
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_CUT = "…[cut, sha256:{}]"
_FULL_DIGEST = 64
_MIN_DIGEST = 8


def _joined(pair: re.Match[str]) -> str:
    high, low = (ord(ch) for ch in pair.group())
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


def _escaped(ch: re.Match[str]) -> str:
    code = ord(ch.group())
    return "\\x00" if code == 0 else f"\\u{code:04x}"


def _cut(clean: str, original: str, limit: int) -> str:
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()
    digits = min(_FULL_DIGEST, limit // 2 - len(_CUT.format("")))
    if digits >= _MIN_DIGEST:
        marker = _CUT.format(digest[:digits])
        return clean[: limit - len(marker)] + marker
    digits = limit // 2
    return clean[: limit - 1 - digits] + "…" + digest[:digits]


def storable(text: str, limit: int) -> str:
    """``text`` as a column of ``limit`` characters stores it, on every backend."""
    clean = text
    if _REJECTED.search(text):
        clean = _REJECTED.sub(_escaped, _PAIR.sub(_joined, text))
    return clean if len(clean) <= limit else _cut(clean, text, limit)


def limit_of(*columns: Column[Any]) -> int:
    """The most characters every one of ``columns`` stores (:data:`TEXT_LIMIT` for TEXT)."""
    return min(getattr(column.type, "length", None) or TEXT_LIMIT for column in columns)


#: Where each text that callers and operators give the ledger is stored: it is made to
#: fit the narrowest of its columns, so that every copy of it is the same text.
FIELDS: dict[str, tuple[Column[Any], ...]] = {
    "agent": (
        budget.c.agent,
        hold.c.agent,
        audit.c.agent,
        audit.c.chain,
        audit_chain.c.chain,
        revocation.c.target,
        vault_key.c.agent,
    ),
    "vendor": (budget.c.vendor, hold.c.vendor, audit.c.vendor),
    "policy_id": (hold.c.policy_id, audit.c.policy_id),
    "run": (
        budget.c.run,
        hold.c.run,
        audit.c.run,
        revocation.c.target,
        proxy_replay.c.run,
        vault_key.c.run,
    ),
    "endpoint": (hold.c.endpoint, audit.c.endpoint),
    "method": (hold.c.method, audit.c.method),
    "customer": (hold.c.customer, audit.c.customer),
    "idempotency_key": (hold.c.vendor_key,),
    "tool_call_id": (hold.c.tool_call_id, audit.c.tool_call_id),
    "credential": (audit.c.credential, proxy_replay.c.credential),
    "subject": (hold.c.subject,),
    "vendor_request_id": (audit.c.vendor_request_id,),
    "by": (
        hold.c.resolved_by,
        hold.c.overrun_acknowledged_by,
        revocation.c.revoked_by,
        revocation.c.lifted_by,
        vault_key.c.created_by,
        vault_key.c.revoked_by,
    ),
    "label": (vault_key.c.label,),
    "reason": (
        hold.c.resolution,
        hold.c.overrun_acknowledgement,
        revocation.c.reason,
        revocation.c.lift_reason,
        vault_key.c.revoke_reason,
    ),
}
_LIMITS = {name: limit_of(*columns) for name, columns in FIELDS.items()}


def limit(name: str) -> int:
    """How many characters the text of :data:`FIELDS` ``name`` keeps in every column."""
    return _LIMITS[name]


@overload
def field(name: str, value: str) -> str: ...
@overload
def field(name: str, value: None) -> None: ...
@overload
def field(name: str, value: str | None) -> str | None: ...
def field(name: str, value: str | None) -> str | None:
    """The storable form of the text ``value`` of :data:`FIELDS` ``name`` (a value that is
    not text, given by mistake, is stored as its ``str``, so its attempt keeps its row)."""
    return value if value is None else storable(str(value), _LIMITS[name])


@functools.cache
def _text_limits(table: Table) -> dict[str, int]:
    return {c.name: limit_of(c) for c in table.c if isinstance(c.type, String)}


def row(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` of a row of ``table`` with each text made storable in its column.

    A value given for a text column that is not text (a vendor's numeric request id, say)
    is stored as its ``str``: the row is written, and hashed, as it will be read back."""
    limits = _text_limits(table)
    return {
        name: value if value is None or name not in limits else storable(str(value), limits[name])
        for name, value in values.items()
    }
