"""Loading policies and run policies from YAML, TOML and JSON files."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from paymaster._errors import PolicyError
from paymaster._loading import load_policies, load_run_policy, read_policy_file
from paymaster._money import Money
from paymaster._policy import PolicySet

YAML_POLICIES = """\
policies:
  - id: refunds
    agent: refund-agent
    vendor: stripe
    currency: USD
    daily_cap: "500.00"
    per_call_cap: "50.00"
    endpoints: [/v1/refunds]
    methods: [post]
    customers: [cus_1, cus_2]
    expires_at: 2030-01-01T00:00:00Z
  - id: sms
    agent: refund-agent
    vendor: twilio
    currency: EUR
    daily_cap: 20
    endpoints: [/2010-04-01/Accounts]
"""

TOML_POLICIES = """\
[[policies]]
id = "refunds"
agent = "refund-agent"
vendor = "stripe"
currency = "USD"
daily_cap = "500.00"
per_call_cap = "50.00"
endpoints = ["/v1/refunds"]
methods = ["post"]
customers = ["cus_1", "cus_2"]
expires_at = 2030-01-01T00:00:00Z

[[policies]]
id = "sms"
agent = "refund-agent"
vendor = "twilio"
currency = "EUR"
daily_cap = 20
endpoints = ["/2010-04-01/Accounts"]
"""

JSON_POLICIES = [
    {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "500.00",
        "per_call_cap": "50.00",
        "endpoints": ["/v1/refunds"],
        "methods": ["post"],
        "customers": ["cus_1", "cus_2"],
        "expires_at": "2030-01-01T00:00:00Z",
    },
    {
        "id": "sms",
        "agent": "refund-agent",
        "vendor": "twilio",
        "currency": "EUR",
        "daily_cap": 20,
        "endpoints": ["/2010-04-01/Accounts"],
    },
]

ONE_YAML_POLICY = """\
- id: refunds
  agent: refund-agent
  vendor: stripe
  currency: USD
  daily_cap: "100.00"
  endpoints: [/v1/refunds]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*paths: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policies(*paths)
    return str(info.value)


def assert_example_policies(policies: PolicySet) -> None:
    assert len(policies) == 2
    refunds = policies.require("refund-agent", "stripe")
    assert refunds.id == "refunds"
    assert refunds.daily_cap == Money(50000, "USD")
    assert refunds.per_call_cap == Money(5000, "USD")
    assert refunds.endpoints == ("/v1/refunds",)
    assert refunds.methods == ("POST",)
    assert refunds.customers == ("cus_1", "cus_2")
    assert refunds.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)
    sms = policies.require("refund-agent", "twilio")
    assert sms.daily_cap == Money(2000, "EUR")
    assert sms.per_call_cap is None


# -- the three formats ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["policies.yaml", "policies.yml", "POLICIES.YAML"])
def test_load_yaml(tmp_path: Path, name: str) -> None:
    assert_example_policies(load_policies(write(tmp_path, name, YAML_POLICIES)))


def test_load_toml_policies_tables(tmp_path: Path) -> None:
    assert_example_policies(load_policies(write(tmp_path, "p.toml", TOML_POLICIES)))


def test_load_json_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", json.dumps(JSON_POLICIES))
    assert_example_policies(load_policies(path))


def test_load_json_policies_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", json.dumps({"version": 1, "policies": JSON_POLICIES}))
    assert_example_policies(load_policies(path))


def test_load_yaml_top_level_list(tmp_path: Path) -> None:
    policies = load_policies(write(tmp_path, "p.yaml", ONE_YAML_POLICY))
    assert [p.id for p in policies] == ["refunds"]


def test_load_accepts_str_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", ONE_YAML_POLICY)
    assert len(load_policies(str(path))) == 1


def test_empty_policies_list_loads_an_empty_set(tmp_path: Path) -> None:
    assert len(load_policies(write(tmp_path, "p.yaml", "policies: []\n"))) == 0


def test_yaml_float_cap_is_refused_not_read_as_binary_float(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", ONE_YAML_POLICY.replace('"100.00"', "0.3"))
    message = load_error(path)
    assert message.startswith(f"{path}: policy #1 (refunds): field 'daily_cap'")
    assert 'quote it, as in daily_cap: "0.30"' in message


def test_blog_shape_loads_from_yaml(tmp_path: Path) -> None:
    text = """\
- agent_id: a
  vendor: stripe
  daily_usd_cap: "100.00"
  allowed_endpoints: [/v1/refunds]
  allowed_customer_ids: [cus_1]
  expires_at: 2030-01-01T00:00:00Z
"""
    policy = load_policies(write(tmp_path, "blog.yaml", text)).require("a", "stripe")
    assert policy.daily_cap == Money(10000, "USD")
    assert policy.customers == ("cus_1",)
    assert policy.endpoints == ("/v1/refunds",)
    assert policy.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)


