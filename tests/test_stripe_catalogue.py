"""The Stripe operation catalogue and cost model (paymaster.vendors.stripe._catalogue): pure."""

from __future__ import annotations

from typing import Any

import pytest

from paymaster import Money, PolicyViolation, ViolationCode
from paymaster.vendors.stripe._catalogue import (
    CATALOGUE,
    Catalogue,
    Cost,
    InvalidStripeRequest,
    Operation,
    Quote,
    StripeRequest,
    actual_cost,
)
from paymaster.vendors.stripe._currency import StripeAmountError

REFUND = CATALOGUE["refunds.create"]
CREATE_INTENT = CATALOGUE["payment_intents.create"]


FORM = "application/x-www-form-urlencoded"


def post(path: str, body: str = "") -> StripeRequest:
    return StripeRequest.parse("POST", f"https://api.stripe.com{path}", body, content_type=FORM)


def get(path: str) -> StripeRequest:
    return StripeRequest.parse("GET", f"https://api.stripe.com{path}")


def charge(
    *, amount: int = 5000, refunded: int = 0, currency: str = "usd", customer: Any = None
) -> dict[str, Any]:
    return {
        "id": "ch_123",
        "object": "charge",
        "amount": amount,
        "amount_refunded": refunded,
        "currency": currency,
        "customer": customer,
    }


def intent(
    *, amount: int = 2000, refunded: int = 0, currency: str = "usd", customer: Any = None
) -> dict[str, Any]:
    return {
        "id": "pi_123",
        "object": "payment_intent",
        "amount": amount,
        "currency": currency,
        "amount_received": amount,
        "customer": customer,
        "latest_charge": charge(amount=amount, refunded=refunded, currency=currency),
    }


# -- StripeRequest.parse ------------------------------------------------------------------
def test_parse_reads_method_path_and_form_body() -> None:
    request = StripeRequest.parse(
        "post",
        "https://api.stripe.com/v1/refunds",
        b"payment_intent=pi_123&amount=500&metadata[order]=42&metadata%5Bnote%5D=x&reason=duplicate",
        content_type=f"{FORM}; charset=utf-8",
    )
    assert request.method == "POST"
    assert request.path == "/v1/refunds"
    assert dict(request.params) == {
        "reason": "duplicate",
        "payment_intent": "pi_123",
        "amount": "500",
    }
    assert request.roots == {"payment_intent", "amount", "metadata", "reason"}


def test_parse_reads_a_get_from_its_query_string() -> None:
    request = get("/v1/payment_intents?customer=cus_1&limit=3&expand[]=data.customer")
    assert dict(request.params) == {"customer": "cus_1", "limit": "3"}


@pytest.mark.parametrize(
    ("method", "url", "body", "content_type", "match"),
    [
        # Another body encoding could be read differently by Stripe: multipart metadata
        # carrying "&amount=1" would be priced at a cent by a form parser.
        (
            "POST",
            "/v1/refunds",
            "payment_intent=pi_1",
            "multipart/form-data; boundary=x",
            "form-urlencoded only",
        ),
        ("POST", "/v1/refunds", "payment_intent=pi_1", None, "unlabelled"),
        (
            "POST",
            "/v1/refunds?amount=1",
            "payment_intent=pi_1&amount=100000",
            FORM,
            "not the query string",
        ),
        ("GET", "/v1/balance", "amount=1", None, "has no body"),
        ("POST", "/v1/refunds", b"payment_intent=pi_1&note=\xff", FORM, "not UTF-8"),
        # Names Stripe's form encoding never produces, which Rack may read as `amount`.
        ("POST", "/v1/refunds", "payment_intent=pi_1&[amount]=90000000", FORM, "parameter name"),
        ("POST", "/v1/refunds", "payment_intent=pi_1&amount]=90000000", FORM, "parameter name"),
        ("POST", "/v1/refunds", "payment_intent=pi_1&amount[x]=9", FORM, "single value"),
    ],
)
def test_requests_stripe_might_read_differently_are_refused(
    method: str, url: str, body: str | bytes, content_type: str | None, match: str
) -> None:
    with pytest.raises(InvalidStripeRequest, match=match):
        StripeRequest.parse(method, f"https://api.stripe.com{url}", body, content_type=content_type)


