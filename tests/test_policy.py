"""Policies, run policies, effective policies and policy sets (pure, no database)."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from paymaster._errors import PolicyError, PolicyViolation, ViolationCode
from paymaster._money import Money
from paymaster._policy import EffectivePolicy, Policy, PolicySet, RunPolicy, effective_policy

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
USD = "USD"


def make_policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": USD,
        "daily_cap": "100.00",
        "per_call_cap": "50.00",
        "endpoints": ["/v1/refunds"],
    }
    fields.update(overrides)
    return Policy.model_validate(fields)


def call(policy: EffectivePolicy | Policy, **overrides: Any) -> str:
    """Run the pure checks with a call that passes the default policy."""
    effective = effective_policy(policy) if isinstance(policy, Policy) else policy
    fields: dict[str, Any] = {
        "endpoint": "/v1/refunds",
        "method": "POST",
        "customer": "cus_1",
        "estimate": Money(1000, USD),
        "now": NOW,
    }
    fields.update(overrides)
    return effective.check(**fields)


def denied(policy: EffectivePolicy | Policy, **overrides: Any) -> ViolationCode:
    with pytest.raises(PolicyViolation) as info:
        call(policy, **overrides)
    return info.value.code


def error_locs(exc: ValidationError) -> list[tuple[int | str, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


# -- Policy validation ----------------------------------------------------------------


def test_valid_policy_fields() -> None:
    p = make_policy(methods=["post"], max_calls_per_day=10)
    assert p.daily_cap == Money(10000, USD)
    assert p.per_call_cap == Money(5000, USD)
    assert p.endpoints == ("/v1/refunds",)
    assert p.methods == ("POST",)
    assert p.max_calls_per_day == 10


def test_naive_expires_at_is_an_error_located_at_expires_at() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(expires_at="2030-01-01T00:00:00")
    assert error_locs(info.value) == [("expires_at",)]


def test_naive_datetime_object_is_rejected_too() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(expires_at=datetime(2030, 1, 1))
    assert error_locs(info.value) == [("expires_at",)]


def test_expires_at_is_converted_to_utc() -> None:
    p = make_policy(expires_at="2030-01-01T02:00:00+02:00")
    assert p.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert p.expires_at is not None
    assert p.expires_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("field", ["daily_cap", "per_call_cap"])
@pytest.mark.parametrize("value", ["0", "0.00", "-5.00", 0, -1])
def test_caps_must_be_positive(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match="must be positive") as info:
        make_policy(**{field: value})
    assert (field,) in error_locs(info.value)


def test_max_calls_per_day_must_be_positive() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(max_calls_per_day=0)
    assert error_locs(info.value) == [("max_calls_per_day",)]


@pytest.mark.parametrize("code", ["XYZ", "US", "usdollar", "", None])
def test_currency_must_be_an_iso_code(code: object) -> None:
    with pytest.raises(ValidationError, match="ISO 4217") as info:
        make_policy(currency=code)
    assert ("currency",) in error_locs(info.value)


def test_currency_is_upper_cased() -> None:
    assert make_policy(currency="usd").currency == USD


def test_cap_in_another_currency_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(daily_cap="100.00 EUR")
    assert ("daily_cap",) in error_locs(info.value)


def test_cap_with_matching_code_is_accepted() -> None:
    assert make_policy(daily_cap="100 USD").daily_cap == Money(10000, USD)


def test_caps_follow_the_currency_exponent() -> None:
    p = make_policy(currency="JPY", daily_cap="10000", per_call_cap="500")
    assert p.daily_cap == Money(10000, "JPY")
    assert p.per_call_cap == Money(500, "JPY")


def test_cap_with_too_many_decimals_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(currency="JPY", daily_cap="100.5", per_call_cap=None)
    assert ("daily_cap",) in error_locs(info.value)


def test_per_call_cap_above_daily_cap_is_rejected() -> None:
    with pytest.raises(ValidationError, match="per_call_cap is above daily_cap"):
        make_policy(daily_cap="10.00", per_call_cap="10.01")


def test_per_call_cap_equal_to_daily_cap_is_allowed() -> None:
    assert make_policy(daily_cap="10.00", per_call_cap="10.00").per_call_cap == Money(1000, USD)


def test_methods_are_upper_cased() -> None:
    assert make_policy(methods=["get", " Post "]).methods == ("GET", "POST")


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown HTTP method") as info:
        make_policy(methods=["POST", "FETCH"])
    assert error_locs(info.value) == [("methods",)]


@pytest.mark.parametrize("field", ["endpoints", "methods", "customers"])
def test_allowlist_given_as_a_string_is_rejected(field: str) -> None:
    with pytest.raises(ValidationError, match="must be a list") as info:
        make_policy(**{field: "POST"})
    assert error_locs(info.value) == [(field,)]


@pytest.mark.parametrize("field", ["endpoints", "methods", "customers"])
def test_allowlist_of_the_wrong_type_is_a_validation_error(field: str) -> None:
    with pytest.raises(ValidationError, match="must be a list") as info:
        make_policy(**{field: 5})
    assert error_locs(info.value) == [(field,)]


def test_blank_allowlist_entry_is_rejected() -> None:
    with pytest.raises(ValidationError, match="non-empty strings"):
        make_policy(customers=["cus_1", "  "])


def test_endpoints_are_required_and_non_empty() -> None:
    with pytest.raises(ValidationError, match="at least one path"):
        make_policy(endpoints=[])


def test_bad_endpoint_pattern_is_rejected() -> None:
    with pytest.raises(ValidationError, match="endpoint pattern") as info:
        make_policy(endpoints=["/v1/ref*"])
    assert error_locs(info.value) == [("endpoints",)]


def test_endpoint_patterns_are_canonicalised() -> None:
    assert make_policy(endpoints=["/v1/refunds/"]).endpoints == ("/v1/refunds",)


def test_default_id_is_agent_slash_vendor() -> None:
    assert make_policy(id="").id == "refund-agent/stripe"
    fields = {"agent": "a", "vendor": "v", "currency": USD, "daily_cap": "1", "endpoints": ["/"]}
    assert Policy.model_validate(fields).id == "a/v"


def test_agent_and_vendor_must_not_be_blank() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(agent="  ", vendor="")
    assert error_locs(info.value) == [("agent",), ("vendor",)]


def test_unknown_fields_are_forbidden() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(daly_cap="5.00")
    assert error_locs(info.value) == [("daly_cap",)]


def test_policy_is_frozen() -> None:
    with pytest.raises(ValidationError):
        make_policy().daily_cap = Money(1, USD)  # type: ignore[misc]


def test_bare_numbers_are_major_units_and_never_binary_float() -> None:
    # A float keeps only ~16 digits of what was typed: it is refused, to be quoted.
    with pytest.raises(ValidationError, match=r'quote it, as in daily_cap: "0\.30"'):
        make_policy(daily_cap=0.3, per_call_cap=None)
    assert make_policy(daily_cap=100, per_call_cap=None).daily_cap == Money(10000, USD)


def test_cap_as_minor_unit_mapping() -> None:
    p = make_policy(daily_cap={"amount": 10000, "currency": USD})
    assert p.daily_cap == Money(10000, USD)


def test_cap_mapping_with_float_amount_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(daily_cap={"amount": 100.5, "currency": USD})
    assert ("daily_cap",) in error_locs(info.value)


def test_bool_cap_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        make_policy(daily_cap=True)
    assert ("daily_cap",) in error_locs(info.value)


# -- the blog-post shape --------------------------------------------------------------

BLOG_POLICY: dict[str, Any] = {
    "agent_id": "a",
    "vendor": "stripe",
    "daily_usd_cap": "100.00",
    "allowed_endpoints": ["/v1/refunds"],
    "allowed_customer_ids": ["cus_1"],
    "expires_at": "2030-01-01T00:00:00Z",
}


def test_blog_post_field_names_load() -> None:
    p = Policy.model_validate(BLOG_POLICY)
    assert p.agent == "a"
    assert p.currency == USD
    assert p.daily_cap == Money(10000, USD)
    assert p.daily_cap.amount == 10000
    assert p.endpoints == ("/v1/refunds",)
    assert p.customers == ("cus_1",)
    assert p.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert p.id == "a/stripe"


def test_blog_shape_with_both_caps_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not both"):
        Policy.model_validate({**BLOG_POLICY, "daily_cap": "5.00"})


def test_blog_usd_cap_with_another_currency_is_rejected() -> None:
    with pytest.raises(ValidationError, match="daily_usd_cap is in USD"):
        Policy.model_validate({**BLOG_POLICY, "currency": "EUR"})


# -- EffectivePolicy.check: the blog post's own tests ---------------------------------


def test_allowed_endpoint_passes_and_returns_canonical_path() -> None:
    assert call(make_policy()) == "/v1/refunds"


def test_disallowed_endpoint_is_denied() -> None:
    assert denied(make_policy(), endpoint="/v1/charges") == ViolationCode.ENDPOINT_NOT_ALLOWED


def test_sub_resource_of_allowed_endpoint_passes() -> None:
    assert call(make_policy(), endpoint="/v1/refunds/re_abc123") == "/v1/refunds/re_abc123"


def test_estimate_at_per_call_cap_passes() -> None:
    assert call(make_policy(), estimate=Money(5000, USD)) == "/v1/refunds"


def test_estimate_over_per_call_cap_is_denied() -> None:
    with pytest.raises(PolicyViolation) as info:
        call(make_policy(), estimate=Money(5001, USD))
    assert info.value.code == ViolationCode.PER_CALL_CAP
    assert info.value.remaining == Money(5000, USD)


def test_without_per_call_cap_the_daily_cap_bounds_one_call() -> None:
    policy = make_policy(per_call_cap=None)
    cap = policy.daily_cap
    assert call(policy, estimate=cap) == "/v1/refunds"
    assert denied(policy, estimate=cap + Money(1, USD)) == ViolationCode.CAP_EXCEEDED
    # An amount no BIGINT column could hold is refused before it reaches the ledger.
    assert denied(policy, estimate=Money(10**30, USD)) == ViolationCode.CAP_EXCEEDED


def test_run_policy_in_another_currency_is_refused() -> None:
    with pytest.raises(PolicyError, match="currency"):
        effective_policy(make_policy(), RunPolicy(currency="EUR"))


def test_expired_policy_is_denied() -> None:
    p = make_policy(expires_at=NOW - timedelta(seconds=1))
    assert denied(p) == ViolationCode.EXPIRED


def test_policy_is_expired_at_the_exact_expiry_instant() -> None:
    assert denied(make_policy(expires_at=NOW)) == ViolationCode.EXPIRED


def test_future_expiry_passes() -> None:
    assert call(make_policy(expires_at=NOW + timedelta(seconds=1))) == "/v1/refunds"


def test_expiry_is_checked_before_anything_else() -> None:
    p = make_policy(expires_at=NOW)
    assert denied(p, endpoint="/v1/charges", estimate=Money(1, "EUR")) == ViolationCode.EXPIRED


# -- EffectivePolicy.check: what the blog post gets wrong -----------------------------


def test_prefix_lookalike_endpoint_is_denied() -> None:
    assert denied(make_policy(), endpoint="/v1/refundsX") == ViolationCode.ENDPOINT_NOT_ALLOWED


@pytest.mark.parametrize(
    "endpoint",
    [
        "/v1/refunds/../charges",
        "/v1/refunds/%2e%2e/charges",
        "/v1/refunds/%252e%252e/charges",
        "/v1/refunds\\..\\charges",
        "/v1//refunds",
        "/v1/refunds/%ff",
    ],
)
def test_path_traversal_is_denied_never_allowed(endpoint: str) -> None:
    assert denied(make_policy(), endpoint=endpoint) == ViolationCode.ENDPOINT_NOT_ALLOWED


def test_full_url_is_checked_on_its_path() -> None:
    assert call(make_policy(), endpoint="https://api.stripe.com/v1/refunds?x=1") == "/v1/refunds"


def test_unlisted_customer_is_denied() -> None:
    p = make_policy(customers=["cus_1"])
    assert denied(p, customer="cus_2") == ViolationCode.CUSTOMER_NOT_ALLOWED


def test_missing_customer_is_denied_when_an_allowlist_exists() -> None:
    p = make_policy(customers=["cus_1"])
    assert denied(p, customer=None) == ViolationCode.CUSTOMER_NOT_ALLOWED


def test_listed_customer_passes() -> None:
    assert call(make_policy(customers=["cus_1", "cus_2"]), customer="cus_2") == "/v1/refunds"


def test_without_customer_allowlist_any_or_no_customer_passes() -> None:
    assert call(make_policy(), customer=None) == "/v1/refunds"
    assert call(make_policy(), customer="cus_anyone") == "/v1/refunds"


def test_estimate_in_another_currency_is_denied() -> None:
    code = denied(make_policy(), estimate=Money(100, "EUR"))
    assert code == ViolationCode.CURRENCY_MISMATCH


def test_currency_mismatch_is_denied_even_without_a_per_call_cap() -> None:
    code = denied(make_policy(per_call_cap=None), estimate=Money(1, "JPY"))
    assert code == ViolationCode.CURRENCY_MISMATCH


def test_method_outside_allowlist_is_denied() -> None:
    p = make_policy(methods=["POST"])
    assert denied(p, method="DELETE") == ViolationCode.METHOD_NOT_ALLOWED


def test_method_check_is_case_insensitive() -> None:
    assert call(make_policy(methods=["POST"]), method="post") == "/v1/refunds"


def test_negative_estimate_is_denied() -> None:
    assert denied(make_policy(), estimate=Money(-1, USD)) == ViolationCode.PER_CALL_CAP


def test_violation_carries_context() -> None:
    with pytest.raises(PolicyViolation) as info:
        call(make_policy(), endpoint="/v1/charges", run="run-7")
    v = info.value
    assert (v.policy_id, v.agent, v.vendor, v.run, v.endpoint) == (
        "refunds",
        "refund-agent",
        "stripe",
        "run-7",
        "/v1/charges",
    )
    assert str(v).startswith("[endpoint_not_allowed]")


def test_violation_survives_pickling() -> None:
    with pytest.raises(PolicyViolation) as info:
        call(make_policy(), estimate=Money(5001, USD), run="r")
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.code, clone.run, clone.remaining) == (
        ViolationCode.PER_CALL_CAP,
        "r",
        Money(5000, USD),
    )


# -- effective_policy: narrowing ------------------------------------------------------


def narrow(policy: Policy | None = None, **run: Any) -> EffectivePolicy:
    return effective_policy(policy or make_policy(), RunPolicy.model_validate(run))


def test_no_run_policy_keeps_the_policy() -> None:
    e = effective_policy(make_policy())
    assert e.per_call_cap == Money(5000, USD)
    assert e.run_cap is None
    assert e.run_max_calls is None
    assert not e.has_run_budget


def test_run_cap_narrows() -> None:
    e = narrow(cap="20.00 USD")
    assert e.run_cap == Money(2000, USD)
    assert e.daily_cap == Money(10000, USD)
    assert e.has_run_budget


def test_run_cap_equal_to_daily_cap_is_allowed() -> None:
    assert narrow(cap="100.00 USD").run_cap == Money(10000, USD)


def test_run_cap_with_currency_field() -> None:
    assert narrow(currency="usd", cap="20").run_cap == Money(2000, USD)


def test_run_per_call_cap_narrows_and_is_enforced() -> None:
    e = narrow(per_call_cap="5.00 USD")
    assert e.per_call_cap == Money(500, USD)
    assert call(e, estimate=Money(500, USD)) == "/v1/refunds"
    assert denied(e, estimate=Money(501, USD)) == ViolationCode.PER_CALL_CAP


def test_run_per_call_cap_when_policy_has_none_is_bounded_by_daily_cap() -> None:
    p = make_policy(per_call_cap=None)
    assert narrow(p, per_call_cap="100.00 USD").per_call_cap == Money(10000, USD)
    with pytest.raises(PolicyError, match="per_call_cap"):
        narrow(p, per_call_cap="100.01 USD")


def test_run_endpoints_narrow_and_both_lists_apply() -> None:
    e = narrow(make_policy(endpoints=["/v1/refunds", "/v1/charges"]), endpoints=["/v1/refunds"])
    assert call(e, endpoint="/v1/refunds/re_1") == "/v1/refunds/re_1"
    assert denied(e, endpoint="/v1/charges") == ViolationCode.ENDPOINT_NOT_ALLOWED


def test_run_endpoint_below_a_policy_endpoint_is_a_narrowing() -> None:
    e = narrow(endpoints=["/v1/refunds/re_1"])
    assert call(e, endpoint="/v1/refunds/re_1") == "/v1/refunds/re_1"
    assert denied(e, endpoint="/v1/refunds/re_2") == ViolationCode.ENDPOINT_NOT_ALLOWED


def test_run_customers_narrow() -> None:
    e = narrow(make_policy(customers=["cus_1", "cus_2"]), customers=["cus_1"])
    assert call(e, customer="cus_1") == "/v1/refunds"
    assert denied(e, customer="cus_2") == ViolationCode.CUSTOMER_NOT_ALLOWED


def test_run_customers_apply_when_policy_has_none() -> None:
    e = narrow(customers=["cus_9"])
    assert call(e, customer="cus_9") == "/v1/refunds"
    assert denied(e, customer="cus_1") == ViolationCode.CUSTOMER_NOT_ALLOWED


def test_run_methods_narrow() -> None:
    e = narrow(make_policy(methods=["GET", "POST"]), methods=["get"])
    assert e.methods == ("GET",)
    assert denied(e, method="POST") == ViolationCode.METHOD_NOT_ALLOWED


def test_run_methods_apply_when_policy_has_none() -> None:
    assert narrow(methods=["POST"]).methods == ("POST",)


def test_earlier_run_expiry_narrows() -> None:
    p = make_policy(expires_at=NOW + timedelta(days=1))
    e = narrow(p, expires_at=NOW)
    assert e.expires_at == NOW
    assert denied(e) == ViolationCode.EXPIRED


def test_run_expiry_applies_when_policy_has_none() -> None:
    assert narrow(expires_at=NOW + timedelta(hours=1)).expires_at == NOW + timedelta(hours=1)


def test_run_max_calls_within_daily_limit() -> None:
    e = narrow(make_policy(max_calls_per_day=10), max_calls=10)
    assert e.run_max_calls == 10
    assert e.max_calls_per_day == 10
    assert e.has_run_budget


def test_run_max_calls_when_policy_has_no_call_limit() -> None:
    assert narrow(max_calls=1000).run_max_calls == 1000


def test_run_vendor_must_match() -> None:
    assert narrow(vendor="stripe").vendor == "stripe"
    with pytest.raises(PolicyError, match="vendor"):
        narrow(vendor="twilio")


# -- effective_policy: every widening is refused, naming the field --------------------


@pytest.mark.parametrize(
    ("policy_overrides", "run", "field"),
    [
        ({}, {"cap": "100.01 USD"}, "cap"),
        ({}, {"per_call_cap": "50.01 USD"}, "per_call_cap"),
        ({}, {"endpoints": ["/v1/charges"]}, "endpoints"),
        ({}, {"endpoints": ["/v1"]}, "endpoints"),
        ({"endpoints": ["/v1/customers/cus_1"]}, {"endpoints": ["/v1/customers/*"]}, "endpoints"),
        ({"customers": ["cus_1"]}, {"customers": ["cus_1", "cus_2"]}, "customers"),
        ({"methods": ["POST"]}, {"methods": ["POST", "DELETE"]}, "methods"),
        (
            {"expires_at": NOW},
            {"expires_at": NOW + timedelta(seconds=1)},
            "expires_at",
        ),
        ({"max_calls_per_day": 5}, {"max_calls": 6}, "max_calls"),
    ],
)
def test_widening_raises_policy_error_naming_the_field(
    policy_overrides: dict[str, Any], run: dict[str, Any], field: str
) -> None:
    with pytest.raises(PolicyError, match=f"widens '{field}'"):
        narrow(make_policy(**policy_overrides), **run)


@pytest.mark.parametrize("field", ["cap", "per_call_cap"])
def test_run_cap_in_another_currency_is_rejected(field: str) -> None:
    with pytest.raises(PolicyError, match=f"'{field}' is in EUR"):
        narrow(**{field: "1.00 EUR"})


@pytest.mark.parametrize("field", ["cap", "per_call_cap"])
def test_run_caps_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError, match="must be positive") as info:
        RunPolicy.model_validate({field: "0 USD"})
    assert error_locs(info.value) == [(field,)]


def test_run_cap_without_any_currency_takes_the_policys() -> None:
    # Kept as major units until narrowed: the policy it narrows gives the currency
    # (tests/test_agent_types.py has more).
    run_policy = RunPolicy.model_validate({"cap": "20.00"})
    assert run_policy.cap == Decimal("20.00")
    assert narrow(make_policy(), cap="20.00").run_cap == Money.parse("20.00 USD")


def test_run_policy_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError) as info:
        RunPolicy.model_validate({"daily_cap": "5 USD"})
    assert error_locs(info.value) == [("daily_cap",)]


def test_run_policy_naive_expiry_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        RunPolicy.model_validate({"expires_at": "2030-01-01T00:00:00"})
    assert error_locs(info.value) == [("expires_at",)]


def test_run_policy_accepts_run_cap_alias() -> None:
    assert RunPolicy.model_validate({"run_cap": "3 USD"}).cap == Money(300, USD)


# -- effective policy checks both allowlists ------------------------------------------


def test_effective_policy_keeps_both_endpoint_allowlists() -> None:
    e = narrow(make_policy(endpoints=["/v1/refunds", "/v1/charges"]), endpoints=["/v1/charges"])
    assert e.endpoint_allowlists == (("/v1/refunds", "/v1/charges"), ("/v1/charges",))
    assert denied(e, endpoint="/v1/refunds") == ViolationCode.ENDPOINT_NOT_ALLOWED
    assert call(e, endpoint="/v1/charges") == "/v1/charges"


def test_effective_policy_keeps_both_customer_allowlists() -> None:
    e = narrow(make_policy(customers=["cus_1", "cus_2"]), customers=["cus_2"])
    assert e.customer_allowlists == (("cus_1", "cus_2"), ("cus_2",))
    assert denied(e, customer="cus_1") == ViolationCode.CUSTOMER_NOT_ALLOWED
    assert call(e, customer="cus_2") == "/v1/refunds"


def test_crafted_effective_policy_still_checks_every_allowlist() -> None:
    # Even an EffectivePolicy built by hand with a wider second list stays within the first.
    e = effective_policy(make_policy()).model_copy(
        update={"endpoint_allowlists": (("/v1/refunds",), ("/",))}
    )
    assert denied(e, endpoint="/v1/charges") == ViolationCode.ENDPOINT_NOT_ALLOWED


# -- EffectivePolicy.hash -------------------------------------------------------------


def test_hash_is_stable_for_equal_policies() -> None:
    a = narrow(cap="20.00 USD")
    b = narrow(cap="20 USD")
    assert a == b
    assert a.hash == b.hash
    assert len(a.hash) == 64
    assert int(a.hash, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"daily_cap": "100.01"},
        {"per_call_cap": "49.99"},
        {"endpoints": ["/v1/refunds", "/v1/charges"]},
        {"methods": ["POST"]},
        {"customers": ["cus_1"]},
        {"expires_at": NOW},
        {"max_calls_per_day": 3},
        {"id": "other"},
    ],
)
def test_hash_differs_when_a_rule_differs(change: dict[str, Any]) -> None:
    assert effective_policy(make_policy(**change)).hash != effective_policy(make_policy()).hash


def test_hash_differs_with_a_run_policy() -> None:
    assert narrow(max_calls=3).hash != effective_policy(make_policy()).hash


# -- PolicySet ------------------------------------------------------------------------


def test_policy_set_rejects_two_policies_for_the_same_agent_and_vendor() -> None:
    with pytest.raises(PolicyError, match="two policies govern agent 'refund-agent'"):
        PolicySet([make_policy(id="a"), make_policy(id="b")])


def test_policy_set_rejects_duplicate_ids() -> None:
    with pytest.raises(PolicyError, match="used twice"):
        PolicySet([make_policy(id="x"), make_policy(id="x", vendor="adyen")])


def test_policy_set_require_missing_pair_is_no_policy() -> None:
    with pytest.raises(PolicyViolation) as info:
        PolicySet([make_policy()]).require("refund-agent", "twilio", run="r1")
    assert info.value.code == ViolationCode.NO_POLICY
    assert (info.value.agent, info.value.vendor, info.value.run) == ("refund-agent", "twilio", "r1")


def test_empty_policy_set_refuses_everything() -> None:
    with pytest.raises(PolicyViolation) as info:
        PolicySet().require("a", "b")
    assert info.value.code == ViolationCode.NO_POLICY


def test_one_agent_may_have_policies_for_several_vendors_and_currencies() -> None:
    stripe = make_policy(id="stripe")
    twilio = make_policy(
        id="twilio",
        vendor="twilio",
        currency="EUR",
        daily_cap="20.00",
        per_call_cap=None,
        endpoints=["/2010-04-01/Accounts"],
    )
    policies = PolicySet([stripe, twilio])
    assert len(policies) == 2
    assert policies.require("refund-agent", "stripe").currency == USD
    assert policies.require("refund-agent", "twilio").daily_cap == Money(2000, "EUR")
    assert policies.get("refund-agent", "adyen") is None
    assert [p.id for p in policies] == ["stripe", "twilio"]


def test_cap_too_large_for_the_ledger_is_rejected() -> None:
    with pytest.raises(ValidationError, match="at most 1000000000000000"):
        make_policy(daily_cap=str(10**20), per_call_cap=None)
