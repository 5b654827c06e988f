"""Guard the audit chain heads on PostgreSQL; refuse TRUNCATE of the audit tables.

The audit table refuses UPDATE and DELETE (revision 0001), but the chain heads could be
deleted or wound back, and both tables truncated (TRUNCATE fires no row trigger). Now:

* a chain head is never deleted, and neither table is truncated;
* a new head starts empty (seq 0, the genesis hash);
* an UPDATE either takes the next seq (seq + 1, head unchanged: the previous row's hash,
  which the next row links to) or sets the head's hash at the same seq; seq never moves
  back, never jumps, and a head never changes chain;
* at COMMIT (a deferred constraint trigger) a chain head at seq N must be the hash of the
  chain's row at seq N: seq moves forward by one with each audit row, never without one.

The check of the new row is deferred because on PostgreSQL the row and its head's hash are
written by one statement (a data-modifying CTE), whose INSERT a trigger on the UPDATE
cannot see. The checks bind a role without the table's ownership; the owner (who can
disable triggers) is the limit of any in-database guard: ``paymaster audit checkpoint``
covers that case. SQLite has no roles, so there is nothing there for a trigger to guard.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_GUARD = """
CREATE FUNCTION paymaster_audit_chain_guard() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
    RAISE EXCEPTION 'paymaster_audit_chain heads are never removed (% refused)', TG_OP;
  END IF;
  IF TG_OP = 'INSERT' THEN
    IF NEW.seq <> 0 OR NEW.head <> repeat('0', 64) THEN
      RAISE EXCEPTION 'paymaster_audit_chain: chain % must start empty (seq 0)', NEW.chain;
    END IF;
    RETURN NEW;
  END IF;
  IF NEW.chain IS DISTINCT FROM OLD.chain THEN
    RAISE EXCEPTION 'paymaster_audit_chain: a head never changes chain (% to %)',
                    OLD.chain, NEW.chain;
  END IF;
  IF (NEW.seq = OLD.seq + 1 AND NEW.head = OLD.head) OR (NEW.seq = OLD.seq AND NEW.seq > 0) THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'paymaster_audit_chain: chain % moves one row at a time (seq % to %)',
                  OLD.chain, OLD.seq, NEW.seq;
END $$ LANGUAGE plpgsql
"""

_NAMES_A_ROW = """
CREATE FUNCTION paymaster_audit_chain_names_a_row() RETURNS trigger AS $$
DECLARE
  now_seq bigint;
  now_head varchar;
BEGIN
  SELECT seq, head INTO now_seq, now_head FROM paymaster_audit_chain WHERE chain = NEW.chain;
  IF now_seq > 0 AND NOT EXISTS (
    SELECT 1 FROM paymaster_audit WHERE chain = NEW.chain AND seq = now_seq AND hash = now_head
  ) THEN
    RAISE EXCEPTION 'paymaster_audit_chain: the head of chain % names no row at seq %',
                    NEW.chain, now_seq;
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_GUARD)
    op.execute(
        "CREATE TRIGGER paymaster_audit_chain_guard BEFORE INSERT OR UPDATE OR DELETE "
        "ON paymaster_audit_chain FOR EACH ROW EXECUTE FUNCTION paymaster_audit_chain_guard()"
    )
    op.execute(
        "CREATE TRIGGER paymaster_audit_chain_no_truncate BEFORE TRUNCATE "
        "ON paymaster_audit_chain FOR EACH STATEMENT "
        "EXECUTE FUNCTION paymaster_audit_chain_guard()"
    )
    op.execute(_NAMES_A_ROW)
    op.execute(
        "CREATE CONSTRAINT TRIGGER paymaster_audit_chain_names_a_row AFTER UPDATE "
        "ON paymaster_audit_chain DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        "EXECUTE FUNCTION paymaster_audit_chain_names_a_row()"
    )
    # The row trigger of revision 0001 does not fire on TRUNCATE; its function raises for
    # any operation, so a statement trigger can use it too.
    op.execute(
        "CREATE TRIGGER paymaster_audit_no_truncate BEFORE TRUNCATE ON paymaster_audit "
        "FOR EACH STATEMENT EXECUTE FUNCTION paymaster_audit_append_only()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS paymaster_audit_no_truncate ON paymaster_audit")
    for trigger in (
        "paymaster_audit_chain_names_a_row",
        "paymaster_audit_chain_no_truncate",
        "paymaster_audit_chain_guard",
    ):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON paymaster_audit_chain")
    op.execute("DROP FUNCTION IF EXISTS paymaster_audit_chain_names_a_row()")
    op.execute("DROP FUNCTION IF EXISTS paymaster_audit_chain_guard()")