def test_the_fingerprint_covers_every_parameter_and_the_account() -> None:
    base = post("/v1/refunds", "payment_intent=pi_1&amount=100")
    assert base.fingerprint == post("/v1/refunds", "payment_intent=pi_1&amount=100").fingerprint
    assert base.fingerprint != post("/v1/refunds", "payment_intent=pi_2&amount=100").fingerprint
    nested = post("/v1/refunds", "payment_intent=pi_1&amount=100&metadata[a]=1")
    assert base.fingerprint != nested.fingerprint
    other_account = StripeRequest.parse(
        "POST",
        "https://api.stripe.com/v1/refunds",
        "payment_intent=pi_1&amount=100",
        content_type=FORM,
        account="acct_2",
    )
    assert base.fingerprint != other_account.fingerprint


def test_parse_accepts_a_str_body_and_no_body() -> None:
    assert dict(post("/v1/customers").params) == {}
    assert dict(post("/v1/refunds", "charge=ch_1").params) == {"charge": "ch_1"}
    assert dict(StripeRequest.parse("GET", "https://api.stripe.com/v1/balance").params) == {}


def test_parse_canonicalises_a_trailing_slash_and_percent_encoding() -> None:
    assert post("/v1/refunds/").path == "/v1/refunds"
    assert get("/v1/customers/cus%5F123").path == "/v1/customers/cus_123"


def test_nested_keys_are_never_priced_even_when_they_look_like_amounts() -> None:
    request = post("/v1/payment_intents", "amount=100&currency=usd&metadata[amount]=999999")
    assert dict(request.params) == {"amount": "100", "currency": "usd"}
    assert CREATE_INTENT.quote(request).estimate == Money(100, "USD")


@pytest.mark.parametrize("param", ["amount", "currency", "customer", "charge", "payment_intent"])
def test_a_priced_param_sent_twice_with_different_values_is_refused(param: str) -> None:
    with pytest.raises(InvalidStripeRequest, match=param):
        post("/v1/refunds", f"{param}=a_1&{param}=b_2")


def test_a_priced_param_repeated_with_the_same_value_is_accepted() -> None:
    assert post("/v1/refunds", "amount=500&amount=500").params["amount"] == "500"


def test_an_unpriced_param_may_repeat() -> None:
    assert post("/v1/refunds", "reason=duplicate&reason=fraudulent").params["reason"] == (
        "fraudulent"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/refunds/../charges",
        "/v1/refunds/%2e%2e/charges",
        "/v1/refunds/./x",
        "/v1//refunds",
        "/v1/refunds/%252e",
        "/v1/refunds/a%2Fb",
        "/v1/refunds/a\\b",
    ],
)
def test_a_non_canonical_path_is_refused(path: str) -> None:
    with pytest.raises(InvalidStripeRequest, match="refusing the path"):
        post(path)


# -- matching -----------------------------------------------------------------------------
@pytest.mark.parametrize("operation", list(CATALOGUE), ids=lambda op: op.name)
def test_every_operation_is_matched_by_its_own_method_and_path(operation: Operation) -> None:
    path = operation.path.replace("{id}", "xx_123")
    request = StripeRequest.parse(operation.method, f"https://api.stripe.com{path}")
    assert CATALOGUE.match(request) is operation
    other = "DELETE" if operation.method != "DELETE" else "GET"
    assert CATALOGUE.match(StripeRequest.parse(other, f"https://api.stripe.com{path}")) is None


def test_refunds_create_is_post_v1_refunds() -> None:
    assert CATALOGUE.match(post("/v1/refunds", "charge=ch_1&amount=5")) is REFUND
    assert REFUND.cost is Cost.REFUND
    assert REFUND.moves_money
    assert CATALOGUE.match(get("/v1/refunds")) is CATALOGUE["refunds.list"]
    assert CATALOGUE.match(get("/v1/refunds/re_1")) is CATALOGUE["refunds.retrieve"]


