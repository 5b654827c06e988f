"""Governing your own Agents SDK tools: three lines around the tools you already have.

Offline: your refund tool calls a local Stripe-compatible server (localstripe), a scripted
model keeps asking for $25.00 refunds, and paymaster stops the run at the $100 daily cap.

    python examples/openai_agents_govern_tools.py [--db ledger.db]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call
from rich.console import Console
from rich.markup import escape

from paymaster import FREE, Governor, Money, PolicyViolation, ToolSpec, load_policies
from paymaster.testing.localstripe import run_localstripe
from paymaster_openai_agents import govern_tools

console = Console()
set_tracing_disabled(True)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--db", help="the SQLite ledger file to keep (default: a temporary one)")
args = parser.parse_args()

with run_localstripe() as server, tempfile.TemporaryDirectory() as tmp:
    ledger = args.db or f"{tmp}/ledger.db"
    stripe = server.client()
    payment = stripe.v1.payment_intents.create(
        params={
            "amount": 50000,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    ).id

    # Your existing tools, unchanged.
    @function_tool
    def issue_refund(payment_intent: str, amount: int) -> dict:
        """Refund part of a payment; amount in cents."""
        refund = stripe.v1.refunds.create(
            params={"payment_intent": payment_intent, "amount": amount}
        )
        return {"id": refund.id, "amount": refund.amount}

    @function_tool
    def lookup_payment(payment_intent: str) -> str:
        """Look a payment up."""
        return str(stripe.v1.payment_intents.retrieve(payment_intent).status)

    # The integration: one spec per tool, then govern_tools.
    governor = Governor(
        f"sqlite:///{ledger}", policies=load_policies(Path(__file__).with_name("policies.yaml"))
    )
    tools = govern_tools(
        [issue_refund, lookup_payment],
        governor,
        specs={
            "issue_refund": ToolSpec(
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=lambda args: Money(args["amount"], "USD"),
                actual=lambda result: result["amount"],
            ),
            "lookup_payment": FREE,
        },
    )

    refund = {"payment_intent": payment, "amount": 2500}
    model = ScriptedModel(
        [[function_call("lookup_payment", {"payment_intent": payment}, call_id="call_0")]]
        + [[function_call("issue_refund", refund, call_id=f"call_{n}")] for n in range(1, 7)]
        + [[assistant_message("All refunded.")]]
    )
    agent = Agent(name="refund-agent", tools=tools, model=model)
    try:
        Runner.run_sync(agent, "Refund me, again and again.", context={"run_id": "demo-run"})
    except PolicyViolation as violation:
        console.print(f"[bold red]run stopped[/bold red]: {escape(str(violation))}")
    for row in governor.audit.query(run="demo-run"):
        cost = row.cost.format() if row.cost else "-"
        console.print(f"  {row.tool_call_id:7} {row.endpoint:24} {row.outcome:8} {cost}")
    governor.close()