# -- several files --------------------------------------------------------------------


def test_several_files_merge(tmp_path: Path) -> None:
    stripe = write(tmp_path, "stripe.yaml", ONE_YAML_POLICY)
    twilio = write(
        tmp_path,
        "twilio.json",
        json.dumps([{**JSON_POLICIES[1], "agent": "sms-agent"}]),
    )
    policies = load_policies(stripe, twilio)
    assert {(p.agent, p.vendor) for p in policies} == {
        ("refund-agent", "stripe"),
        ("sms-agent", "twilio"),
    }


def test_duplicate_agent_vendor_across_files_is_an_error_naming_both_files(
    tmp_path: Path,
) -> None:
    first = write(tmp_path, "a.yaml", ONE_YAML_POLICY)
    second = write(tmp_path, "b.yaml", ONE_YAML_POLICY.replace("id: refunds", "id: other"))
    message = load_error(first, second)
    assert str(first) in message
    assert str(second) in message
    assert "two policies govern agent 'refund-agent'" in message


def test_duplicate_id_across_files_is_an_error(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", ONE_YAML_POLICY)
    second = write(tmp_path, "b.yaml", ONE_YAML_POLICY.replace("stripe", "adyen"))
    assert "'refunds' is used twice" in load_error(first, second)


# -- errors name the file, the policy and the field -----------------------------------


def policy_error(tmp_path: Path, replace: str, by: str) -> tuple[Path, str]:
    text = YAML_POLICIES.replace(replace, by)
    assert text != YAML_POLICIES
    path = write(tmp_path, "bad.yaml", text)
    return path, load_error(path)


def test_naive_expires_at_names_file_policy_and_field(tmp_path: Path) -> None:
    path, message = policy_error(tmp_path, "2030-01-01T00:00:00Z", "2030-01-01T00:00:00")
    assert message.startswith(f"{path}: policy #1 (refunds): field 'expires_at'")
    assert "timezone" in message


def test_negative_daily_cap_names_file_policy_and_field(tmp_path: Path) -> None:
    path, message = policy_error(tmp_path, "daily_cap: 20", "daily_cap: -20")
    assert message.startswith(f"{path}: policy #2 (sms): field 'daily_cap'")
    assert "must be positive" in message


def test_unknown_currency_names_file_policy_and_field(tmp_path: Path) -> None:
    path, message = policy_error(tmp_path, "currency: EUR", "currency: XYZ")
    assert message.startswith(f"{path}: policy #2 (sms): field 'currency'")
    assert "ISO 4217" in message


def test_unknown_field_is_forbidden_and_named(tmp_path: Path) -> None:
    path, message = policy_error(tmp_path, "    methods: [post]\n", "    methdos: [post]\n")
    assert message.startswith(f"{path}: policy #1 (refunds): field 'methdos'")
    assert "Extra inputs are not permitted" in message


def test_cross_field_error_is_named_at_policy_level(tmp_path: Path) -> None:
    path, message = policy_error(tmp_path, 'per_call_cap: "50.00"', 'per_call_cap: "600.00"')
    assert message.startswith(f"{path}: policy #1 (refunds): field '(policy)'")
    assert "per_call_cap is above daily_cap" in message


def test_several_field_errors_are_all_reported(tmp_path: Path) -> None:
    _, message = policy_error(tmp_path, "currency: USD", "currency: XYZ\n    bogus: 1")
    assert "field 'currency'" in message
    assert "field 'bogus'" in message


def test_policy_without_id_is_named_by_position(tmp_path: Path) -> None:
    text = ONE_YAML_POLICY.replace("- id: refunds\n  agent", "- agent").replace('"100.00"', '"0"')
    path = write(tmp_path, "p.yaml", text)
    assert load_error(path).startswith(f"{path}: policy #1: field 'daily_cap'")


def test_policy_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "- just a string\n")
    assert load_error(path) == f"{path}: policy #1: expected a mapping of fields, got str"


def test_wrong_type_for_allowlist_is_a_policy_error(tmp_path: Path) -> None:
    path, message = policy_error(tmp_path, "endpoints: [/v1/refunds]", "endpoints: 5")
    assert message.startswith(f"{path}: policy #1 (refunds): field 'endpoints'")


def test_cap_mapping_with_float_amount_is_a_policy_error(tmp_path: Path) -> None:
    bad = {**JSON_POLICIES[1], "daily_cap": {"amount": 20.5, "currency": "EUR"}}
    path = write(tmp_path, "p.json", json.dumps([bad]))
    assert load_error(path).startswith(f"{path}: policy #1 (sms): field 'daily_cap'")


