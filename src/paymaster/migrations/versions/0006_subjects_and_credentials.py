"""Money safety, part 2: one call in flight per subject, credentials on audit rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("paymaster_hold", sa.Column("subject", sa.String(255), nullable=True))
    in_flight = sa.text("subject IS NOT NULL AND state IN ('pending', 'unknown')")
    op.create_index(
        "uq_hold_subject_in_flight",
        "paymaster_hold",
        ["subject"],
        unique=True,
        sqlite_where=in_flight,
        postgresql_where=in_flight,
    )
    op.add_column("paymaster_audit", sa.Column("credential", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("paymaster_audit") as batch:
        batch.drop_column("credential")
    op.drop_index("uq_hold_subject_in_flight", table_name="paymaster_hold")
    with op.batch_alter_table("paymaster_hold") as batch:
        batch.drop_column("subject")
