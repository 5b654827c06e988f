"""Governing a user's existing LangChain tools, with ``create_agent``, a plain LangGraph
``ToolNode`` and the middleware, driven by a scripted chat model; the tools themselves
call localstripe."""

from __future__ import annotations

import asyncio
import json
import operator
import threading
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import pytest

pytest.importorskip("langchain")

from langchain.agents import create_agent
from langchain.agents.middleware import ToolRetryMiddleware
from langchain_core.messages import AIMessage, AnyMessage, ToolMessage
from langchain_core.tools import BaseTool, ToolException, tool
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode
from typing_extensions import TypedDict

from paymaster import (
    FREE,
    Governor,
    HoldState,
    Money,
    Policy,
    PolicyViolation,
    ToolSpec,
    ViolationCode,
)
from paymaster._errors import SpecError
from paymaster.testing.localstripe import LocalStripe
from paymaster_langchain import PaymasterMiddleware, govern_tools
from paymaster_langchain.testing import ScriptedChatModel
from stripe_fixtures import assert_every_hold_accounted_for, localstripe, paid_intent

__all__ = ["localstripe"]

REFUND_SPEC = ToolSpec(
    vendor="stripe",
    endpoint="/v1/refunds",
    estimate=lambda args: Money(args["amount"], "USD"),
    actual=lambda output: output["amount"],
)


def policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "per_call_cap": "50.00",
        "endpoints": ["/v1/refunds"],
    }
    fields.update(overrides)
    return Policy.model_validate(fields)


def script(*turns: list[tuple[str, dict[str, Any]]]) -> ScriptedChatModel:
    messages = [
        AIMessage(
            "",
            tool_calls=[
                {"name": name, "args": args, "id": f"call_{t}_{i}"}
                for i, (name, args) in enumerate(turn)
            ],
        )
        for t, turn in enumerate(turns)
    ]
    return ScriptedChatModel(messages=iter([*messages, AIMessage("done")]))


class Shop:
    """The user's own tools, calling (local) Stripe themselves."""

    def __init__(self, server: LocalStripe) -> None:
        client = server.client()
        self.calls: list[str] = []

        @tool
        def issue_refund(payment_intent: str, amount: int) -> dict:
            """Refund part of a payment, in cents."""
            self.calls.append("issue_refund")
            refund = client.v1.refunds.create(
                params={"payment_intent": payment_intent, "amount": amount}
            )
            return {"id": refund.id, "amount": refund.amount}

        @tool
        async def aissue_refund(payment_intent: str, amount: int) -> dict:
            """Refund part of a payment, in cents (async)."""
            self.calls.append("aissue_refund")
            refund = await client.v1.refunds.create_async(
                params={"payment_intent": payment_intent, "amount": amount}
            )
            return {"id": refund.id, "amount": refund.amount}

        @tool(response_format="content_and_artifact")
        def refund_with_receipt(payment_intent: str, amount: int) -> tuple[str, dict]:
            """Refund and return a receipt as the artifact."""
            refund = client.v1.refunds.create(
                params={"payment_intent": payment_intent, "amount": amount}
            )
            return f"refunded {refund.amount}", {"amount": refund.amount}

        def declined(payment_intent: str, amount: int) -> str:
            """A refund the bank declines."""
            raise ToolException("declined by the bank")

        from langchain_core.tools import StructuredTool

        self.declined = StructuredTool.from_function(declined, handle_tool_error=True)

        @tool
        def lookup_payment(payment_intent: str) -> str:
            """Look a payment up."""
            self.calls.append("lookup_payment")
            return str(client.v1.payment_intents.retrieve(payment_intent).status)

        self.issue_refund, self.aissue_refund = issue_refund, aissue_refund
        self.refund_with_receipt, self.lookup_payment = refund_with_receipt, lookup_payment

    def governed(self, gov: Governor, *names: str, **kwargs: Any) -> list[BaseTool]:
        specs = {n: FREE if n == "lookup_payment" else REFUND_SPEC for n in names}
        return govern_tools([getattr(self, n) for n in names], gov, specs=specs, **kwargs)


@pytest.fixture
def shop(localstripe: LocalStripe) -> Shop:
    return Shop(localstripe)


