"""The ledger's tables (SQLAlchemy Core). Alembic migrations in ``paymaster.migrations``
create them; this module is the single description the code and the migrations share.

There are deliberately no foreign keys from ``hold`` to ``budget``: on PostgreSQL each
insert would take a KEY SHARE lock on the hot budget row and turn it into a multixact
under load. The ledger writes both in one transaction instead.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AUDIT_RECORD_COLUMNS",
    "alert",
    "audit",
    "audit_chain",
    "budget",
    "hold",
    "metadata",
    "proxy_replay",
    "revocation",
    "vault_key",
]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("paymaster stores aware UTC datetimes only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


Id = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()

budget = Table(
    "paymaster_budget",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),  # "daily" | "run"
    Column("agent", String(200), nullable=False),
    Column("vendor", String(100), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("run", String(200), nullable=False, default=""),
    Column("window", String(10), nullable=False, default=""),  # "YYYY-MM-DD" for daily
    Column("cap", BigInteger, nullable=True),
    Column("calls_cap", BigInteger, nullable=True),
    # pending estimates + settled actuals (+ holds of unknown outcome), minor units
    Column("committed", BigInteger, nullable=False, default=0),
    Column("calls", BigInteger, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    # Unacknowledged overruns of holds counting against this budget: while above zero,
    # every reserve on it is refused (see Ledger.acknowledge_overrun).
    Column("frozen", Integer, nullable=False, default=0, server_default="0"),
    UniqueConstraint("kind", "agent", "vendor", "currency", "run", "window", name="uq_budget"),
    # One day's budgets, for status (revision 0010): the unique key starts with kind alone.
    Index("ix_budget_kind_window", "kind", "window"),
)

hold = Table(
    "paymaster_hold",
    metadata,
    Column("id", String(32), primary_key=True),
    # The ledger's key: the caller's idempotency key scoped to agent type and run
    # (paymaster._ledger.hold_key); ``vendor_key`` is the key as the caller gave it.
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("agent", String(200), nullable=False),
    Column("run", String(200), nullable=True),
    Column("vendor", String(100), nullable=False),
    Column("endpoint", String(500), nullable=False),
    Column("method", String(10), nullable=False),
    Column("customer", String(200), nullable=True),
    Column("currency", String(3), nullable=False),
    Column("estimate", BigInteger, nullable=False),
    Column("actual", BigInteger, nullable=True),
    Column("daily_budget_id", Id, nullable=False),
    Column("run_budget_id", Id, nullable=True),
    Column("policy_id", String(200), nullable=False),
    Column("policy_hash", String(64), nullable=False),
    Column("state", String(10), nullable=False),  # pending | settled | released | unknown
    Column("created_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime, nullable=True),
    Column("resolved_by", String(200), nullable=True),
    Column("resolution", Text, nullable=True),
    # The agent framework's id of the tool call that made this call (revision 0002).
    Column("tool_call_id", String(200), nullable=True),
    # When a stale-hold alert was sent for this hold (revision 0003): each hold alerts once.
    Column("stale_alerted_at", UTCDateTime, nullable=True),
    Column("vendor_key", String(255), nullable=True),
    # Attempts that hold this hold (its first, plus each retry that resumed it by its
    # key): a hold held by more than one is never released by one of them.
    Column("attempts", Integer, nullable=False, default=1, server_default="1"),
    # Of those, the attempts that have not ended yet: a release frees the hold only when
    # the last of them ends with "nothing moved" (none settled it or marked it unknown).
    Column("holders", Integer, nullable=False, default=1, server_default="1"),
    # Settled above its estimate: by how much, and who acknowledged it (unfreezing).
    Column("overrun", BigInteger, nullable=True),
    Column("overrun_acknowledged_at", UTCDateTime, nullable=True),
    Column("overrun_acknowledged_by", String(200), nullable=True),
    Column("overrun_acknowledgement", Text, nullable=True),
    # The object the call changes (revision 0006): one call in flight per subject.
    Column("subject", String(255), nullable=True),
    Index("ix_hold_state_created", "state", "created_at"),
    Index("ix_hold_daily_budget", "daily_budget_id", "state"),
    Index("ix_hold_run", "run"),
)

#: One call in flight per subject: a second pending or unknown hold on it cannot exist.
_IN_FLIGHT = and_(hold.c.subject.is_not(None), hold.c.state.in_(["pending", "unknown"]))
Index(
    "uq_hold_subject_in_flight",
    hold.c.subject,
    unique=True,
    sqlite_where=_IN_FLIGHT,
    postgresql_where=_IN_FLIGHT,
)

#: A run budget's holds, which status sums (revision 0010); a hold without a run budget
#: has no entry, so its call pays nothing for the index.
_WITH_RUN_BUDGET = hold.c.run_budget_id.is_not(None)
Index(
    "ix_hold_run_budget",
    hold.c.run_budget_id,
    sqlite_where=_WITH_RUN_BUDGET,
    postgresql_where=_WITH_RUN_BUDGET,
)

#: The holds whose overrun still awaits acknowledgement, by agent type: while one exists,
#: the agent type's daily budgets are frozen, whichever day's row a reserve takes.
_UNACKNOWLEDGED = and_(hold.c.overrun.is_not(None), hold.c.overrun_acknowledged_at.is_(None))
Index(
    "ix_hold_unacknowledged_overrun",
    hold.c.agent,
    hold.c.vendor,
    hold.c.currency,
    sqlite_where=_UNACKNOWLEDGED,
    postgresql_where=_UNACKNOWLEDGED,
)

#: One row per budget threshold alert fired (revision 0003). The unique key is what makes
#: a threshold fire once per budget window (a budget row is one window) across processes:
#: the transaction whose insert lands is the one whose process emits the alert.
alert = Table(
    "paymaster_alert",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("budget_id", Id, nullable=False),
    Column("threshold_bp", Integer, nullable=False),  # basis points of the cap: 10000 = 100%
    Column("committed", BigInteger, nullable=False),  # when it fired, minor units
    Column("cap", BigInteger, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    UniqueConstraint("budget_id", "threshold_bp", name="uq_alert_budget_threshold"),
)

revocation = Table(
    "paymaster_revocation",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),  # all | agent | run
    Column("target", String(200), nullable=False, default=""),
    Column("reason", Text, nullable=False),
    Column("revoked_by", String(200), nullable=False),
    Column("revoked_at", UTCDateTime, nullable=False),
    Column("lifted_at", UTCDateTime, nullable=True),
    Column("lifted_by", String(200), nullable=True),
    Column("lift_reason", Text, nullable=True),
    Index("ix_revocation_active", "lifted_at", "kind", "target"),
)

audit = Table(
    "paymaster_audit",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("run", String(200), nullable=True),
    Column("agent", String(200), nullable=False),
    Column("vendor", String(100), nullable=False),
    Column("endpoint", String(500), nullable=False),
    Column("method", String(10), nullable=False),
    Column("customer", String(200), nullable=True),
    Column("outcome", String(12), nullable=False),
    Column("http_status", Integer, nullable=True),
    Column("vendor_request_id", String(200), nullable=True),
    Column("currency", String(3), nullable=True),
    Column("estimate", BigInteger, nullable=False, default=0),
    Column("actual", BigInteger, nullable=False, default=0),
    Column("policy_id", String(200), nullable=True),
    Column("policy_hash", String(64), nullable=True),
    Column("violation_code", String(40), nullable=True),
    Column("error", Text, nullable=True),
    Column("hold_id", String(32), nullable=True),
    Column("duration_ms", Integer, nullable=True),
    Column("tool_call_id", String(200), nullable=True),  # revision 0002
    # What the call was presented with, a proxy's vault key id (revision 0006).
    Column("credential", String(64), nullable=True),
    # Tamper evidence: one hash chain per agent type (see paymaster._audit).
    Column("chain", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # Not hashed, not part of the record: a random token of the write that made the row
    # (revision 0005), so a retry after a lost COMMIT reply recognises its own row, never
    # another attempt's written at the same instant.
    Column("write_token", String(32), nullable=True),
    UniqueConstraint("chain", "seq", name="uq_audit_chain_seq"),
    Index("ix_audit_run", "run"),
    Index("ix_audit_agent_at", "agent", "at"),
    Index("ix_audit_vendor_at", "vendor", "at"),
    Index("ix_audit_at", "at"),
)

audit_chain = Table(
    "paymaster_audit_chain",
    metadata,
    Column("chain", String(200), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("head", String(64), nullable=False),
)

#: A vault key's public name, ``pmk_<id>``: how a call presented with one names it in its
#: ``credential`` (and how its audit rows name it).
VAULT_KEY_PREFIX = "pmk_"


def vault_key_id(credential: str | None) -> str | None:
    """The id of the vault key a call's ``credential`` names, or ``None`` (no vault key)."""
    if credential is None or not credential.startswith(VAULT_KEY_PREFIX):
        return None
    return credential[len(VAULT_KEY_PREFIX) :]


