"""The ``paymaster`` command, on SQLite and PostgreSQL: every command, its JSON output and
its failure paths. Time comes from the injectable clock and --watch / --follow run a
bounded number of refreshes whose "sleep" is a hook the test controls: no real sleeps."""

from __future__ import annotations

import csv
import getpass
import io
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, text
from typer.testing import CliRunner, Result

from conftest import Clock, refund_policy
from paymaster import Governor, Hold, Money, PolicyViolation, ViolationCode
from paymaster._audit import AuditRecord
from paymaster._db import _alembic_config, connect
from paymaster._ledger import ReserveRequest
from paymaster._loading import load_policies
from paymaster._operations import AuditFilter, AuditFollower, export_audit
from paymaster._schema import audit
from paymaster.cli import runtime
from paymaster.cli.app import app
from paymaster.cli.init import EXAMPLE_POLICIES

MakeGov = Callable[..., Governor]
Invoke = Callable[..., Result]

runner = CliRunner()


def _no_sleep(seconds: float) -> None:
    raise AssertionError("a command slept outside --watch/--follow")


@pytest.fixture
def invoke(db_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """Run ``paymaster ARGS`` against this test's database (PAYMASTER_DATABASE_URL) with the
    test's clock."""
    monkeypatch.setattr(runtime.hooks, "now", clock)
    monkeypatch.setattr(runtime.hooks, "sleep", _no_sleep)

    def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
        environment: dict[str, str | None] = {
            "PAYMASTER_DATABASE_URL": db_url,
            "PAYMASTER_POLICIES": None,
            "COLUMNS": "250",
        }
        environment.update(env or {})
        return runner.invoke(app, list(args), env=environment, catch_exceptions=False)

    return run


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refund(gov: Governor, amount: str, actual: str | None = None, **kw: Any) -> None:
    """One governed refund, settled at ``actual`` (default the estimate)."""
    args: dict[str, Any] = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money.parse(f"{amount} USD"),
        "run": "run-1",
    }
    args.update(kw)
    with gov.guard(**args) as call:
        call.settle(Money.parse(f"{actual} USD") if actual else None, http_status=200)


def denied(gov: Governor, **kw: Any) -> None:
    with pytest.raises(PolicyViolation):
        refund(gov, "1.00", endpoint="/v1/charges", **kw)


def pending_hold(gov: Governor, amount: str = "25.00", run: str = "run-p") -> Hold:
    """A hold left pending, as by a process that died mid-call."""
    policy = gov.effective_policy("refund-agent", "stripe")
    request = ReserveRequest(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        method="POST",
        estimate=Money.parse(f"{amount} USD"),
        policy=policy,
        run=run,
    )
    return gov.ledger.reserve(request).hold


def unknown_hold(gov: Governor, amount: str = "10.00") -> Hold:
    """A hold whose outcome is unknown (the vendor call timed out)."""
    with pytest.raises(TimeoutError):
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.parse(f"{amount} USD"),
            run="run-u",
        ):
            raise TimeoutError("read timed out")
    [held] = [h for h in gov.holds() if h.state.value == "unknown"]
    return held