def test_json_naive_expiry_is_named(tmp_path: Path) -> None:
    bad = {**JSON_POLICIES[0], "expires_at": "2030-01-01T00:00:00"}
    path = write(tmp_path, "p.json", json.dumps([bad]))
    assert load_error(path).startswith(f"{path}: policy #1 (refunds): field 'expires_at'")


def test_toml_local_datetime_expiry_is_named(tmp_path: Path) -> None:
    text = TOML_POLICIES.replace("2030-01-01T00:00:00Z", "2030-01-01T00:00:00")
    path = write(tmp_path, "p.toml", text)
    assert load_error(path).startswith(f"{path}: policy #1 (refunds): field 'expires_at'")


# -- file-level errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("bad.yaml", "policies: [\n  - id: x\n", "YAML"),
        ("bad.json", '[{"id": "x",}]', "JSON"),
        ("bad.toml", "[[policies]\nid = 'x'\n", "TOML"),
    ],
)
def test_malformed_file_names_the_file(tmp_path: Path, name: str, text: str, kind: str) -> None:
    path = write(tmp_path, name, text)
    assert load_error(path).startswith(f"{path}: not valid {kind}")


def test_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("- id: caf\u00e9\n".encode("latin-1"))
    assert load_error(path).startswith(f"{path}: the policy file is not UTF-8")


def test_unknown_extension_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "policies.ini", "[policies]\n")
    message = load_error(path)
    assert message.startswith(f"{path}: unknown policy file type '.ini'")
    assert ".yaml, .toml or .json" in message


def test_missing_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = load_error(path)
    assert message.startswith(f"{path}: cannot read the policy file")
    assert "No such file" in message


def test_directory_is_not_a_policy_file(tmp_path: Path) -> None:
    assert load_error(tmp_path).startswith(f"{tmp_path}: cannot read the policy file")


@pytest.mark.parametrize(
    "text",
    ["", "id: refunds\nagent: a\n", "policies: {id: x}\n", "42\n"],
    ids=["empty", "single-mapping", "policies-not-a-list", "scalar"],
)
def test_file_that_does_not_hold_a_list_is_rejected(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "p.yaml", text)
    assert load_error(path) == f"{path}: expected a list of policies (or a 'policies' list)"


def test_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "policies: []\ndefaults: {}\n")
    assert load_error(path) == (
        f"{path}: unknown top-level key(s) ['defaults']; expected 'policies'"
    )


def test_read_policy_file_parses_by_extension(tmp_path: Path) -> None:
    assert read_policy_file(write(tmp_path, "a.json", '{"x": [1]}')) == {"x": [1]}
    assert read_policy_file(write(tmp_path, "a.toml", "x = [1]\n")) == {"x": [1]}
    assert read_policy_file(write(tmp_path, "a.yml", "x: [1]\n")) == {"x": [1]}


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "evil.yaml", "!!python/object/apply:os.system ['true']\n")
    assert load_error(path).startswith(f"{path}: not valid YAML")


# -- run policies ---------------------------------------------------------------------


def test_load_run_policy_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "run.yaml",
        'cap: "20.00 USD"\nmax_calls: 5\nendpoints: [/v1/refunds]\n'
        "expires_at: 2030-01-01T00:00:00Z\n",
    )
    run = load_run_policy(path)
    assert run.cap == Money(2000, "USD")
    assert run.max_calls == 5
    assert run.endpoints == ("/v1/refunds",)
    assert run.expires_at == datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_load_run_policy_toml_with_currency(tmp_path: Path) -> None:
    path = write(tmp_path, "run.toml", 'currency = "JPY"\ncap = 500\ncustomers = ["cus_1"]\n')
    run = load_run_policy(path)
    assert run.cap == Money(500, "JPY")
    assert run.customers == ("cus_1",)


def test_load_run_policy_json(tmp_path: Path) -> None:
    path = write(tmp_path, "run.json", json.dumps({"per_call_cap": "1.500 KWD"}))
    assert load_run_policy(path).per_call_cap == Money(1500, "KWD")


def test_run_policy_error_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", 'cap: "-1 USD"\n')
    with pytest.raises(PolicyError, match=re.escape(f"{path}: run policy: field 'cap'")):
        load_run_policy(path)


def test_run_policy_unknown_field_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", 'daily_cap: "1 USD"\n')
    with pytest.raises(PolicyError, match="field 'daily_cap': Extra inputs"):
        load_run_policy(path)


def test_run_policy_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "- cap: 1\n")
    with pytest.raises(PolicyError, match="expected a mapping of fields, got list"):
        load_run_policy(path)


def test_missing_run_policy_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    with pytest.raises(PolicyError, match=re.escape(f"{path}: cannot read")):
        load_run_policy(path)


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)
