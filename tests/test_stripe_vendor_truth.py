"""Proof against Stripe's own record (issue 14): the fake Stripe upstream's books, and a
seeded simulation of agents on paymaster's real Stripe paths (the governed client, the
prebuilt tools, two proxy processes) checked against them on each backend.

The driver is ``tests/stripe_sim.py`` (``python tests/stripe_sim.py`` runs it for longer).
A failing seed is printed with the command that replays it: ``PAYMASTER_SIM_SEED=<seed>``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("stripe")

import stripe

from paymaster.testing.stripe_upstream import Fault, StripeUpstream
from stripe_sim import DEFAULT_SEED, SEED_ENV, SHORT, SHORT_SEEDS, simulate

SEEDS = (
    [int(os.environ[SEED_ENV])]
    if os.environ.get(SEED_ENV)
    else [DEFAULT_SEED + i for i in range(SHORT_SEEDS)]
)


@pytest.fixture
def upstream() -> Iterator[StripeUpstream]:
    with StripeUpstream() as fake:
        yield fake


def client(fake: StripeUpstream, timeout: float = 30) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_a",
        base_addresses={"api": fake.url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


def customer(c: stripe.StripeClient, label: str = "a") -> str:
    return str(c.v1.customers.create(params={"name": "x", "metadata": {"label": label}}).id)


# -- the fake's own behaviour --------------------------------------------------------------
def test_a_replayed_key_answers_the_first_response_and_moves_money_once(
    upstream: StripeUpstream,
) -> None:
    c = client(upstream)
    cus = customer(c)
    params = {"amount": 1200, "currency": "usd", "customer": cus, "confirm": True}
    first = c.v1.payment_intents.create(params=params, options={"idempotency_key": "k1"})
    again = c.v1.payment_intents.create(params=params, options={"idempotency_key": "k1"})
    assert again.id == first.id
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    with pytest.raises(stripe.IdempotencyError):
        c.v1.payment_intents.create(
            params={**params, "amount": 1300}, options={"idempotency_key": "k1"}
        )
    assert upstream.totals() == {("a", "usd"): 1200}


@pytest.mark.parametrize(
    ("fault", "acts"),
    [
        (Fault.RATE_LIMITED, False),
        (Fault.ERROR_BEFORE, False),
        (Fault.ERROR_AFTER, True),
        (Fault.LOST_AFTER, True),
    ],
)
def test_each_fault_acts_or_not_and_a_retry_replays_or_acts(
    upstream: StripeUpstream, fault: Fault, acts: bool
) -> None:
    c = client(upstream)
    params = {"amount": 700, "currency": "usd", "customer": customer(c), "confirm": True}
    upstream.script("k", fault)
    with pytest.raises(stripe.StripeError):
        c.v1.payment_intents.create(params=params, options={"idempotency_key": "k"})
    assert len(upstream.movements()) == int(acts)
    retry = c.v1.payment_intents.create(params=params, options={"idempotency_key": "k"})
    assert (retry.last_response.headers.get("Idempotent-Replayed") == "true") is acts
    assert [m.amount for m in upstream.movements()] == [700]


def test_a_slow_request_is_in_flight_until_released(upstream: StripeUpstream) -> None:
    c, slow = client(upstream), client(upstream, timeout=0.3)
    intent = c.v1.payment_intents.create(
        params={"amount": 5000, "currency": "usd", "customer": customer(c), "confirm": True}
    )
    upstream.script("r", Fault.SLOW)
    params = {"payment_intent": intent.id}
    with pytest.raises(stripe.APIConnectionError):  # the client's timeout
        slow.v1.refunds.create(params=params, options={"idempotency_key": "r"})
    with pytest.raises(stripe.StripeError) as in_flight:
        c.v1.refunds.create(params=params, options={"idempotency_key": "r"})
    assert in_flight.value.http_status == 409
    assert upstream.release("r") == 1
    assert c.v1.refunds.create(params=params, options={"idempotency_key": "r"}).amount == 5000
    with pytest.raises(stripe.InvalidRequestError):  # nothing remains to refund
        c.v1.refunds.create(params={"charge": intent.latest_charge, "amount": 1})
    assert [(m.kind, m.amount) for m in upstream.movements()] == [
        ("charge", 5000),
        ("refund", 5000),
    ]


def test_finalize_charges_the_amount_due_when_it_advances(upstream: StripeUpstream) -> None:
    c = client(upstream)
    cus = customer(c)
    invoice = c.v1.invoices.create(params={"customer": cus, "auto_advance": False})
    arrived, proceed = upstream.gate_finalize(str(invoice.id))
    c.v1.invoice_items.create(
        params={"customer": cus, "amount": 800, "currency": "usd", "invoice": invoice.id}
    )

    def add_while_finalizing() -> None:
        arrived.wait(30)
        c.v1.invoice_items.create(
            params={"customer": cus, "amount": 200, "currency": "usd", "invoice": invoice.id}
        )
        proceed.set()

    adder = threading.Thread(target=add_while_finalizing)
    adder.start()
    paid = c.v1.invoices.finalize_invoice(invoice.id, params={"auto_advance": True})
    adder.join()
    assert (paid.status, paid.amount_due, paid.amount_paid) == ("paid", 1000, 1000)
    assert [(m.kind, m.amount, m.source) for m in upstream.movements()] == [
        ("charge", 1000, invoice.id)
    ]
    sent = c.v1.invoices.create(params={"customer": cus, "collection_method": "send_invoice"})
    c.v1.invoice_items.create(
        params={"customer": cus, "amount": 300, "currency": "usd", "invoice": sent.id}
    )
    assert c.v1.invoices.finalize_invoice(sent.id).status == "open"  # the customer pays
    assert len(upstream.movements()) == 1


# -- the simulation -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_simulation_stripe_never_moves_more_than_the_ledger_allows(db_url: str, seed: int) -> None:
    """The governed client (threads, asyncio), the tools and two proxies against three
    budgets, with faults: every invariant holds per budget (see ``stripe_sim``)."""
    report = simulate(seed, db_url, SHORT)
    print(report.line())
    if report.failures:
        pytest.fail(report.failure_text(), pytrace=False)
