"""The tamper suite: every way of altering the audit log that ``verify`` must report.

A log holding rows from every writer (guard, aguard, the ``governed`` decorator, a
denial, ``record_refusal``, ``free_call``, an operator's resolution, an overrun and its
acknowledgement, rows with ``tool_call_id`` and ``credential``) is built once per test;
each mutation is made, verified, and undone from a snapshot of the three tables.

On PostgreSQL the mutations bypass the append-only triggers with
``SET LOCAL session_replication_role = replica`` (the test URL's role ``root`` is a
superuser): only the owner or a superuser can get past them, which is who these tests
play. The triggers themselves are tested at the end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from typer.testing import CliRunner

from conftest import Clock, refund_policy
from paymaster import Governor, Money, PolicyViolation, ViolationCode
from paymaster._audit import (
    AuditRecord,
    Checkpoint,
    CheckpointError,
    VerifyResult,
    load_key,
)
from paymaster._audit.chain import _HASHED, GENESIS, _hashed_fields, row_hash
from paymaster._schema import AUDIT_RECORD_COLUMNS, audit, audit_chain, hold
from paymaster.cli.app import app

MakeGov = Callable[..., Governor]
#: Every test here alters the log on purpose; each asserts what verify finds itself.
pytestmark = pytest.mark.tampers_with_audit
REFUND = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}
KEY = b"k" * 32
#: What a stored row is: every hashed field, the two hashed when set, and its own hash.
#: (``id`` orders nothing and ``write_token`` is not part of the record.)
FIELDS = [*_HASHED, "tool_call_id", "credential", "hash"]


def _usd(amount: str) -> Money:
    return Money.parse(f"{amount} USD")


def _every_writer(gov: Governor, clock: Clock) -> None:
    """Rows from every writer, in three chains: refund-agent, lookup-agent, stray-agent."""

    def tick() -> None:
        clock.advance(seconds=1)

    with gov.guard(
        **REFUND,
        estimate=_usd("10.00"),
        run="run-a",
        customer="cus_1",
        tool_call_id="toolu_1",
        credential="pmk_key1",
    ) as call:
        call.settle(http_status=200, vendor_request_id="req_1")
    tick()
    with gov.guard(**REFUND, estimate=_usd("2.00"), run="run-a") as call:
        call.fail(http_status=402, error="card_declined")  # released
    tick()
    with pytest.raises(TimeoutError), gov.guard(**REFUND, estimate=_usd("3.00")) as call:
        raise TimeoutError("read timed out")  # unknown
    unknown = call.hold_id
    tick()
    gov.resolve_hold(unknown, release=True, reason="Stripe shows none", by="ops")  # reconciled
    tick()

    async def in_async() -> None:
        async with gov.aguard(**REFUND, estimate=_usd("4.00"), run="run-b") as acall:
            await acall.settle(_usd("3.50"), http_status=200)

    asyncio.run(in_async())
    tick()

    @gov.governed(**REFUND, estimate=lambda amount: _usd(amount))
    def refund(amount: str) -> str:
        return "ok"

    assert refund("5.00") == "ok"
    tick()
    with pytest.raises(PolicyViolation), gov.guard(**{**REFUND, "endpoint": "/v1/charges"}):
        pass  # denied
    tick()
    with gov.guard(**REFUND, estimate=_usd("1.00"), idempotency_key="k1") as call:
        call.settle(_usd("3.00"))  # an overrun: freezes the budget
    tick()
    gov.acknowledge_overrun(call.hold_id, reason="vendor fee", by="ops")
    tick()
    record = gov.free_call(
        agent="refund-agent", vendor="stripe", endpoint="/v1/balance", credential="pmk_key2"
    )
    record(duration_ms=3, http_status=200)
    tick()
    with gov.guard(
        agent="lookup-agent",
        vendor="stripe",
        endpoint="/v1/charges",
        method="GET",
        free=True,
        tool_call_id="toolu_2",
    ) as call:
        call.settle(http_status=200)
    tick()
    for n in range(2):  # a chain of refusals only: no hold names its rows
        violation = PolicyViolation(ViolationCode.NO_POLICY, "no policy for stray-agent")
        gov.record_refusal(
            violation,
            agent="stray-agent",
            vendor="stripe",
            endpoint=f"/v1/thing/{n}",
            method="POST",
            credential="pmk_key3",
        )
        tick()
    with gov.guard(**REFUND, estimate=_usd("1.00"), run="run-c") as call:
        call.settle(http_status=200)  # the newest refund-agent row


Snapshot = dict[str, list[dict[str, Any]]]


@dataclass
class Log:
    gov: Governor
    snapshot: Snapshot
    checkpoint: Checkpoint

    def rows(self, chain: str | None = None) -> list[AuditRecord]:
        rows = self.gov.audit.query(agent=chain)
        return sorted(rows, key=lambda r: (r.chain, r.seq))

    @contextmanager
    def tamper(self) -> Iterator[Connection]:
        """A transaction past the append-only triggers (PostgreSQL: as the superuser)."""
        with self.gov.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
            yield conn

    def restore(self) -> None:
        with self.tamper() as conn:
            for table in (audit, audit_chain, hold):
                conn.execute(delete(table))
                if self.snapshot[table.name]:
                    conn.execute(insert(table), self.snapshot[table.name])

    def verify(self, **kwargs: Any) -> VerifyResult:
        return self.gov.audit.verify(**kwargs)


def _snapshot(gov: Governor) -> Snapshot:
    with gov.engine.connect() as conn:
        return {
            table.name: [dict(row._mapping) for row in conn.execute(select(table))]
            for table in (audit, audit_chain, hold)
        }


@pytest.fixture
def log(make_governor: MakeGov, clock: Clock) -> Log:
    lookup = refund_policy(id="lookups", agent="lookup-agent", endpoints=["/v1/charges"])
    gov = make_governor(refund_policy(), lookup)
    _every_writer(gov, clock)
    result = gov.audit.verify()
    assert result.ok, result.problems
    assert {r.outcome for r in gov.audit.query()} == {
        "allowed",
        "failed",
        "unknown",
        "reconciled",
        "denied",
        "overrun",
        "acknowledged",
    }
    return Log(gov, _snapshot(gov), gov.audit.checkpoint(key=KEY))


def _caught(result: VerifyResult, *, row: int | None = None, says: str = "") -> bool:
    reasons = " | ".join(p.reason for p in result.problems)
    return (
        not result.ok
        and (row is None or row in {p.row_id for p in result.problems})
        and says in reasons
    )


def _changed(value: Any) -> Any:
    """Another value of the same type and stored length."""
    if value is None:
        return "x"
    if isinstance(value, datetime):
        return value + timedelta(microseconds=1)
    if isinstance(value, int):
        return value + 1000
    return value[:-1] + ("a" if value[-1] != "a" else "b")


def _rechain(conn: Connection, chain: str) -> None:
    """Recompute every hash of a chain and its head: what a forger with the database does."""
    rows = conn.execute(
        select(*AUDIT_RECORD_COLUMNS).where(audit.c.chain == chain).order_by(audit.c.seq)
    ).all()
    prev = GENESIS
    for row in rows:
        values = {**_hashed_fields(AuditRecord(**row._mapping)), "prev_hash": prev}
        prev = row_hash(values)
        conn.execute(
            update(audit)
            .where(audit.c.id == row.id)
            .values(prev_hash=values["prev_hash"], hash=prev)
        )
    conn.execute(update(audit_chain).where(audit_chain.c.chain == chain).values(head=prev))


# -- edited fields ----------------------------------------------------------------------
def test_every_edited_field_is_caught(log: Log) -> None:
    missed = []
    for name in FIELDS:
        rows = log.rows()
        target = next((r for r in rows if getattr(r, name) is not None), rows[0])
        with log.tamper() as conn:
            conn.execute(
                update(audit)
                .where(audit.c.id == target.id)
                .values({name: _changed(getattr(target, name))})
            )
        if not _caught(log.verify(), row=target.id):
            missed.append(name)
        log.restore()
    assert not missed, f"edits of {missed} passed verify"
    assert log.verify().ok


# -- removed, moved and forged rows -----------------------------------------------------
def test_a_row_deleted_in_the_middle(log: Log) -> None:
    rows = log.rows("refund-agent")
    with log.tamper() as conn:
        conn.execute(delete(audit).where(audit.c.id == rows[3].id))
    result = log.verify()
    assert _caught(result, row=rows[4].id, says="missing before seq")
    assert result.first_bad_id == rows[4].id


def _truncate(log: Log, chain: str, keep: int) -> list[AuditRecord]:
    """Delete a chain's rows after the first ``keep`` and wind its head back to the last
    one kept: no hash is recomputed, and the chain itself still verifies."""
    rows = log.rows(chain)
    last = rows[keep - 1]
    with log.tamper() as conn:
        conn.execute(delete(audit).where(audit.c.chain == chain, audit.c.seq > keep))
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == chain)
            .values(seq=last.seq, head=last.hash)
        )
    return rows[keep:]


def test_tail_truncation_with_the_head_wound_back(log: Log) -> None:
    gone = _truncate(log, "refund-agent", keep=4)
    result = log.verify()
    # The removed rows named holds that are settled or released: nothing else names them.
    assert _caught(result, says="no audit row names it")
    assert any(g.hold_id and g.hold_id in (result.reason or "") for g in gone)
    result = log.verify(checkpoint=log.checkpoint, key=KEY)
    assert _caught(result, says="below the checkpoint's")
    assert _caught(result, says=f"the row at seq {gone[-1].seq} is gone")


def test_tail_truncation_of_rows_without_holds_needs_the_checkpoint(log: Log) -> None:
    _truncate(log, "stray-agent", keep=1)  # the refusals name no hold
    result = log.verify(checkpoint=log.checkpoint, key=KEY)
    assert _caught(result, says="chain 'stray-agent' (seq 2 in the checkpoint of")
    assert _caught(result, says="its head is at seq 1, below the checkpoint's")


def test_rows_above_the_head_are_flagged(log: Log) -> None:
    rows = log.rows("refund-agent")
    with log.tamper() as conn:  # the head wound back, the rows left
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == "refund-agent")
            .values(seq=rows[4].seq, head=rows[4].hash)
        )
    assert _caught(log.verify(), row=rows[5].id, says="outside seq 1..5")


@pytest.mark.parametrize("holds_too", [False, True])
def test_a_deleted_chain_and_its_head(log: Log, holds_too: bool) -> None:
    with log.tamper() as conn:
        conn.execute(delete(audit).where(audit.c.chain == "refund-agent"))
        conn.execute(delete(audit_chain).where(audit_chain.c.chain == "refund-agent"))
        if holds_too:
            conn.execute(delete(hold).where(hold.c.agent == "refund-agent"))
    if not holds_too:
        assert _caught(log.verify(), says="but no audit row names it")
    result = log.verify(checkpoint=log.checkpoint, key=KEY)
    assert _caught(result, says="chain 'refund-agent' (seq 11 in the checkpoint of")
    assert "its rows and its head were deleted" in (result.reason or "")


def test_a_deleted_chain_of_refusals_needs_the_checkpoint(log: Log) -> None:
    with log.tamper() as conn:
        conn.execute(delete(audit).where(audit.c.chain == "stray-agent"))
        conn.execute(delete(audit_chain).where(audit_chain.c.chain == "stray-agent"))
    result = log.verify(checkpoint=log.checkpoint)
    assert _caught(result, says="chain 'stray-agent' (seq 2 in the checkpoint")


def test_rows_swapped_between_chains(log: Log) -> None:
    a, b = log.rows("refund-agent")[0], log.rows("lookup-agent")[0]  # both at seq 1
    with log.tamper() as conn:
        for row, chain in ((a, "swap"), (b, a.chain), (a, b.chain)):
            conn.execute(update(audit).where(audit.c.id == row.id).values(chain=chain))
    result = log.verify()
    assert _caught(result, row=a.id) and _caught(result, row=b.id)


def test_a_reordered_sequence(log: Log) -> None:
    rows = log.rows("refund-agent")
    first, second = rows[2], rows[3]
    with log.tamper() as conn:
        for row, seq in ((first, -1), (second, first.seq), (first, second.seq)):
            conn.execute(update(audit).where(audit.c.id == row.id).values(seq=seq))
    assert _caught(log.verify(), says="refund-agent")


def test_a_forged_row_with_a_correct_hash_but_no_hold(log: Log) -> None:
    last = log.rows("refund-agent")[-1]
    forged = {
        **_hashed_fields(last),
        "seq": last.seq + 1,
        "prev_hash": last.hash,
        "at": last.at + timedelta(seconds=1),
        "hold_id": "f" * 32,
        "actual": 0,
    }
    forged["hash"] = row_hash(forged)
    # Not past the triggers: a forged append is what the application role may do too.
    with log.gov.engine.begin() as conn:
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == last.chain)
            .values(seq=audit_chain.c.seq + 1)
        )
        conn.execute(insert(audit).values(forged))
        conn.execute(
            update(audit_chain).where(audit_chain.c.chain == last.chain).values(head=forged["hash"])
        )
    [row] = log.gov.audit.query(agent="refund-agent", newest_first=True, limit=1)
    result = log.verify()
    assert _caught(result, row=row.id, says=f"names hold {'f' * 32!r}, which does not exist")
    assert result.rows_checked == len(log.snapshot["paymaster_audit"]) + 1


# -- checkpoints ------------------------------------------------------------------------
def test_history_rewritten_with_every_hash_recomputed_is_caught_by_the_checkpoint(
    log: Log,
) -> None:
    settled = log.rows("refund-agent")[0]
    with log.tamper() as conn:
        conn.execute(update(audit).where(audit.c.id == settled.id).values(actual=1))
        _rechain(conn, "refund-agent")
    result = log.verify(checkpoint=log.checkpoint, key=KEY)
    newest = log.rows("refund-agent")[-1]
    assert _caught(result, row=newest.id, says="has another hash than the checkpoint's")


def test_checkpoint_round_trip_and_signature(log: Log) -> None:
    saved = log.checkpoint
    assert [(h.chain, h.seq) for h in saved.heads] == [
        ("lookup-agent", 1),
        ("refund-agent", 11),
        ("stray-agent", 2),
    ]
    assert all(h.at is not None for h in saved.heads)
    again = Checkpoint.from_json(saved.to_json())
    assert again == saved and again.signature_matches(KEY)
    assert not again.signature_matches(b"another key, 32 bytes long......")
    ok = log.verify(checkpoint=again, key=KEY)
    assert ok.ok and ok.checkpoint_heads == 3

    document = json.loads(saved.to_json())
    document["chains"][1]["seq"] = 12  # an altered checkpoint: caught by its signature
    altered = Checkpoint.from_json(json.dumps(document))
    assert _caught(log.verify(checkpoint=altered, key=KEY), says="signature does not match")
    wrong_key = log.verify(checkpoint=saved, key=b"another key, 32 bytes long......")
    assert _caught(wrong_key, says="signature does not match")
    unsigned = log.gov.audit.checkpoint()
    assert unsigned.signature is None and log.verify(checkpoint=unsigned).ok
    assert _caught(log.verify(checkpoint=unsigned, key=KEY), says="not signed")

    for broken, says in (
        ("[]", "not a paymaster audit checkpoint"),
        ("{", "is JSON"),
        (json.dumps({**document, "extra": 1}), "unknown fields"),
        (json.dumps({**document, "chains": [{"chain": "x", "seq": -1}]}), "malformed"),
        (json.dumps({**document, "created_at": "yesterday"}), "created_at"),
    ):
        with pytest.raises(CheckpointError, match=says):
            Checkpoint.from_json(broken)


def test_load_key(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    assert load_key(path) == KEY
    path.write_bytes(b"short\n")
    with pytest.raises(CheckpointError, match="at least 16"):
        load_key(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_key(tmp_path / "missing")


def test_cli_checkpoint_then_verify(log: Log, db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "key"
    key.write_bytes(KEY)
    saved = tmp_path / "checkpoint.json"

    def run(*args: str) -> Any:
        return runner.invoke(app, ["audit", *args, "--db", db_url], catch_exceptions=False)

    made = run("checkpoint", "--key-file", str(key), "-o", str(saved))
    assert made.exit_code == 0, made.output
    assert "signed checkpoint of 3 chains" in made.stdout
    assert Checkpoint.from_json(saved.read_text()).signature_matches(KEY)
    stdout = run("checkpoint")
    assert stdout.exit_code == 0 and Checkpoint.from_json(stdout.stdout).signature is None

    ok = run("verify", "--checkpoint", str(saved), "--key-file", str(key))
    assert ok.exit_code == 0, ok.output
    assert "the checkpoint (signed) of" in ok.stdout and "holds for its 3 chains" in ok.stdout
    assert "not checked" in run("verify", "--checkpoint", str(saved)).stderr

    _truncate(log, "stray-agent", keep=1)
    bad = run("verify", "--checkpoint", str(saved), "--key-file", str(key))
    assert bad.exit_code == 1
    assert "TAMPERED: chain 'stray-agent'" in bad.stdout and "below the checkpoint's" in bad.stdout
    document = json.loads(run("verify", "--checkpoint", str(saved), "--json").stdout)
    assert document["ok"] is False and document["checkpoint_heads"] == 3
    assert any("stray-agent" in p["reason"] for p in document["problems"])

    saved.write_text(saved.read_text().replace('"seq": 11', '"seq": 10'))
    forged = run("verify", "--checkpoint", str(saved), "--key-file", str(key))
    assert forged.exit_code == 1 and "signature does not match" in forged.stdout
    saved.write_text("{")
    assert run("verify", "--checkpoint", str(saved)).exit_code == 2
    key.write_bytes(b"short")
    assert run("checkpoint", "--key-file", str(key)).exit_code == 2


# -- a random byte ----------------------------------------------------------------------
_DIGITS = "0123456789"
_TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_/:. "


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_random_single_byte_change_is_caught(log: Log, data: st.DataObject) -> None:
    rows = log.snapshot["paymaster_audit"]
    row = data.draw(st.sampled_from(rows))
    name = data.draw(st.sampled_from([n for n in FIELDS if row[n] is not None]))
    old = row[name]
    stored = old.isoformat() if isinstance(old, datetime) else str(old)
    at = data.draw(st.integers(0, len(stored) - 1))
    alphabet = _TEXT if isinstance(old, str) else _DIGITS
    byte = data.draw(st.sampled_from([c for c in alphabet if c != stored[at]]))
    changed = stored[:at] + byte + stored[at + 1 :]
    new: Any = changed
    if isinstance(old, datetime):
        try:
            new = datetime.fromisoformat(changed)
        except ValueError:
            return  # not a time any more: no database would store it
    elif isinstance(old, int):
        new = int(changed)
    if new == old:
        return
    try:
        with log.tamper() as conn:
            conn.execute(update(audit).where(audit.c.id == row["id"]).values({name: new}))
    except (IntegrityError, DBAPIError):
        return  # a seq that collides, a time out of range: refused by the database
    try:
        result = log.verify()
        assert _caught(result, row=row["id"]), (name, old, new, result)
    finally:
        with log.tamper() as conn:
            conn.execute(update(audit).where(audit.c.id == row["id"]).values({name: old}))


# -- the PostgreSQL triggers ------------------------------------------------------------
_REFUSED = [
    "DELETE FROM paymaster_audit_chain WHERE chain = 'refund-agent'",
    "TRUNCATE paymaster_audit_chain",
    "TRUNCATE paymaster_audit",
    "UPDATE paymaster_audit_chain SET seq = seq - 1 WHERE chain = 'refund-agent'",
    "UPDATE paymaster_audit_chain SET seq = seq + 2 WHERE chain = 'refund-agent'",
    "UPDATE paymaster_audit_chain SET seq = seq + 1, head = repeat('a', 64)"
    " WHERE chain = 'refund-agent'",
    "UPDATE paymaster_audit_chain SET chain = 'other' WHERE chain = 'refund-agent'",
    "INSERT INTO paymaster_audit_chain (chain, seq, head) VALUES ('new', 3, repeat('a', 64))",
    # These pass the row trigger and are refused at COMMIT: a head names its row.
    "UPDATE paymaster_audit_chain SET seq = seq + 1 WHERE chain = 'refund-agent'",
    "UPDATE paymaster_audit_chain SET head = repeat('a', 64) WHERE chain = 'refund-agent'",
]


@pytest.mark.postgres
def test_postgres_guards_the_chain_heads(db_url: str, request: pytest.FixtureRequest) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("the triggers are PostgreSQL's (SQLite has no roles to guard against)")
    log: Log = request.getfixturevalue("log")
    for statement in _REFUSED:
        with pytest.raises(DBAPIError, match="paymaster_audit"), log.gov.engine.begin() as conn:
            conn.execute(text(statement))
    assert log.verify().ok
