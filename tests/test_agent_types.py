"""The agent type (issue 16 item 6): an explicit ``agent=`` no policy names fails when the
tools are wrapped, listing the agent types the policies know; an agent type taken from the
agent's name at call time is refused (``no_policy``) with the known ones and the fix; the
prebuilt Stripe tools take the agent's name by default too; a run policy's amount may
leave out its currency (the policy's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("agents")
pytest.importorskip("langchain")

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from pydantic import ValidationError

from conftest import refund_policy
from paymaster import (
    FREE,
    Governor,
    Money,
    Policy,
    PolicyViolation,
    RunPolicy,
    ToolSpec,
    ViolationCode,
    effective_policy,
)
from paymaster._errors import PolicyError
from paymaster._policy import PolicySet
from paymaster.testing.localstripe import LocalStripe
from paymaster_langchain import PaymasterMiddleware, PaymasterStripeToolkit
from paymaster_langchain import govern_tools as lc_govern_tools
from paymaster_langchain.testing import ScriptedChatModel
from paymaster_openai_agents import (
    govern_tool,
    governed_function_tool,
    stripe_tools,
)
from paymaster_openai_agents import govern_tools as oa_govern_tools
from stripe_fixtures import localstripe, paid_intent, refund_agent_policy, refunds_of

set_tracing_disabled(True)
__all__ = ["localstripe"]

REFUND_SPEC = ToolSpec(
    vendor="stripe",
    endpoint="/v1/refunds",
    estimate=lambda args: Money(args["amount"], "USD"),
)


def support_policy() -> Policy:
    return refund_policy(id="support", agent="support-agent", endpoints=["/v1/customers"])


@function_tool
def issue_refund(amount: int) -> str:
    """Refund, in cents (never reached when refused)."""
    raise AssertionError("a refused tool ran")


@function_tool
def look_up(payment: str) -> str:
    """Look a payment up."""
    return "succeeded"


@tool("issue_refund")
def lc_issue_refund(amount: int) -> str:
    """Refund, in cents (never reached when refused)."""
    raise AssertionError("a refused tool ran")


@tool("look_up")
def lc_look_up(payment: str) -> str:
    """Look a payment up."""
    return "succeeded"


# -- core -----------------------------------------------------------------------------------
def test_the_governor_checks_an_agent_type_against_its_policies(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(refund_policy(), support_policy())
    assert gov.policies.agents == ["refund-agent", "support-agent"]
    assert gov.check_agent("refund-agent") == "refund-agent"
    with pytest.raises(PolicyError) as caught:
        gov.check_agent("Refund Agent")
    assert str(caught.value) == (
        "no policy names agent type 'Refund Agent', so every governed call as it would be "
        "refused (no_policy); the policies know agent types 'refund-agent', "
        "'support-agent'; did you mean 'refund-agent'?"
    )
    with pytest.raises(PolicyError, match="did you mean 'support-agent'"):
        gov.check_agent("suport-agent")
    with pytest.raises(PolicyError) as far:
        gov.check_agent("billing")
    assert "did you mean" not in str(far.value)
    assert PolicySet().check_agent("anyone") == "anyone"  # nothing to check against


def test_no_policy_lists_the_known_agent_types_and_the_fix() -> None:
    policies = PolicySet([refund_policy(), support_policy()])
    with pytest.raises(PolicyViolation) as caught:
        policies.require("Refund Agent", "stripe")
    assert caught.value.code is ViolationCode.NO_POLICY
    assert caught.value.message == (
        "no policy governs agent 'Refund Agent' with vendor 'stripe'; calls without a policy "
        "are refused. The policies know agent types 'refund-agent', 'support-agent'. Where "
        "the agent type is the agent's name (no agent= given when its tools were wrapped), "
        "pass agent='refund-agent' there, or name the agent so"
    )
    with pytest.raises(PolicyViolation, match="pass agent= naming one of them there"):
        policies.require("billing", "stripe")
    with pytest.raises(PolicyViolation) as vendor:
        policies.require("refund-agent", "openai")
    assert vendor.value.message.endswith("agent 'refund-agent' has policies for vendor 'stripe'")


# -- Agents SDK -----------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["govern_tools", "govern_tool", "governed_function_tool"])
def test_openai_agents_an_unknown_explicit_agent_type_fails_when_wrapped(
    make_governor: Callable[..., Governor], entry: str
) -> None:
    gov = make_governor()
    with pytest.raises(PolicyError, match=r"'Refund Agent'.*'refund-agent'.*did you mean"):
        if entry == "govern_tools":
            oa_govern_tools(
                [issue_refund], gov, specs={"issue_refund": REFUND_SPEC}, agent="Refund Agent"
            )
        elif entry == "govern_tool":
            govern_tool(issue_refund, gov, REFUND_SPEC, agent="Refund Agent")
        else:
            governed_function_tool(gov, REFUND_SPEC, agent="Refund Agent")
    # A tool that spends nothing needs no policy: its agent type is not checked.
    assert oa_govern_tools([look_up], gov, specs={"look_up": FREE}, agent="Refund Agent")
    assert oa_govern_tools(
        [issue_refund], gov, specs={"issue_refund": REFUND_SPEC}, agent="refund-agent"
    )


def test_openai_agents_an_agent_named_for_display_is_refused_with_the_fix(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor()
    tools = oa_govern_tools([issue_refund], gov, specs={"issue_refund": REFUND_SPEC})
    model = ScriptedModel(
        [
            [function_call("issue_refund", {"amount": 500}, call_id="c1")],
            [assistant_message("done")],
        ]
    )
    agent = Agent(name="Refund Agent", tools=tools, model=model)
    with pytest.raises(PolicyViolation) as caught:
        asyncio.run(Runner.run(agent, "refund 5 dollars", context={"run_id": "run-name"}))
    assert caught.value.code is ViolationCode.NO_POLICY
    assert "The policies know agent type 'refund-agent'" in caught.value.message
    assert "pass agent='refund-agent' there, or name the agent so" in caught.value.message
    denied = gov.audit.query(run="run-name", outcome="denied")
    assert [(r.agent, r.violation_code) for r in denied] == [("Refund Agent", "no_policy")]


def test_openai_agents_stripe_tools_take_the_agents_name_by_default(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    with pytest.raises(PolicyError, match="did you mean 'refund-agent'"):
        stripe_tools(gov, localstripe.client(), agent="Refund Agent")
    intent = paid_intent(localstripe)
    model = ScriptedModel(
        [
            [
                function_call(
                    "create_refund",
                    {"payment_intent": intent, "amount": 700, "reason": None},
                    call_id="c1",
                )
            ],
            [assistant_message("done")],
        ]
    )
    tools = stripe_tools(gov, localstripe.client(), only=["create_refund"])
    agent = Agent(name="refund-agent", tools=tools, model=model)
    result = Runner.run_sync(agent, "refund 7 dollars", context={"run_id": "run-oa-name"})
    assert result.final_output == "done"
    assert refunds_of(localstripe, intent) == [700]
    assert {r.agent for r in gov.audit.query(run="run-oa-name")} == {"refund-agent"}


# -- LangChain ------------------------------------------------------------------------------
def lc_script(*calls: tuple[str, dict[str, Any]]) -> ScriptedChatModel:
    first = AIMessage(
        "",
        tool_calls=[
            {"name": name, "args": args, "id": f"call_{i}"} for i, (name, args) in enumerate(calls)
        ],
    )
    return ScriptedChatModel(messages=iter([first, AIMessage("done")]))


@pytest.mark.parametrize("entry", ["govern_tools", "middleware", "stripe_toolkit"])
def test_langchain_an_unknown_explicit_agent_type_fails_when_wrapped(
    make_governor: Callable[..., Governor], localstripe: LocalStripe, entry: str
) -> None:
    gov = make_governor(refund_agent_policy())
    with pytest.raises(PolicyError, match=r"'Refund Agent'.*'refund-agent'.*did you mean"):
        if entry == "govern_tools":
            lc_govern_tools(
                [lc_issue_refund], gov, specs={"issue_refund": REFUND_SPEC}, agent="Refund Agent"
            )
        elif entry == "middleware":
            PaymasterMiddleware(gov, specs={"issue_refund": REFUND_SPEC}, agent="Refund Agent")
        else:
            PaymasterStripeToolkit(gov, localstripe.client(), agent="Refund Agent")
    assert lc_govern_tools([lc_look_up], gov, specs={"look_up": FREE}, agent="Refund Agent")


def test_langchain_an_agent_named_for_display_or_unnamed_is_refused_with_the_fix(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor()
    tools = lc_govern_tools([lc_issue_refund], gov, specs={"issue_refund": REFUND_SPEC})
    refund = ("issue_refund", {"amount": 500})
    named = create_agent(lc_script(refund), tools=tools, name="Refund Agent")
    request = {"messages": [("user", "refund $5")]}
    with pytest.raises(PolicyViolation) as caught:
        named.invoke(request, config={"metadata": {"run_id": "run-lc-name"}})
    assert caught.value.code is ViolationCode.NO_POLICY
    assert "The policies know agent type 'refund-agent'" in caught.value.message
    assert "pass agent='refund-agent' there, or name the agent so" in caught.value.message
    unnamed = create_agent(lc_script(refund), tools=tools)
    with pytest.raises(ValueError, match=r"create_agent\(\.\.\., name=\.\.\.\).*'refund-agent'"):
        unnamed.invoke(request, config={"metadata": {"run_id": "run-lc-unnamed"}})


def test_langchain_stripe_toolkit_takes_the_agents_name_by_default(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe)
    toolkit = PaymasterStripeToolkit(gov, localstripe.client(), only=["create_refund"])
    model = lc_script(("create_refund", {"payment_intent": intent, "amount": 800}))
    agent = create_agent(model, tools=toolkit.get_tools(), name="refund-agent")
    state = agent.invoke(
        {"messages": [("user", "refund $8")]}, config={"metadata": {"run_id": "run-lc-stripe"}}
    )
    assert state["messages"][-1].content == "done"
    assert refunds_of(localstripe, intent) == [800]
    assert {r.agent for r in gov.audit.query(run="run-lc-stripe")} == {"refund-agent"}


# -- amounts --------------------------------------------------------------------------------
def test_a_run_policy_amount_without_currency_takes_the_policys(
    make_governor: Callable[..., Governor],
) -> None:
    run_policy = RunPolicy(cap="10.00", per_call_cap=5)
    assert (run_policy.cap, run_policy.per_call_cap) == (Decimal("10.00"), Decimal(5))
    narrowed = effective_policy(refund_policy(), run_policy)
    assert (narrowed.run_cap, narrowed.per_call_cap) == (
        Money.parse("10.00 USD"),
        Money.parse("5.00 USD"),
    )
    yen = refund_policy(currency="JPY", daily_cap="10000", per_call_cap="5000")
    assert effective_policy(yen, RunPolicy(cap="1000")).run_cap == Money.parse("1000 JPY")
    with pytest.raises(PolicyError, match=r"'cap' 10\.50 is read in JPY.*decimal"):
        effective_policy(yen, RunPolicy(cap="10.50"))
    # Stored with a key or a run as JSON, it reads back the same.
    assert RunPolicy.model_validate_json(run_policy.model_dump_json()) == run_policy
    # And a governed call is held to it.
    gov = make_governor()

    def refund(amount: str) -> None:
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.parse(amount),
            run="run-bare",
            run_policy=run_policy,
        ) as call:
            call.settle()

    with pytest.raises(PolicyViolation) as per_call:
        refund("5.01 USD")
    assert per_call.value.code is ViolationCode.PER_CALL_CAP
    refund("5.00 USD")
    refund("5.00 USD")
    with pytest.raises(PolicyViolation) as run_cap:
        refund("0.01 USD")
    assert run_cap.value.code is ViolationCode.RUN_CAP_EXCEEDED


def test_amounts_in_another_currency_are_refused_in_both_policies() -> None:
    with pytest.raises(PolicyError) as caught:
        effective_policy(refund_policy(), RunPolicy(cap="10.00 EUR"))
    assert str(caught.value) == (
        "run policy 'cap' is in EUR (10.00 EUR) but policy refunds is in USD: a run policy "
        "narrows its policy in the policy's currency; write it in USD or without a currency "
        "(as in '10.00')"
    )
    assert refund_policy(daily_cap="100.00 USD").daily_cap == Money.parse("100.00 USD")
    with pytest.raises(ValidationError, match=r"'100\.00 EUR' is in EUR, expected USD"):
        refund_policy(daily_cap="100.00 EUR")
    assert RunPolicy(cap="10.00").cap == Decimal("10.00")  # no currency: not refused here
