"""Vault keys (``paymaster._vault``) and the ``paymaster keys`` / ``paymaster proxy``
commands, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, Table, create_engine, inspect, select, text, update
from typer.testing import CliRunner

from conftest import Clock, _pg_schema_url
from paymaster import AlertConfig, Governor, Money, PolicyViolation, RunPolicy, ViolationCode
from paymaster._db import _alembic_config, connect, ensure_schema
from paymaster._ledger import reserve as reserve_module
from paymaster._schema import metadata, proxy_replay, vault_key
from paymaster._vault import VaultKeyNotFound, VaultKeyRefused, VaultKeys
from paymaster.cli import runtime
from paymaster.cli.app import app
from paymaster.proxy import ProxyConfig, read_stripe_key
from stripe_fixtures import refund_agent_policy

Reason = VaultKeyRefused.Reason
runner = CliRunner()
SECRET_AT = len("pmk_") + 12 + 1  # where the secret starts: pmk_<12-hex id>_<secret>


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    ensure_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def keys(engine: Engine, clock: Clock) -> VaultKeys:
    return VaultKeys(engine, clock)


def refused(keys: VaultKeys, presented: str) -> Reason:
    with pytest.raises(VaultKeyRefused) as caught:
        keys.authenticate(presented)
    return caught.value.reason


def test_a_key_authenticates_as_what_it_binds_and_only_its_digest_is_stored(
    keys: VaultKeys, engine: Engine
) -> None:
    policy = RunPolicy.model_validate({"currency": "JPY", "cap": "500", "max_calls": 3})
    made = keys.create("refund-agent", by="ops", run="run-7", run_policy=policy, label="ci")
    assert made.secret.startswith(f"pmk_{made.record.id}_")
    found = keys.authenticate(made.secret)
    assert (found.agent, found.run, found.run_policy, found.label) == (
        "refund-agent",
        "run-7",
        policy,
        "ci",
    )
    with engine.connect() as conn:
        stored = [str(v) for row in conn.execute(select(vault_key)) for v in row]
    secret = made.secret[SECRET_AT:]
    assert not any(secret in value for value in stored)


def test_a_run_policy_without_a_run_counts_against_the_keys_own_run(keys: VaultKeys) -> None:
    made = keys.create(
        "a", by="ops", run_policy=RunPolicy.model_validate({"currency": "USD", "cap": "5.00"})
    )
    assert made.record.run == f"pmk_{made.record.id}"


def test_a_key_without_a_run_is_its_own_run_even_if_stored_without_one(
    keys: VaultKeys, engine: Engine
) -> None:
    made = keys.create("a", by="ops")
    assert made.record.run == made.record.credential == f"pmk_{made.record.id}"
    assert keys.authenticate(made.secret).run == f"pmk_{made.record.id}"
    with engine.begin() as conn:  # as a key made before revision 0007 was stored
        conn.execute(update(vault_key).values(run=None))
    assert keys.authenticate(made.secret).run == f"pmk_{made.record.id}"
    assert [k.run for k in keys.list()] == [f"pmk_{made.record.id}"]


def test_failed_authentications_are_counted_per_known_key_and_reason(
    keys: VaultKeys, clock: Clock
) -> None:
    made = keys.create("a", by="ops")
    wrong = "A" * 43
    for presented in ("sk_test_1", f"pmk_{'0' * 12}_{wrong}", f"pmk_{made.record.id}_{wrong}"):
        with pytest.raises(VaultKeyRefused) as caught:
            keys.authenticate(presented)
        keys.record_failure(caught.value.key_id, caught.value.failure)
    assert caught.value.reason is Reason.UNKNOWN  # the client cannot tell a bad secret
    clock.advance(minutes=5)
    keys.record_failure(made.record.id, "bad_secret")
    keys.record_failure("ffffffffffff", "expired")  # an id no key has: counted as unknown
    keys.record_failure(None, "missing")
    counted = {(f.key_id, f.reason): (f.count, f.first_at, f.last_at) for f in keys.failures()}
    start = clock() - timedelta(minutes=5)
    assert counted == {
        ("unknown", "malformed"): (1, start, start),
        ("unknown", "unknown"): (1, start, start),
        (made.record.id, "bad_secret"): (2, start, clock()),
        ("unknown", "expired"): (1, clock(), clock()),
        ("unknown", "missing"): (1, clock(), clock()),
    }
    assert [f.reason for f in keys.failures(made.record.credential)] == ["bad_secret"]
    assert len(keys.failures("unknown")) == 4


def test_keys_failures_lists_the_counts(cli: str, keys: VaultKeys) -> None:
    made = keys.create("a", by="ops")
    keys.record_failure(made.record.id, "revoked")
    keys.record_failure(None, "missing")
    listed = runner.invoke(app, ["keys", "failures", "--json", "--db", cli])
    assert listed.exit_code == 0, listed.output
    assert {(f["key"], f["reason"], f["count"]) for f in json.loads(listed.stdout)} == {
        (f"pmk_{made.record.id}", "revoked", 1),
        ("unknown", "missing", 1),
    }
    one = runner.invoke(app, ["keys", "failures", f"pmk_{made.record.id}", "--db", cli])
    assert one.exit_code == 0, one.output
    assert "revoked" in one.stdout and "missing" not in one.stdout


def test_migration_0007_gives_old_keys_a_run_and_forgets_unscoped_replays(db_url: str) -> None:
    engine = connect(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "0006")
            old = MetaData()
            old_key = Table("paymaster_vault_key", old, autoload_with=conn)
            old_replay = Table("paymaster_proxy_replay", old, autoload_with=conn)
            now = datetime.now(timezone.utc)
            made = {"secret_sha256": "0" * 64, "agent": "a", "created_at": now, "created_by": "o"}
            conn.execute(old_key.insert().values(id="0123456789ab", **made))
            conn.execute(old_key.insert().values(id="ba9876543210", run="r1", **made))
            kept = {"status": 200, "headers": "{}", "body": b"{}", "created_at": now}
            conn.execute(old_replay.insert().values(key="k", agent="a", **kept))
        ensure_schema(engine)
        with engine.connect() as conn:
            runs = dict(conn.execute(select(vault_key.c.id, vault_key.c.run)).all())
            assert runs == {"0123456789ab": "pmk_0123456789ab", "ba9876543210": "r1"}
            assert conn.execute(select(proxy_replay)).all() == []
        assert_schema_matches(engine)
        with engine.begin() as conn:  # and back down, for a rollback of the upgrade
            command.downgrade(_alembic_config(conn), "0006")
            assert "paymaster_auth_failure" not in inspect(conn).get_table_names()
            columns = {c["name"] for c in inspect(conn).get_columns("paymaster_proxy_replay")}
            assert "credential" not in columns and "run" not in columns
    finally:
        engine.dispose()


def test_the_migrated_tables_of_the_proxy_match_the_schema(engine: Engine) -> None:
    assert_schema_matches(engine)


def assert_schema_matches(engine: Engine) -> None:
    """The proxy's tables as the migrations make them are the tables ``schema.py``
    describes (the other tables are compared where they are owned)."""
    owned = {"paymaster_vault_key", "paymaster_proxy_replay", "paymaster_auth_failure"}
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)

    def table_of(change: Any) -> str:
        if isinstance(change, list):  # modify_* changes come as a list of them
            change = change[0]
        kind = change[0]
        if kind in ("add_table", "remove_table"):
            return str(change[1].name)
        if kind in ("add_column", "remove_column") or kind.startswith("modify_"):
            return str(change[2])
        return str(change[1].table.name)  # an index or a constraint

    assert [d for d in diff if table_of(d) in owned] == []


def test_unknown_malformed_expired_and_revoked_keys_are_refused(
    keys: VaultKeys, clock: Clock
) -> None:
    made = keys.create("a", by="ops", expires_at=clock() + timedelta(hours=2))
    key_id, secret = made.record.id, made.secret[SECRET_AT:]
    assert refused(keys, "sk_test_123") is Reason.MALFORMED
    assert refused(keys, made.secret + "x") is Reason.MALFORMED
    assert refused(keys, f"pmk_{'0' * 12}_{secret}") is Reason.UNKNOWN
    assert refused(keys, f"pmk_{key_id}_{'A' * 43}") is Reason.UNKNOWN
    clock.advance(hours=1, minutes=59)
    keys.authenticate(made.secret)
    clock.advance(minutes=1)
    assert refused(keys, made.secret) is Reason.EXPIRED

    other = keys.create("a", by="ops")
    revoked = keys.revoke(f"pmk_{other.record.id}", by="oncall", reason="leaked")
    assert (revoked.revoked_by, revoked.revoke_reason) == ("oncall", "leaked")
    assert refused(keys, other.secret) is Reason.REVOKED
    again = keys.revoke(other.record.id, by="someone else", reason="twice")
    assert again.revoked_by == "oncall"  # the first revoke stands


def test_listing_and_bad_input(keys: VaultKeys, clock: Clock) -> None:
    first = keys.create("a", by="ops")
    clock.advance(seconds=1)
    second = keys.create("b", by="ops")
    keys.revoke(first.record.id, by="ops", reason="done")
    assert [k.id for k in keys.list()] == [second.record.id]
    assert [k.id for k in keys.list(include_revoked=True)] == [second.record.id, first.record.id]
    with pytest.raises(VaultKeyNotFound):
        keys.revoke("pmk_ffffffffffff", by="ops", reason="x")
    with pytest.raises(ValueError, match="agent"):
        keys.create(" ", by="ops")
    with pytest.raises(ValueError, match="not in the future"):
        keys.create("a", by="ops", expires_at=clock())


# -- the commands ------------------------------------------------------------------------
@pytest.fixture
def cli(db_url: str, engine: Engine, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(runtime.hooks, "now", clock)
    monkeypatch.delenv("PAYMASTER_POLICIES", raising=False)
    return db_url


def test_keys_create_prints_the_key_once_and_list_never_shows_it(
    cli: str, tmp_path: Path, clock: Clock, keys: VaultKeys
) -> None:
    made = runner.invoke(
        app,
        [
            "keys",
            "create",
            "--agent",
            "refund-agent",
            "--run",
            "r1",
            "--expires",
            "2h",
            "--label",
            "nightly",
            "--db",
            cli,
        ],
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert keys.authenticate(secret).run == "r1"
    assert "only time the key is shown" in made.stderr

    listed = runner.invoke(app, ["keys", "list", "--json", "--db", cli])
    (entry,) = json.loads(listed.stdout)
    assert entry["id"] == secret[: len("pmk_") + 12]
    assert (entry["state"], entry["run"], entry["label"]) == ("active", "r1", "nightly")
    assert entry["expires_at"] == (clock() + timedelta(hours=2)).isoformat()
    assert secret[SECRET_AT:] not in listed.stdout
    table = runner.invoke(app, ["keys", "list", "--db", cli])
    assert entry["id"] in table.stdout and secret not in table.stdout

    gone = runner.invoke(app, ["keys", "revoke", entry["id"], "--reason", "rotated", "--db", cli])
    assert gone.exit_code == 0, gone.output
    assert "refuses its next request" in gone.stdout
    assert json.loads(runner.invoke(app, ["keys", "list", "--json", "--db", cli]).stdout) == []
    missing = runner.invoke(
        app, ["keys", "revoke", "pmk_ffffffffffff", "--reason", "x", "--db", cli]
    )
    assert missing.exit_code == 1 and "no vault key" in missing.stderr


def test_keys_create_checks_the_key_against_the_policies(cli: str, tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        yaml.safe_dump(
            {
                "policies": [
                    {
                        "id": "refunds",
                        "agent": "refund-agent",
                        "vendor": "stripe",
                        "currency": "USD",
                        "daily_cap": "100.00",
                        "endpoints": ["/v1/refunds"],
                    }
                ]
            }
        )
    )
    wide = tmp_path / "wide.yaml"
    wide.write_text(
        yaml.safe_dump({"currency": "USD", "cap": "500.00", "endpoints": ["/v1/customers"]})
    )
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump({"currency": "USD", "cap": "5.00"}))
    base = ["keys", "create", "--db", cli, "--policies", str(policies)]

    nobody = runner.invoke(app, [*base, "--agent", "nobody"])
    assert nobody.exit_code == 1 and "no key made" in nobody.stderr
    widens = runner.invoke(app, [*base, "--agent", "refund-agent", "--run-policy", str(wide)])
    assert widens.exit_code == 1 and "widens" in widens.stderr
    made = runner.invoke(
        app, [*base, "--agent", "refund-agent", "--run-policy", str(narrow), "--json"]
    )
    assert made.exit_code == 0, made.output
    document = json.loads(made.stdout)
    assert document["run"] == document["id"]
    assert document["run_policy"]["cap"] == "5.00 USD"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "a", "--expires", "soon"], "neither a duration"),
        (["--agent", "a", "--expires", "2020-01-01"], "not in the future"),
        (["--agent", " "], "must not be empty"),
    ],
)
def test_keys_create_refuses_bad_input_with_exit_2(cli: str, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["keys", "create", "--db", cli, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


# -- the proxy's configuration -----------------------------------------------------------
def test_the_proxy_command_refuses_a_bad_configuration_before_serving(
    cli: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text("policies: []\n")
    base = ["proxy", "--db", cli, "--policies", str(policies)]
    monkeypatch.delenv("PAYMASTER_STRIPE_KEY", raising=False)
    no_key = runner.invoke(app, base)
    assert no_key.exit_code == 2 and "PAYMASTER_STRIPE_KEY" in no_key.stderr
    monkeypatch.setenv("PAYMASTER_STRIPE_KEY", "sk_test_secret")
    for upstream, message in (
        ("ftp://api.stripe.com", "http(s)"),
        ("https://api.stripe.com/v1", "no path"),
        ("https://user@api.stripe.com", "no path, query or user"),
    ):
        bad = runner.invoke(app, [*base, "--upstream", upstream])
        assert bad.exit_code == 2 and message in bad.stderr, bad.stderr
        assert "sk_test_secret" not in bad.output
    listen = runner.invoke(app, [*base, "--listen", "8421"])
    assert listen.exit_code == 2 and "HOST:PORT" in listen.output
    missing_file = runner.invoke(app, [*base, "--stripe-key-file", str(tmp_path / "none")])
    assert missing_file.exit_code == 2 and "cannot read the Stripe key file" in missing_file.stderr


def test_the_real_key_is_read_from_a_file_or_the_environment_and_never_shown(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "stripe.key"
    secret_file.write_text("sk_live_from_file\n")
    assert read_stripe_key(secret_file, {}).get_secret_value() == "sk_live_from_file"
    key = read_stripe_key(None, {"PAYMASTER_STRIPE_KEY": "sk_live_from_env"})
    config = ProxyConfig(stripe_key=key)
    assert "sk_live_from_env" not in repr(config) + str(config) + config.model_dump_json()
    with pytest.raises(ValueError, match="vault key"):
        ProxyConfig(stripe_key="pmk_0123456789ab_" + "A" * 43)


def test_a_key_id_is_listed_whole_in_a_narrow_terminal(
    cli: str, keys: VaultKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = keys.create("refund-agent", by="ops", run="r1", label="a long label for a key")
    monkeypatch.setenv("COLUMNS", "60")  # the id is copied into `keys revoke`: never folded
    table = runner.invoke(app, ["keys", "list", "--db", cli])
    assert table.exit_code == 0, table.output
    assert f"pmk_{made.record.id}" in table.stdout


def test_every_governed_call_presented_with_a_revoked_vault_key_is_refused_by_the_ledger(
    db_url: str, clock: Clock
) -> None:
    """The proxy does not read a key it has authenticated before: the ledger refuses a
    call whose ``credential`` names a revoked key, in a new reserve, a free call, a retry
    of a hold still counted and a call that reserves nothing, and audits each refusal."""
    with Governor(db_url, policies=[refund_agent_policy()], clock=clock) as gov:
        made = VaultKeys(gov.engine, clock).create("refund-agent", by="ops")
        other = VaultKeys(gov.engine, clock).create("refund-agent", by="ops")
        call = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}
        mine = {**call, "credential": made.record.credential}
        held = gov.guard(**mine, estimate=Money(500, "USD"), idempotency_key="k-1")
        held.__enter__()  # a hold still counted, as a call in flight leaves it
        VaultKeys(gov.engine, clock).revoke(made.record.id, by="oncall", reason="leaked")
        _refused_every_way(
            gov,
            mine,
            ViolationCode.REVOKED,
            f"vault key {made.record.credential} was revoked by oncall: leaked",
        )
        with gov.guard(
            **call, estimate=Money(100, "USD"), credential=other.record.credential
        ) as ok:
            ok.settle()
        held.__exit__(None, None, None)
        rows = gov.audit.query()
        denied = [r for r in rows if r.outcome == "denied"]
        assert [(r.violation_code, r.credential) for r in denied] == [
            ("revoked", made.record.credential)
        ] * 4
        assert gov.audit.verify().ok


def _refused_every_way(
    gov: Governor, mine: dict[str, Any], code: ViolationCode, message: str
) -> None:
    """A call presented as ``mine`` is refused with ``code`` and ``message`` in a new
    reserve, a free call, a retry of the counted hold keyed ``k-1``, and ``free_call``."""
    attempts = {
        "new": lambda: gov.guard(**mine, estimate=Money(100, "USD")),
        "free": lambda: gov.guard(**mine, free=True),
        "retry": lambda: gov.guard(**mine, estimate=Money(500, "USD"), idempotency_key="k-1"),
    }
    for name, attempt in attempts.items():
        with pytest.raises(PolicyViolation) as refused:
            with attempt():
                pass
        assert refused.value.code is code, name
        assert message in str(refused.value), name
    with pytest.raises(PolicyViolation) as refused:
        gov.free_call(**mine)
    assert refused.value.code is code


def test_every_governed_call_presented_with_an_expired_vault_key_is_refused_by_the_ledger(
    db_url: str, clock: Clock
) -> None:
    """A request may reach its reserve long after its key was checked (its body sent
    slowly, a wait for a worker): the ledger refuses a call whose key has expired since."""
    with Governor(db_url, policies=[refund_agent_policy()], clock=clock) as gov:
        made = VaultKeys(gov.engine, clock).create(
            "refund-agent", by="ops", expires_at=clock() + timedelta(hours=1)
        )
        mine = {
            "agent": "refund-agent",
            "vendor": "stripe",
            "endpoint": "/v1/refunds",
            "credential": made.record.credential,
        }
        held = gov.guard(**mine, estimate=Money(500, "USD"), idempotency_key="k-1")
        held.__enter__()
        clock.advance(hours=1)
        _refused_every_way(
            gov, mine, ViolationCode.EXPIRED, f"vault key {made.record.credential} expired at"
        )
        held.__exit__(None, None, None)
        denied = [r for r in gov.audit.query() if r.outcome == "denied"]
        assert [(r.violation_code, r.credential) for r in denied] == [
            ("expired", made.record.credential)
        ] * 4
        assert gov.audit.verify().ok


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("stop", "code"),
    [
        ("key revoked", ViolationCode.REVOKED),
        ("key expired", ViolationCode.EXPIRED),
        ("agent revoked", ViolationCode.REVOKED),
    ],
)
def test_a_reserve_that_waited_on_its_budget_row_sees_a_revoke_made_meanwhile(
    pg_admin_url: str,
    clock: Clock,
    stop: str,
    code: ViolationCode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL the day's UPDATE checks the kill switch and the vault key as of its
    start, then may wait on the budget row's lock: a reserve that waited checks them
    again, so a revoke or an expiry during the wait stops the call (found by an
    adversarial review: a stalled peer holding the row let a revoked key's payment
    through after the revoke returned)."""
    timer = _Timer(monkeypatch)
    url, drop = _pg_schema_url(pg_admin_url)
    try:
        with Governor(url, policies=[refund_agent_policy()], clock=clock) as gov:
            keys = VaultKeys(gov.engine, clock)
            made = keys.create("refund-agent", by="ops", expires_at=clock() + timedelta(hours=1))
            call = {
                "agent": "refund-agent",
                "vendor": "stripe",
                "endpoint": "/v1/refunds",
                "credential": made.record.credential,
            }
            with gov.guard(**call, estimate=Money(100, "USD")) as first:
                first.settle()
            (daily,) = [b for b in gov.budgets() if b.kind == "daily"]
            outcome: dict[str, Any] = {}

            def reserve() -> None:
                try:
                    with gov.guard(**call, estimate=Money(200, "USD")) as second:
                        second.settle()
                    outcome["allowed"] = True
                except PolicyViolation as refused:
                    outcome["refused"] = refused.code

            with gov.engine.connect() as blocker:  # a peer stalled holding the day's row
                blocker.begin()
                pid = blocker.execute(text("SELECT pg_backend_pid()")).scalar_one()
                blocker.execute(
                    text("SELECT 1 FROM paymaster_budget WHERE id = :id FOR UPDATE"),
                    {"id": daily.id},
                )
                waiter = threading.Thread(target=reserve)
                waiter.start()
                _wait_until_blocked_by(pg_admin_url, pid)
                if stop == "key revoked":
                    keys.revoke(made.record.id, by="oncall", reason="leaked")
                elif stop == "key expired":
                    clock.advance(hours=1)
                else:
                    gov.revoke(agent="refund-agent", reason="runaway", by="oncall")
                timer.advance(1.0)  # the reserve has waited a second
                blocker.rollback()
            waiter.join(30)
            assert outcome == {"refused": code}
            (budget,) = [b for b in gov.budgets() if b.kind == "daily"]
            assert budget.committed == Money(100, "USD")
            rows = [(r.outcome, r.violation_code) for r in gov.audit.query()]
            assert rows == [("allowed", None), ("denied", code.value)]
            assert gov.audit.verify().ok
    finally:
        drop()


