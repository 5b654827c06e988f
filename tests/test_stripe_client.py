"""The real ``stripe.StripeClient``, governed, against localstripe, on SQLite and PostgreSQL.

Every test checks real effects on three sides: the ledger (budgets, holds), the audit log,
and localstripe's own state read back through an ungoverned client.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest

pytest.importorskip("stripe")
pytest.importorskip("localstripe")

import stripe
from requests.structures import CaseInsensitiveDict

from conftest import refund_policy
from paymaster import (
    AuditRecord,
    BudgetStatus,
    Governor,
    HoldState,
    Money,
    Policy,
    PolicyViolation,
    ViolationCode,
)
from paymaster.testing.localstripe import TEST_API_KEY, LocalStripe, run_localstripe
from paymaster.vendors.stripe import bind, govern, governed_client
from paymaster.vendors.stripe._client import is_governed

REFUND_ENDPOINTS = ["/v1/refunds", "/v1/payment_intents", "/v1/charges"]
USD_AGENT, JPY_AGENT, PAYMENT_AGENT = "refund-agent", "jpy-refund-agent", "payment-agent"

Response = tuple[Any, int, Mapping[str, str]]


def usd_policy(**overrides: object) -> Policy:
    """refund-agent: USD, $100 a day, $50 a call, refunds and their look-ups."""
    return refund_policy(endpoints=REFUND_ENDPOINTS, **overrides)


JPY_POLICY = Policy.model_validate(
    {
        "id": "jpy-refunds",
        "agent": JPY_AGENT,
        "vendor": "stripe",
        "currency": "JPY",
        "daily_cap": "100000",
        "per_call_cap": "50000",
        "endpoints": REFUND_ENDPOINTS,
    }
)
PAYMENT_POLICY = Policy.model_validate(
    {
        "id": "payments",
        "agent": PAYMENT_AGENT,
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "endpoints": ["/v1/payment_intents"],
    }
)


# -- localstripe and the transports --------------------------------------------------------
@pytest.fixture(scope="module")
def ls() -> Iterator[LocalStripe]:
    """One localstripe for the module; tests make their own payments, so never collide."""
    with run_localstripe() as server:
        yield server


@pytest.fixture(scope="module")
def raw(ls: LocalStripe) -> Any:
    """An ungoverned client: makes the payments and reads localstripe's state back."""
    return ls.client()


@pytest.fixture
def gov(make_governor: Callable[..., Governor]) -> Governor:
    return make_governor(usd_policy(), JPY_POLICY, PAYMENT_POLICY)


class Sent(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]

    @property
    def idempotency_key(self) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == "idempotency-key"), None)


class RecordingTransport(stripe.RequestsClient):
    """The HTTP client under the governed one: records every request it is handed, and
    behaves like real Stripe where localstripe does not.

    * ``request_id``: add a ``Request-Id`` response header, as Stripe does;
    * a POST repeating an ``Idempotency-Key`` gets the first response replayed instead of
      acting again (localstripe ignores the header);
    * ``lose_first_refund``: the first ``POST /v1/refunds`` reaches localstripe, which
      acts, then the response is lost (a retryable ``APIConnectionError``).
    """

    def __init__(self, *, request_id: str | None = None, lose_first_refund: bool = False) -> None:
        super().__init__()
        self.sent: list[Sent] = []
        self.request_id = request_id
        self.lose_first_refund = lose_first_refund
        self._replies: dict[str, Response] = {}

    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> Response:
        sent = Sent(method.upper(), urlsplit(url).path, dict(headers or {}))
        self.sent.append(sent)
        key = sent.idempotency_key if sent.method == "POST" else None
        if key is not None and key in self._replies:
            return self._replies[key]
        body, status, response_headers = super().request(method, url, headers, post_data)
        if self.request_id is not None:
            response_headers = CaseInsensitiveDict(response_headers)
            response_headers["Request-Id"] = self.request_id
        if key is not None:
            self._replies[key] = (body, status, response_headers)
        if self.lose_first_refund and sent.method == "POST" and sent.path == "/v1/refunds":
            self.lose_first_refund = False
            raise stripe.APIConnectionError("lost", should_retry=True)
        return body, status, response_headers

    def posts(self, path: str = "/v1/refunds") -> list[Sent]:
        return [s for s in self.sent if s.method == "POST" and s.path == path]


# -- helpers -------------------------------------------------------------------------------
def governed(gov: Governor, ls: LocalStripe, agent: str | None = USD_AGENT, **kwargs: Any) -> Any:
    return governed_client(gov, TEST_API_KEY, agent=agent, base_addresses={"api": ls.url}, **kwargs)


