"""Governed Stripe tools in a LangChain agent (``create_agent``).

Offline by default: a local Stripe-compatible server (localstripe) and a scripted chat
model that asks for a refund above the per-call cap. With ``OPENAI_API_KEY`` and
``STRIPE_API_KEY`` (a test-mode key) set and ``langchain-openai`` installed, the same
agent runs against OpenAI and Stripe's test mode; pass ``--payment-intent``.

    python examples/langchain_stripe.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from openai_agents_stripe import stripe_and_payment
from rich.console import Console
from rich.markup import escape

from paymaster import Governor, PolicyViolation, load_policies
from paymaster_langchain import PaymasterStripeToolkit
from paymaster_langchain.testing import ScriptedChatModel

POLICIES = Path(__file__).with_name("policies.yaml")
console = Console()


def the_model(intent: str) -> Any:
    """A real model with an API key; otherwise one that refunds $20.00, then $30.00."""
    if os.environ.get("OPENAI_API_KEY"):
        from langchain.chat_models import init_chat_model

        return init_chat_model("openai:gpt-4.1-mini")
    turns = [
        AIMessage(
            "",
            tool_calls=[
                {
                    "name": "create_refund",
                    "id": f"call_{amount}",
                    "args": {"payment_intent": intent, "amount": amount},
                }
            ],
        )
        for amount in (2000, 3000)
    ]
    return ScriptedChatModel(messages=iter([*turns, AIMessage("Refunded.")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payment-intent", help="the PaymentIntent to refund (real Stripe)")
    parser.add_argument("--db", help="the SQLite ledger file to keep (default: a temporary one)")
    args = parser.parse_args()
    with (
        stripe_and_payment(args.payment_intent) as (client, intent),
        tempfile.TemporaryDirectory() as tmp,
        Governor(
            f"sqlite:///{args.db or f'{tmp}/ledger.db'}", policies=load_policies(POLICIES)
        ) as governor,
    ):
        # The one line: governed tools for the refund-agent policy ($25 a call, $100 a day).
        toolkit = PaymasterStripeToolkit(
            governor, client, agent="refund-agent", only=["create_refund"]
        )
        agent = create_agent(
            the_model(intent),
            tools=toolkit.get_tools(),
            system_prompt=f"Refund $20.00 of {intent}, then $30.00 more, one per turn.",
        )
        try:
            state = agent.invoke(
                {"messages": [("user", "Please refund me.")]},
                config={"metadata": {"run_id": "demo-run"}},
            )
            console.print(f"the agent finished: {state['messages'][-1].content}")
        except PolicyViolation as violation:
            console.print(f"[bold red]the run was stopped[/bold red]: {escape(str(violation))}")
        for row in governor.audit.query(run="demo-run"):
            cost = row.cost.format() if row.cost else "-"
            console.print(f"  {row.method:4} {row.endpoint:40} {row.outcome:8} {cost}")


if __name__ == "__main__":
    main()
