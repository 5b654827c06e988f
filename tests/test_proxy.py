"""The governing proxy, in this process: the real stripe client -> the proxy (uvicorn, in a
thread) -> localstripe, on SQLite and PostgreSQL.

The proxy's upstream transport records what it forwards (and can lose a response, or
answer as Stripe does when it refuses a key), so the tests see exactly what left the
proxy and with which key.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import event

from conftest import Clock, _pg_schema_url
from paymaster import AuditRecord, Governor, HoldState, Money, Policy, RunPolicy
from paymaster._vault import UNKNOWN_KEY, VaultKeys
from paymaster.proxy import ProxyConfig, create_app
from paymaster.proxy import app as proxy_app
from paymaster.testing.localstripe import TEST_API_KEY, LocalStripe
from paymaster.testing.proxy import proxy_client, serve_app
from stripe_fixtures import localstripe, paid_intent, refund_agent_policy, refunds_of
from tcp_proxy import TcpProxy

__all__ = ["localstripe"]

POLICY_ENDPOINTS = ["/v1/refunds", "/v1/payment_intents", "/v1/charges", "/v1/customers"]


@dataclass
class Forwarded:
    method: str
    path: str
    headers: httpx.Headers
    body: bytes


@dataclass
class RecordingUpstream(httpx.BaseTransport):
    """Forwards to the real upstream and records each request. ``fault`` may replace the
    upstream's answer for a request (or raise, as a lost response)."""

    seen: list[Forwarded] = field(default_factory=list)
    fault: Callable[[httpx.Request, httpx.Response], httpx.Response] | None = None
    inner: httpx.HTTPTransport = field(default_factory=httpx.HTTPTransport)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.seen.append(Forwarded(request.method, request.url.path, request.headers, body))
        response = self.inner.handle_request(request)
        if self.fault is not None:
            response.read()
            return self.fault(request, response)
        return response

    def posts(self, path: str = "/v1/refunds") -> list[Forwarded]:
        return [f for f in self.seen if f.method == "POST" and f.path == path]


@dataclass
class Proxy:
    gov: Governor
    url: str
    key: str
    upstream: RecordingUpstream
    server: LocalStripe

    def client(self, key: str | None = None, **kwargs: Any) -> stripe.StripeClient:
        return proxy_client(self.url, key or self.key, **kwargs)

    def new_key(self, agent: str = "refund-agent", **kwargs: Any) -> str:
        return (
            VaultKeys(self.gov.engine, self.gov.ledger.now)
            .create(agent, by="test", **kwargs)
            .secret
        )

    def keys(self) -> VaultKeys:
        return VaultKeys(self.gov.engine, self.gov.ledger.now)

    def audit(self, endpoint: str) -> list[AuditRecord]:
        return [r for r in self.gov.audit.query() if r.endpoint == endpoint]

    def committed(self, currency: str = "USD", day: date | None = None) -> Money:
        (budget,) = [
            b for b in self.gov.budgets(day=day) if b.kind == "daily" and b.cap.currency == currency
        ]
        return budget.committed


def jpy_policy() -> Policy:
    return Policy.model_validate(
        {
            "id": "yen",
            "agent": "yen-agent",
            "vendor": "stripe",
            "currency": "JPY",
            "daily_cap": "1000",
            "endpoints": POLICY_ENDPOINTS,
        }
    )


@pytest.fixture
def proxy(db_url: str, localstripe: LocalStripe, clock: Clock) -> Iterator[Proxy]:
    policies = [
        refund_agent_policy(endpoints=POLICY_ENDPOINTS, accounts=["acct_A", "acct_B"]),
        jpy_policy(),
    ]
    gov = Governor(db_url, policies=policies, clock=clock)
    upstream = RecordingUpstream()
    config = ProxyConfig(upstream=localstripe.url, stripe_key=TEST_API_KEY)
    app = create_app(gov, config, upstream_transport=upstream)
    try:
        key = VaultKeys(gov.engine, clock).create("refund-agent", by="test").secret
        with serve_app(app) as url:
            yield Proxy(gov, url, key, upstream, localstripe)
    finally:
        gov.close()


