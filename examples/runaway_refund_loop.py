"""A runaway refund loop, stopped before the money moves.

Runs offline: a local Stripe-compatible server (localstripe, on 127.0.0.1) and the real
``stripe`` client, governed by paymaster on embedded SQLite. An agent keeps refunding
$20.00; paymaster allows refunds until the $100 daily cap and refuses the next one before
it is sent; a second process finds the budget spent; a refund for a customer outside the
run's allowlist is refused; an operator's revoke stops even a free look-up; and the audit
log shows every call.

    python examples/runaway_refund_loop.py [--db paymaster-demo.db]
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import stripe
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from paymaster import Governor, Money, PolicyViolation, RunPolicy, load_policies
from paymaster.testing.localstripe import run_localstripe
from paymaster.vendors.stripe import governed_client

HERE = Path(__file__).parent
POLICIES = HERE / "policies.yaml"
console = Console()


def pay(merchant: stripe.StripeClient, customer: str, amount: int) -> str:
    """A customer's card payment, made by the merchant's own (ungoverned) code."""
    intent = merchant.v1.payment_intents.create(
        params={
            "amount": amount,
            "currency": "usd",
            "customer": customer,
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    return str(intent.id)


def refunded(merchant: stripe.StripeClient) -> Money:
    """What the Stripe server itself says was refunded."""
    refunds = merchant.v1.refunds.list(params={"limit": 100}).data
    return Money(sum(r.amount for r in refunds), "USD")


def second_process(db: str, url: str, payment: str) -> None:
    """Another instance of the agent, in its own OS process, on the same ledger."""
    gov = Governor(f"sqlite:///{db}", policies=load_policies(POLICIES))
    client = governed_client(
        gov, "sk_test_demo", agent="refund-agent", run="run-43", base_addresses={"api": url}
    )
    try:
        client.v1.refunds.create(params={"payment_intent": payment, "amount": 2000})
        console.print("  [red]second process refunded: the cap did not hold![/red]")
    except PolicyViolation as violation:
        left = violation.remaining.format() if violation.remaining else "nothing"
        console.print(
            f"  second process (pid {multiprocessing.current_process().pid}) "
            f"refused: [bold]{violation.code}[/bold], {left} left today"
        )
    finally:
        gov.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="paymaster-demo.db", help="SQLite file (recreated)")
    db = parser.parse_args().db
    for suffix in ("", "-wal", "-shm"):
        Path(db + suffix).unlink(missing_ok=True)

    with run_localstripe() as server:
        merchant = server.client()
        alice = str(merchant.v1.customers.create(params={"name": "Alice"}).id)
        mallory = str(merchant.v1.customers.create(params={"name": "Mallory"}).id)
        payments = [pay(merchant, alice, 4000) for _ in range(4)]
        console.print(f"localstripe on {server.url}: {alice} (Alice) paid $40.00 four times")

        gov = Governor(f"sqlite:///{db}", policies=load_policies(POLICIES))
        # This run may only touch Alice's payments: a run policy narrows the agent's policy.
        run_policy = RunPolicy(customers=[alice])
        agent_stripe = governed_client(
            gov,
            "sk_test_demo",
            agent="refund-agent",
            run="run-42",
            run_policy=run_policy,
            base_addresses={"api": server.url},
        )

        console.rule("[bold]1. A runaway loop: the agent keeps refunding $20.00")
        for attempt in range(1, 9):
            payment = payments[(attempt - 1) // 2 % len(payments)]
            try:
                refund = agent_stripe.v1.refunds.create(
                    params={"payment_intent": payment, "amount": 2000}
                )
                console.print(f"  attempt {attempt}: allowed  {refund.id} on {payment}")
            except PolicyViolation as violation:
                console.print(
                    f"  attempt {attempt}: [bold red]PolicyViolation[/bold red] "
                    f"{escape(str(violation))}"
                )
                break
        console.print(f"  the Stripe server refunded {refunded(merchant).format()} in all")

        console.rule("[bold]2. A second process finds the budget already spent")
        child = multiprocessing.get_context("spawn").Process(
            target=second_process, args=(db, server.url, payments[-1])
        )
        child.start()
        child.join()

        console.rule("[bold]3. A refund for a customer outside the run's allowlist")
        other = pay(merchant, mallory, 1000)
        try:
            agent_stripe.v1.refunds.create(params={"payment_intent": other, "amount": 500})
        except PolicyViolation as violation:
            console.print(
                f"  [bold red]{escape(str(violation))}[/bold red] "
                "(the customer comes from the payment, looked up first)"
            )

        console.rule("[bold]4. An operator revokes the run: the next call is refused")
        agent_stripe.v1.customers.retrieve(alice)
        console.print(f"  a free look-up (GET /v1/customers/{alice}) is still allowed")
        gov.revoke(run="run-42", reason="runaway refund loop", by="on-call")
        try:
            agent_stripe.v1.customers.retrieve(alice)
        except PolicyViolation as violation:
            console.print(f"  after the revoke: [bold red]{escape(str(violation))}[/bold red]")

        console.rule("[bold]5. The audit log")
        summary = gov.audit.run_summary("run-42")
        table = Table(title=f"run {summary.run}: {summary.calls} calls")
        table.add_column("outcome")
        table.add_column("calls", justify="right")
        for outcome, count in sorted(summary.outcomes.items()):
            table.add_row(outcome, str(count))
        table.add_row("[bold]spent", ", ".join(m.format() for m in summary.spend.values()))
        console.print(table)
        rows = Table(title="every call (all runs)")
        for column in ("id", "run", "method", "endpoint", "outcome", "cost", "code"):
            rows.add_column(column)
        for record in gov.audit.query():
            cost = record.cost.format() if record.cost else "-"
            rows.add_row(
                str(record.id),
                record.run or "-",
                record.method,
                record.endpoint,
                record.outcome,
                cost,
                record.violation_code or "",
            )
        console.print(rows)
        verdict = gov.audit.verify()
        console.print(
            f"audit chain verified: {verdict.ok} ({verdict.rows_checked} rows); "
            f"ledger file: {Path(db).resolve()}"
        )
        gov.close()


if __name__ == "__main__":
    main()