def paid_intent(
    raw: Any, amount: int = 2000, currency: str = "usd", customer: str | None = None
) -> Any:
    """A succeeded PaymentIntent (its latest charge expanded), made ungoverned."""
    params: dict[str, Any] = {
        "amount": amount,
        "currency": currency,
        "payment_method": "pm_card_visa",
        "confirm": True,
    }
    if customer is not None:
        params["customer"] = customer
    intent = raw.v1.payment_intents.create(params=params)
    assert intent.status == "succeeded"
    return intent


def refunds_of(raw: Any, intent: Any) -> list[int]:
    """The amounts localstripe refunded on a PaymentIntent's charge, smallest first (its
    list order is not stable within a second); by charge, since a refund made with
    ``charge=`` does not name the PaymentIntent."""
    charge = intent.latest_charge.id
    listed = raw.v1.refunds.list(params={"charge": charge, "limit": 100})
    amounts = [r.amount for r in listed.data if r.charge == charge]
    assert raw.v1.charges.retrieve(charge).amount_refunded == sum(amounts)
    return sorted(amounts)


def daily(gov: Governor, agent: str = USD_AGENT) -> BudgetStatus:
    (budget,) = [b for b in gov.budgets() if b.kind == "daily" and b.agent == agent]
    return budget


def rows(gov: Governor, **filters: Any) -> list[AuditRecord]:
    return gov.audit.query(**filters)


def summary(records: list[AuditRecord]) -> list[tuple[str, str, str, int, int]]:
    return [(r.outcome, r.method, r.endpoint, r.estimate, r.actual) for r in records]


# -- money moves, exactly ------------------------------------------------------------------
def test_a_usd_refund_is_settled_at_what_stripe_refunded(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw, 2000)
    client = governed(gov, ls, run="run-usd")
    refund = client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert isinstance(refund, stripe.Refund)
    assert (refund.amount, refund.currency, refund.payment_intent) == (500, "usd", intent.id)

    assert refunds_of(raw, intent) == [500]
    assert raw.v1.charges.retrieve(intent.latest_charge.id).amount_refunded == 500

    lookup, call = rows(gov, run="run-usd")
    assert summary([lookup]) == [("allowed", "GET", f"/v1/payment_intents/{intent.id}", 0, 0)]
    assert (lookup.http_status, lookup.currency) == (200, "USD")
    assert summary([call]) == [("allowed", "POST", "/v1/refunds", 500, 500)]
    assert call.currency == "USD"
    assert call.http_status == 200
    assert call.cost == Money.of("5.00", "USD")
    assert (call.agent, call.run, call.vendor) == (USD_AGENT, "run-usd", "stripe")
    assert call.violation_code is None and call.error is None
    assert call.vendor_request_id is None  # localstripe sends no Request-Id
    assert call.hold_id is not None
    assert gov.ledger.get_hold(call.hold_id).state is HoldState.SETTLED

    budget = daily(gov)
    assert budget.settled == Money.of("5.00", "USD")
    assert budget.committed == Money.of("5.00", "USD")
    assert budget.pending == Money.zero("USD")
    assert budget.calls == 2  # the look-up and the refund
    assert gov.holds() == []
    assert gov.audit.verify().ok


def test_a_jpy_refund_is_500_yen_not_5(gov: Governor, ls: LocalStripe, raw: Any) -> None:
    intent = paid_intent(raw, 5000, "jpy")
    client = governed(gov, ls, agent=JPY_AGENT)
    refund = client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert (refund.amount, refund.currency) == (500, "jpy")
    assert refunds_of(raw, intent) == [500]

    call = rows(gov, agent=JPY_AGENT)[-1]
    assert summary([call]) == [("allowed", "POST", "/v1/refunds", 500, 500)]
    assert call.currency == "JPY"
    assert call.cost == Money(500, "JPY") == Money.of(500, "JPY")
    budget = daily(gov, JPY_AGENT)
    assert budget.settled == Money(500, "JPY")
    assert budget.committed == Money(500, "JPY")
    assert budget.remaining == Money.of(100000 - 500, "JPY")
    assert [b.agent for b in gov.budgets()] == [JPY_AGENT]  # nothing counted in USD


def test_the_refund_currency_is_the_payments_not_the_policys(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw, 5000, "jpy")
    with pytest.raises(PolicyViolation) as caught:
        governed(gov, ls).v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert caught.value.code is ViolationCode.CURRENCY_MISMATCH
    assert refunds_of(raw, intent) == []
    denied = rows(gov, outcome="denied")
    assert [(r.endpoint, r.currency, r.estimate) for r in denied] == [("/v1/refunds", "JPY", 500)]
    assert daily(gov).committed == Money.zero("USD")


