"""Governed Stripe tools in an OpenAI Agents SDK agent.

Offline by default: a local Stripe-compatible server (localstripe) and a scripted model
that asks for one refund too many. With ``OPENAI_API_KEY`` and ``STRIPE_API_KEY`` (a
test-mode key) set, the same agent runs against OpenAI and Stripe's test mode; pass the
PaymentIntent to refund with ``--payment-intent``.

    python examples/openai_agents_stripe.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import stripe
from agents import Agent, Runner, set_tracing_disabled
from agents.models.interface import Model
from agents.testing import ScriptedModel, assistant_message, function_call
from rich.console import Console
from rich.markup import escape

from paymaster import Governor, PolicyViolation, load_policies
from paymaster.testing.localstripe import run_localstripe
from paymaster_openai_agents import stripe_tools

POLICIES = Path(__file__).with_name("policies.yaml")
console = Console()


@contextlib.contextmanager
def stripe_and_payment(intent: str | None) -> Iterator[tuple[stripe.StripeClient, str]]:
    """Stripe's test mode with a real key, else localstripe with a $60.00 payment."""
    key = os.environ.get("STRIPE_API_KEY")
    if key:
        if not intent:
            raise SystemExit("with STRIPE_API_KEY set, pass --payment-intent pi_...")
        yield stripe.StripeClient(key), intent
        return
    with run_localstripe() as server:
        merchant = server.client()
        paid = merchant.v1.payment_intents.create(
            params={
                "amount": 6000,
                "currency": "usd",
                "payment_method": "pm_card_visa",
                "confirm": True,
            }
        )
        yield merchant, str(paid.id)


def the_model(intent: str) -> Model | str:
    """A real model with an API key; otherwise one that refunds $20.00, then $30.00."""
    if os.environ.get("OPENAI_API_KEY"):
        return "gpt-4.1-mini"
    return ScriptedModel(
        [
            [
                function_call(
                    "create_refund",
                    {"payment_intent": intent, "amount": amount, "reason": None},
                    call_id=f"call_{amount}",
                )
            ]
            for amount in (2000, 3000)
        ]
        + [[assistant_message("Refunded.")]]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payment-intent", help="the PaymentIntent to refund (real Stripe)")
    parser.add_argument("--db", help="the SQLite ledger file to keep (default: a temporary one)")
    args = parser.parse_args()
    set_tracing_disabled(not os.environ.get("OPENAI_API_KEY"))  # no key: no trace export
    with (
        stripe_and_payment(args.payment_intent) as (client, intent),
        tempfile.TemporaryDirectory() as tmp,
        Governor(
            f"sqlite:///{args.db or f'{tmp}/ledger.db'}", policies=load_policies(POLICIES)
        ) as governor,
    ):
        # The one line: governed tools for the refund-agent policy ($25 a call, $100 a day).
        tools = stripe_tools(governor, client, agent="refund-agent", only=["create_refund"])
        agent = Agent(
            name="refund-agent",
            instructions=f"Refund $20.00 of {intent}, then $30.00 more, one refund per turn.",
            tools=tools,
            model=the_model(intent),
        )
        try:
            result = Runner.run_sync(agent, "Please refund me.", context={"run_id": "demo-run"})
            console.print(f"the agent finished: {result.final_output}")
        except PolicyViolation as violation:
            console.print(f"[bold red]the run was stopped[/bold red]: {escape(str(violation))}")
        for row in governor.audit.query(run="demo-run"):
            cost = row.cost.format() if row.cost else "-"
            console.print(f"  {row.method:4} {row.endpoint:40} {row.outcome:8} {cost}")


if __name__ == "__main__":
    main()
