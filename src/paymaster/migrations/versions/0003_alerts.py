"""Budget alerts: the thresholds each budget window has fired, and stale-hold alerts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from paymaster._schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "paymaster_alert",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("budget_id", Id, nullable=False),
        sa.Column("threshold_bp", sa.Integer, nullable=False),
        sa.Column("committed", sa.BigInteger, nullable=False),
        sa.Column("cap", sa.BigInteger, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("budget_id", "threshold_bp", name="uq_alert_budget_threshold"),
    )
    op.add_column("paymaster_hold", sa.Column("stale_alerted_at", UTCDateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("paymaster_hold") as batch:
        batch.drop_column("stale_alerted_at")
    op.drop_table("paymaster_alert")