def test_customers_retrieve_names_the_customer_from_the_path() -> None:
    request = get("/v1/customers/cus_123")
    operation = CATALOGUE.match(request)
    assert operation is CATALOGUE["customers.retrieve"]
    assert operation.match(request) == "cus_123"
    assert operation.quote(request) == Quote(estimate=None, customer="cus_123")


def test_a_path_literal_is_not_an_object_id() -> None:
    search = get("/v1/customers/search?query=email%3A%27a%40b.c%27")
    assert CATALOGUE["customers.retrieve"].match(search) is None
    assert CATALOGUE.match(search) is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/customers/cus_1"),
        ("POST", "/v1/customers/cus_1"),  # an update
        ("POST", "/v1/payouts"),
        ("POST", "/v1/transfers"),
        ("POST", "/v1/refunds/re_1"),
        ("POST", "/v1/refunds/re_1/cancel"),
        ("GET", "/v1/refundsX"),
        ("GET", "/v1/refunds/re_1/extra"),
        ("GET", "/v2/refunds"),
    ],
)
def test_uncatalogued_requests_match_nothing(method: str, path: str) -> None:
    assert CATALOGUE.match(StripeRequest.parse(method, f"https://api.stripe.com{path}")) is None


def test_catalogue_is_a_named_ordered_collection() -> None:
    assert len(CATALOGUE) == len(list(CATALOGUE))
    assert next(iter(CATALOGUE)).name == "refunds.create"
    with pytest.raises(KeyError):
        CATALOGUE["payouts.create"]
    with pytest.raises(ValueError, match="unique"):
        Catalogue([Operation("a.b", "GET", "/v1/a"), Operation("a.b", "GET", "/v1/b")])
    custom = Catalogue([Operation("things.retrieve", "GET", "/v1/things/{id}")])
    assert custom.match(get("/v1/things/th_1")) is custom["things.retrieve"]


# -- pricing: amounts ---------------------------------------------------------------------
def test_payment_intents_create_costs_its_amount() -> None:
    request = post("/v1/payment_intents", "amount=2000&currency=usd&customer=cus_9")
    assert CREATE_INTENT.lookup_path(request) is None
    assert CREATE_INTENT.quote(request) == Quote(Money(2000, "USD"), "cus_9")
    jpy = post("/v1/payment_intents", "amount=5000&currency=jpy")
    assert CREATE_INTENT.quote(jpy) == Quote(Money(5000, "JPY"), None)


def test_charges_create_costs_its_amount() -> None:
    request = post("/v1/charges", "amount=1230&currency=kwd&customer=cus_9")
    assert CATALOGUE["charges.create"].quote(request) == Quote(Money(1230, "KWD"), "cus_9")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("amount=2000", "'currency'"),
        ("amount=2000&currency=", "'currency'"),
        ("currency=usd", "'amount'"),
        ("amount=12.50&currency=usd", "whole number"),
        ("amount=-5&currency=usd", "whole number"),
        ("amount=1e3&currency=usd", "whole number"),
        ("amount=1235&currency=kwd", "end in 0"),
        ("amount=150&currency=isk", "multiples of 100"),
        ("amount=100&currency=zzz", "unknown currency"),
    ],
)
def test_an_unpriceable_amount_is_an_invalid_request(body: str, named: str) -> None:
    with pytest.raises(InvalidStripeRequest, match=named):
        CREATE_INTENT.quote(post("/v1/payment_intents", body))


def test_a_superscript_digit_amount_is_an_invalid_request() -> None:
    with pytest.raises(InvalidStripeRequest):
        CREATE_INTENT.quote(post("/v1/payment_intents", "amount=%C2%B2&currency=usd"))


# -- pricing: refunds ---------------------------------------------------------------------
def test_a_refund_of_a_charge_looks_up_the_charge() -> None:
    assert REFUND.lookup_path(post("/v1/refunds", "charge=ch_123&amount=5")) == "/v1/charges/ch_123"