def refunds_of(server: LocalStripe, intent: str) -> list[int]:
    data = server.client().v1.refunds.list(params={"limit": 100}).data
    return sorted(r.amount for r in data if r.payment_intent == intent)


def config(run: str) -> dict[str, Any]:
    return {"metadata": {"run_id": run}}


# -- wrapping ------------------------------------------------------------------------------
def test_wrapping_keeps_what_the_model_and_the_agent_see(
    make_governor: Callable[..., Governor], shop: Shop
) -> None:
    gov = make_governor(policy())
    originals = [shop.issue_refund, shop.refund_with_receipt]
    wrapped = govern_tools(originals, gov, specs={t.name: REFUND_SPEC for t in originals})
    for before, after in zip(originals, wrapped, strict=True):
        assert after.name == before.name
        assert after.description == before.description
        assert after.tool_call_schema.model_json_schema() == (
            before.tool_call_schema.model_json_schema()
        )
        assert (after.return_direct, after.response_format) == (
            before.return_direct,
            before.response_format,
        )
    with pytest.raises(ValueError, match=r"no spec for 'lookup_payment'.*FREE"):
        govern_tools([shop.lookup_payment], gov, specs={})


# -- create_agent --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream"])
def test_refunds_until_the_cap_then_the_caller_gets_the_violation(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe, mode: str
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    name = "aissue_refund" if mode == "ainvoke" else "issue_refund"
    refund = (name, {"payment_intent": intent, "amount": 3000})
    agent = create_agent(
        script([refund], [refund], [refund], [refund]),
        name="refund-agent",
        tools=shop.governed(gov, name),
    )
    request = {"messages": [("user", "refund, again and again")]}
    with pytest.raises(PolicyViolation) as caught:
        if mode == "invoke":
            agent.invoke(request, config=config("run-1"))
        elif mode == "ainvoke":
            asyncio.run(agent.ainvoke(request, config=config("run-1")))
        else:
            list(agent.stream(request, config=config("run-1")))
    assert caught.value.code is ViolationCode.CAP_EXCEEDED
    assert refunds_of(localstripe, intent) == [3000, 3000, 3000]
    rows = gov.audit.query(run="run-1")
    assert [(r.outcome, r.actual, r.tool_call_id) for r in rows] == [
        ("allowed", 3000, "call_0_0"),
        ("allowed", 3000, "call_1_0"),
        ("allowed", 3000, "call_2_0"),
        ("denied", 0, "call_3_0"),
    ]


def test_a_refusal_escapes_retry_middleware_and_is_not_retried(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    agent = create_agent(
        script([("issue_refund", {"payment_intent": intent, "amount": 6000})]),
        tools=shop.governed(gov, "issue_refund"),
        name="refund-agent",
        middleware=[ToolRetryMiddleware(max_retries=3)],
    )
    with pytest.raises(PolicyViolation) as caught:
        agent.invoke({"messages": [("user", "refund")]})
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    assert len(gov.audit.query(outcome="denied")) == 1
    assert shop.calls == []


def test_the_users_own_errors_keep_their_handling(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe)
    tools = govern_tools(
        [shop.declined], gov, specs={"declined": REFUND_SPEC}, agent="refund-agent"
    )
    agent = create_agent(
        script([("declined", {"payment_intent": intent, "amount": 500})]), tools=tools
    )
    state = agent.invoke({"messages": [("user", "refund")]}, config=config("run-e"))
    (message,) = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert (message.content, message.status) == ("declined by the bank", "error")  # as before
    (row,) = gov.audit.query(run="run-e")
    assert (row.outcome, row.error) == ("failed", "ToolException: declined by the bank")
    assert gov.holds() == []


def test_a_content_and_artifact_tool_settles_from_its_artifact(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe)
    agent = create_agent(
        script([("refund_with_receipt", {"payment_intent": intent, "amount": 1200})]),
        tools=shop.governed(gov, "refund_with_receipt"),
        name="refund-agent",
    )
    state = agent.invoke({"messages": [("user", "refund")]}, config=config("run-a"))
    (message,) = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert (message.content, message.artifact) == ("refunded 1200", {"amount": 1200})
    (row,) = gov.audit.query(run="run-a")
    assert (row.outcome, row.actual) == ("allowed", 1200)


def test_tell_model_mode_returns_an_error_tool_message(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    agent = create_agent(
        script([("issue_refund", {"payment_intent": intent, "amount": 6000})]),
        tools=shop.governed(gov, "issue_refund", on_violation="tell_model"),
        name="refund-agent",
    )
    state = agent.invoke({"messages": [("user", "refund")]})
    (message,) = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and "per_call_cap" in str(message.content)
    assert [r.outcome for r in gov.audit.query()] == ["denied"]


def test_parallel_calls_one_denied_leave_no_hold_pending(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    big, small = paid_intent(localstripe, amount=50000), paid_intent(localstripe)
    for mode in ("invoke", "ainvoke"):
        name = "aissue_refund" if mode == "ainvoke" else "issue_refund"
        agent = create_agent(
            script(
                [
                    (name, {"payment_intent": big, "amount": 6000}),
                    (name, {"payment_intent": small, "amount": 1000}),
                ]
            ),
            tools=shop.governed(gov, name),
            name="refund-agent",
        )
        with pytest.raises(PolicyViolation):
            call = getattr(agent, mode)({"messages": [("user", "both")]}, config=config("p"))
            if mode == "ainvoke":
                asyncio.run(call)
    assert refunds_of(localstripe, big) == []
    assert_every_hold_accounted_for(gov)


def test_free_tools_are_audited_with_the_run_and_tool_call(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe)
    agent = create_agent(
        script([("lookup_payment", {"payment_intent": intent})]),
        tools=shop.governed(gov, "lookup_payment"),
        name="refund-agent",
    )
    agent.invoke({"messages": [("user", "look")]}, config={"configurable": {"thread_id": "t-9"}})
    (row,) = gov.audit.query()
    assert (row.run, row.endpoint, row.tool_call_id, row.outcome) == (
        "t-9",
        "/tools/lookup_payment",
        "call_0_0",
        "allowed",
    )


# -- a plain ToolNode with handle_tool_errors=True ----------------------------------------------
class State(TypedDict):
    messages: Annotated[list[AnyMessage], operator.add]


def test_a_tool_node_that_handles_every_error_still_lets_the_refusal_through(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    tools = shop.governed(gov, "issue_refund", agent="refund-agent")
    graph = StateGraph(State)
    graph.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    app = graph.compile()
    call = AIMessage(
        "",
        tool_calls=[
            {
                "name": "issue_refund",
                "id": "call_x",
                "args": {"payment_intent": intent, "amount": 6000},
            }
        ],
    )
    with pytest.raises(PolicyViolation) as caught:
        app.invoke({"messages": [call]})
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    assert shop.calls == []


# -- the middleware ------------------------------------------------------------------------
def test_the_middleware_governs_every_tool_call_of_the_agent(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    refund = ("issue_refund", {"payment_intent": intent, "amount": 4000})
    middleware = PaymasterMiddleware(
        gov, specs={"issue_refund": REFUND_SPEC, "lookup_payment": FREE}
    )
    agent = create_agent(
        script([("lookup_payment", {"payment_intent": intent})], [refund], [refund], [refund]),
        tools=[shop.issue_refund, shop.lookup_payment],
        name="refund-agent",
        middleware=[ToolRetryMiddleware(max_retries=2), middleware],
    )
    with pytest.raises(PolicyViolation) as caught:
        agent.invoke({"messages": [("user", "refund")]}, config=config("run-m"))
    assert caught.value.code is ViolationCode.CAP_EXCEEDED
    assert refunds_of(localstripe, intent) == [4000, 4000]
    rows = gov.audit.query(run="run-m")
    assert [(r.endpoint, r.outcome, r.tool_call_id) for r in rows] == [
        ("/tools/lookup_payment", "allowed", "call_0_0"),
        ("/v1/refunds", "allowed", "call_1_0"),
        ("/v1/refunds", "allowed", "call_2_0"),
        ("/v1/refunds", "denied", "call_3_0"),
    ]


def test_the_middleware_refuses_a_tool_without_a_spec(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe)
    agent = create_agent(
        script([("lookup_payment", {"payment_intent": intent})]),
        tools=[shop.lookup_payment],
        name="refund-agent",
        middleware=[PaymasterMiddleware(gov, specs={})],
    )
    with pytest.raises(PolicyViolation) as caught:
        asyncio.run(agent.ainvoke({"messages": [("user", "look")]}))
    assert caught.value.code is ViolationCode.UNKNOWN_OPERATION
    assert shop.calls == []
    assert [r.violation_code for r in gov.audit.query()] == ["unknown_operation"]


# -- outcomes the tool's own handling must not hide (from review) ------------------------------
def test_a_timeout_the_tool_turns_into_a_message_keeps_its_hold_counted(
    make_governor: Callable[..., Governor],
) -> None:
    from langchain_core.tools import StructuredTool

    gov = make_governor(policy())

    def charge_then_time_out(payment_intent: str, amount: int) -> str:
        """Pays, then the reply is lost."""
        raise ToolException("upstream timed out") from TimeoutError("read timed out")

    flaky = StructuredTool.from_function(charge_then_time_out, handle_tool_error=True)
    (tool_,) = govern_tools([flaky], gov, specs={flaky.name: REFUND_SPEC}, agent="refund-agent")
    output = tool_.invoke(
        {
            "type": "tool_call",
            "id": "c1",
            "name": flaky.name,
            "args": {"payment_intent": "pi_1", "amount": 700},
        }
    )
    assert (output.content, output.status) == ("upstream timed out", "error")  # as before
    (hold,) = gov.holds()
    assert hold.state is HoldState.UNKNOWN  # it may have paid


def test_the_spec_sees_the_arguments_as_the_tool_does(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())

    @tool
    def refund_units(quantity: int = 3, unit: int = 1000) -> dict:
        """Refund some units."""
        return {"amount": quantity * unit}

    spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=lambda a: Money(a["quantity"] * a["unit"], "USD"),
        actual=lambda output: output["amount"],
    )
    (tool_,) = govern_tools([refund_units], gov, specs={"refund_units": spec}, agent="refund-agent")
    tool_.invoke({"unit": "1000"})  # a string the tool's schema coerces, a default it fills
    (row,) = gov.audit.query()
    assert (row.estimate, row.actual) == (3000, 3000)


def test_a_tool_without_an_args_schema_keeps_its_schema_and_run_is_governed(
    make_governor: Callable[..., Governor],
) -> None:
    from langchain_core.tools import BaseTool as _BaseTool

    gov = make_governor(policy())

    class Refund(_BaseTool):
        name: str = "refund"
        description: str = "Refund an amount in cents."

        def _run(self, amount: int) -> dict:
            return {"amount": amount}

    original = Refund()
    (governed,) = govern_tools([original], gov, specs={"refund": REFUND_SPEC}, agent="refund-agent")
    assert governed.tool_call_schema.model_json_schema() == (
        original.tool_call_schema.model_json_schema()
    )
    assert governed.run({"amount": 400}) == {"amount": 400}
    (row,) = gov.audit.query()
    assert (row.outcome, row.actual) == ("allowed", 400)


def test_the_middleware_passes_a_made_up_tool_to_the_agent(
    make_governor: Callable[..., Governor], shop: Shop
) -> None:
    gov = make_governor(policy())
    agent = create_agent(
        script([("refund_everything", {})]),
        tools=[shop.lookup_payment],
        name="refund-agent",
        middleware=[PaymasterMiddleware(gov, specs={"lookup_payment": FREE})],
    )
    state = agent.invoke({"messages": [("user", "go")]})
    (message,) = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert "not a valid tool" in str(message.content)
    assert gov.audit.query() == []


# -- issue 13: a broken spec ends the run; siblings are settled, not abandoned ---------------------
def refund_tool(kind: str, body: Callable[[int], Any] | None = None) -> BaseTool:
    """A refund tool, sync or async, whose body is ``body`` (default: pays ``amount``)."""
    pay = body or (lambda amount: {"amount": amount})
    if kind == "sync":

        def refund(amount: int) -> Any:
            """Refund an amount in cents (a sync tool)."""
            return pay(amount)

        return tool(refund)

    async def arefund(amount: int) -> Any:
        """Refund an amount in cents (an async tool)."""
        result = pay(amount)
        return await result if asyncio.iscoroutine(result) else result

    return tool("refund", arefund)  # type: ignore[call-overload, no-any-return]


def run_agent(agent: Any, kind: str, run: str) -> dict[str, Any]:
    request = {"messages": [("user", "refund")]}
    if kind == "sync":
        return agent.invoke(request, config=config(run))  # type: ignore[no-any-return]
    return asyncio.run(agent.ainvoke(request, config=config(run)))  # type: ignore[no-any-return]


def refund_spec(**fields: Any) -> ToolSpec:
    fields.setdefault("estimate", lambda a: Money(a["amount"], "USD"))
    return ToolSpec(vendor="stripe", endpoint="/v1/refunds", **fields)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_spec_that_raises_ends_the_run_with_a_spec_error(
    make_governor: Callable[..., Governor], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    gov = make_governor(policy())
    paid: list[int] = []
    spec = refund_spec(estimate=lambda a: Money(a["amount"], a["currency"]))  # a bug
    tools = govern_tools([refund_tool(kind, paid.append)], gov, specs={"refund": spec})
    agent = create_agent(script([("refund", {"amount": 700})]), tools=tools, name="refund-agent")
    with pytest.raises(SpecError) as caught:
        run_agent(agent, kind, "run-s")
    assert (caught.value.tool, caught.value.hold_id) == ("refund", None)
    assert paid == []  # the tool never ran
    (row,) = gov.audit.query(run="run-s")
    assert (row.outcome, row.hold_id, row.tool_call_id) == ("errored", None, "call_0_0")
    assert "KeyError: 'currency'" in (row.error or "")
    assert gov.holds() == [] and gov.budgets() == []  # nothing reserved
    assert any(r.name == "paymaster" and "refund" in r.getMessage() for r in caplog.records)


def test_a_spec_failing_on_arguments_the_tool_refuses_is_the_models_to_fix(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    tools = govern_tools([refund_tool("sync")], gov, specs={"refund": refund_spec()})
    agent = create_agent(script([("refund", {"amont": 700})]), tools=tools, name="refund-agent")
    state = agent.invoke({"messages": [("user", "refund")]})
    (message,) = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert message.status == "error" and "Invalid request" in str(message.content)
    (row,) = gov.audit.query()
    assert (row.outcome, row.violation_code) == ("denied", "invalid_request")


def test_a_refusal_raised_by_the_spec_itself_stays_a_refusal(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())

    def estimate(args: Mapping[str, Any]) -> Money:
        if args["amount"] > 1000:
            raise PolicyViolation(ViolationCode.PER_CALL_CAP, "refunds above $10 need a human")
        return Money(args["amount"], "USD")

    tools = govern_tools(
        [refund_tool("sync")], gov, specs={"refund": refund_spec(estimate=estimate)}
    )
    agent = create_agent(script([("refund", {"amount": 2000})]), tools=tools, name="refund-agent")
    with pytest.raises(PolicyViolation) as caught:
        agent.invoke({"messages": [("user", "refund")]})
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    (row,) = gov.audit.query()
    assert (row.outcome, row.violation_code) == ("denied", "per_call_cap")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_actual_that_raises_after_the_tool_paid_keeps_the_hold_and_ends_the_run(
    make_governor: Callable[..., Governor], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    gov = make_governor(policy())
    paid: list[int] = []

    def pays_then_answers_in_prose(amount: int) -> str:
        paid.append(amount)
        return f"refunded {amount} cents"  # the spec expects {"amount": ...}

    spec = refund_spec(actual=lambda output: output["amount"])
    tools = govern_tools(
        [refund_tool(kind, pays_then_answers_in_prose)], gov, specs={"refund": spec}
    )
    model = script([("refund", {"amount": 900})], [("refund", {"amount": 100})])
    agent = create_agent(model, tools=tools, name="refund-agent")
    with pytest.raises(SpecError) as caught:
        run_agent(agent, kind, "run-a")
    assert paid == [900]  # the run stopped there
    (kept,) = gov.holds()
    assert (kept.state, kept.estimate) == (HoldState.UNKNOWN, Money(900, "USD"))
    assert (caught.value.tool, caught.value.hold_id) == ("refund", kept.id)
    (row,) = gov.audit.query(run="run-a")
    assert (row.outcome, row.hold_id) == ("unknown", kept.id)
    (budget,) = gov.budgets()
    assert budget.committed == Money(900, "USD")  # counted until reconciled
    assert any(kept.id in r.getMessage() for r in caplog.records if r.name == "paymaster")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_actual_sees_a_json_string_result_decoded_as_the_readme_says(
    make_governor: Callable[..., Governor], kind: str
) -> None:
    gov = make_governor(policy())
    spec = refund_spec(actual=lambda output: output["amount"])
    body = refund_tool(kind, lambda amount: json.dumps({"amount": amount - 1}))
    tools = govern_tools([body], gov, specs={"refund": spec})
    agent = create_agent(script([("refund", {"amount": 900})]), tools=tools, name="refund-agent")
    run_agent(agent, kind, "run-j")
    (row,) = gov.audit.query(run="run-j")
    assert (row.outcome, row.actual) == ("allowed", 899)
    assert gov.holds() == []


def test_a_pair_returned_by_a_content_tool_is_its_content_not_an_artifact(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    spec = refund_spec(actual=lambda output: output[1]["amount"])
    body = refund_tool("sync", lambda amount: ("ok", {"amount": amount}))
    (governed,) = govern_tools([body], gov, specs={"refund": spec}, agent="refund-agent")
    governed.invoke({"amount": 300})
    (row,) = gov.audit.query()
    assert (row.outcome, row.actual) == ("allowed", 300)


IN_CALL = threading.Barrier(3, timeout=30)  # the two refunds and the failing lookup


@tool
async def lookup(ref: str) -> str:
    """Look a refund up; fails once both refunds are mid-call (a bug of its own)."""
    await asyncio.to_thread(IN_CALL.wait)
    raise RuntimeError("the lookup service is down")


def slow_refunds(gov: Governor, body: Callable[[int], Any], kind: str) -> list[BaseTool]:
    """``refund`` (governed, slow) and ``lookup`` (free), which fails once both refunds are
    mid-call: LangGraph then cancels the refunds' tasks."""
    spec = refund_spec(actual=lambda output: output["amount"])
    return govern_tools(
        [refund_tool(kind, body), lookup], gov, specs={"refund": spec, "lookup": FREE}
    )


REFUNDS_AND_A_FAILING_LOOKUP = [
    ("refund", {"amount": 4000}),
    ("refund", {"amount": 3000}),
    ("lookup", {"ref": "r1"}),
]


def assert_both_settled(gov: Governor, run: str) -> None:
    gov.close()  # waits for calls still in the governor's workers
    url = gov.engine.url.render_as_string(hide_password=False)
    with Governor(url, policies=gov.policies) as fresh:
        rows = [r for r in fresh.audit.query(run=run) if r.endpoint == "/v1/refunds"]
        assert sorted((r.outcome, r.actual) for r in rows) == [
            ("allowed", 3000),
            ("allowed", 4000),
        ]
        assert fresh.holds() == []  # none left unknown for an operator to resolve
        (budget,) = [b for b in fresh.budgets(day=gov.ledger.now().date()) if b.kind == "daily"]
        assert budget.committed == budget.settled == Money(7000, "USD")


def test_sync_siblings_langgraph_stops_waiting_for_are_settled_from_their_result(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    IN_CALL.reset()
    release = threading.Event()

    def slow_refund(amount: int) -> dict[str, Any]:
        IN_CALL.wait()
        assert release.wait(timeout=30)  # the vendor answers after LangGraph gave up
        return {"amount": amount}

    tools = slow_refunds(gov, slow_refund, "sync")
    agent = create_agent(script(REFUNDS_AND_A_FAILING_LOOKUP), tools=tools, name="refund-agent")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="lookup service is down"):
            await agent.ainvoke({"messages": [("user", "go")]}, config=config("run-7"))
        release.set()

    asyncio.run(main())
    assert_both_settled(gov, "run-7")


def test_async_siblings_langgraph_stops_waiting_for_are_settled_from_their_result(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    IN_CALL.reset()

    async def main() -> None:
        release = asyncio.Event()

        async def slow_refund(amount: int) -> dict[str, Any]:
            await asyncio.to_thread(IN_CALL.wait)
            await release.wait()  # the vendor answers after LangGraph gave up
            return {"amount": amount}

        tools = slow_refunds(gov, slow_refund, "async")
        model = script(REFUNDS_AND_A_FAILING_LOOKUP)
        agent = create_agent(model, tools=tools, name="refund-agent")
        with pytest.raises(RuntimeError, match="lookup service is down"):
            await agent.ainvoke({"messages": [("user", "go")]}, config=config("run-7a"))
        # A long-lived loop (a server, say) goes on: the vendor answers the two calls
        # LangGraph cancelled, and they settle themselves.
        release.set()
        await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))

    asyncio.run(main())
    assert_both_settled(gov, "run-7a")


def test_an_async_body_still_running_when_the_loop_shuts_down_is_kept_unknown(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    IN_CALL.reset()

    async def never_answered(amount: int) -> dict[str, Any]:
        await asyncio.to_thread(IN_CALL.wait)
        await asyncio.Event().wait()  # the vendor never answers
        return {"amount": amount}

    tools = slow_refunds(gov, never_answered, "async")
    agent = create_agent(script(REFUNDS_AND_A_FAILING_LOOKUP), tools=tools, name="refund-agent")
    with pytest.raises(RuntimeError, match="lookup service is down"):
        # The run fails with both refunds waiting on the vendor; asyncio.run's shutdown
        # then cancels their bodies: whether they paid is truly unknown.
        asyncio.run(agent.ainvoke({"messages": [("user", "go")]}, config=config("run-u")))
    assert sorted((h.state, h.estimate.amount) for h in gov.holds()) == [
        (HoldState.UNKNOWN, 3000),
        (HoldState.UNKNOWN, 4000),
    ]
    assert_every_hold_accounted_for(gov)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_parallel_calls_past_the_cap_settle_the_ones_that_fit(
    make_governor: Callable[..., Governor], kind: str
) -> None:
    gov = make_governor(policy())
    spec = refund_spec(actual=lambda output: output["amount"])
    tools = govern_tools([refund_tool(kind)], gov, specs={"refund": spec})
    model = script([("refund", {"amount": 4000})] * 3)  # the cap ($100) fits two
    agent = create_agent(model, tools=tools, name="refund-agent")
    with pytest.raises(PolicyViolation) as caught:
        run_agent(agent, kind, "run-3")
    assert caught.value.code is ViolationCode.CAP_EXCEEDED
    assert sorted((r.outcome, r.actual) for r in gov.audit.query(run="run-3")) == [
        ("allowed", 4000),
        ("allowed", 4000),
        ("denied", 0),
    ]
    assert gov.holds() == []


def test_governing_your_own_tools_does_not_import_stripe(tmp_path: Any) -> None:
    import subprocess
    import sys

    code = """
import sys
from langchain_core.tools import tool
from paymaster import FREE, Governor
from paymaster_langchain import govern_tools

@tool
def look(x: int) -> int:
    "Look."
    return x

govern_tools([look], Governor(sys.argv[1], policies=[]), specs={"look": FREE})
assert "stripe" not in sys.modules, "stripe was imported"
import paymaster_langchain
assert paymaster_langchain.PaymasterStripeToolkit.__name__ == "PaymasterStripeToolkit"
"""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    subprocess.run([sys.executable, "-c", code, url], check=True)


class UpstreamError(Exception):
    """A vendor SDK's error answer, shaped like Stripe's (``http_status``)."""

    def __init__(self, http_status: int) -> None:
        super().__init__(f"HTTP {http_status} from the vendor")
        self.http_status = http_status


@pytest.mark.parametrize(("status", "state"), [(502, HoldState.UNKNOWN), (402, HoldState.RELEASED)])
def test_a_vendor_error_answer_keeps_the_hold_unless_it_is_a_refusal(
    make_governor: Callable[..., Governor], status: int, state: HoldState
) -> None:
    from langchain_core.tools import StructuredTool

    gov = make_governor(policy())

    def refund(amount: int) -> str:
        """Refund; the vendor answers with an error."""
        raise ToolException("the vendor answered with an error") from UpstreamError(status)

    handled = StructuredTool.from_function(refund, handle_tool_error=True)
    (governed,) = govern_tools(
        [handled], gov, specs={"refund": refund_spec()}, agent="refund-agent"
    )
    output = governed.invoke(
        {"type": "tool_call", "id": "c1", "name": "refund", "args": {"amount": 900}}
    )
    assert output.status == "error"  # the tool's own handling, as before
    (hold,) = gov.ledger.holds(states=[state])
    assert hold.estimate == Money(900, "USD")
