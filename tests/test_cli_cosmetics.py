"""CLI cosmetics (issue 16, item 8): flags shown as flags in --help, counts with the noun
that agrees with them, ``status --watch`` visible in a pipe, and the Agents SDK examples
quiet about trace export offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner, Result

from conftest import Clock
from paymaster import Governor, Money
from paymaster.cli import runtime
from paymaster.cli.app import app
from paymaster.cli.output import plural

MakeGov = Callable[..., Governor]
Invoke = Callable[..., Result]

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _no_sleep(seconds: float) -> None:
    raise AssertionError("a command slept outside --watch/--follow")


@pytest.fixture
def invoke(db_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """Run ``paymaster ARGS`` against this test's database with the test's clock."""
    monkeypatch.setattr(runtime.hooks, "now", clock)
    monkeypatch.setattr(runtime.hooks, "sleep", _no_sleep)

    def run(*args: str) -> Result:
        env: dict[str, str | None] = {
            "PAYMASTER_DATABASE_URL": db_url,
            "PAYMASTER_POLICIES": None,
            "COLUMNS": "250",
        }
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return run


def guarded(gov: Governor, amount: str, run: str = "run-1") -> Any:
    """A governed refund call of ``amount`` (a context manager)."""
    estimate = Money.parse(f"{amount} USD")
    return gov.guard(
        agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=estimate, run=run
    )


def refund(gov: Governor, amount: str) -> None:
    with guarded(gov, amount) as call:
        call.settle(None, http_status=200)


# -- boolean flags in --help ---------------------------------------------------------------
def _command_paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_boolean_flags_show_as_flags_in_every_help() -> None:
    paths = list(_command_paths(get_command(app)))
    assert ("audit", "verify") in paths and ("status",) in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.stdout, path
    verify = runner.invoke(app, ["audit", "verify", "--help"], env={"COLUMNS": "250"}).stdout
    assert re.search(r"--json +Print one JSON document", verify), verify
    assert re.search(r"--help +Show this message", verify), verify
    assert re.search(r"--db +<str>", verify), verify  # options taking a value keep theirs
    # --json still takes no value
    assert runner.invoke(app, ["audit", "verify", "--json", "true"]).exit_code == 2


# -- plurals -------------------------------------------------------------------------------
def test_plural() -> None:
    assert plural(0, "audit row") == "0 audit rows"
    assert plural(1, "audit row") == "1 audit row"
    assert plural(2, "chain") == "2 chains"
    assert plural(1, "valid policy", "valid policies") == "1 valid policy"
    assert plural(3, "valid policy", "valid policies") == "3 valid policies"


def test_policy_check_counts_one_policy(tmp_path: Path) -> None:
    file = tmp_path / "one.yaml"
    policy = {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "endpoints": ["/v1/refunds"],
    }
    file.write_text(yaml.safe_dump({"policies": [policy]}))
    result = runner.invoke(app, ["policy", "check", str(file)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "1 valid policy" in result.stdout and "1 valid policies" not in result.stdout


def test_counts_of_one_are_singular(invoke: Invoke, make_governor: MakeGov, tmp_path: Path) -> None:
    gov = make_governor()
    refund(gov, "1.00")
    assert gov.audit.verify().rows_checked == 1

    verified = invoke("audit", "verify")
    assert verified.exit_code == 0, verified.output
    assert "ok: 1 audit row checked in 1 chain" in verified.stdout
    assert "1 chains" not in verified.stdout
    tail = invoke("audit", "tail")
    assert "1 newest audit row" in tail.stdout and "1 newest audit rows" not in tail.stdout
    exported = invoke("audit", "export", "--output", str(tmp_path / "audit.csv"))
    assert "exported 1 audit row to" in exported.stdout
    saved = tmp_path / "checkpoint.json"
    made = invoke("audit", "checkpoint", "--output", str(saved))
    assert "unsigned checkpoint of 1 chain written" in made.stdout
    against = invoke("audit", "verify", "--checkpoint", str(saved))
    assert against.exit_code == 0, against.output
    assert against.stdout.rstrip().endswith("holds for its 1 chain")

    with pytest.raises(TimeoutError), guarded(gov, "2.00", run="run-u"):
        raise TimeoutError  # one hold left unresolved: its outcome is unknown
    holds = invoke("holds", "list")
    assert "1 unresolved hold" in holds.stdout and "1 unresolved holds" not in holds.stdout

    assert invoke("revoke", "--agent", "refund-agent", "--reason", "loop").exit_code == 0
    restored = invoke("restore", "--agent", "refund-agent")
    assert "lifted 1 revocation" in restored.stdout and "(s)" not in restored.stdout

    assert invoke("keys", "create", "--agent", "refund-agent").exit_code == 0
    keys = invoke("keys", "list")
    assert "1 vault key" in keys.stdout and "1 vault keys" not in keys.stdout


# -- status --watch outside a terminal -----------------------------------------------------
def test_status_watch_prints_every_refresh_when_not_a_terminal(
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
    assert result.stdout.count("budgets for") == 3  # the first view and two refreshes
    rows = [line for line in result.stdout.splitlines() if "refund-agent" in line]
    assert ["$10.00" in rows[0], "$30.00" in rows[1], "$50.00" in rows[2]] == [True] * 3
    assert "\x1b[" not in result.stdout  # plain text: no cursor movement


def test_status_watch_outside_a_terminal_warns_of_an_outage_on_stderr(
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

    monkeypatch.setattr(status_module, "take_snapshot", flaky)
    monkeypatch.setattr(runtime.hooks, "sleep", lambda seconds: None)
    result = invoke("status", "--watch", "--iterations", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("budgets for") == 2  # the first view and the third read
    assert "Warning: database unavailable, retrying: database restarting" in result.stderr


# -- the Agents SDK examples offline -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("example", ["openai_agents_govern_tools.py", "openai_agents_stripe.py"])
def test_agents_examples_offline_do_not_try_to_export_traces(example: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "STRIPE_API_KEY")}
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / example), "--db", str(tmp_path / "ledger.db")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    assert "skipping trace export" not in ran.stderr, ran.stderr
