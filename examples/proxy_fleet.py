"""Agents that never hold the real Stripe key: two governing proxies on one ledger.

Runs offline: localstripe (a local Stripe-compatible server) upstream, two real
``paymaster proxy`` processes on one SQLite ledger, and agents using the stock ``stripe``
client with a vault key. Refunds go through either proxy until the $100 daily cap, then
both refuse; a revoke stops both at their next request; a revoked vault key is refused.

    python examples/proxy_fleet.py [--db paymaster-proxy-demo.db]

For a fleet across hosts, point ``--db`` of every ``paymaster proxy`` at PostgreSQL.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import stripe
from rich.console import Console

from paymaster import Governor
from paymaster._vault import VaultKeys
from paymaster.testing.localstripe import run_localstripe
from paymaster.testing.proxy import run_proxy

POLICIES = Path(__file__).parent / "policies.yaml"
console = Console()


def attempt(name: str, client: stripe.StripeClient, payment: str) -> None:
    try:
        refund = client.v1.refunds.create(params={"payment_intent": payment, "amount": 2000})
        console.print(f"  {name}: refunded {refund.id} ${refund.amount / 100:.2f}")
    except stripe.StripeError as refused:
        code = refused.error.code if refused.error else None
        console.print(
            f"  {name}: [bold]{type(refused).__name__}[/bold] {refused.http_status} "
            f"{code}: {refused.user_message}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="paymaster-proxy-demo.db", help="SQLite ledger file")
    db = Path(parser.parse_args().db)
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    with Governor(url, policies=POLICIES) as ledger, run_localstripe() as upstream:
        key = VaultKeys(ledger.engine).create("refund-agent", by="demo").secret
        console.print(
            f"vault key for refund-agent: {key[:16]}... (the real key stays in the "
            "proxies' environment)"
        )
        payment = str(
            upstream.client()
            .v1.payment_intents.create(
                params={
                    "amount": 50_000,
                    "currency": "usd",
                    "payment_method": "pm_card_visa",
                    "confirm": True,
                }
            )
            .id
        )
        with (
            run_proxy(url, POLICIES, upstream.url) as a,
            run_proxy(url, POLICIES, upstream.url) as b,
        ):
            agents = {"agent via proxy A": a.client(key), "agent via proxy B": b.client(key)}
            console.rule("refunds of $20.00 through two proxies; $100.00 a day")
            for i in range(6):
                name = list(agents)[i % 2]
                attempt(name, agents[name], payment)
            console.rule("an operator revokes refund-agent: both proxies refuse")
            ledger.revoke(agent="refund-agent", reason="runaway refunds", by="demo")
            for name, client in agents.items():
                attempt(name, client, payment)
            ledger.restore(agent="refund-agent", reason="investigated", by="demo")
            console.rule("the vault key is revoked: refused before anything is read")
            VaultKeys(ledger.engine).revoke(key, by="demo", reason="rotated")
            attempt("agent via proxy A", agents["agent via proxy A"], payment)
        refunds = upstream.client().v1.refunds.list(params={"limit": 100}).data
        (budget,) = [b for b in ledger.budgets() if b.kind == "daily"]
        console.rule("what the Stripe server and the ledger say")
        console.print(
            f"  localstripe refunded ${sum(r.amount for r in refunds) / 100:.2f} "
            f"in {len(refunds)} refunds; the ledger settled {budget.settled.format()} "
            f"of {budget.cap.format()}"
        )


if __name__ == "__main__":
    main()
