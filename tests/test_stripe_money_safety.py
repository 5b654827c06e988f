"""Money safety, part 2 (the Stripe catalogue): one regression test per defect, each
against a small scripted Stripe that keeps its own books of what it charged. localstripe
cannot run these flows: it rejects ``auto_advance`` and ``collection_method``."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import stripe
from requests.structures import CaseInsensitiveDict

from paymaster import Governor, Money, Policy, PolicyViolation, ViolationCode
from paymaster.testing.stripe_upstream import Fault, StripeUpstream
from paymaster.vendors.stripe import CATALOGUE, STRIPE_VERSION, governed_client

MakeGov = Callable[..., Governor]
ENDPOINTS = sorted({op.path.split("/{")[0] for op in CATALOGUE})
ADVANCE: dict[str, Any] = {"auto_advance": True}


def billing_policy(**overrides: Any) -> Policy:
    """billing-agent: $100 a day, $25 a call, every catalogued endpoint."""
    fields: dict[str, Any] = {
        "id": "billing",
        "agent": "billing-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "per_call_cap": "25.00",
        "endpoints": ENDPOINTS,
    }
    fields.update(overrides)
    return Policy.model_validate(fields)


class InvoiceStripe(stripe.RequestsClient):
    """Stripe's invoices as its API reference documents them: a draft's amount_due is the
    sum of its items (it was created with ``auto_advance=false``, as the catalogue requires),
    and finalizing it with ``auto_advance=true`` charges it at once. ``charged`` is
    Stripe's own record of what it charged."""

    def __init__(self) -> None:
        super().__init__()
        self.amount_due = 0
        #: The customer's credit balance: a draft's amount_due is shown net of it, and the
        #: first of its invoices to be finalized uses it up.
        self.credit = 0
        #: Run when a finalize arrives, before it charges (another invoice taking the
        #: credit first, say).
        self.on_finalize: Callable[[], None] | None = None
        self.status = "draft"
        self.charged: list[int] = []
        self.sent: list[tuple[str, str, dict[str, str], dict[str, str]]] = []
        #: Run once, right after the invoice is first read (another agent's write, say).
        self.after_first_read: Callable[[], None] | None = None
        #: Answers the next finalize with this status without acting (a refusal).
        self.refuse_next_finalize: int | None = None
        #: Set while a finalize is being processed; the finalize waits for ``go_on``.
        self.finalizing = threading.Event()
        self.go_on: threading.Event | None = None

    def invoice(self) -> dict[str, Any]:
        return {
            "id": "in_1",
            "object": "invoice",
            "currency": "usd",
            "customer": "cus_1",
            "collection_method": "charge_automatically",
            "auto_advance": self.status != "draft",
            "status": self.status,
            "total": self.amount_due,
            "amount_due": max(self.amount_due - self.credit, 0),
        }

    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None
    ) -> tuple[str, int, Any]:
        path = urlsplit(url).path
        params = dict(parse_qsl(post_data or urlsplit(url).query))
        self.sent.append((method.upper(), path, params, dict(headers or {})))
        status, body = self._answer(method.upper(), path, params)
        return json.dumps(body), status, CaseInsensitiveDict({"Request-Id": "req_1"})

    def _answer(self, method: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        if (method, path) == ("GET", "/v1/invoices/in_1"):
            answer = self.invoice()
            hook, self.after_first_read = self.after_first_read, None
            if hook is not None:
                hook()
            return 200, answer
        if (method, path) == ("POST", "/v1/invoiceitems"):
            self.amount_due += int(params["amount"])
            return 200, {"id": "ii_1", "object": "invoiceitem", "amount": int(params["amount"])}
        if (method, path) == ("POST", "/v1/invoices/in_1/finalize"):
            if self.refuse_next_finalize is not None:
                status, self.refuse_next_finalize = self.refuse_next_finalize, None
                return status, {"error": {"type": "invalid_request_error", "message": "no"}}
            self.finalizing.set()
            if self.go_on is not None:
                self.go_on.wait(timeout=30)
            hook, self.on_finalize = self.on_finalize, None
            if hook is not None:
                hook()
            self.charged.append(max(self.amount_due - self.credit, 0))
            self.status = "paid"
            return 200, self.invoice()
        if (method, path) == ("POST", "/v1/payment_intents"):
            self.charged.append(int(params["amount"]))
            return 200, {
                "id": "pi_1",
                "object": "payment_intent",
                "amount": int(params["amount"]),
                "currency": params["currency"],
                "status": "succeeded",
            }
        if method == "GET" and path.startswith("/v1/payment_intents/"):
            return 404, {"error": {"type": "invalid_request_error", "code": "resource_missing"}}
        if (method, path) == ("POST", "/v1/payment_links"):
            return 200, {"id": "plink_1", "object": "payment_link", "url": "https://x"}
        raise AssertionError(f"unexpected {method} {path}")


def client_for(gov: Governor, fake: InvoiceStripe, **options: Any) -> stripe.StripeClient:
    return governed_client(
        gov, "sk_test_x", agent="billing-agent", http_client=fake, max_network_retries=0, **options
    )


def add_item(client: stripe.StripeClient, amount: int) -> None:
    client.v1.invoice_items.create(
        params={"customer": "cus_1", "invoice": "in_1", "amount": amount, "currency": "usd"}
    )


# -- 1. a finalize cannot charge more than it reserved -----------------------------------
def test_items_added_after_finalize_was_priced_are_never_charged_unreserved(
    make_governor: MakeGov,
) -> None:
    """Another agent adds $500 of items between the finalize's look-up and its reserve.
    Before: the finalize was reserved at $5, Stripe charged $505 (past the $25 per-call
    cap and the $100 cap). Now the invoice is read again while the ledger holds it, and
    the finalize is refused (``stale_price``) with nothing sent."""
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    client = client_for(gov, fake)
    add_item(client, 500)
    other_agent = client_for(make_governor(billing_policy()), fake)
    fake.after_first_read = lambda: add_item(other_agent, 50_000)
    with pytest.raises(PolicyViolation) as refused:
        client.v1.invoices.finalize_invoice("in_1", params=ADVANCE)
    assert refused.value.code is ViolationCode.STALE_PRICE
    assert fake.charged == []
    assert ("POST", "/v1/invoices/in_1/finalize") not in [s[:2] for s in fake.sent]
    # priced again, the finalize is now above the per-call cap: refused, nothing charged
    with pytest.raises(PolicyViolation) as again:
        client.v1.invoices.finalize_invoice("in_1", params=ADVANCE)
    assert again.value.code is ViolationCode.CAP_EXCEEDED  # $505 against a $100 cap
    assert fake.charged == []
    assert gov.audit.verify().ok


def test_no_item_is_added_while_a_finalize_is_in_flight(make_governor: MakeGov) -> None:
    """While the finalize's hold is pending, an item add on the same invoice is refused
    by the ledger (``subject_busy``) from any process, and nothing is sent for it."""
    gov, other = make_governor(billing_policy()), make_governor(billing_policy())
    fake = InvoiceStripe()
    client = client_for(gov, fake)
    add_item(client, 1000)
    fake.go_on = threading.Event()
    finalize = threading.Thread(
        target=lambda: client.v1.invoices.finalize_invoice("in_1", params=ADVANCE)
    )
    finalize.start()
    assert fake.finalizing.wait(timeout=30)
    try:
        with pytest.raises(PolicyViolation) as refused:
            add_item(client_for(other, fake), 90_000)
        assert refused.value.code is ViolationCode.SUBJECT_BUSY
    finally:
        fake.go_on.set()
        finalize.join(timeout=30)
    assert fake.charged == [1000]
    [status] = gov.budgets()
    assert status.committed == Money(1000, "USD") and not status.frozen


# -- 2. a retry of a released hold is priced again ---------------------------------------
def test_a_retry_of_a_refused_finalize_is_priced_again(make_governor: MakeGov) -> None:
    """The first finalize of a $0 invoice is refused (429, which Stripe does not store for
    the key); the agent adds $1,000 of items and retries with the same key. Before: the
    retry re-armed the released hold at $0 and Stripe charged $1,000."""
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    client = client_for(gov, fake)
    fake.refuse_next_finalize = 429
    key = {"idempotency_key": "finalize-in_1"}
    with pytest.raises(stripe.StripeError):
        client.v1.invoices.finalize_invoice("in_1", params=ADVANCE, options=key)
    add_item(client, 100_000)
    with pytest.raises(PolicyViolation) as refused:
        client.v1.invoices.finalize_invoice("in_1", params=ADVANCE, options=key)
    assert refused.value.code is ViolationCode.CAP_EXCEEDED
    assert fake.charged == []


def test_a_key_older_than_stripes_24_hours_is_a_new_call(
    make_governor: MakeGov, clock: Any
) -> None:
    """Stripe forgets a key after 24 hours, so the same key then makes a new charge; the
    ledger counts it as a new call instead of refusing it as already completed."""
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    client = client_for(gov, fake)
    params = {"amount": 1000, "currency": "usd", "customer": "cus_1", "confirm": True}
    options = {"idempotency_key": "daily-charge"}
    client.v1.payment_intents.create(params=params, options=options)
    clock.advance(hours=25)
    client.v1.payment_intents.create(params=params, options=options)
    assert fake.charged == [1000, 1000]
    settled = [row.actual for row in gov.audit.query() if row.endpoint == "/v1/payment_intents"]
    assert settled == [1000, 1000]


# -- 6. requests priced on assumptions ------------------------------------------------------
def test_look_ups_and_unversioned_calls_use_the_catalogues_stripe_version(
    make_governor: MakeGov,
) -> None:
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    add_item(client_for(gov, fake, stripe_version=STRIPE_VERSION), 500)
    [(_, _, _, lookup), (_, _, _, call)] = fake.sent
    assert lookup["Stripe-Version"] == STRIPE_VERSION
    assert call["Stripe-Version"] == STRIPE_VERSION


def test_a_stripe_version_the_catalogue_does_not_know_is_refused(make_governor: MakeGov) -> None:
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    client = client_for(gov, fake, stripe_version="2019-02-19")
    with pytest.raises(PolicyViolation, match="Stripe-Version '2019-02-19'"):
        add_item(client, 500)
    assert fake.sent == []
    [row] = gov.audit.query()
    assert row.outcome == "denied" and row.violation_code == "invalid_request"


def test_a_connected_account_must_be_in_the_policy(make_governor: MakeGov) -> None:
    """Before: Stripe-Account (and Stripe-Context) could not be restricted by policy."""
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    on_behalf = client_for(gov, fake, stripe_account="acct_other")
    params = {"amount": 1000, "currency": "usd", "customer": "cus_1", "confirm": True}
    with pytest.raises(PolicyViolation, match="account_not_allowed"):
        on_behalf.v1.payment_intents.create(params=params)
    assert fake.charged == []
    allowed = make_governor(billing_policy(id="billing-2", accounts=["acct_other"]))
    client_for(allowed, fake, stripe_account="acct_other").v1.payment_intents.create(params=params)
    assert fake.charged == [1000]


def test_money_routed_to_a_connected_account_needs_the_policy(make_governor: MakeGov) -> None:
    """Before: payment_links.create with transfer_data was priced as free and sent, routing
    every future payment of the link to another account."""
    gov = make_governor(billing_policy())
    fake = InvoiceStripe()
    client = client_for(gov, fake)
    link: dict[str, Any] = {"line_items": [{"price": "price_1", "quantity": 1}]}
    with pytest.raises(PolicyViolation, match="account_not_allowed"):
        client.v1.payment_links.create(
            params={**link, "transfer_data": {"destination": "acct_thief"}}
        )
    with pytest.raises(PolicyViolation, match="application fee"):
        client.v1.payment_links.create(params={**link, "application_fee_amount": 100})
    assert [s[:2] for s in fake.sent] == []
    outcomes = [(row.outcome, row.violation_code) for row in gov.audit.query()]
    assert outcomes == [("denied", "account_not_allowed"), ("denied", "invalid_request")]


def test_a_run_policy_may_narrow_the_accounts_but_not_widen_them() -> None:
    from paymaster import PolicyError, RunPolicy
    from paymaster._policy import effective_policy

    policy = billing_policy(accounts=["acct_1", "acct_2"])
    narrowed = effective_policy(policy, RunPolicy(accounts=["acct_1"]))
    assert narrowed.account_allowlists == (("acct_1", "acct_2"), ("acct_1",))
    with pytest.raises(PolicyError, match="accounts"):
        effective_policy(policy, RunPolicy(accounts=["acct_3"]))
    with pytest.raises(PolicyViolation) as refused:
        narrowed.check(
            endpoint="/v1/payment_intents",
            method="POST",
            customer=None,
            estimate=Money(100, "USD"),
            now=datetime.now(timezone.utc),
            accounts=["acct_2"],
        )
    assert refused.value.code is ViolationCode.ACCOUNT_NOT_ALLOWED


def test_a_finalize_is_reserved_at_what_it_can_charge_if_a_credit_is_used_up_first(
    make_governor: MakeGov,
) -> None:
    """A draft's amount_due is net of the customer's credit, which another of the
    customer's invoices may use up between the re-read and the finalize. Before: reserved
    at the $2 net of credit, charged $5 (an overrun past a $4.50 cap). Now reserved at
    the invoice's total, which its hold keeps from changing."""
    gov = make_governor(billing_policy(daily_cap="4.50", per_call_cap="4.50"))
    fake = InvoiceStripe()
    client = client_for(gov, fake)
    add_item(client, 400)
    fake.credit = 300  # the draft shows $1.00 due

    def another_invoice_takes_the_credit() -> None:
        fake.credit = 0

    fake.on_finalize = another_invoice_takes_the_credit
    client.v1.invoices.finalize_invoice("in_1", params=ADVANCE)
    assert fake.charged == [400]
    [status] = gov.budgets()
    assert status.committed == Money(400, "USD") and not status.frozen
    assert gov.overruns() == []


@pytest.mark.parametrize(
    "params",
    [
        {"destination": {"account": "acct_evil", "amount": 900}},  # a legacy destination
        {"source": "acct_evil"},  # an account debit
    ],
)
def test_an_account_named_in_any_parameter_needs_the_policy(
    make_governor: MakeGov, params: dict[str, Any]
) -> None:
    gov = make_governor(billing_policy(accounts=["acct_approved"]))
    fake = InvoiceStripe()
    with pytest.raises(PolicyViolation) as refused:
        client_for(gov, fake).v1.charges.create(
            params={"amount": 1000, "currency": "usd", **params}
        )
    assert refused.value.code is ViolationCode.ACCOUNT_NOT_ALLOWED
    assert fake.sent == []


def test_a_legacy_application_fee_without_an_account_is_refused(make_governor: MakeGov) -> None:
    fake = InvoiceStripe()
    with pytest.raises(PolicyViolation, match="application fee"):
        client_for(make_governor(billing_policy()), fake).v1.charges.create(
            params={"amount": 1000, "currency": "usd", "application_fee": 100}
        )
    assert fake.sent == []


def test_who_pays_is_read_once(make_governor: MakeGov) -> None:
    """``invoice`` decides which invoice an item is held on: sent twice, refused; and a
    customer named by ``customer_account`` (unread by paymaster) is refused."""
    from paymaster.vendors.stripe import InvalidStripeRequest, StripeRequest

    with pytest.raises(InvalidStripeRequest, match="'invoice'"):
        StripeRequest.parse(
            "POST",
            "https://api.stripe.com/v1/invoiceitems",
            "invoice=in_1&invoice=in_2&amount=100&currency=usd",
            content_type="application/x-www-form-urlencoded",
        )
    fake = InvoiceStripe()
    with pytest.raises(PolicyViolation, match="customer_account"):
        client_for(make_governor(billing_policy()), fake).v1.payment_intents.create(
            params={"amount": 100, "currency": "usd", "customer_account": "acct_1"}
        )
    assert fake.sent == []


def test_an_attempt_whose_pricing_look_up_fails_leaves_its_row(make_governor: MakeGov) -> None:
    """Before: the refund's look-up answered 404, and only the look-up wrote a row."""
    gov = make_governor(billing_policy())
    with pytest.raises(stripe.InvalidRequestError):
        client_for(gov, InvoiceStripe()).v1.refunds.create(params={"payment_intent": "pi_gone"})
    rows = [(row.method, row.endpoint, row.outcome) for row in gov.audit.query()]
    assert ("POST", "/v1/refunds", "denied") in rows


# -- keys the ledger stores as one are one call at Stripe ---------------------------------


def test_two_keys_the_ledger_stores_as_one_are_one_call_at_stripe(
    make_governor: MakeGov,
) -> None:
    """A key with a NUL is stored escaped (``order-1\\x00``), as the literal key with a
    backslash is: the ledger takes the second for a retry of the first. Before, Stripe
    was sent each key as given, so it charged twice while the ledger counted once."""
    gov = make_governor(billing_policy(daily_cap="10.00", per_call_cap="10.00"))
    with_nul, literal = "order-1\x00", "order-1\\x00"
    params = {"amount": 1000, "currency": "usd", "confirm": "true", "payment_method": "pm_x"}
    with StripeUpstream() as stripe_server:
        client = governed_client(
            gov,
            "sk_test_x",
            agent="billing-agent",
            max_network_retries=0,
            base_addresses={"api": stripe_server.url},
        )
        # Stripe charges each and the answer is lost, whichever form of the key it is sent.
        for key in (with_nul, literal):
            stripe_server.script(key, Fault.LOST_AFTER)
        for key in (with_nul, literal):
            with contextlib.suppress(stripe.APIConnectionError, PolicyViolation):
                client.v1.payment_intents.create(params, {"idempotency_key": key})
        moved = sum(stripe_server.totals().values())
    [budget] = gov.ledger.budgets()
    assert moved == 1000, "Stripe charged once: both keys are one call"
    assert budget.committed.amount >= moved


def test_one_key_under_two_stripe_accounts_is_two_calls(make_governor: MakeGov) -> None:
    """Stripe keeps idempotency keys per account: the same key and body sent with another
    account's API key is another charge. Before, the ledger took it for a retry of the first
    call and resumed its hold, so $20 moved under one $10 reservation."""
    gov = make_governor(billing_policy(daily_cap="10.00", per_call_cap="10.00"))
    params = {"amount": 1000, "currency": "usd", "confirm": "true", "payment_method": "pm_x"}
    with StripeUpstream() as stripe_server:
        client = governed_client(
            gov,
            "sk_test_account_a",
            agent="billing-agent",
            max_network_retries=0,
            base_addresses={"api": stripe_server.url},
        )
        stripe_server.script("order-42", Fault.LOST_AFTER)  # account A pays; answer lost
        with contextlib.suppress(stripe.APIConnectionError):
            client.v1.payment_intents.create(params, {"idempotency_key": "order-42"})
        with pytest.raises(PolicyViolation) as refused:
            client.v1.payment_intents.create(
                params, {"idempotency_key": "order-42", "api_key": "sk_test_account_b"}
            )
        moved = sum(stripe_server.totals().values())
    assert refused.value.code is ViolationCode.CAP_EXCEEDED
    assert moved == 1000
    [budget] = gov.ledger.budgets()
    assert budget.committed.amount >= moved


def test_a_long_key_with_a_lone_surrogate_leaves_its_row(make_governor: MakeGov) -> None:
    """Before, a key over 200 characters holding a lone surrogate failed to encode while
    the request was read, and the attempt left no row."""
    gov = make_governor(billing_policy())
    with StripeUpstream() as stripe_server:
        client = governed_client(
            gov,
            "sk_test_x",
            agent="billing-agent",
            max_network_retries=0,
            base_addresses={"api": stripe_server.url},
        )
        key = "k" * 201 + "\ud800"
        client.v1.payment_intents.create(
            {"amount": 100, "currency": "usd", "payment_method": "pm_x"}, {"idempotency_key": key}
        )
    [row] = gov.audit.query()
    assert row.outcome == "allowed"


def test_a_calls_run_policy_never_replaces_the_toolkits(make_governor: MakeGov) -> None:
    """Before, ``invoke(run_policy=...)`` replaced the toolkit's run policy (``a or b``), so
    a $20.00 refund passed a toolkit whose run policy allowed $5.00 a call. Two different
    run policies for one call are refused, with the attempt's row; the same one twice is
    one."""
    from paymaster import RunPolicy
    from paymaster.vendors.stripe._tools import StripeToolkit

    gov = make_governor(billing_policy(per_call_cap="50.00"))
    narrow = RunPolicy(per_call_cap="5.00")
    with StripeUpstream() as stripe_server:
        setup = stripe.StripeClient("sk_test_setup", base_addresses={"api": stripe_server.url})
        payment = setup.v1.payment_intents.create(
            params={"amount": 9000, "currency": "usd", "confirm": True, "payment_method": "pm_x"}
        ).id
        client = stripe.StripeClient("sk_test_agent", base_addresses={"api": stripe_server.url})
        toolkit = StripeToolkit(
            gov, client, agent="billing-agent", run_policy=narrow, only=["create_refund"]
        )
        refund = {"payment_intent": payment, "amount": 2000}
        with pytest.raises(PolicyViolation) as wider:
            toolkit.invoke(
                "create_refund", refund, run="run-1", run_policy=RunPolicy(per_call_cap="50.00")
            )
        with pytest.raises(PolicyViolation) as same:
            toolkit.invoke("create_refund", refund, run="run-1", run_policy=narrow)
        refunds = [m for m in stripe_server.movements() if m.kind == "refund"]
    assert wider.value.code is ViolationCode.RUN_POLICY_WIDENED
    assert same.value.code is ViolationCode.PER_CALL_CAP
    assert refunds == []
    assert [r.violation_code for r in gov.audit.query() if r.endpoint == "/v1/refunds"] == [
        "run_policy_widened",
        "per_call_cap",
    ]