def test_a_refund_of_a_payment_intent_looks_it_up_with_its_latest_charge() -> None:
    request = post("/v1/refunds", "payment_intent=pi_123")
    assert REFUND.lookup_path(request) == "/v1/payment_intents/pi_123?expand%5B%5D=latest_charge"


@pytest.mark.parametrize(
    "body",
    [
        "amount=500",
        "charge=ch_1&payment_intent=pi_1",
        "charge=&payment_intent=",
        "reason=duplicate",
    ],
)
def test_a_refund_must_name_exactly_one_charge_or_payment_intent(body: str) -> None:
    with pytest.raises(InvalidStripeRequest, match="exactly one"):
        REFUND.lookup_path(post("/v1/refunds", body))


@pytest.mark.parametrize("body", ["charge=ch_1%2F..%2Fx", "payment_intent=pi", "charge=../x"])
def test_a_refund_names_a_well_formed_object_id(body: str) -> None:
    with pytest.raises(InvalidStripeRequest, match="not a Stripe object id"):
        REFUND.lookup_path(post("/v1/refunds", body))


def test_free_operations_need_no_look_up() -> None:
    assert CATALOGUE["refunds.list"].lookup_path(get("/v1/refunds")) is None
    assert CATALOGUE["balance.retrieve"].lookup_path(get("/v1/balance")) is None


def test_a_refund_amount_is_priced_in_the_looked_up_currency() -> None:
    request = post("/v1/refunds", "charge=ch_123&amount=500")
    quote = REFUND.quote(request, charge(currency="jpy", amount=5000))
    assert quote.estimate == Money(500, "JPY")
    assert quote.estimate == Money.of(500, "JPY")  # ¥500
    # A currency in the request cannot override the payment's.
    spoofed = post("/v1/refunds", "charge=ch_123&amount=500&currency=usd")
    assert REFUND.quote(spoofed, charge(currency="jpy")).estimate == Money(500, "JPY")


def test_a_refund_without_amount_costs_what_remains_of_the_charge() -> None:
    request = post("/v1/refunds", "charge=ch_123")
    assert REFUND.quote(request, charge(amount=5000, refunded=1200)).estimate == Money(3800, "USD")
    assert REFUND.quote(request, charge(amount=5000)).estimate == Money(5000, "USD")
    assert REFUND.quote(request, charge(amount=5000, refunded=5000)).estimate == Money(0, "USD")


def test_a_refund_without_amount_costs_what_remains_of_the_intents_latest_charge() -> None:
    request = post("/v1/refunds", "payment_intent=pi_123")
    looked_up = intent(amount=2000, refunded=500)
    assert REFUND.quote(request, looked_up).estimate == Money(1500, "USD")
    jpy = intent(amount=5000, refunded=1000, currency="jpy")
    assert REFUND.quote(request, jpy).estimate == Money(4000, "JPY")


def test_an_intent_whose_charge_is_not_expanded_is_bounded_by_what_it_received() -> None:
    request = post("/v1/refunds", "payment_intent=pi_123")
    looked_up = {**intent(amount=2000), "latest_charge": "ch_123", "amount_received": 1800}
    assert REFUND.quote(request, looked_up).estimate == Money(1800, "USD")


def test_a_refund_cannot_be_priced_without_its_look_up() -> None:
    with pytest.raises(InvalidStripeRequest, match="/v1/charges/ch_123"):
        REFUND.quote(post("/v1/refunds", "charge=ch_123&amount=5"))
    with pytest.raises(InvalidStripeRequest, match="no currency"):
        REFUND.quote(post("/v1/refunds", "charge=ch_123&amount=5"), {"object": "charge"})
    with pytest.raises(InvalidStripeRequest, match="what remains"):
        REFUND.quote(post("/v1/refunds", "charge=ch_123"), {"object": "charge", "currency": "usd"})


def test_a_refund_amount_is_checked_against_the_looked_up_currency_rules() -> None:
    with pytest.raises(InvalidStripeRequest, match=r"refunds\.create"):
        REFUND.quote(post("/v1/refunds", "charge=ch_1&amount=150"), charge(currency="isk"))
    with pytest.raises(InvalidStripeRequest, match="end in 0"):
        REFUND.quote(post("/v1/refunds", "charge=ch_1&amount=1235"), charge(currency="kwd"))


