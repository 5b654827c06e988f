"""``verify(checkpoint=..., since_checkpoint=True)``: only the rows written since a
checkpoint are walked, and what it must still catch there; what it leaves to a full
verify, by design. Built on the tamper suite's log (every writer, three chains).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, update
from typer.testing import CliRunner

import test_audit_tamper as tamper
from conftest import Clock, refund_policy
from paymaster._audit.chain import _hashed_fields, row_hash
from paymaster._schema import audit, audit_chain
from paymaster.cli.app import app
from test_audit_tamper import KEY, REFUND, Log, _caught, _truncate, _usd

pytestmark = pytest.mark.tampers_with_audit
log = tamper.log  # the tamper suite's fixture: its log, a snapshot, a signed checkpoint

#: Rows the log's checkpoint covers, per chain (the tamper suite asserts these heads).
CHECKPOINTED = {"lookup-agent": 1, "refund-agent": 11, "stray-agent": 2}


def _more_calls(log: Log, n: int = 3) -> None:
    """``n`` settled refunds after the checkpoint, and one refusal."""
    for _ in range(n):
        with log.gov.guard(**REFUND, estimate=_usd("1.00"), run="run-later") as call:
            call.settle(http_status=200)
    with pytest.raises(Exception, match="endpoint"):
        with log.gov.guard(**{**REFUND, "endpoint": "/v1/charges"}, estimate=_usd("1.00")):
            pass


def _since(log: Log) -> Any:
    return log.verify(checkpoint=log.checkpoint, key=KEY, since_checkpoint=True)


def test_only_the_rows_since_the_checkpoint_are_walked(log: Log) -> None:
    nothing_new = _since(log)
    assert nothing_new.ok and nothing_new.since_checkpoint
    assert nothing_new.rows_checked == 0 and nothing_new.checkpoint_heads == 3
    _more_calls(log, 3)
    result = _since(log)
    assert result.ok, result.problems
    assert result.rows_checked == 4 and result.chains == 3
    full = log.verify(checkpoint=log.checkpoint, key=KEY)
    assert full.ok and not full.since_checkpoint
    assert full.rows_checked == sum(CHECKPOINTED.values()) + 4


def test_a_chain_begun_after_the_checkpoint_is_walked_from_its_first_row(
    log: Log, make_governor: Any, clock: Clock
) -> None:
    later = make_governor(refund_policy(id="later", agent="later-agent"))
    for _ in range(2):
        with later.guard(**{**REFUND, "agent": "later-agent"}, estimate=_usd("1.00")) as call:
            call.settle(_usd("1.00"))
    result = _since(log)
    assert result.ok, result.problems
    assert result.rows_checked == 2 and result.chains == 4


def test_an_edited_row_after_the_checkpoint_is_caught(log: Log) -> None:
    _more_calls(log, 2)
    newest = log.rows("refund-agent")[-1]
    with log.tamper() as conn:
        conn.execute(update(audit).where(audit.c.id == newest.id).values(actual=999))
    assert _caught(_since(log), row=newest.id, says="does not match its hash")


def test_a_row_deleted_after_the_checkpoint_is_caught(log: Log) -> None:
    _more_calls(log, 3)
    rows = log.rows("refund-agent")
    gone, after = rows[-3], rows[-2]
    assert gone.seq > CHECKPOINTED["refund-agent"]
    with log.tamper() as conn:
        conn.execute(delete(audit).where(audit.c.id == gone.id))
    assert _caught(_since(log), row=after.id, says="missing before seq")


def test_history_rewritten_with_every_hash_recomputed_is_caught(log: Log) -> None:
    _more_calls(log, 1)
    first = log.rows("refund-agent")[0]
    with log.tamper() as conn:
        conn.execute(update(audit).where(audit.c.id == first.id).values(actual=1))
        tamper._rechain(conn, "refund-agent")
    assert _caught(_since(log), says="has another hash than the checkpoint's")


def test_a_head_wound_back_below_the_checkpoint_is_caught(log: Log) -> None:
    _truncate(log, "refund-agent", keep=4)
    result = _since(log)
    assert _caught(result, says="its head is at seq 4, below the checkpoint's")
    assert result.rows_checked == 0  # nothing above the checkpoint to walk


def test_a_forged_row_naming_no_hold_is_caught(log: Log) -> None:
    last = log.rows("refund-agent")[-1]
    forged = {
        **_hashed_fields(last),
        "seq": last.seq + 1,
        "prev_hash": last.hash,
        "at": last.at + timedelta(seconds=1),
        "hold_id": "f" * 32,
    }
    forged["hash"] = row_hash(forged)
    with log.tamper() as conn:
        conn.execute(insert(audit).values(forged))
        conn.execute(
            update(audit_chain)
            .where(audit_chain.c.chain == last.chain)
            .values(seq=forged["seq"], head=forged["hash"])
        )
    [row] = log.gov.audit.query(agent="refund-agent", newest_first=True, limit=1)
    result = _since(log)
    assert _caught(result, row=row.id, says=f"names hold {'f' * 32!r}, which does not exist")
    assert result.rows_checked == 1


def test_a_chain_without_its_head_is_caught(log: Log) -> None:
    with log.tamper() as conn:
        conn.execute(delete(audit_chain).where(audit_chain.c.chain == "lookup-agent"))
    [first] = log.rows("lookup-agent")
    for result in (_since(log), log.verify()):
        assert _caught(result, row=first.id, says="chain 'lookup-agent' has rows but no head row")


def test_what_is_left_to_a_full_verify(log: Log) -> None:
    """Rows up to the checkpoint are not re-read: an edit that leaves their hashes alone
    passes, and so do holds whose rows were deleted with the head wound back as far as
    the checkpoint. A full verify catches both."""
    _more_calls(log, 2)
    old = log.rows("refund-agent")[0]
    with log.tamper() as conn:
        conn.execute(update(audit).where(audit.c.id == old.id).values(actual=old.actual + 1))
    assert _since(log).ok
    assert _caught(log.verify(), row=old.id, says="does not match its hash")
    log.restore()
    _more_calls(log, 2)
    _truncate(log, "refund-agent", keep=CHECKPOINTED["refund-agent"])
    assert _since(log).ok
    assert _caught(log.verify(), says="no audit row names it")


def test_since_checkpoint_needs_a_checkpoint(log: Log) -> None:
    with pytest.raises(ValueError, match="checkpoint="):
        log.verify(since_checkpoint=True)


def test_cli_verify_since_checkpoint(log: Log, db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    key, saved = tmp_path / "key", tmp_path / "checkpoint.json"
    key.write_bytes(KEY)
    saved.write_text(log.checkpoint.to_json())

    def run(*args: str) -> Any:
        return runner.invoke(app, ["audit", "verify", *args, "--db", db_url])

    _more_calls(log, 2)
    since = ["--checkpoint", str(saved), "--key-file", str(key), "--since-checkpoint"]
    ok = run(*since)
    assert ok.exit_code == 0, ok.output
    assert "ok: 3 audit rows written since the checkpoint checked in 3 chains" in ok.stdout
    document = json.loads(run(*since, "--json").stdout)
    assert document["ok"] is True and document["since_checkpoint"] is True
    assert document["rows_checked"] == 3
    assert json.loads(run("--json").stdout)["since_checkpoint"] is False
    alone = run("--since-checkpoint")
    assert alone.exit_code == 2 and "--checkpoint" in alone.stderr
    newest = log.rows("refund-agent")[-1]
    with log.tamper() as conn:
        conn.execute(update(audit).where(audit.c.id == newest.id).values(actual=5))
    bad = run(*since)
    assert bad.exit_code == 1 and f"audit row {newest.id} is the first bad row" in bad.stdout
