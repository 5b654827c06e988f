"""The initial ledger and audit schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from paymaster._schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "paymaster_budget",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("vendor", sa.String(100), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("run", sa.String(200), nullable=False),
        sa.Column("window", sa.String(10), nullable=False),
        sa.Column("cap", sa.BigInteger, nullable=True),
        sa.Column("calls_cap", sa.BigInteger, nullable=True),
        sa.Column("committed", sa.BigInteger, nullable=False),
        sa.Column("calls", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint(
            "kind", "agent", "vendor", "currency", "run", "window", name="uq_budget"
        ),
    )
    op.create_table(
        "paymaster_hold",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True, unique=True),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("run", sa.String(200), nullable=True),
        sa.Column("vendor", sa.String(100), nullable=False),
        sa.Column("endpoint", sa.String(500), nullable=False),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("customer", sa.String(200), nullable=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("estimate", sa.BigInteger, nullable=False),
        sa.Column("actual", sa.BigInteger, nullable=True),
        sa.Column("daily_budget_id", Id, nullable=False),
        sa.Column("run_budget_id", Id, nullable=True),
        sa.Column("policy_id", sa.String(200), nullable=False),
        sa.Column("policy_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("resolved_at", UTCDateTime, nullable=True),
        sa.Column("resolved_by", sa.String(200), nullable=True),
        sa.Column("resolution", sa.Text, nullable=True),
    )
    op.create_index("ix_hold_state_created", "paymaster_hold", ["state", "created_at"])
    op.create_index("ix_hold_daily_budget", "paymaster_hold", ["daily_budget_id", "state"])
    op.create_index("ix_hold_run", "paymaster_hold", ["run"])
    op.create_table(
        "paymaster_revocation",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("revoked_by", sa.String(200), nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=False),
        sa.Column("lifted_at", UTCDateTime, nullable=True),
        sa.Column("lifted_by", sa.String(200), nullable=True),
        sa.Column("lift_reason", sa.Text, nullable=True),
    )
    op.create_index("ix_revocation_active", "paymaster_revocation", ["lifted_at", "kind", "target"])
    op.create_table(
        "paymaster_audit",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("run", sa.String(200), nullable=True),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("vendor", sa.String(100), nullable=False),
        sa.Column("endpoint", sa.String(500), nullable=False),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("customer", sa.String(200), nullable=True),
        sa.Column("outcome", sa.String(12), nullable=False),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("vendor_request_id", sa.String(200), nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("estimate", sa.BigInteger, nullable=False),
        sa.Column("actual", sa.BigInteger, nullable=False),
        sa.Column("policy_id", sa.String(200), nullable=True),
        sa.Column("policy_hash", sa.String(64), nullable=True),
        sa.Column("violation_code", sa.String(40), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=True),
        sa.Column("chain", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("chain", "seq", name="uq_audit_chain_seq"),
    )
    op.create_index("ix_audit_run", "paymaster_audit", ["run"])
    op.create_index("ix_audit_agent_at", "paymaster_audit", ["agent", "at"])
    op.create_index("ix_audit_vendor_at", "paymaster_audit", ["vendor", "at"])
    op.create_index("ix_audit_at", "paymaster_audit", ["at"])
    op.create_table(
        "paymaster_audit_chain",
        sa.Column("chain", sa.String(200), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("head", sa.String(64), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # The audit log is append-only: refuse UPDATE and DELETE at the database.
        op.execute(
            """
            CREATE FUNCTION paymaster_audit_append_only() RETURNS trigger AS $$
            BEGIN
              RAISE EXCEPTION 'paymaster_audit is append-only (% refused)', TG_OP;
            END $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER paymaster_audit_append_only BEFORE UPDATE OR DELETE "
            "ON paymaster_audit FOR EACH ROW EXECUTE FUNCTION paymaster_audit_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS paymaster_audit_append_only ON paymaster_audit")
        op.execute("DROP FUNCTION IF EXISTS paymaster_audit_append_only()")
    for table in (
        "paymaster_audit_chain",
        "paymaster_audit",
        "paymaster_revocation",
        "paymaster_hold",
        "paymaster_budget",
    ):
        op.drop_table(table)