@pytest.fixture
def pg_schema_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for a test that routes the ledger through a cuttable
    TCP proxy."""
    url, drop = _pg_schema_url(pg_admin_url)
    try:
        yield url
    finally:
        drop()


def routed_through(tcp_url: str) -> tuple[TcpProxy, str]:
    from sqlalchemy.engine import make_url

    url = make_url(tcp_url)
    tcp = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    return tcp, url.set(host="127.0.0.1", port=tcp.port).render_as_string(hide_password=False)


def error_of(exc: stripe.StripeError) -> tuple[int | None, str | None]:
    """The HTTP status and the error code of a Stripe exception (``e.code`` is set only for
    400/402/404 by stripe-python; the error object always has it)."""
    assert exc.error is not None
    return exc.http_status, exc.error.code


# -- allowed calls -----------------------------------------------------------------------
def test_allowed_calls_pass_through_with_their_real_responses(proxy: Proxy) -> None:
    intent = paid_intent(proxy.server, 5000)
    client = proxy.client()
    customer = client.v1.customers.create(params={"email": "a@example.com"})
    assert proxy.server.client().v1.customers.retrieve(customer.id).email == "a@example.com"
    refund = client.v1.refunds.create(params={"payment_intent": intent, "amount": 2000})
    assert (refund.object, refund.amount, refund.status) == ("refund", 2000, "succeeded")
    assert refunds_of(proxy.server, intent) == [2000]
    assert proxy.committed() == Money(2000, "USD")
    rows = proxy.gov.audit.query(agent="refund-agent")
    assert [(r.method, r.endpoint.split("/")[2], r.outcome, r.actual) for r in rows] == [
        ("POST", "customers", "allowed", 0),
        ("GET", "payment_intents", "allowed", 0),
        ("POST", "refunds", "allowed", 2000),
    ]
    assert all(r.http_status == 200 for r in rows)
    assert proxy.gov.holds() == []


def test_the_real_key_goes_upstream_and_the_vault_key_never_does(proxy: Proxy) -> None:
    intent = paid_intent(proxy.server)
    proxy.client().v1.refunds.create(params={"payment_intent": intent, "amount": 500})
    httpx.get(
        f"{proxy.url}/v1/customers",
        headers={
            "Authorization": f"Bearer {proxy.key}",
            "Cookie": "session=1",
            "X-Forwarded-For": "10.0.0.1",
            "Host": "evil.example",
        },
    ).raise_for_status()
    assert len(proxy.upstream.seen) == 3
    for forwarded in proxy.upstream.seen:
        assert forwarded.headers["authorization"] == f"Bearer {TEST_API_KEY}"
        assert forwarded.headers["host"] == proxy.server.url.removeprefix("http://")
        assert "cookie" not in forwarded.headers
        assert "x-forwarded-for" not in forwarded.headers
        assert proxy.key not in repr(list(forwarded.headers.items())) + forwarded.body.decode()
    # The client's POST carried stripe-python's own Idempotency-Key, forwarded as sent.
    (post,) = proxy.upstream.posts()
    assert post.headers["idempotency-key"]


def test_a_post_without_an_idempotency_key_is_forwarded_with_one_the_client_is_told(
    proxy: Proxy,
) -> None:
    intent = paid_intent(proxy.server)
    response = httpx.post(
        f"{proxy.url}/v1/refunds",
        data={"payment_intent": intent, "amount": "700"},
        headers={"Authorization": f"Bearer {proxy.key}"},
    )
    assert response.status_code == 200, response.text
    (post,) = proxy.upstream.posts()
    made = post.headers["idempotency-key"]
    assert made.startswith("paymaster-proxy-")
    # the client is told its key; Stripe gets it scoped to the key's agent type and run
    assert made.split("~")[0] == response.headers["idempotency-key"]
    (held,) = [
        h for h in proxy.gov.ledger.holds(states=list(HoldState)) if h.endpoint == "/v1/refunds"
    ]
    told = response.headers["idempotency-key"]
    assert held.idempotency_key is not None and held.idempotency_key.endswith(told)


def test_jpy_amounts_are_exact(proxy: Proxy) -> None:
    intent = paid_intent(proxy.server, 800, "jpy")
    client = proxy.client(proxy.new_key("yen-agent"))
    refund = client.v1.refunds.create(params={"payment_intent": intent, "amount": 500})
    assert (refund.amount, refund.currency) == (500, "jpy")
    assert proxy.committed("JPY") == Money(500, "JPY")
    (row,) = proxy.audit("/v1/refunds")
    assert (row.currency, row.estimate, row.actual) == ("JPY", 500, 500)
    with pytest.raises(stripe.PermissionError) as refused:  # ¥500 + ¥600 > ¥1,000
        client.v1.refunds.create(params={"payment_intent": intent, "amount": 300 + 300})
    assert error_of(refused.value) == (403, "paymaster_cap_exceeded")
    assert refunds_of(proxy.server, intent) == [500]


# -- refusals ----------------------------------------------------------------------------
def test_a_refusal_raises_stripes_permission_error_and_nothing_is_sent(proxy: Proxy) -> None:
    intent = paid_intent(proxy.server, 20000)
    client = proxy.client()
    for _ in range(2):
        client.v1.refunds.create(params={"payment_intent": intent, "amount": 5000})
    with pytest.raises(stripe.PermissionError) as refused:
        client.v1.refunds.create(params={"payment_intent": intent, "amount": 100})
    assert error_of(refused.value) == (403, "paymaster_cap_exceeded")
    assert "daily cap" in str(refused.value.user_message)
    assert refused.value.headers is not None
    assert refused.value.headers["stripe-should-retry"] == "false"
    assert refused.value.headers["request-id"].startswith("req_pm_")
    assert len(proxy.upstream.posts()) == 2
    assert refunds_of(proxy.server, intent) == [5000, 5000]
    assert proxy.committed() == Money(10000, "USD")
    (denied,) = proxy.gov.audit.query(outcome="denied")
    assert (denied.violation_code, denied.estimate) == ("cap_exceeded", 100)


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (
            lambda c: c.v1.products.create(params={"name": "x"}),
            403,
            "paymaster_endpoint_not_allowed",
        ),
        (
            lambda c: c.raw_request("post", "/v1/payouts", amount=100, currency="usd"),
            403,
            "paymaster_unknown_operation",
        ),
        (
            lambda c: c.raw_request("post", "/v1/payment_intents", amount="12.5", currency="usd"),
            400,
            "paymaster_invalid_request",
        ),
    ],
    ids=["endpoint-not-allowed", "uncatalogued", "malformed-amount"],
)
def test_each_refusal_has_a_status_and_a_stable_code(
    proxy: Proxy, call: Callable[[stripe.StripeClient], Any], status: int, code: str
) -> None:
    with pytest.raises(stripe.StripeError) as refused:
        call(proxy.client())
    assert error_of(refused.value) == (status, code)
    assert proxy.upstream.seen == []
    assert proxy.gov.holds() == []
    (denied,) = proxy.gov.audit.query()
    assert denied.outcome == "denied"
    assert f"paymaster_{denied.violation_code}" == code


def test_a_run_policy_bound_to_a_key_narrows_its_calls(proxy: Proxy) -> None:
    intent = paid_intent(proxy.server, 9000)
    run_policy = RunPolicy.model_validate({"cap": "30.00", "currency": "USD"})
    key = proxy.new_key(run_policy=run_policy)
    client = proxy.client(key)
    client.v1.refunds.create(params={"payment_intent": intent, "amount": 2000})
    with pytest.raises(stripe.PermissionError) as refused:
        client.v1.refunds.create(params={"payment_intent": intent, "amount": 2000})
    assert error_of(refused.value) == (403, "paymaster_run_cap_exceeded")
    runs = {r.run for r in proxy.gov.audit.query()}
    assert runs == {f"pmk_{key.split('_')[1]}"}
    proxy.client().v1.refunds.create(params={"payment_intent": intent, "amount": 2000})


# -- idempotency -------------------------------------------------------------------------
def test_a_retry_with_the_same_key_is_counted_once_and_replayed(proxy: Proxy) -> None:
    intent = paid_intent(proxy.server, 5000)
    client = proxy.client()
    params = {"payment_intent": intent, "amount": 1500}
    first = client.v1.refunds.create(params=params, options={"idempotency_key": "k-1"})
    again = client.v1.refunds.create(params=params, options={"idempotency_key": "k-1"})
    assert again.id == first.id
    assert again.last_response.headers["idempotent-replayed"] == "true"
    assert [p.headers["idempotency-key"].split("~")[0] for p in proxy.upstream.posts()] == ["k-1"]
    assert refunds_of(proxy.server, intent) == [1500]
    assert proxy.committed() == Money(1500, "USD")
    charged, replayed = proxy.audit("/v1/refunds")
    assert (charged.actual, replayed.actual, replayed.outcome) == (1500, 0, "allowed")
    # Its own attempt (a free call of its own), naming Stripe's request it replays.
    assert (replayed.http_status, replayed.vendor_request_id) == (
        charged.http_status,
        charged.vendor_request_id,
    )
    assert (replayed.credential, replayed.run) == (charged.credential, charged.run)
    # The same key on another request is not a replay of this one: it is governed (and
    # counted) as its own call, and Stripe, which scopes keys to their parameters, would
    # refuse it (localstripe does not).
    other = client.v1.refunds.create(
        params={**params, "amount": 1600}, options={"idempotency_key": "k-1"}
    )
    assert other.id != first.id
    assert "idempotent-replayed" not in other.last_response.headers
    assert proxy.committed() == Money(1500 + 1600, "USD")


def test_replays_are_kept_for_24_hours_then_the_key_is_a_new_call(
    proxy: Proxy, clock: Clock
) -> None:
    """Stripe forgets a key after 24 hours: the same key then makes a new refund, which
    is reserved and counted as one."""
    intent = paid_intent(proxy.server, 5000)
    client = proxy.client()
    day = clock().date()
    params = {"payment_intent": intent, "amount": 1000}
    first = client.v1.refunds.create(params=params, options={"idempotency_key": "k-day"})
    clock.advance(hours=23, minutes=59)
    assert client.v1.refunds.create(params=params, options={"idempotency_key": "k-day"}).id == (
        first.id
    )
    clock.advance(minutes=2)
    again = client.v1.refunds.create(params=params, options={"idempotency_key": "k-day"})
    assert again.id != first.id
    assert len(proxy.upstream.posts()) == 2
    assert proxy.committed(day=day) == Money(1000, "USD")
    assert proxy.committed() == Money(1000, "USD")  # the next day's budget


def credential_of(key: str) -> str:
    """``pmk_<id>`` of a whole vault key: its credential on audit rows, and its run."""
    return key[: len("pmk_") + 12]


def create_intent(proxy: Proxy, key: str, idempotency_key: str = "k-pi") -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/v1/payment_intents",
        data={"amount": "2000", "currency": "usd"},
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key},
    )


def test_a_replay_is_served_only_to_the_vault_key_that_made_the_call(proxy: Proxy) -> None:
    """Another key presenting the same request and Idempotency-Key gets nothing of the
    first call's answer: a key its policy refuses is refused, one it allows makes its own
    call (its own hold, run and row), never a replay of another run's."""
    made = create_intent(proxy, proxy.key)
    assert made.status_code == 200, made.text
    intent = made.json()
    assert intent["client_secret"]

    narrowed = {"currency": "USD", "endpoints": ["/v1/customers"], "methods": ["GET"]}
    narrow = proxy.new_key(run_policy=RunPolicy.model_validate(narrowed))
    refused = create_intent(proxy, narrow)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "paymaster_endpoint_not_allowed"
    assert intent["id"] not in refused.text and intent["client_secret"] not in refused.text
    assert "idempotent-replayed" not in refused.headers

    other = proxy.new_key()
    own = create_intent(proxy, other)
    assert own.status_code == 200, own.text
    assert "idempotent-replayed" not in own.headers
    assert own.json()["id"] != intent["id"]
    assert len(proxy.upstream.posts("/v1/payment_intents")) == 2

    again = create_intent(proxy, proxy.key)  # the key that made the call: replayed
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == intent["id"]
    rows = proxy.audit("/v1/payment_intents")
    assert [(r.credential, r.run, r.outcome) for r in rows] == [
        (credential_of(proxy.key), credential_of(proxy.key), "allowed"),
        (credential_of(narrow), credential_of(narrow), "denied"),
        (credential_of(other), credential_of(other), "allowed"),
        (credential_of(proxy.key), credential_of(proxy.key), "allowed"),
    ]
    assert len(proxy.upstream.posts("/v1/payment_intents")) == 2


