"""Money safety: shared holds, overruns that freeze a budget, run-scoped keys.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from paymaster._schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "paymaster_budget",
        sa.Column("frozen", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("paymaster_hold", sa.Column("vendor_key", sa.String(255), nullable=True))
    op.add_column(
        "paymaster_hold",
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    )
    op.add_column(
        "paymaster_hold",
        sa.Column("holders", sa.Integer, nullable=False, server_default="1"),
    )
    op.add_column("paymaster_hold", sa.Column("overrun", sa.BigInteger, nullable=True))
    op.add_column(
        "paymaster_hold",
        sa.Column("overrun_acknowledged_at", UTCDateTime, nullable=True),
    )
    op.add_column(
        "paymaster_hold", sa.Column("overrun_acknowledged_by", sa.String(200), nullable=True)
    )
    op.add_column("paymaster_hold", sa.Column("overrun_acknowledgement", sa.Text, nullable=True))
    op.add_column("paymaster_audit", sa.Column("write_token", sa.String(32), nullable=True))
    unacknowledged = sa.text("overrun IS NOT NULL AND overrun_acknowledged_at IS NULL")
    op.create_index(
        "ix_hold_unacknowledged_overrun",
        "paymaster_hold",
        ["agent", "vendor", "currency"],
        sqlite_where=unacknowledged,
        postgresql_where=unacknowledged,
    )
    # Keys written before this revision were not scoped: they stay the vendor's key too.
    op.execute("UPDATE paymaster_hold SET vendor_key = idempotency_key")


def downgrade() -> None:
    op.drop_index("ix_hold_unacknowledged_overrun", table_name="paymaster_hold")
    with op.batch_alter_table("paymaster_audit") as batch:
        batch.drop_column("write_token")
    with op.batch_alter_table("paymaster_hold") as batch:
        for column in (
            "overrun_acknowledgement",
            "overrun_acknowledged_by",
            "overrun_acknowledged_at",
            "overrun",
            "holders",
            "attempts",
            "vendor_key",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("paymaster_budget") as batch:
        batch.drop_column("frozen")
