"""The governing proxy: vault keys, and the responses it replays to retries.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from paymaster._schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "paymaster_vault_key",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("run", sa.String(200), nullable=True),
        sa.Column("run_policy", sa.Text, nullable=True),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
        sa.Column("revoked_by", sa.String(200), nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
    )
    op.create_table(
        "paymaster_proxy_replay",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_proxy_replay_created", "paymaster_proxy_replay", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_proxy_replay_created", table_name="paymaster_proxy_replay")
    op.drop_table("paymaster_proxy_replay")
    op.drop_table("paymaster_vault_key")
