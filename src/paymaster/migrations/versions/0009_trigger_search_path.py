"""Pin the search path of the ledger's trigger functions (PostgreSQL).

The check of revision 0008 that a chain head names a row read ``paymaster_audit`` and
``paymaster_audit_chain`` by bare name, so it resolved them through the caller's search
path, where PostgreSQL looks in the session's temporary schema first. Any role may create
a temporary table (PUBLIC has TEMP by default), so the least-privilege role could shadow
``paymaster_audit`` with a table of its own and wind a chain head past the rows that
exist. ``verify()`` still caught the result, but the database's guard did not hold.

Each trigger function now runs with ``search_path`` set to the schema the ledger lives
in, then ``pg_temp`` explicitly last, as PostgreSQL's documentation prescribes for
functions that must not be redirected ("Writing SECURITY DEFINER Functions Safely"). The
schema is the one current when the migration runs (where ``alembic`` made the tables);
moving the tables to another schema afterwards makes the checks fail, which refuses the
write rather than skipping the check.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_FUNCTIONS = (
    "paymaster_audit_append_only",
    "paymaster_audit_chain_guard",
    "paymaster_audit_chain_names_a_row",
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    schema = bind.execute(text("SELECT current_schema()")).scalar_one()
    quoted = bind.dialect.identifier_preparer.quote_identifier(schema)
    for function in _FUNCTIONS:
        op.execute(f"ALTER FUNCTION {quoted}.{function}() SET search_path = {quoted}, pg_temp")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for function in _FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function}() RESET search_path")
