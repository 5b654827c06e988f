"""The tool call that made a governed call, on its hold and its audit rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("paymaster_hold", "paymaster_audit"):
        op.add_column(table, sa.Column("tool_call_id", sa.String(200), nullable=True))


def downgrade() -> None:
    for table in ("paymaster_hold", "paymaster_audit"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tool_call_id")
