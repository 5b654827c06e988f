"""Verifying the audit log: every chain walked from genesis to its head, cross-checked
against the holds, and against a checkpoint kept outside the database; or, from a
checkpoint, only what was written since (its cost follows the rows written since, not the
size of the log)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, exists, func, or_, select

from .._db import read_only
from .._schema import AUDIT_RECORD_COLUMNS, audit, audit_chain, hold
from .chain import GENESIS, _hashed_fields, row_hash
from .checkpoint import Checkpoint, _iso
from .records import AuditRecord


@dataclass(frozen=True)
class VerifyProblem:
    """One thing :meth:`AuditLog.verify` found wrong. ``row_id`` is the audit row it is
    about; ``None`` for what no stored row shows (a deleted chain, a hold no row names, a
    checkpoint's signature)."""

    reason: str
    row_id: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :meth:`AuditLog.verify`. ``first_bad_id`` and ``reason`` describe
    the first of ``problems``: problems with a row first (lowest id), then the others."""

    ok: bool
    rows_checked: int
    chains: int
    first_bad_id: int | None = None
    reason: str | None = None
    problems: tuple[VerifyProblem, ...] = ()
    """Every problem found, up to :data:`MAX_PROBLEMS` (one per chain at most from the
    chain walk: a chain is not read past its first bad row)."""
    checkpoint_heads: int = 0
    """How many chain heads of a checkpoint were checked (0 without a checkpoint)."""
    since_checkpoint: bool = False
    """Whether only the rows written since the checkpoint were walked (``rows_checked``
    counts those), the rows up to it taken as the checkpoint vouches for them."""


#: At most this many problems are reported (a wiped log would otherwise list every hold).
MAX_PROBLEMS = 100
_SAMPLE = 20  # rows or holds listed per cross-check

#: Per chain: its head's seq, its head's hash, and the lowest id of a row outside 1..seq.
_Heads = dict[str, tuple[int, str, Any]]
#: Per chain: where its walk starts, after the row at this seq, whose hash is this one.
_Starts = dict[str, tuple[int, str]]
#: Rows walked that name a hold: (row id, hold id).
_Named = list[tuple[int, str]]
_GENESIS_START = (0, GENESIS)
#: Hold ids looked up per statement (well under any backend's bound-parameter limit).
_LOOKUP_BATCH = 500


def verify(
    engine: Engine,
    *,
    batch: int = 1000,
    checkpoint: Checkpoint | None = None,
    key: bytes | None = None,
    since_checkpoint: bool = False,
) -> VerifyResult:
    """What :meth:`paymaster.AuditLog.verify` finds (it documents the checks)."""
    if since_checkpoint and checkpoint is None:
        raise ValueError("since_checkpoint=True verifies from a checkpoint: pass checkpoint=")
    problems = _signature_problems(checkpoint, key)
    heads, orphans = _read_heads(engine)
    for chain, first_id in orphans.items():
        problems.append(VerifyProblem(f"chain {chain!r} has rows but no head row", first_id))
    starts: _Starts = {}
    if since_checkpoint and checkpoint is not None:
        starts = {head.chain: (head.seq, head.hash) for head in checkpoint.heads}
    checked, chain_problems, named = _walk_chains(engine, heads, batch, starts)
    problems += chain_problems
    if checkpoint is not None:
        live = {chain: seq for chain, (seq, _, _) in heads.items()}
        problems += _verify_checkpoint(engine, checkpoint, live, set(orphans))
    problems += _verify_named_holds(engine, named) if since_checkpoint else _verify_holds(engine)
    problems.sort(key=lambda p: (p.row_id is None, p.row_id or 0))
    del problems[MAX_PROBLEMS:]
    heads_checked = 0 if checkpoint is None else len(checkpoint.heads)
    chains = len(heads.keys() | orphans.keys())
    if problems:
        first = problems[0]
        return VerifyResult(
            False,
            checked,
            chains,
            first.row_id,
            first.reason,
            tuple(problems),
            heads_checked,
            since_checkpoint,
        )
    return VerifyResult(
        True, checked, chains, checkpoint_heads=heads_checked, since_checkpoint=since_checkpoint
    )


def _signature_problems(checkpoint: Checkpoint | None, key: bytes | None) -> list[VerifyProblem]:
    """The checkpoint's signature checked against ``key``, when both are given."""
    problems: list[VerifyProblem] = []
    if checkpoint is not None and key is not None:
        if checkpoint.signature is None:
            problems.append(
                VerifyProblem("the checkpoint is not signed, but a key was given to check it")
            )
        elif not checkpoint.signature_matches(key):
            problems.append(
                VerifyProblem(
                    "the checkpoint's signature does not match the key: the checkpoint "
                    "was altered, or signed with another key"
                )
            )
    return problems


def _read_heads(engine: Engine) -> tuple[_Heads, dict[str, int]]:
    """Every chain head (with the first row outside its range), and every chain that has
    rows but no head (with its first row's id)."""
    # Whether a chain has a row outside 1..seq, as two probes of uq_audit_chain_seq. Not
    # min(id) here: for min(id) PostgreSQL walks the primary key until a row matches,
    # which on a sound log (none does) reads every row, once per chain.
    above = exists().where(audit.c.chain == audit_chain.c.chain, audit.c.seq > audit_chain.c.seq)
    below = exists().where(audit.c.chain == audit_chain.c.chain, audit.c.seq < 1)
    outside = or_(above, below)
    # The chains that have rows, one index probe each (the next chain name above the last
    # one found, on uq_audit_chain_seq) rather than a pass over every row: a few dozen
    # chains, however many rows.
    found = select(func.min(audit.c.chain).label("chain")).cte("chains", recursive=True)
    following = select(func.min(audit.c.chain)).where(audit.c.chain > found.c.chain)
    found = found.union_all(select(following.scalar_subquery()).where(found.c.chain.is_not(None)))
    first_id = (
        select(func.min(audit.c.id))
        .where(audit.c.chain == found.c.chain)
        .correlate(found)
        .scalar_subquery()
    )
    headless = (
        select(found.c.chain, first_id.label("first_id"))
        .select_from(found.outerjoin(audit_chain, audit_chain.c.chain == found.c.chain))
        .where(found.c.chain.is_not(None), audit_chain.c.chain.is_(None))
    )
    with read_only(engine) as conn:
        # One statement each: a row and its chain head commit together, so a call
        # landing meanwhile is seen whole or not at all.
        heads = {
            row.chain: (int(row.seq), str(row.head), row.outside)
            for row in conn.execute(select(audit_chain, outside.label("outside")))
        }
        orphans = {row.chain: int(row.first_id) for row in conn.execute(headless)}
        for chain, (seq, head, flagged) in heads.items():
            first_outside = None
            if flagged:  # calls landing meanwhile add rows above seq with newer ids
                first_outside = conn.execute(
                    # id + 0: not the primary key's order (see above), the chain's rows
                    select(func.min(audit.c.id + 0)).where(
                        audit.c.chain == chain, or_(audit.c.seq > seq, audit.c.seq < 1)
                    )
                ).scalar_one()
            heads[chain] = (seq, head, first_outside)
    return heads, orphans


def _walk_chains(
    engine: Engine, heads: _Heads, batch: int, starts: _Starts
) -> tuple[int, list[VerifyProblem], _Named]:
    """Walk every chain up to its head, from genesis or from its start in ``starts``: rows
    checked, the problems found, and the rows walked that name a hold."""
    problems: list[VerifyProblem] = []
    named: _Named = []
    checked = 0
    for chain in sorted(heads):
        head_seq, head_hash, outside_id = heads[chain]
        start = starts.get(chain, _GENESIS_START)
        if start[0] <= head_seq:  # a head below its checkpoint's is the checkpoint's finding
            n, problem = _verify_chain(engine, chain, head_seq, head_hash, batch, start, named)
            checked += n
            if problem is not None:
                problems.append(problem)
        if outside_id is not None:
            problems.append(
                VerifyProblem(
                    f"chain {chain!r}: a row lies outside seq 1..{head_seq}, the chain "
                    "head's range (was the head wound back?)",
                    int(outside_id),
                )
            )
    return checked, problems, named


def _verify_chain(
    engine: Engine,
    chain: str,
    head_seq: int,
    head_hash: str,
    batch: int,
    start: tuple[int, str],
    named: _Named,
) -> tuple[int, VerifyProblem | None]:
    """Walk ``chain`` from the row after ``start`` (seq and hash: genesis, or a
    checkpoint's head) to its head."""
    expected_seq, prev, last_id, checked = start[0] + 1, start[1], None, 0
    while True:
        query = (
            select(*AUDIT_RECORD_COLUMNS)
            .where(
                audit.c.chain == chain,
                audit.c.seq >= expected_seq,
                audit.c.seq <= head_seq,
            )
            .order_by(audit.c.seq)
            .limit(batch)
        )
        with read_only(engine) as conn:
            rows = [AuditRecord(**r._mapping) for r in conn.execute(query)]
        for record in rows:
            checked += 1
            if record.seq != expected_seq:
                return checked, VerifyProblem(
                    f"chain {chain!r}: row(s) missing before seq {record.seq}", record.id
                )
            if record.prev_hash != prev:
                return checked, VerifyProblem(
                    f"chain {chain!r}: prev_hash does not match the row before", record.id
                )
            if row_hash(_hashed_fields(record)) != record.hash:
                return checked, VerifyProblem(
                    f"chain {chain!r}: row content does not match its hash", record.id
                )
            if record.agent != chain:
                return checked, VerifyProblem(
                    f"chain {chain!r}: a row of agent type {record.agent!r}", record.id
                )
            expected_seq, prev, last_id = record.seq + 1, record.hash, record.id
            if record.hold_id is not None:
                named.append((record.id, record.hold_id))
        if len(rows) < batch:
            break
    if expected_seq - 1 != head_seq:
        return checked, VerifyProblem(
            f"chain {chain!r}: rows after seq {expected_seq - 1} are missing (the chain "
            f"head is at seq {head_seq})",
            last_id,
        )
    if prev != head_hash:
        return checked, VerifyProblem(
            f"chain {chain!r}: the chain head does not match the row at seq {head_seq}",
            last_id,
        )
    return checked, None


def _verify_holds(engine: Engine) -> list[VerifyProblem]:
    """Rows naming no hold, and holds that left ``pending`` with no row naming them
    (each one statement, so a call committing meanwhile is seen whole or not at all)."""
    rows_without_hold = (
        select(audit.c.id, audit.c.hold_id)
        .select_from(audit.outerjoin(hold, hold.c.id == audit.c.hold_id))
        .where(audit.c.hold_id.is_not(None), hold.c.id.is_(None))
        .order_by(audit.c.id)
        .limit(_SAMPLE)
    )
    # A LEFT JOIN rather than NOT EXISTS: SQLite then builds an index on hold_id for
    # the query instead of scanning the audit table once per hold.
    holds_without_row = (
        select(hold.c.id, hold.c.state)
        .select_from(hold.outerjoin(audit, audit.c.hold_id == hold.c.id))
        .where(hold.c.state != "pending", audit.c.id.is_(None))
        .order_by(hold.c.created_at, hold.c.id)
        .limit(_SAMPLE)
    )
    with read_only(engine) as conn:
        orphan_rows = conn.execute(rows_without_hold).all()
        bare_holds = conn.execute(holds_without_row).all()
    problems = [
        VerifyProblem(
            f"audit row {row.id} names hold {row.hold_id!r}, which does not exist "
            "(a forged row, or its hold was deleted)",
            int(row.id),
        )
        for row in orphan_rows
    ]
    problems += [
        VerifyProblem(
            f"hold {held.id!r} is {held.state} but no audit row names it (its rows were deleted)"
        )
        for held in bare_holds
    ]
    return problems


def _verify_named_holds(engine: Engine, named: _Named) -> list[VerifyProblem]:
    """The rows walked that name a hold which does not exist: what :func:`_verify_holds`
    checks of every row, for the rows written since a checkpoint (by primary key)."""
    missing: list[tuple[int, str]] = []
    with read_only(engine) as conn:
        for i in range(0, len(named), _LOOKUP_BATCH):
            part = named[i : i + _LOOKUP_BATCH]
            wanted = sorted({hold_id for _, hold_id in part})
            exist = set(conn.execute(select(hold.c.id).where(hold.c.id.in_(wanted))).scalars())
            missing += [(row_id, hold_id) for row_id, hold_id in part if hold_id not in exist]
    return [
        VerifyProblem(
            f"audit row {row_id} names hold {hold_id!r}, which does not exist "
            "(a forged row, or its hold was deleted)",
            row_id,
        )
        for row_id, hold_id in sorted(missing)[:_SAMPLE]
    ]


def _verify_checkpoint(
    engine: Engine, checkpoint: Checkpoint, heads: dict[str, int], headless: set[str]
) -> list[VerifyProblem]:
    problems: list[VerifyProblem] = []
    when = _iso(checkpoint.created_at)
    with read_only(engine) as conn:
        for head in checkpoint.heads:
            where = f"chain {head.chain!r} (seq {head.seq} in the checkpoint of {when})"
            if head.chain not in heads and head.chain not in headless:
                problems.append(
                    VerifyProblem(f"{where} is missing: its rows and its head were deleted")
                )
                continue
            seq = heads.get(head.chain)
            if seq is not None and seq < head.seq:
                problems.append(
                    VerifyProblem(
                        f"{where}: its head is at seq {seq}, below the checkpoint's: rows "
                        "were removed and the head wound back"
                    )
                )
            if head.seq == 0:
                continue
            row = conn.execute(
                select(audit.c.id, audit.c.hash).where(
                    audit.c.chain == head.chain, audit.c.seq == head.seq
                )
            ).first()
            if row is None:
                problems.append(VerifyProblem(f"{where}: the row at seq {head.seq} is gone"))
            elif row.hash != head.hash:
                problems.append(
                    VerifyProblem(
                        f"{where}: the row at seq {head.seq} has another hash than the "
                        "checkpoint's: it, or a row before it, was rewritten",
                        int(row.id),
                    )
                )
    return problems