# -- refusals before anything is sent --------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "earlier", "amount", "code"),
    [
        (usd_policy(), None, 6000, ViolationCode.PER_CALL_CAP),
        (usd_policy(daily_cap="10.00", per_call_cap=None), 800, 500, ViolationCode.CAP_EXCEEDED),
    ],
    ids=["per_call_cap", "daily_cap"],
)
def test_a_refund_over_the_cap_is_refused_and_not_made(
    make_governor: Callable[..., Governor],
    ls: LocalStripe,
    raw: Any,
    policy: Policy,
    earlier: int | None,
    amount: int,
    code: ViolationCode,
) -> None:
    gov = make_governor(policy)
    intent = paid_intent(raw, 10000)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    expected = []
    if earlier is not None:
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": earlier})
        expected.append(earlier)
    before = daily(gov).committed if earlier is not None else Money.zero("USD")

    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": amount})
    assert caught.value.code is code

    assert refunds_of(raw, intent) == expected
    assert len(transport.posts()) == len(expected)  # the refused POST was never sent
    (denied,) = rows(gov, outcome="denied")
    assert (denied.method, denied.endpoint, denied.estimate, denied.actual) == (
        "POST",
        "/v1/refunds",
        amount,
        0,
    )
    assert (denied.violation_code, denied.currency, denied.hold_id) == (code.value, "USD", None)
    assert daily(gov).committed == before
    assert gov.holds() == []


def test_a_refund_of_what_remains_is_estimated_from_the_looked_up_payment(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw, 2000)
    raw.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})  # ungoverned
    client = governed(gov, ls)
    refund = client.v1.refunds.create(params={"payment_intent": intent.id})

    call = rows(gov)[-1]
    # localstripe refunds the whole charge again (below): above the reservation, that is
    # recorded as an overrun. Real Stripe would refund the 1500 reserved.
    expected = "overrun" if refund.amount > 1500 else "allowed"
    assert (call.outcome, call.endpoint) == (expected, "/v1/refunds")
    assert call.estimate == 1500  # 2000 paid, 500 refunded before
    # localstripe refunds the whole charge again whatever remains (a quirk: real Stripe
    # would refund 1500); the audit and the ledger record what Stripe answered.
    assert call.actual == refund.amount
    assert refunds_of(raw, intent) == sorted([500, refund.amount])
    budget = daily(gov)
    assert budget.settled == Money(refund.amount, "USD")
    assert budget.committed == Money(refund.amount, "USD")
    if refund.amount > 1500:
        over = Money(refund.amount - 1500, "USD").format()
        assert call.error is not None and f"(by {over})" in call.error
        assert [h.id for h in gov.overruns()] == [call.hold_id]
    assert gov.holds() == []


# -- Stripe's own errors -----------------------------------------------------------------
def test_a_refund_of_an_unknown_charge_fails_at_the_look_up(gov: Governor, ls: LocalStripe) -> None:
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.refunds.create(params={"charge": "ch_doesnotexist", "amount": 500})
    assert caught.value.http_status == 404

    assert [(s.method, s.path) for s in transport.sent] == [
        ("GET", "/v1/charges/ch_doesnotexist")
    ]  # the refund itself was never sent
    failed, unpriced = rows(gov)
    assert summary([failed]) == [("failed", "GET", "/v1/charges/ch_doesnotexist", 0, 0)]
    assert (unpriced.outcome, unpriced.endpoint) == ("denied", "/v1/refunds")
    assert unpriced.error is not None and "HTTP 404" in unpriced.error
    assert failed.http_status == 404
    assert failed.error is not None and "invalid_request_error" in failed.error
    assert failed.hold_id is not None
    assert gov.ledger.get_hold(failed.hold_id).state is HoldState.RELEASED
    assert gov.holds() == []
    budget = daily(gov)
    assert (budget.committed, budget.settled, budget.pending) == (Money.zero("USD"),) * 3


def test_a_declined_payment_releases_its_hold(gov: Governor, ls: LocalStripe) -> None:
    client = governed(gov, ls, agent=PAYMENT_AGENT)
    with pytest.raises(stripe.CardError) as caught:
        client.v1.payment_intents.create(
            params={
                "amount": 1000,
                "currency": "usd",
                "payment_method": "pm_card_chargeCustomerFail",
                "confirm": True,
            }
        )
    assert caught.value.http_status == 402
    assert caught.value.code == "card_declined"

    (failed,) = rows(gov, agent=PAYMENT_AGENT)
    assert summary([failed]) == [("failed", "POST", "/v1/payment_intents", 1000, 0)]
    assert (failed.http_status, failed.currency) == (402, "USD")
    assert failed.error is not None and "card_declined" in failed.error
    assert failed.hold_id is not None
    assert gov.ledger.get_hold(failed.hold_id).state is HoldState.RELEASED
    assert gov.holds() == []
    budget = daily(gov, PAYMENT_AGENT)
    assert (budget.committed, budget.settled) == (Money.zero("USD"), Money.zero("USD"))
    assert budget.calls == 1


