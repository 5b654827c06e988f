"""Proxy scoping: replays kept per vault key, a run for every key, failed authentications.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from paymaster._schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("paymaster_proxy_replay", sa.Column("credential", sa.String(64), nullable=True))
    op.add_column("paymaster_proxy_replay", sa.Column("run", sa.String(200), nullable=True))
    # Responses kept before this revision do not say which key made their call, so none
    # could be served: forget them now rather than keep customer data a day longer.
    op.execute("DELETE FROM paymaster_proxy_replay")
    # A key made without a run has its own id as its run (as the README always said).
    op.execute("UPDATE paymaster_vault_key SET run = 'pmk_' || id WHERE run IS NULL")
    op.create_table(
        "paymaster_auth_failure",
        sa.Column("credential", sa.String(32), primary_key=True),
        sa.Column("reason", sa.String(16), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("first_at", UTCDateTime, nullable=False),
        sa.Column("last_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("paymaster_auth_failure")
    with op.batch_alter_table("paymaster_proxy_replay") as batch:
        batch.drop_column("run")
        batch.drop_column("credential")
