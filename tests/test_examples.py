"""Every example runs as a user runs it, and leaves an audit log that verifies.

Each example is started as its own process (``python examples/NAME.py --db FILE``), on
localstripe and a scripted model, exactly as its docstring says. Then the installed
``paymaster audit verify`` command checks the ledger it left, so an example whose rows
do not verify (a writer whose row hashes differently, a refusal that left no row, a
resolved hold without its row) fails the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAYMASTER = Path(sys.executable).with_name("paymaster")
#: What each example shows, in words its output must contain.
SHOWS = {
    "runaway_refund_loop.py": "refused",
    "proxy_fleet.py": "refused",
    "langchain_govern_tools.py": "run stopped",
    "langchain_stripe.py": "the run was stopped",
    "openai_agents_govern_tools.py": "run stopped",
    "openai_agents_stripe.py": "the run was stopped",
}


def test_every_example_is_listed() -> None:
    assert sorted(SHOWS) == sorted(path.name for path in EXAMPLES.glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(SHOWS))
def test_the_example_runs_and_its_audit_log_verifies(example: str, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / example), "--db", str(ledger)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert SHOWS[example] in ran.stdout, ran.stdout

    verified = subprocess.run(
        [str(PAYMASTER), "audit", "verify", "--db", f"sqlite:///{ledger}", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] is True and report["problems"] == [], report
    assert report["rows_checked"] > 0, "the example wrote no audit rows"