def test_a_replay_is_governed_like_the_call_it_repeats(
    proxy: Proxy, localstripe: LocalStripe, clock: Clock
) -> None:
    """A replay spends nothing, but it is checked as the call it repeats: a policy tightened
    since, or a revoke of the key's run, refuses it with the usual refusal and its row."""
    intent = paid_intent(proxy.server, 5000)
    key = proxy.new_key(run="run-7")
    params = {"payment_intent": intent, "amount": 1000}
    options: Any = {"idempotency_key": "k-gov"}
    first = proxy.client(key).v1.refunds.create(params=params, options=options)

    tightened = refund_agent_policy(endpoints=["/v1/customers"])
    config = ProxyConfig(upstream=localstripe.url, stripe_key=TEST_API_KEY)
    with Governor(proxy.gov.engine, policies=[tightened], clock=clock) as gov:
        with serve_app(create_app(gov, config)) as url:
            with pytest.raises(stripe.PermissionError) as narrowed:
                proxy_client(url, key).v1.refunds.create(params=params, options=options)
    assert error_of(narrowed.value) == (403, "paymaster_endpoint_not_allowed")

    proxy.gov.revoke(run="run-7", reason="runaway", by="oncall")
    with pytest.raises(stripe.PermissionError) as revoked:
        proxy.client(key).v1.refunds.create(params=params, options=options)
    assert error_of(revoked.value) == (403, "paymaster_revoked")
    proxy.gov.restore(run="run-7", reason="fixed", by="oncall")
    assert proxy.client(key).v1.refunds.create(params=params, options=options).id == first.id

    rows = proxy.audit("/v1/refunds")
    assert [(r.outcome, r.violation_code, r.actual) for r in rows] == [
        ("allowed", None, 1000),
        ("denied", "endpoint_not_allowed", 0),
        ("denied", "revoked", 0),
        ("allowed", None, 0),
    ]
    assert {(r.credential, r.run) for r in rows} == {(credential_of(key), "run-7")}
    assert len(proxy.upstream.posts()) == 1
    assert proxy.committed() == Money(1000, "USD")


