"""The prebuilt Stripe tools in a real Agents SDK ``Runner`` with a scripted model,
against localstripe: refusals stop the run and reach the caller; every call is audited."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("agents")

from agents import Agent, Runner, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

from paymaster import Governor, Money, PolicyViolation, ViolationCode
from paymaster.testing.localstripe import LocalStripe
from paymaster_openai_agents import stripe_tools
from stripe_fixtures import (
    assert_every_hold_accounted_for,
    localstripe,
    paid_intent,
    refund_agent_policy,
    refunds_of,
)

set_tracing_disabled(True)
__all__ = ["localstripe"]


def refund_script(*calls: dict[str, Any]) -> ScriptedModel:
    """Turn 1: one create_refund call per argument set (in parallel); turn 2: done."""
    return ScriptedModel(
        [
            [
                function_call("create_refund", args, call_id=f"call_{i}")
                for i, args in enumerate(calls, 1)
            ],
            [assistant_message("done")],
        ]
    )


def agent_with(gov: Governor, server: LocalStripe, model: ScriptedModel, **kwargs: Any) -> Agent:
    tools = stripe_tools(
        gov, server.client(), agent="refund-agent", only=["create_refund"], **kwargs
    )
    return Agent(name="refund-agent", tools=tools, model=model)


def test_one_line_registers_the_tools(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    tools = stripe_tools(gov, localstripe.client(), agent="refund-agent")
    assert [t.name for t in tools][:3] == ["create_customer", "list_customers", "create_product"]
    refund = next(t for t in tools if t.name == "create_refund")
    assert refund.params_json_schema["additionalProperties"] is False
    assert set(refund.params_json_schema["properties"]) == {"payment_intent", "amount", "reason"}


def test_an_allowed_refund_runs_and_is_audited_with_the_run(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe)
    model = refund_script({"payment_intent": intent, "amount": 700, "reason": None})
    result = Runner.run_sync(
        agent_with(gov, localstripe, model), "refund 7 dollars", context={"run_id": "run-oa-1"}
    )
    assert result.final_output == "done"
    assert refunds_of(localstripe, intent) == [700]
    rows = gov.audit.query(run="run-oa-1")
    assert [(r.method, r.outcome, r.actual) for r in rows] == [
        ("GET", "allowed", 0),
        ("POST", "allowed", 700),
    ]
    assert gov.audit.run_summary("run-oa-1").spend == {"USD": Money(700, "USD")}


def test_a_refusal_stops_the_run_and_reaches_the_caller(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    model = refund_script({"payment_intent": intent, "amount": 6000, "reason": None})
    with pytest.raises(PolicyViolation) as caught:
        asyncio.run(
            Runner.run(
                agent_with(gov, localstripe, model),
                "refund 60 dollars",
                context={"run_id": "run-oa-2"},
            )
        )
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    assert model.remaining_steps == 1  # the model never saw the refusal
    assert refunds_of(localstripe, intent) == []
    denied = gov.audit.query(run="run-oa-2", outcome="denied")
    assert [(r.endpoint, r.estimate, r.violation_code) for r in denied] == [
        ("/v1/refunds", 6000, "per_call_cap")
    ]


def test_a_refusal_stops_a_streamed_run(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    model = refund_script({"payment_intent": intent, "amount": 6000, "reason": None})

    async def consume() -> None:
        streamed = Runner.run_streamed(agent_with(gov, localstripe, model), "refund")
        async for _ in streamed.stream_events():
            pass

    with pytest.raises(PolicyViolation):
        asyncio.run(consume())
    assert refunds_of(localstripe, intent) == []


def test_tell_model_mode_hands_the_refusal_to_the_model(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    model = refund_script({"payment_intent": intent, "amount": 6000, "reason": None})
    agent = agent_with(gov, localstripe, model, on_violation="tell_model")
    assert Runner.run_sync(agent, "refund", context={"run_id": "run-oa-3"}).final_output == "done"
    told = str(model.last_call)
    assert "per_call_cap" in told and "Do not retry" in told
    assert refunds_of(localstripe, intent) == []
    assert [r.outcome for r in gov.audit.query(run="run-oa-3")] == ["allowed", "denied"]


def test_a_stripe_error_goes_to_the_model(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    model = refund_script({"payment_intent": "pi_doesnotexist", "amount": 100, "reason": None})
    result = Runner.run_sync(
        agent_with(gov, localstripe, model), "refund", context={"run_id": "run-oa-4"}
    )
    assert result.final_output == "done"
    assert "Stripe refused the call (HTTP 404" in str(model.last_call)
    # the look-up's row, and the refund attempt's own (refused: it could not be priced)
    assert [(r.outcome, r.http_status) for r in gov.audit.query(run="run-oa-4")] == [
        ("failed", 404),
        ("denied", None),
    ]
    assert gov.holds() == []


def test_parallel_calls_one_refused_leave_no_hold_pending(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    big, small = paid_intent(localstripe, amount=9000), paid_intent(localstripe)
    model = refund_script(
        {"payment_intent": big, "amount": 6000, "reason": None},
        {"payment_intent": small, "amount": 1000, "reason": None},
    )
    with pytest.raises(PolicyViolation):
        Runner.run_sync(
            agent_with(gov, localstripe, model), "refund both", context={"run_id": "run-oa-5"}
        )
    assert refunds_of(localstripe, big) == []
    assert_every_hold_accounted_for(gov)
    assert any(r.violation_code == "per_call_cap" for r in gov.audit.query(run="run-oa-5"))


def test_a_run_policy_in_the_context_narrows_the_stripe_tools(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    from paymaster import RunPolicy

    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    refund = {"payment_intent": intent, "amount": 2000, "reason": None}
    model = ScriptedModel(
        [
            [function_call("create_refund", refund, call_id="call_1")],
            [function_call("create_refund", refund, call_id="call_2")],
            [assistant_message("done")],
        ]
    )
    context = {"run_id": "run-oa-rp", "paymaster_run_policy": RunPolicy(cap="30.00 USD")}
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(agent_with(gov, localstripe, model), "refund twice", context=context)
    assert caught.value.code is ViolationCode.RUN_CAP_EXCEEDED
    assert refunds_of(localstripe, intent) == [2000]
