"""The Python API's errors name the mistake and its fix (as the CLI's do)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import refund_policy
from paymaster import FREE, Governor, Money, Policy, PolicyError, RunPolicy, ToolSpec
from paymaster._loading import load_policies
from paymaster._telemetry import Telemetry
from paymaster._toolspec import check_specs

MakeGov = Callable[..., Governor]
REFUND = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}
REFUND_SPEC = ToolSpec(vendor="stripe", endpoint="/v1/refunds", estimate=Money(500, "USD"))


# -- 1. an estimate that is not Money ----------------------------------------------------
@pytest.mark.parametrize("telemetry", [False, True], ids=["plain", "telemetry"])
def test_guard_with_a_str_estimate_shows_money_parse(
    make_governor: MakeGov, telemetry: bool
) -> None:
    # With telemetry on it was AttributeError: 'str' object has no attribute 'amount'.
    gov = make_governor(telemetry=Telemetry() if telemetry else False)
    with pytest.raises(TypeError) as info, gov.guard(**REFUND, estimate="5.00 USD"):  # type: ignore[arg-type]
        pass
    assert "estimate must be paymaster.Money" in str(info.value)
    assert 'Money.parse("5.00 USD")' in str(info.value)


def test_aguard_with_a_str_estimate_shows_money_parse(make_governor: MakeGov) -> None:
    gov = make_governor(telemetry=Telemetry())

    async def call() -> None:
        async with gov.aguard(**REFUND, estimate="5.00 USD"):  # type: ignore[arg-type]
            pass

    with pytest.raises(TypeError, match=r'must be paymaster\.Money.*Money\.parse\("5\.00 USD"\)'):
        asyncio.run(call())


def test_governed_with_a_str_estimate_is_refused_when_decorating(make_governor: MakeGov) -> None:
    gov = make_governor()
    with pytest.raises(TypeError, match=r'Money\.parse\("5\.00 USD"\)'):
        gov.governed(**REFUND, estimate="5.00 USD")  # type: ignore[arg-type]


def test_an_int_estimate_says_minor_units(make_governor: MakeGov) -> None:
    gov = make_governor()
    with pytest.raises(TypeError, match=r'Money\(500, "USD"\).*minor units'):
        with gov.guard(**REFUND, estimate=500):  # type: ignore[arg-type]
            pass


# -- 2. a path instead of a database URL -------------------------------------------------
def test_governor_with_a_path_says_it_is_not_a_database_url() -> None:
    with pytest.raises(ValueError) as info:
        Governor("paymaster.db", policies=[refund_policy()])
    message = str(info.value)
    assert "'paymaster.db' is not a database URL" in message
    assert "sqlite:///paymaster.db" in message
    assert "postgresql+psycopg://user@host/db" in message


# -- 3. a missing optional dependency names its extra --------------------------------------
MISSING_EXTRA_CASES = {
    "stripe": ("stripe", "from paymaster.vendors.stripe import governed_client", "stripe"),
    "proxy-starlette": ("starlette", "import paymaster.proxy", "proxy"),
    "proxy-uvicorn": ("uvicorn", "import paymaster.proxy", "proxy"),
    "otel": (
        "opentelemetry",
        "from paymaster._telemetry import Telemetry\nTelemetry()",
        "otel",
    ),
    "postgres": (
        "psycopg",
        "from paymaster._db import connect\nconnect('postgresql+psycopg://user@host/db')",
        "postgres",
    ),
}


@pytest.mark.parametrize("case", sorted(MISSING_EXTRA_CASES))
def test_a_missing_optional_dependency_names_the_extra(case: str) -> None:
    module, code, extra = MISSING_EXTRA_CASES[case]
    script = textwrap.dedent(
        """\
        import sys
        for name in list(sys.modules):
            if name == {module!r} or name.startswith({module!r} + "."):
                del sys.modules[name]
        sys.modules[{module!r}] = None  # as if it were not installed
        try:
        {code}
        except ModuleNotFoundError as exc:
            print(type(exc).__name__, exc.name, exc, sep="|")
        else:
            print("no error")
        """
    ).format(module=module, code=textwrap.indent(code, "    "))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    kind, name, message = result.stdout.strip().split("|", 2)
    assert kind == "MissingExtra"
    assert name == module
    assert f"pip install 'paymaster[{extra}]'" in message
    assert module in message


# -- 4. tool specs -----------------------------------------------------------------------
def test_a_dict_spec_is_refused_naming_the_tool_and_toolspec() -> None:
    spec = {"vendor": "stripe", "endpoint": "/v1/refunds"}
    with pytest.raises(TypeError) as info:
        check_specs(["issue_refund"], {"issue_refund": spec})  # type: ignore[dict-item]
    message = str(info.value)
    assert "'issue_refund'" in message
    assert "ToolSpec(vendor='stripe', endpoint='/v1/refunds')" in message


def test_a_misspelt_spec_is_reported_unused_with_a_suggestion() -> None:
    with pytest.raises(ValueError) as info:
        check_specs(["issue_refund", "lookup"], {"isue_refund": REFUND_SPEC, "lookup": FREE})
    message = str(info.value)
    assert "unused specs name tools that are not given: isue_refund" in message
    assert "did you mean 'issue_refund'?" in message
    assert "no spec for 'issue_refund'" in message  # still said: it is what it leads to


def test_openai_agents_adapter_refuses_dict_and_misspelt_specs(make_governor: MakeGov) -> None:
    pytest.importorskip("agents")
    from agents import function_tool

    from paymaster_openai_agents import govern_tools

    @function_tool
    def issue_refund(charge: str) -> str:
        return charge

    gov = make_governor()
    with pytest.raises(TypeError, match=r"'issue_refund'.*ToolSpec\(vendor='stripe'"):
        govern_tools([issue_refund], gov, specs={"issue_refund": {"vendor": "stripe"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"isue_refund \(did you mean 'issue_refund'\?\)"):
        govern_tools([issue_refund], gov, specs={"isue_refund": REFUND_SPEC})


def test_langchain_adapter_refuses_dict_and_misspelt_specs(make_governor: MakeGov) -> None:
    pytest.importorskip("langchain")
    from langchain_core.tools import tool

    from paymaster_langchain import PaymasterMiddleware, govern_tools

    @tool
    def issue_refund(charge: str) -> str:
        """Refund a charge."""
        return charge

    gov = make_governor()
    with pytest.raises(TypeError, match=r"'issue_refund'.*ToolSpec\(vendor='stripe'"):
        govern_tools([issue_refund], gov, specs={"issue_refund": {"vendor": "stripe"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"isue_refund \(did you mean 'issue_refund'\?\)"):
        govern_tools([issue_refund], gov, specs={"isue_refund": REFUND_SPEC})
    with pytest.raises(TypeError, match=r"'issue_refund'.*ToolSpec\(vendor='stripe'"):
        PaymasterMiddleware(gov, specs={"issue_refund": {"vendor": "stripe"}})  # type: ignore[dict-item]


# -- 5. an unknown currency is named as one ----------------------------------------------
@pytest.mark.parametrize(("text", "code"), [("100.00 US", "US"), ("100.00 DOLLARS", "DOLLARS")])
def test_money_parse_names_an_unknown_currency(text: str, code: str) -> None:
    with pytest.raises(ValueError, match=f"unknown currency '{code}'"):
        Money.parse(text)


def policy_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "endpoints": ["/v1/refunds"],
    }
    fields.update(overrides)
    return fields


def test_a_policy_amount_in_an_unknown_currency_names_it() -> None:
    with pytest.raises(ValidationError) as info:
        Policy.model_validate(policy_fields(currency="XYZ"))
    [cap] = [e for e in info.value.errors() if e["loc"] == ("daily_cap",)]
    assert "unknown currency 'XYZ'" in cap["msg"]
    assert "has no currency" not in str(info.value)
    with pytest.raises(ValidationError, match="unknown currency 'XYZ'"):
        RunPolicy.model_validate({"currency": "XYZ", "cap": "20.00"})


def test_a_policy_file_amount_in_an_unknown_currency_names_it(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "- id: refunds\n  agent: refund-agent\n  vendor: stripe\n  currency: XYZ\n"
        '  daily_cap: "100.00"\n  endpoints: [/v1/refunds]\n'
    )
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    assert f"{path}: policy #1 (refunds): field 'currency'" in str(info.value)
    assert "field 'daily_cap': unknown currency 'XYZ'" in str(info.value)


# -- 6. money in a policy is never a float -----------------------------------------------
def test_a_float_cap_is_refused_naming_the_field_and_the_quoted_fix() -> None:
    with pytest.raises(ValidationError) as info:
        Policy.model_validate(policy_fields(daily_cap=100.0))
    [error] = info.value.errors()
    assert error["loc"] == ("daily_cap",)
    assert 'quote it, as in daily_cap: "100.00"' in error["msg"]
    with pytest.raises(ValidationError, match=r'quote it, as in cap: "5\.00"'):
        RunPolicy.model_validate({"currency": "USD", "cap": 5.0})
    # An int is still major units of the policy's currency, as Money.of reads it.
    assert Policy.model_validate(policy_fields(daily_cap=100)).daily_cap == Money(10000, "USD")


def test_an_unquoted_yaml_float_is_refused_naming_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "- id: refunds\n  agent: refund-agent\n  vendor: stripe\n  currency: USD\n"
        "  daily_cap: 100.00\n  endpoints: [/v1/refunds]\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    message = str(info.value)
    assert message.startswith(f"{path}: policy #1 (refunds): field 'daily_cap'")
    assert 'daily_cap: "100.00"' in message


def test_a_float_blog_post_cap_is_refused_under_its_own_name() -> None:
    with pytest.raises(ValidationError, match=r'quote it, as in daily_usd_cap: "100\.00"'):
        Policy.model_validate(
            {
                "agent_id": "a",
                "vendor": "stripe",
                "daily_usd_cap": 100.0,
                "allowed_endpoints": ["/v1/refunds"],
            }
        )


@pytest.mark.parametrize("given", ["cap=10.00", {"cap": "10.00"}, ("10.00",)])
def test_a_run_policy_that_is_not_one_is_refused_with_its_row(
    make_governor: MakeGov, given: object
) -> None:
    """Before, a str or a tuple failed with an AttributeError deep in the policy code, and
    the attempt left no row."""
    gov = make_governor()
    with pytest.raises(TypeError, match=r"run_policy must be a paymaster.RunPolicy, got \w+"):
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(100, "USD"),
            run_policy=given,  # type: ignore[arg-type]
        ):
            raise AssertionError("refused: never runs")
    [row] = gov.audit.query()
    assert row.outcome == "denied" and row.violation_code == "invalid_request"


def test_a_run_policy_amount_without_currency_round_trips_through_a_vault_key(
    make_governor: MakeGov,
) -> None:
    """A vault key stores its run policy as JSON. A bare amount was written as "1E+2",
    which reads back as no amount at all, so every read of the key table failed."""
    from decimal import Decimal

    from paymaster._vault import VaultKeys

    gov = make_governor()
    run_policy = RunPolicy(cap=Decimal("100.00").normalize(), per_call_cap="5.00")
    keys = VaultKeys(gov.engine)
    made = keys.create("refund-agent", by="ops", run_policy=run_policy)
    assert keys.authenticate(made.secret).run_policy == run_policy
    assert [k.id for k in keys.list()] == [made.record.id]
    effective = gov.effective_policy("refund-agent", "stripe", run_policy)
    assert effective.run_cap == Money(10_000, "USD")