#: Vault keys (revision 0004): what a proxy client presents instead of the real vendor
#: key. Only a digest of the secret part is stored; the key id is public.
vault_key = Table(
    "paymaster_vault_key",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("agent", String(200), nullable=False),
    Column("run", String(200), nullable=True),
    Column("run_policy", Text, nullable=True),  # the RunPolicy as JSON
    Column("label", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revoked_by", String(200), nullable=True),
    Column("revoke_reason", Text, nullable=True),
)

#: Responses the proxy replays to a retry with the same idempotency key (revision 0004),
#: kept 24 hours as Stripe keeps its keys. ``key`` is the ledger's idempotency key (the
#: client's key scoped to the exact request).
proxy_replay = Table(
    "paymaster_proxy_replay",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("agent", String(200), nullable=False),
    Column("hold_id", String(32), nullable=True),
    Column("status", Integer, nullable=False),
    Column("headers", Text, nullable=False),  # JSON object of the replayed headers
    Column("body", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # The vault key that made the call and its run (revision 0007): a response is
    # replayed only to that key. Rows kept before have none, and replay to nobody.
    Column("credential", String(64), nullable=True),
    Column("run", String(200), nullable=True),
    Index("ix_proxy_replay_created", "created_at"),
)

#: The columns of a stored audit record (:class:`paymaster.AuditRecord`).
AUDIT_RECORD_COLUMNS = tuple(column for column in audit.c if column.name != "write_token")

#: Failed authentications at the proxy (revision 0007), counted rather than logged one row
#: each, so that an unauthenticated flood cannot grow the ledger: one row per (vault key
#: id, reason), where ``credential`` is a known key's id or ``"unknown"``.
auth_failure = Table(
    "paymaster_auth_failure",
    metadata,
    Column("credential", String(32), primary_key=True),
    Column("reason", String(16), primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("first_at", UTCDateTime, nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
)
