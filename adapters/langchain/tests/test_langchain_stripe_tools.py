"""The prebuilt Stripe tools in a real LangChain ``create_agent`` with a scripted model,
against localstripe: refusals reach the caller whatever tool-error handling is set."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

pytest.importorskip("langchain")

from langchain.agents import create_agent
from langchain.agents.middleware import ToolRetryMiddleware
from langchain_core.messages import AIMessage, ToolMessage

from paymaster import Governor, PolicyViolation, ViolationCode
from paymaster.testing.localstripe import LocalStripe
from paymaster_langchain import PaymasterStripeToolkit
from paymaster_langchain.testing import ScriptedChatModel
from stripe_fixtures import (
    assert_every_hold_accounted_for,
    localstripe,
    paid_intent,
    refund_agent_policy,
    refunds_of,
)

__all__ = ["localstripe"]


def refund_script(*calls: dict[str, Any]) -> ScriptedChatModel:
    first = AIMessage(
        "",
        tool_calls=[
            {"name": "create_refund", "args": args, "id": f"call_{i}"}
            for i, args in enumerate(calls, 1)
        ],
    )
    return ScriptedChatModel(messages=iter([first, AIMessage("done")]))


def agent_with(
    gov: Governor,
    server: LocalStripe,
    model: ScriptedChatModel,
    *,
    middleware: Sequence[Any] = (),
    **kwargs: Any,
) -> Any:
    toolkit = PaymasterStripeToolkit(
        gov, server.client(), agent="refund-agent", only=["create_refund"], **kwargs
    )
    return create_agent(model, tools=toolkit.get_tools(), middleware=list(middleware))


def run_config(run: str) -> dict[str, Any]:
    return {"metadata": {"run_id": run}}


def test_one_line_registers_the_tools(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    tools = PaymasterStripeToolkit(gov, localstripe.client(), agent="refund-agent").get_tools()
    refund = next(t for t in tools if t.name == "create_refund")
    assert set(refund.tool_call_schema.model_json_schema()["properties"]) == {
        "payment_intent",
        "amount",
        "reason",
    }
    assert "smallest unit" in refund.description


def test_an_allowed_refund_runs_and_is_audited_with_the_run(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe)
    agent = agent_with(gov, localstripe, refund_script({"payment_intent": intent, "amount": 800}))
    state = agent.invoke({"messages": [("user", "refund $8")]}, config=run_config("run-lc-1"))
    assert state["messages"][-1].content == "done"
    assert refunds_of(localstripe, intent) == [800]
    rows = gov.audit.query(run="run-lc-1")
    assert [(r.method, r.outcome, r.actual) for r in rows] == [
        ("GET", "allowed", 0),
        ("POST", "allowed", 800),
    ]


@pytest.mark.parametrize(
    "middleware", [(), (ToolRetryMiddleware(max_retries=2),)], ids=["default", "retry-middleware"]
)
def test_a_refusal_reaches_the_caller_whatever_the_error_handling(
    make_governor: Callable[..., Governor], localstripe: LocalStripe, middleware: Sequence[Any]
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    agent = agent_with(
        gov,
        localstripe,
        refund_script({"payment_intent": intent, "amount": 6000}),
        middleware=middleware,
    )
    with pytest.raises(PolicyViolation) as caught:
        agent.invoke({"messages": [("user", "refund $60")]}, config=run_config("run-lc-2"))
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    assert refunds_of(localstripe, intent) == []
    denied = gov.audit.query(run="run-lc-2", outcome="denied")
    assert len(denied) == 1  # not retried by the middleware
    assert denied[0].estimate == 6000


def test_a_refusal_reaches_the_caller_of_ainvoke(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    agent = agent_with(gov, localstripe, refund_script({"payment_intent": intent, "amount": 6000}))
    with pytest.raises(PolicyViolation):
        asyncio.run(agent.ainvoke({"messages": [("user", "refund")]}))
    assert refunds_of(localstripe, intent) == []


def test_tell_model_mode_returns_the_refusal_as_a_tool_message(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    intent = paid_intent(localstripe, amount=9000)
    agent = agent_with(
        gov,
        localstripe,
        refund_script({"payment_intent": intent, "amount": 6000}),
        on_violation="tell_model",
    )
    state = agent.invoke({"messages": [("user", "refund")]}, config=run_config("run-lc-3"))
    told = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert len(told) == 1 and "per_call_cap" in str(told[0].content)
    assert refunds_of(localstripe, intent) == []
    assert [r.outcome for r in gov.audit.query(run="run-lc-3")] == ["allowed", "denied"]


def test_parallel_calls_one_refused_leave_no_hold_pending(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(refund_agent_policy())
    big, small = paid_intent(localstripe, amount=9000), paid_intent(localstripe)
    model = refund_script(
        {"payment_intent": big, "amount": 6000}, {"payment_intent": small, "amount": 1000}
    )
    for invoke in ("invoke", "ainvoke"):
        agent = agent_with(
            gov,
            localstripe,
            model
            if invoke == "invoke"
            else refund_script(
                {"payment_intent": big, "amount": 6000}, {"payment_intent": small, "amount": 1000}
            ),
        )
        with pytest.raises(PolicyViolation):
            call = getattr(agent, invoke)(
                {"messages": [("user", "refund both")]}, config=run_config("run-lc-5")
            )
            if invoke == "ainvoke":
                asyncio.run(call)
    assert refunds_of(localstripe, big) == []
    assert_every_hold_accounted_for(gov)
