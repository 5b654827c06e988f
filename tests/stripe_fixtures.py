"""Fixtures shared by the tests that drive governed Stripe tools against localstripe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from paymaster import Policy
from paymaster.testing.localstripe import LocalStripe, run_localstripe

REFUND_ENDPOINTS = ["/v1/refunds", "/v1/payment_intents", "/v1/charges"]


@pytest.fixture(scope="module")
def localstripe() -> Iterator[LocalStripe]:
    with run_localstripe() as server:
        yield server


def refund_agent_policy(**overrides: Any) -> Policy:
    """refund-agent: $100 a day, $50 a call, refunds and the look-ups they need."""
    fields: dict[str, Any] = {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "per_call_cap": "50.00",
        "endpoints": REFUND_ENDPOINTS,
    }
    fields.update(overrides)
    return Policy.model_validate(fields)


def paid_intent(server: LocalStripe, amount: int = 2000, currency: str = "usd") -> str:
    """A succeeded PaymentIntent, made with an ungoverned client; returns its id."""
    intent = server.client().v1.payment_intents.create(
        params={
            "amount": amount,
            "currency": currency,
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    return str(intent.id)


def refunds_of(server: LocalStripe, intent: str) -> list[int]:
    """The amounts localstripe refunded on a PaymentIntent."""
    refunds = server.client().v1.refunds.list(params={"limit": 100})
    return [r.amount for r in refunds.data if r.payment_intent == intent]


def assert_every_hold_accounted_for(gov: Any) -> None:
    """No hold is left pending silently: each is settled, released, or kept counted as
    ``unknown`` with an audit row saying so; the budget counts exactly those.

    Closes ``gov`` first: that waits for tool calls whose task was cancelled, which run to
    completion in the governor's worker threads.
    """
    from paymaster import Governor, HoldState, Money

    day = gov.ledger.now().date()  # the test governor's clock, not the wall clock
    gov.close()
    with Governor(
        gov.engine.url.render_as_string(hide_password=False), policies=gov.policies
    ) as fresh:
        unresolved = fresh.holds()
        assert [h for h in unresolved if h.state is HoldState.PENDING] == []
        unknown_rows = {r.hold_id for r in fresh.audit.query(outcome="unknown")}
        assert {h.id for h in unresolved} <= unknown_rows
        (budget,) = [b for b in fresh.budgets(day=day) if b.kind == "daily"]
        kept = sum((h.estimate for h in unresolved), Money.zero(budget.cap.currency))
        assert budget.committed == budget.settled + kept
