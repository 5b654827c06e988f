"""The framework-neutral prebuilt Stripe tools: their specs, and each one run through a
governed client (against localstripe where it implements the endpoint; otherwise against
a transport that answers as Stripe documents, recording what was sent)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import stripe
from pydantic import ValidationError
from requests.structures import CaseInsensitiveDict

from paymaster import GovernanceUnavailable, Governor, Policy, PolicyViolation, ViolationCode
from paymaster.testing.localstripe import LocalStripe, run_localstripe
from paymaster.vendors.stripe import CATALOGUE, InvalidStripeRequest
from paymaster.vendors.stripe._tools import (
    STRIPE_TOOLS,
    StripeToolkit,
    idempotency_key,
    select_tools,
    tool_failure_text,
)

ALL_ENDPOINTS = sorted({op.path.split("/{")[0] for op in CATALOGUE})


@pytest.fixture(scope="module")
def ls() -> Iterator[LocalStripe]:
    with run_localstripe() as server:
        yield server


def ops_policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "id": "ops",
        "agent": "ops-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "per_call_cap": "50.00",
        "endpoints": ALL_ENDPOINTS,
    }
    fields.update(overrides)
    return Policy.model_validate(fields)


# -- the specs -----------------------------------------------------------------------------
def test_the_set_covers_stripe_agent_toolkit_0_6_local_tools() -> None:
    assert set(STRIPE_TOOLS) == {
        "create_customer",
        "list_customers",
        "create_product",
        "list_products",
        "create_price",
        "list_prices",
        "create_payment_link",
        "create_invoice",
        "create_invoice_item",
        "finalize_invoice",
        "retrieve_balance",
        "create_refund",
        "list_payment_intents",
        "retrieve_payment_intent",
    }


@pytest.mark.parametrize("tool", list(STRIPE_TOOLS.values()), ids=list(STRIPE_TOOLS))
def test_every_tool_is_fully_specified(tool: Any) -> None:
    assert len(tool.description) > 30
    schema = tool.args_schema.model_json_schema()
    assert schema.get("additionalProperties") is False
    assert all(CATALOGUE[name] for name in tool.operations)
    for field in schema.get("properties", {}).values():
        assert field.get("description"), f"{tool.name}: every argument explains itself"
    if "amount" in schema.get("properties", {}) or "unit_amount" in schema.get("properties", {}):
        assert "smallest unit" in tool.description + json.dumps(schema)


def test_only_names_unknown_tools_clearly() -> None:
    assert [t.name for t in select_tools(["create_refund", "list_customers"])] == [
        "create_refund",
        "list_customers",
    ]
    with pytest.raises(ValueError, match=r"'refund_everything'.*choose from"):
        select_tools(["refund_everything"])


def test_idempotency_keys_name_one_tool_call() -> None:
    args = STRIPE_TOOLS["create_refund"].arguments({"payment_intent": "pi_1", "amount": 5})
    other = STRIPE_TOOLS["create_refund"].arguments({"payment_intent": "pi_1", "amount": 6})
    key = idempotency_key("create_refund", "run-1", "call_1", args)
    assert key == idempotency_key("create_refund", "run-1", "call_1", args)
    assert key is not None and key.startswith("paymaster-")
    assert key != idempotency_key("create_refund", "run-2", "call_1", args)
    assert key != idempotency_key("create_refund", "run-1", "call_2", args)
    assert key != idempotency_key("create_refund", "run-1", "call_1", other)
    assert idempotency_key("create_refund", "run-1", None, args) is None


def test_what_the_model_is_told_and_what_ends_the_run() -> None:
    refused = PolicyViolation(ViolationCode.CAP_EXCEEDED, "over the cap")
    assert tool_failure_text(refused, tell_model_violations=False) is None
    told = tool_failure_text(refused, tell_model_violations=True)
    assert told is not None and "cap_exceeded" in told and "Do not retry" in told
    invalid = tool_failure_text(
        InvalidStripeRequest("KWD amounts end in 0"), tell_model_violations=False
    )
    assert invalid == "Invalid request, nothing was sent: KWD amounts end in 0"
    assert tool_failure_text(GovernanceUnavailable("db down"), tell_model_violations=True) is None
    with pytest.raises(ValidationError) as bad_args:
        STRIPE_TOOLS["create_refund"].arguments({"payment_intent": "pi_1", "amount": -1})
    assert "amount" in (tool_failure_text(bad_args.value, tell_model_violations=False) or "")
    declined = stripe.CardError("Your card was declined.", None, "card_declined", http_status=402)
    assert tool_failure_text(declined, tell_model_violations=False) == (
        "Stripe refused the call (HTTP 402 card_declined): Your card was declined."
    )
    assert tool_failure_text(RuntimeError("bug"), tell_model_violations=True) is None


# -- run through a governed client ---------------------------------------------------------
def test_the_tools_localstripe_implements_run_governed_and_audited(
    make_governor: Callable[..., Governor], ls: LocalStripe
) -> None:
    gov = make_governor(ops_policy())
    kit = StripeToolkit(gov, ls.client(), agent="ops-agent")
    customer = kit.invoke(
        "create_customer", {"name": "Ada", "email": "ada@example.com"}, run="r1", tool_call_id="c1"
    )
    assert customer["object"] == "customer"
    assert any(c["id"] == customer["id"] for c in kit.invoke("list_customers", {})["data"])
    product = kit.invoke("create_product", {"name": "Widget"}, run="r1", tool_call_id="c2")
    assert kit.invoke("list_products", {"limit": 5})["object"] == "list"
    assert "available" in kit.invoke("retrieve_balance", {})
    intent = ls.client().v1.payment_intents.create(
        params={
            "amount": 3000,
            "currency": "usd",
            "customer": customer["id"],
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    found = kit.invoke("retrieve_payment_intent", {"payment_intent": intent.id})
    assert found["amount"] == 3000
    assert kit.invoke("list_payment_intents", {"limit": 3})["object"] == "list"
    refund = kit.invoke(
        "create_refund", {"payment_intent": intent.id, "amount": 1200}, run="r1", tool_call_id="c3"
    )
    assert refund["amount"] == 1200
    assert product["name"] == "Widget"
    audited = [
        (
            r.method,
            r.endpoint.rsplit("/", 1)[0] if "_" in r.endpoint.rsplit("/", 1)[-1] else r.endpoint,
            r.outcome,
        )
        for r in gov.audit.query()
    ]
    assert ("POST", "/v1/refunds", "allowed") in audited
    assert ("GET", "/v1/balance", "allowed") in audited
    assert gov.audit.run_summary("r1").spend["USD"].amount == 1200


class StripeShaped(stripe.RequestsClient):
    """Answers as Stripe's API reference documents, for the endpoints localstripe lacks,
    and records what it was sent (method, path, parameters)."""

    def __init__(self, answers: Mapping[tuple[str, str], dict[str, Any]]) -> None:
        super().__init__()
        self.answers = answers
        self.sent: list[tuple[str, str, dict[str, str]]] = []

    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> tuple[str, int, Any]:
        path = urlsplit(url).path
        params = dict(parse_qsl(post_data or urlsplit(url).query))
        self.sent.append((method.upper(), path, params))
        body = self.answers[(method.upper(), path)]
        return json.dumps(body), 200, CaseInsensitiveDict({"Request-Id": "req_doc"})


def test_the_other_tools_send_what_stripe_documents(
    make_governor: Callable[..., Governor], ls: LocalStripe
) -> None:
    gov = make_governor(ops_policy())
    transport = StripeShaped(
        {
            ("POST", "/v1/prices"): {"id": "price_1", "object": "price", "unit_amount": 500},
            ("GET", "/v1/prices"): {"object": "list", "data": []},
            ("POST", "/v1/payment_links"): {
                "id": "plink_1",
                "object": "payment_link",
                "url": "https://buy.stripe.com/x",
            },
            ("POST", "/v1/invoices"): {"id": "in_1", "object": "invoice"},
            ("POST", "/v1/invoiceitems"): {"id": "ii_1", "object": "invoiceitem"},
            ("GET", "/v1/invoices/in_1"): {
                "id": "in_1",
                "object": "invoice",
                "currency": "usd",
                "collection_method": "send_invoice",
                "amount_due": 500,
                "customer": "cus_1",
                "status": "draft",
            },
            ("POST", "/v1/invoices/in_1/finalize"): {
                "id": "in_1",
                "object": "invoice",
                "currency": "usd",
                "status": "open",
                "collection_method": "send_invoice",
                "amount_due": 500,
                "customer": "cus_1",
            },
        }
    )
    client = stripe.StripeClient("sk_test_x", http_client=transport)
    kit = StripeToolkit(gov, client, agent="ops-agent")
    kit.invoke("create_price", {"product": "prod_1", "unit_amount": 500, "currency": "usd"})
    kit.invoke("list_prices", {"product": "prod_1"})
    link = kit.invoke("create_payment_link", {"price": "price_1", "quantity": 2})
    kit.invoke("create_invoice", {"customer": "cus_1"})
    kit.invoke("create_invoice_item", {"customer": "cus_1", "price": "price_1", "invoice": "in_1"})
    kit.invoke("finalize_invoice", {"invoice": "in_1"})
    assert link["url"].startswith("https://")
    assert transport.sent == [
        ("POST", "/v1/prices", {"product": "prod_1", "unit_amount": "500", "currency": "usd"}),
        ("GET", "/v1/prices", {"product": "prod_1", "limit": "10"}),
        ("POST", "/v1/payment_links", {"price": "price_1", "quantity": "2"}),
        (
            "POST",
            "/v1/invoices",
            {"customer": "cus_1", "days_until_due": "30", "collection_method": "send_invoice"},
        ),
        ("GET", "/v1/invoices/in_1", {}),  # an item only goes on a draft that cannot charge
        ("POST", "/v1/invoiceitems", {"customer": "cus_1", "price": "price_1", "invoice": "in_1"}),
        ("GET", "/v1/invoices/in_1", {}),  # finalize is priced from the invoice first
        ("GET", "/v1/invoices/in_1", {}),  # and read again once the ledger holds it
        ("POST", "/v1/invoices/in_1/finalize", {}),
    ]
    assert all(
        r.outcome == "allowed" and r.vendor_request_id == "req_doc" for r in gov.audit.query()
    )
    assert gov.budgets()[0].committed.amount == 0  # the customer pays a sent invoice
