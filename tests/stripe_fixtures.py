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
        "id": "refunds", "agent": "refund-agent", "vendor": "stripe", "currency": "USD",
        "daily_cap": "100.00", "per_call_cap": "50.00", "endpoints": REFUND_ENDPOINTS,
    }  # fmt: skip
    fields.update(overrides)
    return Policy.model_validate(fields)


def paid_intent(server: LocalStripe, amount: int = 2000, currency: str = "usd") -> str:
    """A succeeded PaymentIntent, made with an ungoverned client; returns its id."""
    intent = server.client().v1.payment_intents.create(
        params={"amount": amount, "currency": currency, "payment_method": "pm_card_visa",
                "confirm": True}
    )  # fmt: skip
    return str(intent.id)


def refunds_of(server: LocalStripe, intent: str) -> list[int]:
    """The amounts localstripe refunded on a PaymentIntent."""
    refunds = server.client().v1.refunds.list(params={"limit": 100})
    return [r.amount for r in refunds.data if r.payment_intent == intent]