@pytest.mark.parametrize(
    "customer",
    ["cus_42", {"id": "cus_42", "object": "customer", "email": "a@example.com"}],
    ids=["id", "expanded"],
)
def test_a_refund_is_for_the_looked_up_objects_customer(customer: Any) -> None:
    request = post("/v1/refunds", "charge=ch_123&amount=5&customer=cus_spoofed")
    assert REFUND.quote(request, charge(customer=customer)).customer == "cus_42"
    by_intent = post("/v1/refunds", "payment_intent=pi_123")
    assert REFUND.quote(by_intent, intent(customer=customer)).customer == "cus_42"


@pytest.mark.parametrize("customer", [None, "", {"object": "customer"}])
def test_a_refund_of_a_guest_payment_names_no_customer(customer: Any) -> None:
    request = post("/v1/refunds", "charge=ch_123&amount=5")
    assert REFUND.quote(request, charge(customer=customer)).customer is None


def test_customer_from_the_param() -> None:
    listing = get("/v1/payment_intents?customer=cus_7&limit=3")
    assert CATALOGUE["payment_intents.list"].quote(listing) == Quote(None, "cus_7")
    assert CATALOGUE["payment_intents.list"].quote(get("/v1/payment_intents")).customer is None
    item = post("/v1/invoiceitems", "customer=cus_8&price=price_1&invoice=in_1")
    draft = {
        "id": "in_1",
        "status": "draft",
        "collection_method": "send_invoice",
        "currency": "usd",
        "customer": "cus_8",
    }
    assert CATALOGUE["invoice_items.create"].quote(item, draft) == Quote(None, "cus_8")


@pytest.mark.parametrize(
    ("name", "request_"),
    [
        ("refunds.list", get("/v1/refunds?limit=3")),
        ("customers.create", post("/v1/customers", "email=a%40b.c")),
        ("products.create", post("/v1/products", "name=Widget")),
        ("prices.create", post("/v1/prices", "unit_amount=500&currency=usd&product=prod_1")),
        ("payment_links.create", post("/v1/payment_links", "line_items[0][price]=price_1")),
        ("balance.retrieve", get("/v1/balance")),
    ],
)
def test_free_operations_quote_no_estimate(name: str, request_: StripeRequest) -> None:
    operation = CATALOGUE[name]
    assert CATALOGUE.match(request_) is operation
    assert not operation.moves_money
    assert operation.quote(request_).estimate is None
    assert actual_cost(operation, {"object": "whatever", "amount": 999, "currency": "usd"}) is None


# -- invoices ------------------------------------------------------------------------------
FINALIZE = CATALOGUE["invoices.finalize_invoice"]


def invoice(collection_method: str, amount_due: int = 5000) -> dict[str, object]:
    return {
        "id": "in_1",
        "object": "invoice",
        "collection_method": collection_method,
        "amount_due": amount_due,
        "currency": "usd",
        "customer": "cus_9",
    }


def test_finalizing_an_invoice_stripe_charges_by_itself_costs_its_amount_due() -> None:
    request = post("/v1/invoices/in_1/finalize")
    assert FINALIZE.lookup_path(request) == "/v1/invoices/in_1"
    quote = FINALIZE.quote(request, invoice("charge_automatically"))
    assert quote == Quote(Money(5000, "USD"), "cus_9")
    assert actual_cost(FINALIZE, invoice("charge_automatically", 4000)) == Money(4000, "USD")


