"""A runaway refund loop, stopped before the money moves.

Runs offline on embedded SQLite: an "agent" keeps retrying a $20 refund against a local
stand-in for Stripe. paymaster allows calls until the $100 daily cap, then refuses; a
second process finds the budget already spent; an operator's revoke stops even a free
look-up; and the audit log summarises the run.

    python examples/runaway_refund_loop.py [--db paymaster-demo.db]
"""

from __future__ import annotations

import argparse
import multiprocessing
import uuid
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from paymaster import Governor, Money, PolicyViolation, load_policies

HERE = Path(__file__).parent
POLICIES = HERE / "policies.yaml"
console = Console()


class LocalStripe:
    """A stand-in for the vendor: it records refunds, it never refuses them."""

    def __init__(self) -> None:
        self.refunded = Money.zero("USD")

    def create_refund(self, charge: str, amount: Money, idempotency_key: str) -> dict[str, object]:
        self.refunded += amount
        return {"id": f"re_{uuid.uuid4().hex[:10]}", "amount": amount.amount,
                "charge": charge, "request_id": f"req_{uuid.uuid4().hex[:12]}"}  # fmt: skip


def refund(gov: Governor, stripe: LocalStripe, run: str, amount: Money) -> dict[str, object]:
    """One governed refund: reserve, call the vendor, settle with what it reports."""
    with gov.guard(agent="refund-agent", run=run, vendor="stripe", endpoint="/v1/refunds",
                   method="POST", customer="cus_alice", estimate=amount) as call:  # fmt: skip
        result = stripe.create_refund("ch_1", amount, idempotency_key=call.idempotency_key)
        call.settle(int(str(result["amount"])), http_status=200,
                    vendor_request_id=str(result["request_id"]))  # fmt: skip
        return result


def second_process(db: str) -> None:
    """Another instance of the agent, in its own OS process, on the same ledger."""
    gov = Governor(f"sqlite:///{db}", policies=load_policies(POLICIES))
    try:
        refund(gov, LocalStripe(), "run-43", Money.parse("20.00 USD"))
        console.print("  [red]second process refunded: the cap did not hold![/red]")
    except PolicyViolation as violation:
        console.print(f"  second process (pid {multiprocessing.current_process().pid}) "
                      f"refused: [bold]{violation.code}[/bold], {violation.remaining.format()} "
                      "left today")  # type: ignore[union-attr]  # fmt: skip
    finally:
        gov.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="paymaster-demo.db", help="SQLite file (recreated)")
    db = parser.parse_args().db
    for suffix in ("", "-wal", "-shm"):
        Path(db + suffix).unlink(missing_ok=True)

    gov = Governor(f"sqlite:///{db}", policies=load_policies(POLICIES))
    stripe = LocalStripe()
    console.rule("[bold]1. A runaway loop: the agent retries a $20.00 refund")
    for attempt in range(1, 9):
        try:
            result = refund(gov, stripe, "run-42", Money.parse("20.00 USD"))
            console.print(f"  attempt {attempt}: allowed  {result['id']}")
        except PolicyViolation as violation:
            console.print(f"  attempt {attempt}: [bold red]PolicyViolation[/bold red] "
                          f"{escape(str(violation))}")  # fmt: skip
            break
    console.print(f"  the vendor refunded {stripe.refunded.format()} in all")

    console.rule("[bold]2. A second process finds the budget already spent")
    child = multiprocessing.get_context("spawn").Process(target=second_process, args=(db,))
    child.start()
    child.join()

    console.rule("[bold]3. An operator revokes the run: the next call is refused")
    lookup = {"agent": "refund-agent", "run": "run-42", "vendor": "stripe",
              "endpoint": "/v1/refunds/re_1", "method": "GET", "customer": "cus_alice"}  # fmt: skip
    with gov.guard(**lookup) as call:
        call.settle(http_status=200)
        console.print("  a free look-up (GET /v1/refunds/re_1) is still allowed")
    gov.revoke(run="run-42", reason="runaway refund loop", by="on-call")
    try:
        with gov.guard(**lookup):
            pass
    except PolicyViolation as violation:
        console.print(f"  after the revoke: [bold red]{escape(str(violation))}[/bold red]")

    console.rule("[bold]4. The audit log")
    summary = gov.audit.run_summary("run-42")
    table = Table(title=f"run {summary.run}: {summary.calls} calls")
    table.add_column("outcome")
    table.add_column("calls", justify="right")
    for outcome, count in sorted(summary.outcomes.items()):
        table.add_row(outcome, str(count))
    table.add_row("[bold]spent", ", ".join(m.format() for m in summary.spend.values()))
    console.print(table)
    rows = Table(title="every call (all runs)")
    for column in ("id", "run", "endpoint", "outcome", "cost", "code"):
        rows.add_column(column)
    for record in gov.audit.query():
        cost = record.cost.format() if record.cost else "-"
        rows.add_row(str(record.id), record.run or "-", record.endpoint, record.outcome, cost,
                     record.violation_code or "")  # fmt: skip
    console.print(rows)
    verdict = gov.audit.verify()
    console.print(f"audit chain verified: {verdict.ok} ({verdict.rows_checked} rows); "
                  f"ledger file: {Path(db).resolve()}")  # fmt: skip
    gov.close()


if __name__ == "__main__":
    main()