def test_an_allowed_payment_is_settled_at_its_amount(gov: Governor, ls: LocalStripe) -> None:
    client = governed(gov, ls, agent=PAYMENT_AGENT)
    intent = client.v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    assert intent.status == "succeeded"
    (call,) = rows(gov, agent=PAYMENT_AGENT)
    assert summary([call]) == [("allowed", "POST", "/v1/payment_intents", 1234, 1234)]
    assert daily(gov, PAYMENT_AGENT).settled == Money(1234, "USD")


# -- Request-Id ----------------------------------------------------------------------------
def test_stripes_request_id_is_audited(gov: Governor, ls: LocalStripe, raw: Any) -> None:
    intent = paid_intent(raw)
    client = governed(gov, ls, http_client=RecordingTransport(request_id="req_test123"))
    client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 300})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create(params={"charge": "ch_doesnotexist", "amount": 300})

    records = rows(gov)
    assert [(r.outcome, r.method, r.vendor_request_id) for r in records] == [
        ("allowed", "GET", "req_test123"),
        ("allowed", "POST", "req_test123"),
        ("failed", "GET", "req_test123"),
        ("denied", "POST", None),  # the refund that could not be priced: never sent
    ]


def test_without_a_request_id_header_none_is_audited(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    governed(gov, ls).v1.refunds.create(params={"payment_intent": intent.id, "amount": 300})
    assert [r.vendor_request_id for r in rows(gov)] == [None, None]


# -- idempotency ---------------------------------------------------------------------------
def test_two_refunds_send_two_idempotency_keys(gov: Governor, ls: LocalStripe, raw: Any) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    for amount in (100, 200):
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": amount})

    keys = [s.idempotency_key for s in transport.posts()]
    assert len(keys) == 2
    assert None not in keys
    assert keys[0] != keys[1]
    assert all(s.idempotency_key is None for s in transport.sent if s.method == "GET")
    calls = [r for r in rows(gov) if r.method == "POST"]
    # The ledger's key is the wire key scoped to the exact request (its fingerprint).
    ledger_keys = [gov.ledger.get_hold(str(r.hold_id)).idempotency_key or "" for r in calls]
    # Stripe gets the wire key scoped to the agent type and run (after a "~").
    assert [k.split(":", 1)[1] for k in ledger_keys] == [k.split("~")[0] for k in keys]
    assert refunds_of(raw, intent) == [100, 200]
    assert daily(gov).settled == Money(300, "USD")


def test_a_retried_call_reuses_its_key_and_is_counted_once(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport(lose_first_refund=True)
    client = governed(gov, ls, http_client=transport, max_network_retries=1)
    client._requestor._client._sleep_time_seconds = lambda num_retries: 0

    refund = client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert refund.amount == 500

    first, retry = transport.posts()
    assert first.idempotency_key is not None
    assert retry.idempotency_key == first.idempotency_key
    assert refunds_of(raw, intent) == [500]  # Stripe replayed the call under its key

    records = rows(gov)
    assert summary(records) == [
        ("allowed", "GET", f"/v1/payment_intents/{intent.id}", 0, 0),  # attempt 1's look-up
        ("unknown", "POST", "/v1/refunds", 500, 0),  # the response was lost
        # the retry is priced from the hold its key names: no second look-up
        ("allowed", "POST", "/v1/refunds", 500, 500),  # the same hold, settled
    ]
    unknown, settled = records[1], records[2]
    assert unknown.hold_id == settled.hold_id is not None
    assert unknown.error is not None and "APIConnectionError: lost" in unknown.error
    assert settled.http_status == 200
    hold = gov.ledger.get_hold(str(settled.hold_id))
    wire_key = (first.idempotency_key or "").split("~")[0]
    assert (hold.idempotency_key or "").endswith(f":{wire_key}")
    assert (hold.state, hold.actual) == (HoldState.SETTLED, Money(500, "USD"))
    assert len({r.hold_id for r in records}) == 2  # one look-up, one refund hold

    budget = daily(gov)
    assert budget.settled == Money(500, "USD")  # not 1000
    assert budget.committed == Money(500, "USD")
    assert budget.pending == Money.zero("USD")
    assert budget.calls == 2  # the retry resumed the refund's hold: not counted again
    assert gov.holds() == []


def test_a_retried_refund_of_what_remains_is_counted_once(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport(lose_first_refund=True)
    client = governed(gov, ls, http_client=transport, max_network_retries=1)
    client._requestor._client._sleep_time_seconds = lambda num_retries: 0
    refund = client.v1.refunds.create(params={"payment_intent": intent.id})
    assert refund.amount == 2000
    assert refunds_of(raw, intent) == [2000]  # made once: the retry replayed the key
    assert daily(gov).settled == Money(2000, "USD")
    assert gov.holds() == []


def test_an_explicit_idempotency_key_is_forwarded_scoped_to_its_run(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    params = {"payment_intent": intent.id, "amount": 400}
    client.v1.refunds.create(params=params, options={"idempotency_key": "k1"})

    (sent,) = transport.posts()
    assert (sent.idempotency_key or "").startswith("k1~")  # readable, and scoped
    call = rows(gov)[-1]
    assert (gov.ledger.get_hold(str(call.hold_id)).idempotency_key or "").endswith(":k1")

    # Sent again with its key after it settled: refused, never repeated.
    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(params=params, options={"idempotency_key": "k1"})
    assert caught.value.code is ViolationCode.ALREADY_COMPLETED
    assert len(transport.posts()) == 1
    assert refunds_of(raw, intent) == [400]
    assert daily(gov).settled == Money(400, "USD")
    # Another run presenting the same key and body makes its own call at Stripe (which
    # would otherwise replay this run's object to it), governed and counted as its own.
    with bind(run="another-run"):
        client.v1.refunds.create(params=params, options={"idempotency_key": "k1"})
    assert transport.posts()[1].idempotency_key != sent.idempotency_key
    assert daily(gov).settled == Money(800, "USD")


# -- nothing passes ungoverned -------------------------------------------------------------
def test_an_uncatalogued_call_is_refused_and_never_sent(gov: Governor, ls: LocalStripe) -> None:
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport, run="run-x")
    with pytest.raises(PolicyViolation) as deleting:
        client.v1.customers.delete("cus_x")
    with pytest.raises(PolicyViolation) as paying_out:
        client.v1.payouts.create(params={"amount": 100, "currency": "usd"})
    for caught in (deleting, paying_out):
        assert caught.value.code is ViolationCode.UNKNOWN_OPERATION
        assert caught.value.vendor == "stripe"

    assert transport.sent == []
    records = rows(gov)
    assert [(r.outcome, r.method, r.endpoint, r.violation_code) for r in records] == [
        ("denied", "DELETE", "/v1/customers/cus_x", "unknown_operation"),
        ("denied", "POST", "/v1/payouts", "unknown_operation"),
    ]
    assert all(r.hold_id is None and r.run == "run-x" for r in records)
    assert gov.budgets() == []
    assert gov.holds() == []


@pytest.fixture
def customers(raw: Any) -> tuple[str, str]:
    """Two localstripe customers: the first is on the allowlist, the second is not."""
    allowed = raw.v1.customers.create(params={"email": "allowed@example.com"})
    other = raw.v1.customers.create(params={"email": "other@example.com"})
    return str(allowed.id), str(other.id)


def test_a_refund_for_a_customer_outside_the_allowlist_is_refused(
    make_governor: Callable[..., Governor],
    ls: LocalStripe,
    raw: Any,
    customers: tuple[str, str],
) -> None:
    allowed, other = customers
    gov = make_governor(usd_policy(customers=[allowed]))
    intent = paid_intent(raw, customer=other)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert caught.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    assert other in caught.value.message

    assert refunds_of(raw, intent) == []
    assert transport.posts() == []
    lookup, denied = rows(gov)
    # The customer is the looked-up payment's: the request itself names none.
    assert (lookup.outcome, lookup.method, lookup.customer) == ("allowed", "GET", None)
    assert (denied.outcome, denied.method, denied.endpoint, denied.customer) == (
        "denied",
        "POST",
        "/v1/refunds",
        other,
    )
    assert (denied.violation_code, denied.estimate) == ("customer_not_allowed", 500)
    assert daily(gov).committed == Money.zero("USD")
    assert gov.holds() == []


@pytest.mark.parametrize("by", ["payment_intent", "charge"])
def test_a_refund_for_an_allowed_customer_goes_through(
    make_governor: Callable[..., Governor],
    ls: LocalStripe,
    raw: Any,
    customers: tuple[str, str],
    by: str,
) -> None:
    allowed, _ = customers
    gov = make_governor(usd_policy(customers=[allowed]))
    intent = paid_intent(raw, customer=allowed)
    target = intent.id if by == "payment_intent" else intent.latest_charge.id
    refund = governed(gov, ls).v1.refunds.create(params={by: target, "amount": 500})
    assert refund.amount == 500
    assert refunds_of(raw, intent) == [500]
    lookup, call = rows(gov)
    assert lookup.endpoint == f"/v1/{by}s/{target}"
    assert (call.outcome, call.endpoint, call.customer, call.actual) == (
        "allowed",
        "/v1/refunds",
        allowed,
        500,
    )
    assert daily(gov).settled == Money(500, "USD")


def test_the_allowlist_still_refuses_an_agents_own_read_naming_no_customer(
    make_governor: Callable[..., Governor],
    ls: LocalStripe,
    raw: Any,
    customers: tuple[str, str],
) -> None:
    allowed, _ = customers
    gov = make_governor(usd_policy(customers=[allowed]))
    intent = paid_intent(raw, customer=allowed)
    with pytest.raises(PolicyViolation) as caught:
        governed(gov, ls).v1.payment_intents.retrieve(intent.id)
    assert caught.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    (denied,) = rows(gov)
    assert (denied.method, denied.endpoint) == ("GET", f"/v1/payment_intents/{intent.id}")


def test_an_async_refund_for_an_allowed_customer_goes_through(
    make_governor: Callable[..., Governor],
    ls: LocalStripe,
    raw: Any,
    customers: tuple[str, str],
) -> None:
    allowed, _ = customers
    gov = make_governor(usd_policy(customers=[allowed]))
    intent = paid_intent(raw, customer=allowed)
    client = governed(gov, ls)

    async def scenario() -> Any:
        return await client.v1.refunds.create_async(
            params={"payment_intent": intent.id, "amount": 500}
        )

    assert asyncio.run(scenario()).amount == 500
    assert refunds_of(raw, intent) == [500]
    assert [(r.outcome, r.method, r.customer) for r in rows(gov)] == [
        ("allowed", "GET", None),
        ("allowed", "POST", allowed),
    ]


# -- async ---------------------------------------------------------------------------------
def test_async_refunds_are_governed_the_same(gov: Governor, ls: LocalStripe, raw: Any) -> None:
    intent = paid_intent(raw)
    client = governed(gov, ls, run="run-async")

    async def scenario() -> tuple[Any, BaseException]:
        refund = await client.v1.refunds.create_async(
            params={"payment_intent": intent.id, "amount": 700}
        )
        try:
            await client.v1.refunds.create_async(
                params={"payment_intent": intent.id, "amount": 6000}
            )
        except PolicyViolation as refused:
            return refund, refused
        raise AssertionError("the refund over the per-call cap was not refused")

    refund, refused = asyncio.run(scenario())
    assert refund.amount == 700
    assert isinstance(refused, PolicyViolation)
    assert refused.code is ViolationCode.PER_CALL_CAP
    assert refunds_of(raw, intent) == [700]
    assert summary(rows(gov, run="run-async")) == [
        ("allowed", "GET", f"/v1/payment_intents/{intent.id}", 0, 0),
        ("allowed", "POST", "/v1/refunds", 700, 700),
        ("allowed", "GET", f"/v1/payment_intents/{intent.id}", 0, 0),
        ("denied", "POST", "/v1/refunds", 6000, 0),
    ]
    assert rows(gov, run="run-async")[1].http_status == 200
    assert daily(gov).settled == Money(700, "USD")
    assert gov.holds() == []


def test_async_stripe_errors_release_the_hold(gov: Governor, ls: LocalStripe) -> None:
    client = governed(gov, ls)

    async def scenario() -> None:
        await client.v1.refunds.create_async(params={"charge": "ch_doesnotexist", "amount": 1})

    with pytest.raises(stripe.InvalidRequestError) as caught:
        asyncio.run(scenario())
    assert caught.value.http_status == 404
    failed, unpriced = rows(gov)
    assert (failed.outcome, failed.method, failed.http_status) == ("failed", "GET", 404)
    assert (unpriced.outcome, unpriced.method) == ("denied", "POST")
    assert gov.holds() == []
    assert daily(gov).committed == Money.zero("USD")


# -- govern() and bind() -------------------------------------------------------------------
def test_govern_returns_a_governed_copy_and_leaves_the_original_alone(
    gov: Governor, ls: LocalStripe
) -> None:
    original = ls.client()
    copy = govern(original, gov, agent=USD_AGENT, run="run-govern")
    assert copy is not original
    assert is_governed(copy)
    assert not is_governed(original)
    with pytest.raises(TypeError, match="governed already"):
        govern(copy, gov, agent=USD_AGENT)

    intent = paid_intent(original)  # the original still works, unaudited
    assert rows(gov) == []
    copy.v1.refunds.create(params={"payment_intent": intent.id, "amount": 250})
    assert refunds_of(original, intent) == [250]
    assert summary(rows(gov, run="run-govern"))[-1] == ("allowed", "POST", "/v1/refunds", 250, 250)

    original.v1.refunds.create(params={"payment_intent": intent.id, "amount": 100})
    assert refunds_of(original, intent) == [100, 250]
    assert len(rows(gov)) == 2  # the original's refund was not governed
    assert daily(gov).settled == Money(250, "USD")


def test_bind_attributes_calls_to_an_agent_and_run(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    client = governed(gov, ls, agent=None)
    with pytest.raises(ValueError, match="needs an agent"):
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 100})
    run = f"run-{uuid.uuid4().hex[:8]}"
    with bind(agent=USD_AGENT, run=run):
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 100})
    assert [(r.agent, r.run, r.outcome) for r in rows(gov)] == [(USD_AGENT, run, "allowed")] * 2
    assert refunds_of(raw, intent) == [100]