def _wait_until_blocked_by(admin_url: str, pid: int) -> list[int]:
    """Until some session waits on a lock that session ``pid`` holds; returns their
    pids. Asked from a connection of its own: a transaction sees one snapshot of
    ``pg_stat_activity``."""
    deadline = time.monotonic() + 30
    blocked = text("SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            while not (waiting := list(conn.execute(blocked, {"pid": pid}).scalars())):
                assert time.monotonic() < deadline, f"nothing waited on session {pid}"
                time.sleep(0.005)  # polling the server for the wait, not a wait for it
    finally:
        engine.dispose()
    return waiting


class _Timer:
    """The reserve's monotonic timer, moved by the test instead of by sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        monkeypatch.setattr(reserve_module, "_monotonic", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.postgres
@pytest.mark.parametrize("stop", ["agent revoked", "key revoked", "key expired"])
def test_a_reserve_that_waited_on_an_alert_row_sees_a_revoke_made_meanwhile(
    pg_admin_url: str, clock: Clock, stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-check is the reserve's last statement: a reserve that crossed an alert
    threshold can wait, after the day's UPDATE, on the same threshold's alert row written
    by a concurrent refusal that itself waits on a stalled peer (found by an adversarial
    review: the call went out 500 ms after the revoke returned)."""
    timer = _Timer(monkeypatch)
    url, drop = _pg_schema_url(pg_admin_url)
    try:
        sent: list[object] = []
        with Governor(
            url,
            policies=[refund_agent_policy(per_call_cap="100.00")],
            clock=clock,
            alerts=AlertConfig(sinks=[sent.append]),
        ) as gov:
            keys = VaultKeys(gov.engine, clock)
            made = keys.create("refund-agent", by="ops", expires_at=clock() + timedelta(hours=1))
            call = {
                "agent": "refund-agent",
                "vendor": "stripe",
                "endpoint": "/v1/refunds",
                "credential": made.record.credential,
            }
            with gov.guard(**call, estimate=Money(7000, "USD")) as first:  # $70 of $100
                first.settle()
            outcome: dict[str, Any] = {}

            def attempt(name: str, cents: int) -> None:
                try:
                    with gov.guard(**call, estimate=Money(cents, "USD")) as made_call:
                        made_call.settle()
                    outcome[name] = "allowed"
                except PolicyViolation as refused:
                    outcome[name] = refused.code.value

            with gov.engine.connect() as stalled:  # a peer stalled holding the chain head
                stalled.begin()
                pid = stalled.execute(text("SELECT pg_backend_pid()")).scalar_one()
                stalled.execute(
                    text("SELECT 1 FROM paymaster_audit_chain WHERE chain = :c FOR UPDATE"),
                    {"c": "refund-agent"},
                )
                # $40 would pass the cap: refused, it writes the 100% alert row, then waits
                # on the chain head for its audit row.
                denied = threading.Thread(target=attempt, args=("denied", 4000))
                denied.start()
                (denied_pid,) = _wait_until_blocked_by(pg_admin_url, pid)
                # $30 reaches the cap exactly: its alert row waits on the refusal's.
                reserving = threading.Thread(target=attempt, args=("reserving", 3000))
                reserving.start()
                _wait_until_blocked_by(pg_admin_url, denied_pid)
                if stop == "agent revoked":
                    gov.revoke(agent="refund-agent", reason="runaway", by="oncall")
                elif stop == "key revoked":
                    keys.revoke(made.record.id, by="oncall", reason="leaked")
                else:
                    clock.advance(hours=1)
                timer.advance(1.0)
                stalled.rollback()
            denied.join(30)
            reserving.join(30)
            expected = "expired" if stop == "key expired" else "revoked"
            assert outcome == {"denied": "cap_exceeded", "reserving": expected}
            (budget,) = [b for b in gov.budgets() if b.kind == "daily"]
            assert budget.committed == Money(7000, "USD")
            assert gov.audit.verify().ok
    finally:
        drop()
