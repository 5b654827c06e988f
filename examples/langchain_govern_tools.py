"""Governing your own LangChain tools: three lines around the tools you already have.

Offline: your refund tool calls a local Stripe-compatible server (localstripe), a scripted
chat model keeps asking for $25.00 refunds, and paymaster stops the run at the $100 daily
cap, even through a ToolRetryMiddleware that would otherwise retry the refusal.

    python examples/langchain_govern_tools.py [--db ledger.db]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import ToolRetryMiddleware
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from rich.console import Console
from rich.markup import escape

from paymaster import FREE, Governor, Money, PolicyViolation, ToolSpec, load_policies
from paymaster.testing.localstripe import run_localstripe
from paymaster_langchain import govern_tools
from paymaster_langchain.testing import ScriptedChatModel

console = Console()


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
    @tool
    def issue_refund(payment_intent: str, amount: int) -> dict:
        """Refund part of a payment; amount in cents."""
        refund = stripe.v1.refunds.create(
            params={"payment_intent": payment_intent, "amount": amount}
        )
        return {"id": refund.id, "amount": refund.amount}

    @tool
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
                actual=lambda output: output["amount"],
            ),
            "lookup_payment": FREE,
        },
    )

    def turn(n: int, name: str, args: dict[str, Any]) -> AIMessage:
        return AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"call_{n}"}])

    refund = {"payment_intent": payment, "amount": 2500}
    model = ScriptedChatModel(
        messages=iter(
            [turn(0, "lookup_payment", {"payment_intent": payment})]
            + [turn(n, "issue_refund", refund) for n in range(1, 7)]
            + [AIMessage("All refunded.")]
        )
    )
    agent = create_agent(
        model, tools=tools, name="refund-agent", middleware=[ToolRetryMiddleware(max_retries=3)]
    )
    try:
        agent.invoke(
            {"messages": [("user", "Refund me, again and again.")]},
            config={"metadata": {"run_id": "demo-run"}},
        )
    except PolicyViolation as violation:
        console.print(f"[bold red]run stopped[/bold red]: {escape(str(violation))}")
    for row in governor.audit.query(run="demo-run"):
        cost = row.cost.format() if row.cost else "-"
        console.print(f"  {row.tool_call_id:7} {row.endpoint:24} {row.outcome:8} {cost}")
    governor.close()