def test_a_retry_after_a_lost_response_is_forwarded_with_the_same_key_and_counted_once(
    proxy: Proxy,
) -> None:
    intent = paid_intent(proxy.server, 5000)
    lost: list[str] = []

    def lose_the_first_refund(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.method == "POST" and not lost:
            lost.append(request.url.path)
            raise httpx.ReadTimeout("upstream timed out", request=request)
        return response

    proxy.upstream.fault = lose_the_first_refund
    client = proxy.client()
    params = {"payment_intent": intent, "amount": 2500}
    with pytest.raises(stripe.APIError) as failed:
        client.v1.refunds.create(params=params, options={"idempotency_key": "k-lost"})
    assert error_of(failed.value) == (502, "paymaster_upstream_outcome_unknown")
    assert failed.value.headers is not None
    assert failed.value.headers["idempotency-key"] == "k-lost"
    (kept,) = proxy.gov.holds()
    assert kept.state is HoldState.UNKNOWN
    assert proxy.committed() == Money(2500, "USD")  # still counted: Stripe may have paid

    retried = client.v1.refunds.create(params=params, options={"idempotency_key": "k-lost"})
    assert retried.amount == 2500
    sent = [p.headers["idempotency-key"] for p in proxy.upstream.posts()]
    assert len(sent) == 2 and sent[0] == sent[1] and sent[0].startswith("k-lost~")
    assert proxy.gov.holds() == []
    assert proxy.committed() == Money(2500, "USD")  # reserved and counted once
    # localstripe ignores idempotency keys, so it refunded twice; Stripe would replay.
    assert refunds_of(proxy.server, intent) == [2500, 2500]


def test_the_same_key_on_behalf_of_another_account_is_another_call(proxy: Proxy) -> None:
    """Stripe scopes idempotency keys per account: with another Stripe-Context the same key
    and body are a new call, reserved and counted on their own, never a replay."""
    intent = paid_intent(proxy.server, 5000)
    for context in ("acct_A", "acct_B"):
        response = httpx.post(
            f"{proxy.url}/v1/refunds",
            data={"payment_intent": intent, "amount": "1000"},
            headers={
                "Authorization": f"Bearer {proxy.key}",
                "Idempotency-Key": "k-ctx",
                "Stripe-Context": context,
            },
        )
        assert response.status_code == 200, response.text
        assert "idempotent-replayed" not in response.headers
    posts = proxy.upstream.posts()
    assert [p.headers["stripe-context"] for p in posts] == ["acct_A", "acct_B"]
    assert proxy.committed() == Money(2000, "USD")


def test_an_unreachable_upstream_releases_the_hold(proxy: Proxy, clock: Clock) -> None:
    """No connection means nothing was sent: the hold is released, not kept unknown."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    config = ProxyConfig(upstream=f"http://127.0.0.1:{port}", stripe_key=TEST_API_KEY)
    with serve_app(create_app(proxy.gov, config)) as url:
        with pytest.raises(stripe.APIError) as failed:
            proxy_client(url, proxy.key).v1.payment_intents.create(
                params={"amount": 3000, "currency": "usd"}
            )
    assert error_of(failed.value) == (502, "paymaster_upstream_unreachable")
    assert "not sent" in str(failed.value.user_message)
    assert proxy.gov.holds() == []
    assert proxy.committed() == Money(0, "USD")
    (row,) = proxy.gov.audit.query()
    assert (row.outcome, row.estimate, row.actual) == ("errored", 3000, 0)


def test_a_header_value_httpx_cannot_send_is_refused_before_anything_is_reserved(
    proxy: Proxy,
) -> None:
    response = httpx.post(
        f"{proxy.url}/v1/payment_intents",
        data={"amount": "100", "currency": "usd"},
        headers=[("Authorization", f"Bearer {proxy.key}"), ("Idempotency-Key", b"k\xe9y")],
    )
    assert response.status_code == 400, response.text
    assert "printable ASCII" in response.json()["error"]["message"]
    assert proxy.upstream.seen == [] and proxy.gov.holds() == []


# -- keys and the kill switch ------------------------------------------------------------
def test_a_key_made_without_a_run_is_its_own_run_on_every_row_and_can_be_revoked(
    proxy: Proxy,
) -> None:
    client = proxy.client()
    client.v1.customers.list()
    too_big = httpx.post(
        f"{proxy.url}/v1/refunds",
        content=b"x" * 300_000,
        headers={"Authorization": f"Bearer {proxy.key}"},
    )
    assert too_big.status_code == 413
    proxy.gov.revoke(run=credential_of(proxy.key), reason="this key only", by="oncall")
    with pytest.raises(stripe.PermissionError) as refused:
        client.v1.customers.list()
    assert error_of(refused.value) == (403, "paymaster_revoked")
    proxy.client(proxy.new_key()).v1.customers.list()  # another key of the agent: allowed
    rows = proxy.gov.audit.query()
    assert [(r.outcome, r.violation_code) for r in rows] == [
        ("allowed", None),
        ("denied", "invalid_request"),
        ("denied", "revoked"),
        ("allowed", None),
    ]
    assert [(r.credential, r.run) for r in rows[:3]] == [(credential_of(proxy.key),) * 2] * 3
    assert rows[3].credential != credential_of(proxy.key)
    assert len(proxy.upstream.seen) == 2
    assert proxy.gov.audit.verify().ok


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
def test_a_method_other_than_get_post_delete_is_refused_after_the_key_and_audited(
    proxy: Proxy, method: str
) -> None:
    with httpx.Client(base_url=proxy.url) as http:
        anonymous = http.request(method, "/v1/refunds")
        assert anonymous.status_code == 401, anonymous.text
        assert anonymous.json()["error"]["code"] == "paymaster_missing_api_key"
        response = http.request(
            method, "/v1/refunds", headers={"Authorization": f"Bearer {proxy.key}"}
        )
    assert response.status_code == 405, response.text
    assert response.json()["error"]["code"] == "paymaster_method_not_allowed"
    (row,) = proxy.gov.audit.query()
    assert (row.outcome, row.violation_code, row.method, row.endpoint) == (
        "denied",
        "method_not_allowed",
        method,
        "/v1/refunds",
    )
    assert (row.credential, row.run) == (credential_of(proxy.key), credential_of(proxy.key))
    assert [(f.key_id, f.reason, f.count) for f in proxy.keys().failures()] == [
        (UNKNOWN_KEY, "missing", 1)
    ]
    assert proxy.upstream.seen == [] and proxy.gov.holds() == []


def test_failed_authentications_are_counted_per_key_and_reason_in_bounded_rows(
    proxy: Proxy, clock: Clock
) -> None:
    own_id = proxy.key.split("_")[1]
    expiring = proxy.new_key(expires_at=clock() + timedelta(hours=1))
    revoked = proxy.new_key()
    proxy.keys().revoke(revoked, by="oncall", reason="leaked")
    clock.advance(hours=1)
    presented = [
        TEST_API_KEY,  # malformed, naming no key
        f"pmk_{own_id}_short",  # malformed, naming a known key
        *(f"pmk_{i:012x}_" + "A" * 43 for i in range(20)),  # a flood of unknown keys
        f"pmk_{own_id}_" + "A" * 43,  # a known id with a wrong secret
        expiring,
        revoked,
    ]
    for key in presented:
        auth = {"Authorization": f"Bearer {key}"}
        response = httpx.get(f"{proxy.url}/v1/customers", headers=auth)
        assert response.status_code == 401, key
    assert httpx.get(f"{proxy.url}/v1/customers").status_code == 401
    counted = {(f.key_id, f.reason): f.count for f in proxy.keys().failures()}
    assert counted == {
        (UNKNOWN_KEY, "malformed"): 1,
        (own_id, "malformed"): 1,
        (UNKNOWN_KEY, "unknown"): 20,
        (own_id, "bad_secret"): 1,
        (credential_of(expiring)[4:], "expired"): 1,
        (credential_of(revoked)[4:], "revoked"): 1,
        (UNKNOWN_KEY, "missing"): 1,
    }
    (mine,) = [f for f in proxy.keys().failures(proxy.key) if f.reason == "bad_secret"]
    assert mine.first_at == mine.last_at == clock()
    assert proxy.gov.audit.query() == [] and proxy.upstream.seen == []


def test_a_revoke_stops_the_next_request_and_a_restore_lifts_it(proxy: Proxy) -> None:
    client = proxy.client()
    client.v1.customers.list()
    with Governor(proxy.gov.engine, policies=[]) as operator:  # another process, in effect
        operator.revoke(agent="refund-agent", reason="runaway refunds", by="oncall")
        with pytest.raises(stripe.PermissionError) as refused:
            client.v1.customers.list()
        assert error_of(refused.value) == (403, "paymaster_revoked")
        assert "runaway refunds" in str(refused.value.user_message)
        operator.restore(agent="refund-agent", reason="fixed", by="oncall")
    client.v1.customers.list()
    assert len(proxy.upstream.seen) == 2


def test_a_revoked_vault_key_is_refused_on_its_next_request(proxy: Proxy) -> None:
    client = proxy.client()
    client.v1.customers.list()
    VaultKeys(proxy.gov.engine).revoke(proxy.key, by="oncall", reason="leaked in a log")
    with pytest.raises(stripe.AuthenticationError) as refused:
        client.v1.customers.list()
    assert error_of(refused.value) == (401, "paymaster_vault_key_revoked")
    assert "leaked in a log" in str(refused.value.user_message)
    assert len(proxy.upstream.seen) == 1


def test_a_remembered_key_is_not_read_again_and_its_revocation_is_still_caught(
    proxy: Proxy,
) -> None:
    """After its first request a key is not read again: its revocation is caught inside
    the reserve of the next governed call (here a refund's pricing look-up), answered as
    a revoked key (401, the failure counted), audited, and nothing is sent."""
    key_reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "paymaster_vault_key" in statement:
            key_reads.append(statement)

    event.listen(proxy.gov.engine, "before_cursor_execute", count)
    client = proxy.client()
    for _ in range(3):
        client.v1.customers.list()
    assert len(key_reads) == 1
    intent = paid_intent(proxy.server, 5000)
    seen = len(proxy.upstream.seen)
    proxy.keys().revoke(proxy.key, by="oncall", reason="leaked in a log")
    for _ in range(2):  # caught by the reserve, then refused by authentication
        with pytest.raises(stripe.AuthenticationError) as refused:
            client.v1.refunds.create(params={"payment_intent": intent, "amount": 100})
        assert error_of(refused.value) == (401, "paymaster_vault_key_revoked")
        assert "leaked in a log" in str(refused.value.user_message)
    assert len(proxy.upstream.seen) == seen
    assert refunds_of(proxy.server, intent) == []
    counted = {(f.key_id, f.reason): f.count for f in proxy.keys().failures(proxy.key)}
    assert counted == {(credential_of(proxy.key)[4:], "revoked"): 2}
    denied = [r for r in proxy.gov.audit.query() if r.outcome == "denied"]
    assert [(r.violation_code, r.credential) for r in denied] == [
        ("revoked", credential_of(proxy.key))
    ]
    assert proxy.committed() == Money(0, "USD")
    assert proxy.gov.audit.verify().ok


def test_a_remembered_key_that_expires_is_refused_before_anything_is_sent(
    proxy: Proxy, clock: Clock
) -> None:
    expiring = proxy.new_key(expires_at=clock() + timedelta(hours=1))
    client = proxy.client(expiring)
    client.v1.customers.list()
    clock.advance(hours=1)
    with pytest.raises(stripe.AuthenticationError) as refused:
        client.v1.customers.list()
    assert error_of(refused.value) == (401, "paymaster_vault_key_expired")
    assert len(proxy.upstream.seen) == 1


def test_a_key_that_expires_while_its_request_body_is_being_sent_moves_nothing(
    proxy: Proxy, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is checked when the headers arrive; a body sent after the key expired
    must not reach Stripe (the ledger checks the key again in the reserve)."""
    expiring = proxy.new_key(expires_at=clock() + timedelta(hours=1))
    intent = paid_intent(proxy.server, 5000)
    reading = threading.Event()
    read_body = proxy_app._read_body

    async def noticed(request: Any, limit: int) -> bytes:
        reading.set()  # authenticated: the proxy now waits for the body
        return await read_body(request, limit)

    monkeypatch.setattr(proxy_app, "_read_body", noticed)
    body = f"payment_intent={intent}&amount=700".encode()
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/refunds HTTP/1.1\r\nHost: proxy\r\n"
            + f"Authorization: Bearer {expiring}\r\n".encode()
            + b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        assert reading.wait(10)
        clock.advance(hours=1)
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"401", answer
    assert json.loads(payload)["error"]["code"] == "paymaster_vault_key_expired"
    assert proxy.upstream.seen == []
    assert refunds_of(proxy.server, intent) == []
    denied = [(r.outcome, r.violation_code) for r in proxy.gov.audit.query()]
    assert denied == [("denied", "expired")]
    assert [b.committed for b in proxy.gov.budgets() if b.committed.amount] == []


def test_bad_keys_are_refused_before_anything_is_read_reserved_or_sent(
    proxy: Proxy, clock: Clock
) -> None:
    key_id = proxy.key.split("_")[1]
    expiring = proxy.new_key(expires_at=clock() + timedelta(hours=1))
    clock.advance(hours=1)
    cases = {
        TEST_API_KEY: "paymaster_vault_key_malformed",  # the real key is not accepted
        "pmk_000000000000_" + "A" * 43: "paymaster_vault_key_unknown",
        f"pmk_{key_id}_" + "A" * 43: "paymaster_vault_key_unknown",  # right id, wrong secret
        expiring: "paymaster_vault_key_expired",
    }
    for key, code in cases.items():
        with pytest.raises(stripe.AuthenticationError) as refused:
            proxy.client(key).v1.refunds.create(params={"payment_intent": "pi_1", "amount": 1})
        assert error_of(refused.value) == (401, code), key
    for headers in ({}, {"Authorization": "Token abc"}, {"Authorization": "Basic !!"}):
        response = httpx.get(f"{proxy.url}/v1/customers", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "paymaster_missing_api_key"
    assert proxy.upstream.seen == []
    assert proxy.gov.audit.query() == []
    assert proxy.gov.holds() == []


def test_basic_authentication_with_the_key_as_user_is_accepted(proxy: Proxy) -> None:
    response = httpx.get(f"{proxy.url}/v1/customers", auth=(proxy.key, ""))
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "list"


# -- malformed requests ------------------------------------------------------------------
def test_an_oversized_body_is_refused_and_audited_without_a_reservation(proxy: Proxy) -> None:
    auth = {"Authorization": f"Bearer {proxy.key}"}
    big = {"payment_intent": "pi_1", "amount": "100", "metadata[x]": "x" * 300_000}
    declared = httpx.post(f"{proxy.url}/v1/refunds", data=big, headers=auth)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(300):
            yield b"x" * 1024

    streamed = httpx.post(f"{proxy.url}/v1/refunds", content=chunks(), headers=auth)
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "paymaster_request_too_large"
    assert proxy.upstream.seen == []
    assert proxy.gov.holds() == []
    rows = proxy.gov.audit.query()
    assert [(r.outcome, r.violation_code) for r in rows] == [("denied", "invalid_request")] * 2


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("POST", "/v1/refunds/%2E%2E/payouts", {"data": {"amount": "1"}}, 400),
        ("POST", "//evil.example/v1/refunds", {"data": {"amount": "1"}}, 400),
        ("POST", "/v1/refunds%2F..%2Fpayouts", {"data": {"amount": "1"}}, 400),
        (
            "POST",
            "/v1/refunds",
            {"content": b'{"amount": 1}', "headers": [("Content-Type", "application/json")]},
            400,
        ),
        (
            "POST",
            "/v1/refunds",
            {
                "data": {"amount": "1"},
                "headers": [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
            },
            400,
        ),
        ("PUT", "/v1/refunds", {}, 405),
        ("OPTIONS", "/v1/refunds", {}, 405),
    ],
    ids=["dot-dot", "double-slash", "encoded-slash", "json-body", "two-keys", "put", "options"],
)
def test_malformed_requests_get_a_clear_4xx_and_nothing_is_reserved(
    proxy: Proxy, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    headers = [("Authorization", f"Bearer {proxy.key}"), *kwargs.pop("headers", [])]
    with httpx.Client(base_url=proxy.url) as http:
        response = http.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"].startswith("paymaster_") and error["message"]
    assert proxy.upstream.seen == []
    assert proxy.gov.holds() == []


def test_stripe_refusing_the_proxys_key_is_not_passed_on_to_the_agent(proxy: Proxy) -> None:
    def refuse_the_key(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = (
            b'{"error": {"type": "invalid_request_error", "message": "Invalid API Key '
            b"provided: sk_test_****ymaster and " + TEST_API_KEY.encode() + b'"}}'
        )
        status = 401 if request.url.path == "/v1/customers" else 403
        return httpx.Response(status, content=body, headers={"Request-Id": "req_1"})

    proxy.upstream.fault = refuse_the_key
    client = proxy.client()
    with pytest.raises(stripe.APIError) as failed:
        client.v1.customers.list()
    assert error_of(failed.value) == (502, "paymaster_upstream_authentication_failed")
    with pytest.raises(stripe.PermissionError) as forbidden:
        client.v1.products.list()  # not in the policy's endpoints, so refused before ...
    assert error_of(forbidden.value)[0] == 403
    with pytest.raises(stripe.PermissionError) as passed_on:
        client.v1.payment_intents.list()  # ... while this one is Stripe's own 403
    assert "sk_test" not in str(passed_on.value.user_message)
    assert "[the proxy's Stripe key]" in str(passed_on.value.user_message)
    for row in proxy.gov.audit.query():
        assert "sk_test" not in (row.error or "")
    assert proxy.gov.holds() == []


def test_the_health_endpoint_answers_when_the_ledger_does(proxy: Proxy) -> None:
    response = httpx.get(f"{proxy.url}/_paymaster/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.postgres
def test_an_unreachable_ledger_fails_closed(pg_schema_url: str, localstripe: LocalStripe) -> None:
    tcp, routed = routed_through(pg_schema_url)
    gov = Governor(routed, policies=[refund_agent_policy(endpoints=POLICY_ENDPOINTS)])
    upstream = RecordingUpstream()
    config = ProxyConfig(upstream=localstripe.url, stripe_key=TEST_API_KEY)
    try:
        key = VaultKeys(gov.engine).create("refund-agent", by="test").secret
        with serve_app(create_app(gov, config, upstream_transport=upstream)) as proxy_url:
            client = proxy_client(proxy_url, key)
            client.v1.customers.list()
            tcp.cut()
            with pytest.raises(stripe.APIError) as failed:
                client.v1.customers.list()
            assert error_of(failed.value) == (503, "paymaster_ledger_unavailable")
            message = str(failed.value.user_message)
            assert "unavailable" in message and "not forwarded" in message
            assert str(tcp.port) not in message and "postgresql" not in message
            health = httpx.get(f"{proxy_url}/_paymaster/health")
            assert (health.status_code, health.json()) == (503, {"status": "unavailable"})
    finally:
        gov.close()
    assert len(upstream.seen) == 1


@pytest.mark.postgres
def test_a_ledger_lost_after_stripe_answered_still_returns_stripes_answer(
    pg_schema_url: str, localstripe: LocalStripe
) -> None:
    """Raising after Stripe acted would tell the agent the refund failed and invite a
    retry: the refund comes back, and its hold stays pending and counted."""
    tcp, routed = routed_through(pg_schema_url)
    gov = Governor(routed, policies=[refund_agent_policy(endpoints=POLICY_ENDPOINTS)])
    intent = paid_intent(localstripe, 5000)

    def lose_the_ledger(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.method == "POST":
            tcp.cut()
        return response

    upstream = RecordingUpstream(fault=lose_the_ledger)
    config = ProxyConfig(upstream=localstripe.url, stripe_key=TEST_API_KEY)
    try:
        key = VaultKeys(gov.engine).create("refund-agent", by="test").secret
        with serve_app(create_app(gov, config, upstream_transport=upstream)) as proxy_url:
            refund = proxy_client(proxy_url, key).v1.refunds.create(
                params={"payment_intent": intent, "amount": 1200}
            )
        assert refund.amount == 1200
    finally:
        gov.close()
    assert refunds_of(localstripe, intent) == [1200]
    with Governor(pg_schema_url, policies=[]) as direct:  # the same ledger, not through tcp
        (held,) = [h for h in direct.holds() if h.endpoint == "/v1/refunds"]
        assert (held.state, held.estimate) == (HoldState.PENDING, Money(1200, "USD"))
        (budget,) = [b for b in direct.budgets() if b.kind == "daily"]
        assert budget.committed == Money(1200, "USD")
