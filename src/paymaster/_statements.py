"""The ledger's hot-path SQL, built once with bind parameters.

Building a SQLAlchemy statement with literal values costs more client CPU than running
it; these are compiled once per dialect and reused with a parameter dict.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy import (
    BigInteger,
    Insert,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    case,
    exists,
    insert,
    literal_column,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ._schema import alert, audit, audit_chain, budget, hold, revocation, vault_key

__all__ = [
    "ACTIVE_REVOCATION",
    "ADJUST_BUDGET",
    "ADJUST_BUDGET_RETURNING",
    "AUDIT_INSERT",
    "AUDIT_WRITTEN",
    "BUDGET_STATE",
    "CHAIN_NEXT",
    "CHAIN_SET_HEAD",
    "DROP_HOLDER",
    "HOLD_BY_ID",
    "HOLD_BY_ID_LOCKED",
    "HOLD_BY_KEY",
    "HOLD_ON_SUBJECT",
    "INSERT_HOLD",
    "REARM_HOLD",
    "REFUSED_VAULT_KEY",
    "RESOLVE_HOLD",
    "RESUME_HOLD",
    "RUN_BUDGET_LOCKED",
    "SET_HOLD_RESOLUTION",
    "STALE_HOLDS",
    "UNACKNOWLEDGED_OVERRUNS",
    "alert_insert",
    "audit_insert_and_head",
    "take_budget",
]

#: A hold still counted (pending or unknown). Constants in the SQL, not an expanding IN
#: list of binds: the statement compiles to fixed SQL once (:mod:`paymaster._driver`),
#: and a prepared statement's generic plan can still use the partial indexes on holds in
#: flight (their predicate is this same constant list).
_IN_FLIGHT = hold.c.state.in_([literal_column("'pending'"), literal_column("'unknown'")])

# A revocation in force for this agent or run (or everything); ``p_run`` may be NULL.
_REVOKED_WHERE = and_(
    revocation.c.lifted_at.is_(None),
    or_(
        revocation.c.kind == "all",
        and_(revocation.c.kind == "agent", revocation.c.target == bindparam("p_agent")),
        and_(revocation.c.kind == "run", revocation.c.target == bindparam("p_run")),
    ),
)

# The vault key the call was presented with, revoked or expired as of ``p_now``
# (``p_vault_key`` NULL: none was). A proxy trusts a key it has authenticated before
# without reading it again, and a request may reach its reserve long after its key was
# checked (a slow body, a queue for a worker): so the key is checked here, by the reserve
# itself, as the kill switch is.
_VAULT_KEY_REFUSED_WHERE = and_(
    vault_key.c.id == bindparam("p_vault_key"),
    or_(vault_key.c.revoked_at.is_not(None), vault_key.c.expires_at <= bindparam("p_now")),
)

REFUSED_VAULT_KEY = select(
    vault_key.c.id,
    vault_key.c.revoked_at,
    vault_key.c.revoked_by,
    vault_key.c.revoke_reason,
    vault_key.c.expires_at,
).where(_VAULT_KEY_REFUSED_WHERE)

ACTIVE_REVOCATION: Select[tuple[str, str, str]] = (
    select(revocation.c.kind, revocation.c.target, revocation.c.reason)
    .where(_REVOKED_WHERE)
    .order_by(revocation.c.id)
    .limit(1)
)

HOLD_BY_KEY = select(hold).where(hold.c.idempotency_key == bindparam("p_key")).with_for_update()
HOLD_BY_ID = select(hold).where(hold.c.id == bindparam("p_id"))
#: Waits for a transaction still committing the hold (a retry after a lost COMMIT reply).
HOLD_BY_ID_LOCKED = HOLD_BY_ID.with_for_update()
#: The audit row a write made (found by its token): immutable proof that the write's
#: transaction committed, for a retry after a lost COMMIT reply.
AUDIT_WRITTEN = (
    select(audit.c.id)
    .where(audit.c.at == bindparam("p_at"), audit.c.write_token == bindparam("p_token"))
    .limit(1)
)
#: The call in flight on a subject (at most one, by the partial unique index).
HOLD_ON_SUBJECT = (
    select(hold.c.id, hold.c.method, hold.c.endpoint, hold.c.state)
    .where(hold.c.subject == bindparam("p_subject"), _IN_FLIGHT)
    .limit(1)
)
INSERT_HOLD: Insert = insert(hold)

REARM_HOLD: Update = (
    update(hold)
    .where(hold.c.id == bindparam("p_id"), hold.c.state == "released")
    .values(
        {
            **{
                column: bindparam(f"p_{column.name}")
                for column in hold.c
                if column.name
                not in ("id", "idempotency_key", "stale_alerted_at", "attempts", "holders")
            },
            # A hold reserved again may go stale, and alert, again.
            hold.c.stale_alerted_at: None,
            # An attempt an operator's release left running still holds it: the new
            # attempt joins it rather than resetting the count it may release against.
            hold.c.attempts: hold.c.attempts + 1,
            hold.c.holders: hold.c.holders + 1,
        }
    )
)

_ACTUAL = bindparam("p_actual", type_=BigInteger)

_DONE = bindparam("p_done", type_=Integer)
#: One attempt fewer holds the hold (``p_done`` is 1 for an attempt, 0 for an operator).
_HOLDERS_LEFT = case((hold.c.holders > _DONE, hold.c.holders - _DONE), else_=0)

#: An attempt (or an operator) resolves a hold from ``p_from``. A hold still held by more
#: than ``p_max_holders`` attempts is left alone (a release passes 1: a hold another
#: attempt still holds is never released by one of them). ``overrun`` is what a settle
#: spent above the estimate.
RESOLVE_HOLD: Update = (
    update(hold)
    .where(
        hold.c.id == bindparam("p_id"),
        hold.c.state == bindparam("p_from"),
        hold.c.holders <= bindparam("p_max_holders"),
    )
    .values(
        holders=_HOLDERS_LEFT,
        state=bindparam("p_state"),
        actual=_ACTUAL,
        resolved_at=bindparam("p_at"),
        resolved_by=bindparam("p_by"),
        resolution=bindparam("p_reason"),
        # (An unknown hold that carried an overrun already is reconciled by the ledger.)
        overrun=case((hold.c.estimate < _ACTUAL, _ACTUAL - hold.c.estimate), else_=None),
    )
    .returning(*hold.c)
)

#: A hold's resolution as a late attempt or an operator finds it must change, the row
#: being locked already (``SELECT ... FOR UPDATE``).
SET_HOLD_RESOLUTION: Update = (
    update(hold)
    .where(hold.c.id == bindparam("p_id"))
    .values(
        state=bindparam("p_state"),
        actual=bindparam("p_actual"),
        resolved_at=bindparam("p_at"),
        resolved_by=bindparam("p_by"),
        resolution=bindparam("p_reason"),
        overrun=bindparam("p_overrun"),
        overrun_acknowledged_at=bindparam("p_ack_at"),
        overrun_acknowledged_by=bindparam("p_ack_by"),
        overrun_acknowledgement=bindparam("p_ack_reason"),
    )
    .returning(*hold.c)
)

#: Another attempt presents the hold's key while it is still counted: one more holder.
#: An ``unknown`` hold stays unknown (the earlier attempt may have paid).
RESUME_HOLD: Update = (
    update(hold)
    .where(hold.c.id == bindparam("p_id"), _IN_FLIGHT)
    .values(attempts=hold.c.attempts + 1, holders=hold.c.holders + 1)
    .returning(*hold.c)
)

#: An attempt ends without changing the hold's state (another attempt or an operator
#: decided it, or others still hold it): it no longer holds it.
DROP_HOLDER: Update = (
    update(hold)
    .where(hold.c.id == bindparam("p_id"))
    .values(holders=_HOLDERS_LEFT)
    .returning(*hold.c)
)

#: An overrun awaiting acknowledgement of the agent type of the budget being taken: it
#: freezes every daily budget of that type, including days that begin after it.
_AGENT_OVERRUN_WHERE = and_(
    hold.c.agent == budget.c.agent,
    hold.c.vendor == budget.c.vendor,
    hold.c.currency == budget.c.currency,
    hold.c.overrun.is_not(None),
    hold.c.overrun_acknowledged_at.is_(None),
)

#: The overruns that keep a budget frozen (for the refusal's message): its own holds'
#: and, for a daily budget, its agent type's.
UNACKNOWLEDGED_OVERRUNS = (
    select(hold.c.id, hold.c.overrun, hold.c.currency)
    .where(
        or_(
            hold.c.daily_budget_id == bindparam("p_bid"),
            hold.c.run_budget_id == bindparam("p_bid"),
            and_(
                hold.c.agent == bindparam("p_agent"),
                hold.c.vendor == bindparam("p_vendor"),
                hold.c.currency == bindparam("p_currency"),
            ),
        ),
        hold.c.overrun.is_not(None),
        hold.c.overrun_acknowledged_at.is_(None),
    )
    .order_by(hold.c.resolved_at)
    .limit(3)
)

ADJUST_BUDGET: Update = (
    update(budget)
    .where(budget.c.id == bindparam("p_bid"))
    .values(
        committed=budget.c.committed + bindparam("p_delta", type_=BigInteger),
        frozen=budget.c.frozen + bindparam("p_freeze", type_=Integer),
    )
)

#: :data:`ADJUST_BUDGET` telling what the budget now stands at (for threshold alerts).
ADJUST_BUDGET_RETURNING: Update = ADJUST_BUDGET.returning(
    budget.c.id, budget.c.kind, budget.c.run, budget.c.window, budget.c.cap, budget.c.committed
)

BUDGET_STATE = select(budget.c.cap, budget.c.committed, budget.c.calls, budget.c.frozen).where(
    budget.c.id == bindparam("p_bid")
)

#: A run budget's stored limits, locked: a run policy may narrow them, never widen them.
RUN_BUDGET_LOCKED = (
    select(budget.c.cap, budget.c.calls_cap)
    .where(budget.c.id == bindparam("p_bid"))
    .with_for_update()
)


@cache
def take_budget(*, capped: bool, call_capped: bool, check_revoked: bool) -> Update:
    """``committed = committed + x, calls = calls + 1`` only where the budget has room.

    With ``check_revoked`` the same statement also refuses when a revocation is in force,
    or the call's vault key is revoked or expired (as of the statement's start), saving a
    round trip.
    """
    x = bindparam("p_x", type_=BigInteger)
    stmt = (
        update(budget)
        .where(budget.c.id == bindparam("p_bid"))
        .values(
            committed=budget.c.committed + x,
            calls=budget.c.calls + 1,
            cap=bindparam("p_cap", type_=BigInteger),
            calls_cap=bindparam("p_calls_cap", type_=BigInteger),
        )
        .where(budget.c.frozen == 0)
        .returning(budget.c.committed)
    )
    if capped:  # written so that it cannot overflow BIGINT at the largest caps
        stmt = stmt.where(budget.c.committed <= bindparam("p_cap", type_=BigInteger) - x)
    if call_capped:
        stmt = stmt.where(budget.c.calls < bindparam("p_calls_cap", type_=BigInteger))
    if check_revoked:  # the agent type's daily budget
        stmt = stmt.where(
            not_(exists().where(_REVOKED_WHERE)),
            not_(exists().where(_VAULT_KEY_REFUSED_WHERE)),
            not_(exists().where(_AGENT_OVERRUN_WHERE)),
        )
    return stmt


# -- alerts ---------------------------------------------------------------------------

#: Flag the unresolved holds created at or before ``p_cutoff`` that have not alerted yet;
#: a concurrent checker's UPDATE re-checks ``stale_alerted_at`` under the row lock, so
#: each hold is returned to exactly one of them.
STALE_HOLDS: Update = (
    update(hold)
    .where(
        _IN_FLIGHT,
        hold.c.created_at <= bindparam("p_cutoff"),
        hold.c.stale_alerted_at.is_(None),
    )
    .values(stale_alerted_at=bindparam("p_at"))
    .returning(*hold.c)
)


@cache
def alert_insert(postgres: bool) -> Insert:
    """Record that a budget crossed a threshold, unless some transaction already did: a
    returned row means this transaction fired it."""
    dialect_insert = pg_insert if postgres else sqlite_insert
    return (
        dialect_insert(alert)
        .on_conflict_do_nothing(index_elements=["budget_id", "threshold_bp"])
        .returning(alert.c.id)
    )


# -- the audit chain -------------------------------------------------------------------

#: Take the chain head's row lock and the next sequence number; ``head`` is unchanged by
#: this statement, so RETURNING gives the previous row's hash.
CHAIN_NEXT: Update = (
    update(audit_chain)
    .where(audit_chain.c.chain == bindparam("p_chain"))
    .values(seq=audit_chain.c.seq + 1)
    .returning(audit_chain.c.seq, audit_chain.c.head)
)

CHAIN_SET_HEAD: Update = (
    update(audit_chain)
    .where(audit_chain.c.chain == bindparam("p_chain"))
    .values(head=bindparam("p_head"))
)

AUDIT_INSERT: Insert = insert(audit)


@cache
def audit_insert_and_head() -> Update:
    """PostgreSQL: insert the audit row and move the chain head in one statement."""
    row = (
        insert(audit)
        .values({c: bindparam(f"a_{c.name}") for c in audit.c if c.name != "id"})
        .cte("new_audit_row")
    )
    return CHAIN_SET_HEAD.add_cte(row)