# -- the kill switch -----------------------------------------------------------------------
def test_a_revoked_agent_makes_no_refund(gov: Governor, ls: LocalStripe, raw: Any) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    gov.revoke(agent=USD_AGENT, reason="incident 7", by="oncall")

    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert caught.value.code is ViolationCode.REVOKED
    assert "incident 7" in caught.value.message
    assert refunds_of(raw, intent) == []
    assert transport.posts() == []
    (denied,) = rows(gov)
    # Refused at the refund's first governed step, its look-up: nothing was read or sent.
    assert (denied.outcome, denied.method, denied.endpoint, denied.violation_code) == (
        "denied",
        "GET",
        f"/v1/payment_intents/{intent.id}",
        "revoked",
    )
    assert transport.sent == []
    assert gov.holds() == []

    gov.restore(agent=USD_AGENT, reason="resolved", by="oncall")
    client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert refunds_of(raw, intent) == [500]
    assert daily(gov).settled == Money(500, "USD")


# -- holes a request could slip through (from review) ---------------------------------------
class ScriptedTransport(RecordingTransport):
    """A RecordingTransport that answers chosen requests itself: ``answers`` maps
    ``(method, path)`` to queued actions: an exception to raise after forwarding
    (the response is lost), or a ``(status, body)`` to answer with instead of forwarding."""

    def __init__(self, answers: dict[tuple[str, str], list[Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answers = answers

    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> Response:
        queue = self.answers.get((method.upper(), urlsplit(url).path))
        action = queue.pop(0) if queue else None
        if isinstance(action, tuple):
            self.sent.append(Sent(method.upper(), urlsplit(url).path, dict(headers or {})))
            return action[1], action[0], CaseInsensitiveDict({"Content-Type": "application/json"})
        response = super().request(method, url, headers, post_data)
        if isinstance(action, BaseException):
            raise action
        return response


def test_a_multipart_body_is_refused_before_anything_is_sent(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    smuggled = {
        "payment_intent": intent.id,
        "metadata": {"note": f"x&amount=1&payment_intent={intent.id}&y="},
    }
    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(params=smuggled, options={"content_type": "multipart/form-data"})
    assert caught.value.code is ViolationCode.INVALID_REQUEST
    assert transport.sent == []
    assert refunds_of(raw, intent) == []
    assert [(r.outcome, r.violation_code) for r in rows(gov)] == [("denied", "invalid_request")]


def test_a_key_reused_for_another_request_is_governed_as_that_request(
    make_governor: Callable[..., Governor], ls: LocalStripe, raw: Any
) -> None:
    allowed = raw.v1.customers.create(params={"name": "ok"}).id
    other = raw.v1.customers.create(params={"name": "other"}).id
    gov = make_governor(usd_policy(customers=[allowed]))
    mine, theirs = paid_intent(raw, customer=allowed), paid_intent(raw, customer=other)
    transport = ScriptedTransport(
        {("POST", "/v1/refunds"): [(400, '{"error": {"type": "invalid_request_error"}}')]}
    )
    client = governed(gov, ls, http_client=transport)
    with pytest.raises(stripe.InvalidRequestError):  # refused by Stripe: the hold is released
        client.v1.refunds.create(
            params={"payment_intent": mine.id, "amount": 100}, options={"idempotency_key": "k-1"}
        )
    with pytest.raises(PolicyViolation) as caught:  # the same key, another customer's payment
        client.v1.refunds.create(
            params={"payment_intent": theirs.id, "amount": 4000}, options={"idempotency_key": "k-1"}
        )
    assert caught.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    assert len(transport.posts()) == 1
    assert refunds_of(raw, theirs) == []
    assert daily(gov).committed == Money.zero("USD")


def test_a_retry_refused_after_a_lost_response_keeps_the_hold_counted(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = ScriptedTransport(
        {
            ("POST", "/v1/refunds"): [
                stripe.APIConnectionError("lost", should_retry=True),  # Stripe refunded, reply lost
                (409, '{"error": {"type": "idempotency_error", "message": "in progress"}}'),
            ]
        }
    )
    client = governed(gov, ls, http_client=transport, max_network_retries=1)
    client._requestor._client._sleep_time_seconds = lambda num_retries: 0
    with pytest.raises(stripe.StripeError):
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert refunds_of(raw, intent) == [500]
    (hold,) = gov.holds()
    assert hold.state is HoldState.UNKNOWN
    assert daily(gov).committed == Money(500, "USD")
    assert [r.outcome for r in rows(gov)] == ["allowed", "unknown", "unknown"]


def test_a_redirect_after_a_paid_call_keeps_the_hold_counted(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = ScriptedTransport({("POST", "/v1/refunds"): [(307, "")]})
    client = governed(gov, ls, http_client=transport)
    with pytest.raises(stripe.StripeError):
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    assert [h.state for h in gov.holds()] == [HoldState.UNKNOWN]


def test_two_spellings_of_the_idempotency_header_are_refused(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(
            params={"payment_intent": intent.id, "amount": 500},
            options={"idempotency_key": "A", "headers": {"idempotency-key": "B"}},
        )
    assert caught.value.code is ViolationCode.INVALID_REQUEST
    assert transport.sent == []


def test_a_free_call_whose_connection_fails_is_released(
    make_governor: Callable[..., Governor], ls: LocalStripe, raw: Any
) -> None:
    gov = make_governor(refund_policy(endpoints=[*REFUND_ENDPOINTS, "/v1/customers"]))
    customer = raw.v1.customers.create(params={"name": "c"}).id
    transport = ScriptedTransport(
        {
            ("GET", f"/v1/customers/{customer}"): [
                stripe.APIConnectionError("reset", should_retry=False),
            ]
        }
    )
    with pytest.raises(stripe.APIConnectionError):
        governed(gov, ls, http_client=transport).v1.customers.retrieve(customer)
    assert gov.holds() == []  # nothing to reconcile: a read moves no money
    assert rows(gov)[-1].outcome == "errored"


@pytest.mark.parametrize(
    "headers",
    [
        {b"Idempotency-Key": "fresh"},  # a bytes name would be sent but not seen
        {"Idempotency_Key": "fresh"},  # folded to Idempotency-Key by some servers
        {"Idempotency-Key": ""},
        {"Idempotency-Key": " padded "},
    ],
    ids=["bytes-name", "underscore", "empty", "padded"],
)
def test_idempotency_headers_that_could_be_read_two_ways_are_refused(
    gov: Governor, ls: LocalStripe, raw: Any, headers: dict[Any, str]
) -> None:
    intent = paid_intent(raw)
    transport = RecordingTransport()
    client = governed(gov, ls, http_client=transport)
    with pytest.raises(PolicyViolation) as caught:
        client.v1.refunds.create(
            params={"payment_intent": intent.id, "amount": 500},
            options={"idempotency_key": "same", "headers": headers},
        )
    assert caught.value.code is ViolationCode.INVALID_REQUEST
    assert transport.sent == []


def test_a_long_key_and_its_hash_are_different_calls(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    import hashlib

    intent = paid_intent(raw)
    client = governed(gov, ls)
    long_key = "k" * 201
    params = {"payment_intent": intent.id, "amount": 500}
    client.v1.refunds.create(params=params, options={"idempotency_key": long_key})
    hashed = hashlib.sha256(long_key.encode()).hexdigest()
    client.v1.refunds.create(params=params, options={"idempotency_key": hashed})
    assert daily(gov).settled == Money(1000, "USD")  # two calls, both counted


def test_two_concurrent_attempts_with_one_key_share_one_hold(
    gov: Governor, ls: LocalStripe, raw: Any
) -> None:
    import threading

    intent = paid_intent(raw)
    both_sent = threading.Barrier(2)
    order = threading.Lock()

    class Concurrent(RecordingTransport):
        """Both attempts are in flight at once; Stripe acts on one and replays it to the
        other, as it does for a repeated key."""

        def request(
            self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
        ) -> Response:
            if method.upper() == "POST":
                both_sent.wait(timeout=30)
                with order:
                    return super().request(method, url, headers, post_data)
            return super().request(method, url, headers, post_data)

    client = governed(gov, ls, http_client=Concurrent())
    params = {"payment_intent": intent.id, "amount": 500}
    results: list[Any] = []

    def attempt() -> None:
        results.append(client.v1.refunds.create(params=params, options={"idempotency_key": "k"}))

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.amount for r in results] == [500, 500]
    assert refunds_of(raw, intent) == [500]  # acted once
    assert daily(gov).settled == Money(500, "USD")  # counted once
    assert gov.holds() == []