POLICY_FILE = """\
policies:
  - id: refunds
    agent: refund-agent
    vendor: stripe
    currency: USD
    daily_cap: "100.00"
    per_call_cap: "50.00"
    max_calls_per_day: 10
    endpoints: [/v1/refunds]
    methods: [POST]
  - id: yen
    agent: jp-agent
    vendor: stripe
    currency: JPY
    daily_cap: "5000"
    endpoints: [/v1/refunds]
    customers: [cus_1]
    expires_at: 2027-01-01T00:00:00Z
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY_FILE)
    return path


# -- init ----------------------------------------------------------------------------------
def test_init_writes_example_policies_and_creates_the_database(
    invoke: Invoke, tmp_path: Path
) -> None:
    target = tmp_path / "policies.yaml"
    result = invoke("init", "--policies", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_text() == EXAMPLE_POLICIES
    assert "# " in EXAMPLE_POLICIES and len(load_policies(target)) == 2
    assert as_json(invoke("db", "current", "--json"))["is_head"] is True
    assert invoke("status").exit_code == 0

    target.write_text("mine")
    again = invoke("init", "--policies", str(target))
    assert again.exit_code == 2
    assert "already exists" in again.stderr and target.read_text() == "mine"


def test_init_refuses_bad_targets_and_writes_nothing_when_the_database_fails(
    tmp_path: Path,
) -> None:
    toml = tmp_path / "p.toml"
    result = runner.invoke(app, ["init", "--policies", str(toml), "--db", "sqlite:///x.db"])
    assert result.exit_code == 2 and "YAML" in result.stderr and not toml.exists()
    missing_dir = tmp_path / "nope" / "p.yaml"
    result = runner.invoke(app, ["init", "--policies", str(missing_dir)])
    assert result.exit_code == 2 and "not a directory" in result.stderr
    target = tmp_path / "p.yaml"
    unreachable = f"sqlite:///{tmp_path}/no/such/dir/ledger.db"
    result = runner.invoke(app, ["init", "--policies", str(target), "--db", unreachable])
    assert result.exit_code == 3, result.output
    assert "unavailable" in result.stderr and not target.exists()


# -- policy check --------------------------------------------------------------------------
def test_policy_check_prints_the_policies(policy_file: Path) -> None:
    result = runner.invoke(app, ["policy", "check", str(policy_file)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for text_ in (
        "refunds",
        "jp-agent",
        "$100.00",
        "$50.00",
        "¥5,000",
        "/v1/refunds",
        "POST",
        "cus_1",
        "2027-01-01",
        "any",
        "never",
    ):
        assert text_ in result.stdout, text_
    document = as_json(runner.invoke(app, ["policy", "check", str(policy_file), "--json"]))
    refunds, yen = document["policies"]
    assert refunds["daily_cap"] == {"amount": 10000, "currency": "USD", "formatted": "$100.00"}
    assert refunds["max_calls_per_day"] == 10 and refunds["methods"] == ["POST"]
    assert yen["daily_cap"]["amount"] == 5000 and yen["customers"] == ["cus_1"]
    assert yen["expires_at"] == "2027-01-01T00:00:00+00:00"
    from_env = runner.invoke(
        app, ["policy", "check", "--json"], env={"PAYMASTER_POLICIES": str(policy_file)}
    )
    assert as_json(from_env) == document


def test_policy_check_invalid_file_exits_1_naming_file_policy_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY_FILE.replace('per_call_cap: "50.00"', 'per_call_cap: "-5.00"'))
    result = runner.invoke(app, ["policy", "check", str(bad)])
    assert result.exit_code == 1
    assert "bad.yaml" in result.stderr and "(refunds)" in result.stderr
    assert "per_call_cap" in result.stderr and "positive" in result.stderr
    missing = runner.invoke(app, ["policy", "check", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 1 and "cannot read" in missing.stderr


def test_policy_check_with_a_run_policy_shows_the_effective_policy(
    policy_file: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run.yaml"
    run.write_text('currency: USD\ncap: "20.00"\nmax_calls: 3\ncustomers: [cus_9]\n')
    args = ["policy", "check", str(policy_file), "--run", str(run)]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "effective with run policy" in result.stdout and "$20.00 / 3 calls" in result.stdout
    [effective] = as_json(runner.invoke(app, [*args, "--json"]))["effective"]
    assert effective["policy_id"] == "refunds"
    assert effective["run_cap"]["formatted"] == "$20.00" and effective["run_max_calls"] == 3
    assert effective["customer_allowlists"] == [["cus_9"]] and len(effective["hash"]) == 64

    run.write_text('currency: USD\ncap: "500.00"\n')
    widened = runner.invoke(app, args)
    assert widened.exit_code == 1
    assert "run.yaml" in widened.stderr and "'refunds'" in widened.stderr
    assert "widens 'cap'" in widened.stderr
    run.write_text("vendor: twilio\n")
    none = runner.invoke(app, args)
    assert none.exit_code == 1 and "matches no policy" in none.stderr
    run.write_text("cap: [1]\n")
    invalid = runner.invoke(app, args)
    assert invalid.exit_code == 1 and "field 'cap'" in invalid.stderr


# -- status --------------------------------------------------------------------------------
def test_status_shows_todays_budgets(invoke: Invoke, make_governor: MakeGov) -> None:
    gov = make_governor(refund_policy(max_calls_per_day=10))
    refund(gov, "40.00", actual="30.00")
    pending_hold(gov, "25.00")
    result = invoke("status")
    assert result.exit_code == 0, result.output
    assert "budgets for 2026-11-24" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "refund-agent → stripe" in line)
    for cell in ("$100.00", "$30.00", "$25.00", "$45.00", "2/10", "55%"):
        assert cell in row, cell
    [budget] = as_json(invoke("status", "--json"))["budgets"]
    assert budget["cap"] == {"amount": 10000, "currency": "USD", "formatted": "$100.00"}
    assert budget["settled"]["amount"] == 3000 and budget["pending"]["amount"] == 2500
    assert budget["remaining"]["formatted"] == "$45.00"
    assert (budget["calls"], budget["calls_cap"], budget["window"]) == (2, 10, "2026-11-24")
    assert as_json(invoke("status", "--json", "--day", "2026-11-23"))["budgets"] == []


def test_status_formats_each_budget_in_its_currency_and_lists_unused_policies(
    invoke: Invoke, make_governor: MakeGov, policy_file: Path
) -> None:
    yen = refund_policy(
        id="yen", agent="jp-agent", currency="JPY", daily_cap="5000", per_call_cap=None
    )
    gov = make_governor(refund_policy(), yen)
    refund(gov, "1200", agent="jp-agent", estimate=Money.parse("1200 JPY"))
    result = invoke("status", "--policies", str(policy_file))
    assert result.exit_code == 0, result.output
    yen_row = next(line for line in result.stdout.splitlines() if "jp-agent" in line)
    assert "¥5,000" in yen_row and "¥1,200" in yen_row and "¥3,800" in yen_row
    unused = next(line for line in result.stdout.splitlines() if "refund-agent" in line)
    assert "$100.00" in unused and "0/10" in unused
    document = as_json(invoke("status", "--json", env={"PAYMASTER_POLICIES": str(policy_file)}))
    assert {b["agent"] for b in document["budgets"]} == {"jp-agent", "refund-agent"}


def test_status_shows_run_budgets_and_revocations(invoke: Invoke, make_governor: MakeGov) -> None:
    from paymaster import RunPolicy

    gov = make_governor()
    refund(gov, "5.00", run="run-7", run_policy=RunPolicy(cap="20.00 USD", max_calls=4))
    gov.revoke(run="run-9", reason="looping", by="ops")
    result = invoke("status")
    assert "run run-7 (refund-agent → stripe)" in result.stdout
    assert "run run-9" in result.stdout and "looping" in result.stdout
    document = as_json(invoke("status", "--json"))
    run_budget = next(b for b in document["budgets"] if b["kind"] == "run")
    assert run_budget["run"] == "run-7" and run_budget["cap"]["formatted"] == "$20.00"
    assert run_budget["calls_cap"] == 4
    [revoked] = document["revocations"]
    assert (revoked["scope"], revoked["target"], revoked["by"]) == ("run", "run-9", "ops")


def test_status_watch_refreshes_in_place(
    invoke: Invoke, make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    gov = make_governor()
    refund(gov, "10.00")
    sleeps: list[float] = []

    def tick(seconds: float) -> None:  # between refreshes: another process spends
        sleeps.append(seconds)
        refund(gov, "20.00")

    monkeypatch.setattr(runtime.hooks, "sleep", tick)
    result = invoke("status", "--watch", "--interval", "0.5", "--iterations", "2")
    assert result.exit_code == 0, result.output
    assert sleeps == [0.5, 0.5]
    row = [line for line in result.stdout.splitlines() if "refund-agent" in line][-1]
    assert "$50.00" in row and "3" in row  # the last refresh: 10 + 20 + 20 settled
    assert invoke("status", "--watch", "--json").exit_code == 2


def test_status_watch_keeps_going_through_an_outage_and_stops_on_ctrl_c(
    invoke: Invoke, make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paymaster._errors import GovernanceUnavailable
    from paymaster.cli import status as status_module

    make_governor()
    real = status_module.take_snapshot
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise GovernanceUnavailable("database restarting")
        return real(*args, **kwargs)

    def tick(seconds: float) -> None:
        if calls["n"] >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_module, "take_snapshot", flaky)
    monkeypatch.setattr(runtime.hooks, "sleep", tick)
    result = invoke("status", "--watch")
    assert result.exit_code == 0, result.output
    assert calls["n"] == 3 and "budgets for" in result.stdout


# -- audit tail ----------------------------------------------------------------------------
def test_audit_tail_lists_newest_rows_with_filters(
    invoke: Invoke, make_governor: MakeGov, clock: Clock
) -> None:
    gov = make_governor()
    refund(gov, "10.00", run="run-a", tool_call_id="call_1")
    denied(gov, run="run-a")
    clock.advance(minutes=30)
    refund(gov, "5.00", run="run-b")
    result = invoke("audit", "tail")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "3 newest audit rows" in result.stdout
    assert "call_1" in result.stdout and "endpoint_not_allowed" in result.stdout
    assert "$10.00" in result.stdout and "2026-11-24 12:00:00Z" in result.stdout
    assert next(n for n, line in enumerate(lines) if "run-a" in line) < next(
        n for n, line in enumerate(lines) if "run-b" in line
    )  # oldest first
    rows = as_json(invoke("audit", "tail", "--json"))
    assert [r["run"] for r in rows] == ["run-a", "run-a", "run-b"]
    assert rows[0]["actual"] == {"amount": 1000, "currency": "USD", "formatted": "$10.00"}
    assert rows[0]["tool_call_id"] == "call_1"

    def runs(*args: str) -> list[tuple[str, str]]:
        return [(r["run"], r["outcome"]) for r in as_json(invoke("audit", "tail", "--json", *args))]

    assert runs("--outcome", "denied") == [("run-a", "denied")]
    assert runs("--run", "run-b") == [("run-b", "allowed")]
    assert runs("--limit", "1") == [("run-b", "allowed")]
    assert runs("--since", "10m") == [("run-b", "allowed")]
    assert runs("--since", "2026-11-24T12:10:00Z") == [("run-b", "allowed")]
    assert runs("--agent", "someone", "--vendor", "stripe") == []
    assert len(runs("--vendor", "stripe", "--since", "2026-11-24")) == 3
    assert invoke("audit", "tail", "--since", "yesterday").exit_code == 2
    assert invoke("audit", "tail", "--outcome", "maybe").exit_code == 2
    assert invoke("audit", "tail", "--limit", "0").exit_code == 2


def test_audit_tail_follow_prints_new_rows_once(
    invoke: Invoke, make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    gov = make_governor()
    refund(gov, "1.00", run="old-1")
    refund(gov, "1.00", run="old-2")
    polls: list[int] = []

    def tick(seconds: float) -> None:  # between polls: new calls land, then none
        polls.append(1)
        if len(polls) == 1:
            refund(gov, "2.00", run="new-1")
            denied(gov, run="new-2")
        if len(polls) == 3:
            refund(gov, "3.00", run="new-3")

    monkeypatch.setattr(runtime.hooks, "sleep", tick)
    result = invoke("audit", "tail", "--follow", "--limit", "1", "--json", "--iterations", "3")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["run"] for r in rows] == ["old-2", "new-1", "new-2", "new-3"]
    assert len(polls) == 3

    polls.clear()
    text_result = invoke("audit", "tail", "-f", "--outcome", "denied", "--iterations", "1")
    lines = text_result.stdout.splitlines()
    assert len(lines) == 2 and all("endpoint_not_allowed" in line for line in lines)


def test_audit_tail_follow_keeps_going_through_an_outage(
    invoke: Invoke, make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paymaster._errors import GovernanceUnavailable

    gov = make_governor()
    real_poll = AuditFollower.poll
    polls: list[int] = []

    def flaky_poll(self: AuditFollower) -> list[AuditRecord]:
        polls.append(1)
        if len(polls) in (2, 3):  # the first poll is the initial tail
            raise GovernanceUnavailable("database restarting")
        return real_poll(self)

    def tick(seconds: float) -> None:
        if len(polls) == 1:
            refund(gov, "1.00", run="during-outage")

    monkeypatch.setattr(AuditFollower, "poll", flaky_poll)
    monkeypatch.setattr(runtime.hooks, "sleep", tick)
    result = invoke("audit", "tail", "--follow", "--iterations", "3")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("database restarting") == 1  # warned once per outage
    assert "during-outage" in result.stdout


def _insert_audit(db_url: str, ids_and_runs: list[tuple[int | None, str]]) -> None:
    """Audit rows written directly (explicit ids simulate out-of-order commits)."""
    engine = connect(db_url)
    at = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)
    try:
        with engine.begin() as conn:
            for n, (row_id, run) in enumerate(ids_and_runs):
                values = _row(n, at, run)
                if row_id is not None:
                    values["id"] = row_id
                conn.execute(insert(audit).values(**values))
    finally:
        engine.dispose()


def _row(n: int, at: datetime, run: str = "bulk") -> dict[str, Any]:
    return {
        "at": at,
        "run": run,
        "agent": "bulk-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "method": "POST",
        "customer": None,
        "outcome": "allowed",
        "http_status": 200,
        "vendor_request_id": f"req_{n}",
        "currency": "USD",
        "estimate": 100,
        "actual": 100,
        "policy_id": "p",
        "policy_hash": "e" * 64,
        "violation_code": None,
        "error": "x" * 200,
        "hold_id": None,
        "duration_ms": 1,
        "chain": f"bulk-{run}",
        "seq": n + 1,
        "prev_hash": "0" * 64,
        "hash": "f" * 64,
    }


def test_follower_returns_rows_committed_out_of_id_order(db_url: str) -> None:
    Governor(db_url, policies=[]).close()  # the schema
    _insert_audit(db_url, [(1, "a"), (2, "b"), (4, "d")])
    engine = connect(db_url)
    try:
        follower = AuditFollower(engine, AuditFilter())
        assert [r.run for r in follower.tail(2)] == ["b", "d"]
        assert follower.poll() == []
        _insert_audit(db_url, [(3, "c"), (5, "e")])  # 3 committed after 4 was seen
        assert [r.run for r in follower.poll()] == ["c", "e"]
        assert follower.poll() == []
        filtered = AuditFollower(engine, AuditFilter(run="a"))
        assert [r.run for r in filtered.tail(5)] == ["a"]
    finally:
        engine.dispose()


# -- audit export --------------------------------------------------------------------------
def test_audit_export_csv_and_jsonl(
    invoke: Invoke, make_governor: MakeGov, clock: Clock, tmp_path: Path
) -> None:
    gov = make_governor()
    refund(gov, "10.00", actual="7.50", run="early", tool_call_id="call_9")
    clock.advance(hours=1)
    denied(gov, run="late")
    out = tmp_path / "audit.csv"
    result = invoke("audit", "export", "--format", "csv", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "exported 2 audit rows" in result.stdout
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["run"] for r in rows] == ["early", "late"]
    assert rows[0]["actual"] == "750" and rows[0]["currency"] == "USD"
    assert rows[0]["tool_call_id"] == "call_9" and rows[0]["at"].startswith("2026-11-24T12:00")
    assert rows[1]["violation_code"] == "endpoint_not_allowed" and rows[1]["http_status"] == ""
    assert not list(tmp_path.glob("*.partial"))  # written whole, then renamed

    lines = invoke("audit", "export", "--format", "jsonl").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["run"] for r in records] == ["early", "late"]
    assert records[0]["actual"] == 750 and records[0]["hash"] == gov.audit.query()[0].hash

    def runs(*args: str) -> list[str]:
        result = invoke("audit", "export", "--format", "jsonl", *args)
        return [json.loads(line)["run"] for line in result.stdout.splitlines()]

    assert runs("--since", "2026-11-24T12:30:00Z") == ["late"]
    assert runs("--until", "2026-11-24T12:30:00Z") == ["early"]
    assert runs("--since", "10m") == ["late"]
    assert runs("--until", "10m") == ["early"]
    bad = invoke("audit", "export", "--since", "2026-11-25", "--until", "2026-11-24")
    assert bad.exit_code == 2 and "--until" in bad.stderr
    assert invoke("audit", "export", "--format", "xml").exit_code == 2


def test_export_writes_each_row_before_reading_the_next() -> None:
    """The writer never holds more than the row it is writing: it pulls row n+1 only after
    row n is written, so a lazy source keeps memory constant."""
    pulled: list[int] = []
    at = datetime(2026, 11, 24, tzinfo=timezone.utc)

    def source() -> Iterator[AuditRecord]:
        for n in range(1, 1001):
            pulled.append(n)
            yield AuditRecord(id=n, **_row(n, at))

    class Probe(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[tuple[int, str]] = []

        def write(self, s: str) -> int:
            self.writes.append((len(pulled), s))
            return super().write(s)

    for fmt in ("jsonl", "csv"):
        pulled.clear()
        probe = Probe()
        assert export_audit(source(), fmt, probe) == 1000  # type: ignore[arg-type]
        row_writes = [n for n, s in probe.writes if '"id":' in s or s[:1].isdigit()]
        assert row_writes[:3] == [1, 2, 3] and row_writes[-1] == 1000


def test_audit_export_memory_does_not_grow_with_rows(
    invoke: Invoke, db_url: str, tmp_path: Path
) -> None:
    Governor(db_url, policies=[]).close()
    base = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)
    engine = connect(db_url)
    try:
        with engine.begin() as conn:  # 20k rows, one a second
            for chunk in range(0, 20_000, 5000):
                rows = [_row(n, base + timedelta(seconds=n)) for n in range(chunk, chunk + 5000)]
                conn.execute(insert(audit), rows)
    finally:
        engine.dispose()
    out = tmp_path / "export.jsonl"

    def export(*args: str, expected: int, traced: bool = True) -> int:
        if traced:
            tracemalloc.start()
        try:
            result = invoke("audit", "export", "--format", "jsonl", "-o", str(out), *args)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.exit_code == 0, result.output
        with out.open() as file:
            assert sum(1 for _ in file) == expected
        return peak

    first_2k = ("--until", (base + timedelta(seconds=2000)).isoformat())
    export(*first_2k, expected=2_000, traced=False)  # warm up (statement caches, imports)
    small = export(*first_2k, expected=2_000)
    large = export(expected=20_000)
    # Holding 20k rows at once would take tens of MB; streaming holds one batch at most.
    assert large < small * 1.5 + 512 * 1024, (small, large)
    assert large < 16 * 1024 * 1024, large


# -- audit verify --------------------------------------------------------------------------
@pytest.mark.tampers_with_audit
def test_audit_verify_ok_then_names_the_first_tampered_row(
    invoke: Invoke, make_governor: MakeGov
) -> None:
    gov = make_governor()
    for _ in range(3):
        refund(gov, "1.00")
    result = invoke("audit", "verify")
    assert result.exit_code == 0 and "ok: 3 audit rows checked in 1 chain" in result.stdout
    assert as_json(invoke("audit", "verify", "--json"))["ok"] is True
    second = gov.audit.query()[1].id
    with gov.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE paymaster_audit DISABLE TRIGGER USER"))
        conn.execute(text("UPDATE paymaster_audit SET actual = 1 WHERE id = :id"), {"id": second})
    bad = invoke("audit", "verify")
    assert bad.exit_code == 1
    assert f"audit row {second} is the first bad row" in bad.stdout
    assert "does not match its hash" in bad.stdout
    document = json.loads(invoke("audit", "verify", "--json").stdout)
    assert document["ok"] is False and document["first_bad_id"] == second


# -- runs show -----------------------------------------------------------------------------
def test_runs_show_summarises_a_run(invoke: Invoke, make_governor: MakeGov) -> None:
    gov = make_governor()
    refund(gov, "10.00", actual="8.00", run="run-42")
    refund(gov, "5.00", run="run-42")
    denied(gov, run="run-42")
    pending_hold(gov, "3.00", run="run-42")
    refund(gov, "1.00", run="other")
    result = invoke("runs", "show", "run-42")
    assert result.exit_code == 0, result.output
    for text_ in (
        "refund-agent",
        "allowed 2, denied 1",
        "$13.00",
        "unresolved holds",
        "$3.00",
        "audit rows (3)",
    ):
        assert text_ in result.stdout, text_
    assert "other" not in result.stdout
    document = as_json(invoke("runs", "show", "run-42", "--json"))
    assert document["calls"] == 3 and document["outcomes"] == {"allowed": 2, "denied": 1}
    assert document["spend"]["USD"] == {"amount": 1300, "currency": "USD", "formatted": "$13.00"}
    assert [h["estimate"]["amount"] for h in document["unresolved_holds"]] == [300]
    assert len(document["rows_shown"]) == 3 and document["rows"] == 3
    limited = invoke("runs", "show", "run-42", "--limit", "2")
    assert "last 2 of 3" in limited.stdout
    missing = invoke("runs", "show", "run-404")
    assert missing.exit_code == 1 and "no audit rows for run 'run-404'" in missing.stderr


def test_a_run_too_long_to_store_is_found_by_the_name_it_was_given(
    invoke: Invoke, make_governor: MakeGov
) -> None:
    """``audit tail --run`` and ``runs show`` filter as the Python API does: by the run's
    stored form (cut to its column), and a NUL in a filter names nothing instead of
    failing the read on PostgreSQL."""
    gov = make_governor()
    run = "run-" * 60
    refund(gov, "2.00", run=run)
    refund(gov, "1.00", run="other")
    tail = as_json(invoke("audit", "tail", "--run", run, "--json"))
    assert [row["run"] for row in tail] == [gov.audit.query(run=run)[0].run]
    shown = as_json(invoke("runs", "show", run, "--json"))
    assert shown["calls"] == 1 and len(shown["rows_shown"]) == 1
    assert as_json(invoke("audit", "tail", "--run", "r\x00un", "--json")) == []


# -- revoke / restore ----------------------------------------------------------------------
def test_revoke_stops_the_next_call_and_restore_lifts_it(
    invoke: Invoke, make_governor: MakeGov
) -> None:
    gov = make_governor()
    refund(gov, "1.00")
    result = invoke("revoke", "--agent", "refund-agent", "--reason", "runaway loop")
    assert result.exit_code == 0, result.output
    assert "revoked agent 'refund-agent'" in result.stdout and "runaway loop" in result.stdout
    assert f"by {getpass.getuser()}" in result.stdout
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00")  # another process: refused at its next call
    assert info.value.code is ViolationCode.REVOKED and "runaway loop" in info.value.message
    status = as_json(invoke("status", "--json"))
    assert [r["target"] for r in status["revocations"]] == ["refund-agent"]

    restored = invoke("restore", "--agent", "refund-agent", "--reason", "fixed", "--by", "bob")
    assert restored.exit_code == 0 and "lifted 1 revocation" in restored.stdout
    refund(gov, "1.00")
    nothing = invoke("restore", "--agent", "refund-agent")
    assert nothing.exit_code == 0 and "nothing to restore" in nothing.stdout

    everything = as_json(
        invoke("revoke", "--all", "--reason", "incident", "--by", "alice", "--json")
    )
    assert everything["revoked"]["scope"] == "all" and everything["revoked"]["by"] == "alice"
    run_only = as_json(invoke("revoke", "--run", "run-9", "--reason", "x", "--json"))
    assert run_only["revoked"]["target"] == "run-9" and len(run_only["active"]) == 2
    with pytest.raises(PolicyViolation):
        refund(gov, "1.00", run="run-other")
    partial = invoke("restore", "--all")
    assert "lifted 1" in partial.stdout and "still revoked: run 'run-9'" in partial.stdout
    assert as_json(invoke("restore", "--run", "run-9", "--json"))["lifted"] == 1
    refund(gov, "1.00", run="run-9")


def test_revoke_needs_exactly_one_scope_and_a_reason(
    invoke: Invoke, make_governor: MakeGov
) -> None:
    gov = make_governor()
    for args in ([], ["--agent", "a", "--run", "r"], ["--agent", "a", "--all"]):
        result = invoke("revoke", *args, "--reason", "why")
        assert result.exit_code == 2, args
        assert "exactly one scope" in result.stderr
    assert invoke("revoke", "--agent", "a").exit_code == 2  # no --reason
    blank = invoke("revoke", "--agent", "a", "--reason", "  ")
    assert blank.exit_code == 2 and "--reason" in blank.stderr
    assert invoke("revoke", "--agent", "", "--reason", "x").exit_code == 2
    assert invoke("restore").exit_code == 2
    assert gov.revocations() == []  # nothing half-written


# -- holds ---------------------------------------------------------------------------------
def test_holds_list_with_older_than(invoke: Invoke, make_governor: MakeGov, clock: Clock) -> None:
    gov = make_governor()
    pending = pending_hold(gov, "25.00")
    clock.advance(minutes=5)
    unknown = unknown_hold(gov, "10.00")
    refund(gov, "1.00")  # settled: not listed
    holds = as_json(invoke("holds", "list", "--json"))
    assert [(h["id"], h["state"]) for h in holds] == [
        (pending.id, "pending"),
        (unknown.id, "unknown"),
    ]
    assert holds[0]["estimate"] == {"amount": 2500, "currency": "USD", "formatted": "$25.00"}
    table = invoke("holds", "list")
    assert pending.id in table.stdout and "5m" in table.stdout and "$25.00" in table.stdout
    assert as_json(invoke("holds", "list", "--older-than", "10m", "--json")) == []
    clock.advance(minutes=7)
    older = as_json(invoke("holds", "list", "--older-than", "10m", "--json"))
    assert [h["id"] for h in older] == [pending.id]
    assert invoke("holds", "list", "--older-than", "ten").exit_code == 2


def test_holds_resolve_once(invoke: Invoke, make_governor: MakeGov) -> None:
    gov = make_governor()
    pending = pending_hold(gov, "25.00")
    unknown = unknown_hold(gov, "10.00")
    result = invoke("holds", "resolve", pending.id, "--settle", "12.50", "--reason", "stripe says")
    assert result.exit_code == 0, result.output
    assert "settled at $12.50" in result.stdout and "estimate $25.00" in result.stdout
    assert f"by {getpass.getuser()}" in result.stdout
    [budget] = gov.budgets()
    assert budget.settled == Money(1250, "USD") and budget.pending == Money(1000, "USD")

    again = invoke("holds", "resolve", pending.id, "--release", "--reason", "oops")
    assert again.exit_code == 1 and "already settled" in again.stderr
    assert gov.budgets()[0].settled == Money(1250, "USD")

    released = as_json(
        invoke(
            "holds",
            "resolve",
            unknown.id,
            "--release",
            "--reason",
            "never sent",
            "--by",
            "carol",
            "--json",
        )
    )
    assert released["state"] == "released" and released["resolved_by"] == "carol"
    assert gov.budgets()[0].pending == Money(0, "USD")
    assert gov.audit.query()[-1].outcome == "reconciled"

    missing = invoke("holds", "resolve", "nope", "--release", "--reason", "x")
    assert missing.exit_code == 1 and "no hold 'nope'" in missing.stderr


def test_holds_resolve_bad_input_exits_2(invoke: Invoke, make_governor: MakeGov) -> None:
    gov = make_governor()
    held = pending_hold(gov, "25.00")
    cases = [
        (["--release", "--settle", "1.00"], "exactly one"),
        ([], "exactly one"),
        (["--settle", "1.00 EUR"], "EUR"),
        (["--settle", "lots"], "cannot read"),
        (["--settle", "-1.00"], "negative"),
        (["--settle", "1.001"], "decimal places"),
    ]
    for args, message in cases:
        result = invoke("holds", "resolve", held.id, *args, "--reason", "x")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert invoke("holds", "resolve", held.id, "--release").exit_code == 2  # no --reason
    assert [h.id for h in gov.holds()] == [held.id]  # still pending, untouched
    ok = as_json(
        invoke("holds", "resolve", held.id, "--settle", "25.00 USD", "--reason", "x", "--json")
    )
    assert ok["actual"]["amount"] == 2500


# -- db ------------------------------------------------------------------------------------
def test_db_current_and_upgrade_from_an_older_schema(invoke: Invoke, db_url: str) -> None:
    engine = connect(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "0001")
    finally:
        engine.dispose()
    current = as_json(invoke("db", "current", "--json"))
    assert current["current"] == "0001" and current["is_head"] is False
    assert "not the head" in invoke("db", "current").stdout
    stale = invoke("status")
    assert stale.exit_code == 3 and "paymaster db upgrade" in stale.stderr
    upgraded = invoke("db", "upgrade")
    assert upgraded.exit_code == 0 and "upgraded from 0001" in upgraded.stdout
    after = as_json(invoke("db", "current", "--json"))
    assert after["is_head"] is True and after["current"] == after["head"]
    assert "already at the head" in invoke("db", "upgrade").stdout
    assert "(head)" in invoke("db", "current").stdout


def test_db_on_an_empty_database(invoke: Invoke, db_url: str) -> None:
    if db_url.startswith("sqlite"):
        missing = invoke("db", "current")
        assert missing.exit_code == 3 and "paymaster init" in missing.stderr
        assert invoke("status").exit_code == 3
        assert not Path(db_url.removeprefix("sqlite:///")).exists()  # nothing created
    else:
        assert as_json(invoke("db", "current", "--json"))["current"] is None
        assert "no paymaster schema" in invoke("db", "current").stdout
        empty = invoke("holds", "list")
        assert empty.exit_code == 3 and "no paymaster schema" in empty.stderr
    created = as_json(invoke("db", "upgrade", "--json"))
    assert created["before"] is None and created["current"] == created["head"]
    assert as_json(invoke("holds", "list", "--json")) == []


# -- database errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["audit", "tail"],
        ["audit", "verify"],
        ["audit", "export"],
        ["holds", "list"],
        ["runs", "show", "r"],
        ["revoke", "--all", "--reason", "x"],
        ["db", "current"],
        ["db", "upgrade"],
    ],
)
def test_an_unreachable_database_exits_3(args: list[str]) -> None:
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    result = runner.invoke(app, args, env={"PAYMASTER_DATABASE_URL": url})
    assert result.exit_code == 3, result.output
    assert "unavailable" in result.stderr and "127.0.0.1" in result.stderr


def test_a_bad_database_url_exits_2(tmp_path: Path) -> None:
    for url in ("mysql://x/y", "sqlite://", "sqlite:///:memory:", "not a url"):
        for command_ in (["db", "upgrade"], ["status"]):
            result = runner.invoke(app, [*command_, "--db", url])
            assert result.exit_code == 2, (url, result.output)
            assert "--db" in result.stderr


def test_the_installed_entry_point_maps_errors_to_exit_codes(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "paymaster.cli", "status", "--db", missing],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert "no paymaster database" in done.stderr and "Traceback" not in done.stderr


def test_db_option_overrides_the_environment(tmp_path: Path, invoke: Invoke) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert invoke("db", "upgrade", "--db", other).exit_code == 0
    assert "other.db" in invoke("db", "current", "--db", other).stdout


def test_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("init", "policy", "status", "audit", "runs", "revoke", "restore", "holds", "db"):
        assert name in result.stdout
    assert "--iterations" not in runner.invoke(app, ["status", "--help"]).stdout
    assert runner.invoke(app, ["--version"]).stdout.startswith("paymaster ")


def test_holds_acknowledge_an_overrun(invoke: Invoke, make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(
        agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(1000, "USD")
    ) as call:
        call.settle(Money(1500, "USD"))
    listed = invoke("holds", "list", "--overruns")
    assert listed.exit_code == 0, listed.output
    assert "1 overrun awaiting" in listed.stdout and "$5.00" in listed.stdout
    [row] = as_json(invoke("holds", "list", "--overruns", "--json"))
    assert row["id"] == call.hold_id and row["overrun"]["amount"] == 500
    assert invoke("holds", "acknowledge", call.hold_id, "--reason", " ").exit_code == 2
    done = invoke("holds", "acknowledge", call.hold_id, "--reason", "fee", "--by", "ops")
    assert done.exit_code == 0, done.output
    assert "acknowledged by ops" in done.stdout
    assert not gov.budgets()[0].frozen
    again = invoke("holds", "acknowledge", call.hold_id, "--reason", "fee")
    assert again.exit_code == 1 and "no overrun awaiting" in again.stderr
    assert invoke("holds", "acknowledge", "nope", "--reason", "x").exit_code == 1