def test_finalizing_an_invoice_the_customer_pays_costs_nothing() -> None:
    quote = FINALIZE.quote(post("/v1/invoices/in_1/finalize"), invoice("send_invoice"))
    assert quote == Quote(None, "cus_9")
    assert actual_cost(FINALIZE, invoice("send_invoice")) is None


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ("customer=cus_1&collection_method=send_invoice&days_until_due=30", False),
        ("customer=cus_1&auto_advance=false", False),
        ("customer=cus_1", True),  # charged automatically and finalized by Stripe itself
        ("customer=cus_1&collection_method=charge_automatically&auto_advance=true", True),
    ],
)
def test_an_invoice_that_would_charge_unpriced_is_refused(body: str, refused: bool) -> None:
    operation = CATALOGUE["invoices.create"]
    request = post("/v1/invoices", body)
    if refused:
        with pytest.raises(InvalidStripeRequest, match="auto_advance=false"):
            operation.quote(request)
    else:
        assert operation.quote(request) == Quote(None, "cus_1")


ITEM = CATALOGUE["invoice_items.create"]


def test_an_invoice_item_must_go_on_a_draft_that_cannot_charge_by_itself() -> None:
    with pytest.raises(InvalidStripeRequest, match="must name its draft invoice"):
        ITEM.lookup_path(post("/v1/invoiceitems", "customer=cus_1&amount=999999&currency=usd"))
    request = post("/v1/invoiceitems", "customer=cus_1&invoice=in_1&amount=999&currency=usd")
    assert ITEM.lookup_path(request) == "/v1/invoices/in_1"
    draft = {**invoice("send_invoice"), "status": "draft", "auto_advance": True}
    assert ITEM.quote(request, draft) == Quote(None, "cus_1")
    manual = {**invoice("charge_automatically"), "status": "draft", "auto_advance": False}
    assert ITEM.quote(request, manual) == Quote(None, "cus_1")
    charging = {**manual, "auto_advance": True}
    with pytest.raises(InvalidStripeRequest, match="charged unpriced"):
        ITEM.quote(request, charging)
    with pytest.raises(InvalidStripeRequest, match="not a draft"):
        ITEM.quote(request, {**draft, "status": "open"})


def test_odd_separators_and_absurd_amounts_are_refused() -> None:
    with pytest.raises(InvalidStripeRequest, match="';'"):
        get("/v1/charges?customer=cus_ok&x=1;customer=cus_other")
    with pytest.raises(InvalidStripeRequest, match="whole number"):
        CREATE_INTENT.quote(post("/v1/payment_intents", f"amount={'9' * 4400}&currency=usd"))


def test_a_customer_balance_is_refused() -> None:
    with pytest.raises(InvalidStripeRequest, match="balance"):
        CATALOGUE["customers.create"].quote(post("/v1/customers", "name=A&balance=-50000"))


# -- actual cost --------------------------------------------------------------------------
def test_actual_cost_reads_the_response() -> None:
    refund = {"id": "re_1", "object": "refund", "amount": 500, "currency": "jpy"}
    assert actual_cost(REFUND, refund) == Money(500, "JPY")
    payment = {"id": "pi_1", "object": "payment_intent", "amount": 1050, "currency": "usd"}
    assert actual_cost(CREATE_INTENT, payment) == Money(1050, "USD")
    assert actual_cost(CREATE_INTENT, {"amount": 500, "currency": "isk"}) == Money(5, "ISK")


@pytest.mark.parametrize(
    "response",
    [
        {},
        {"amount": 500},
        {"currency": "usd"},
        {"amount": "500", "currency": "usd"},
        {"amount": 5.0, "currency": "usd"},
        {"amount": -1, "currency": "usd"},
    ],
)
def test_actual_cost_of_an_unreadable_response_is_an_error(response: dict[str, Any]) -> None:
    with pytest.raises(StripeAmountError):
        actual_cost(REFUND, response)


# -- the violation ------------------------------------------------------------------------
def test_invalid_stripe_request_is_a_policy_violation() -> None:
    with pytest.raises(PolicyViolation) as caught:
        CREATE_INTENT.quote(post("/v1/payment_intents", "amount=5"))
    violation = caught.value
    assert isinstance(violation, InvalidStripeRequest)
    assert isinstance(violation, ValueError)
    assert violation.code is ViolationCode.INVALID_REQUEST
    assert violation.code.value == "invalid_request"
    assert violation.vendor == "stripe"
    assert "currency" in violation.message
    assert str(violation).startswith("[invalid_request] ")
