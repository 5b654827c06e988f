"""Governing a user's existing Agents SDK function tools, end to end with the real
``Runner`` and a scripted model; the tools themselves call localstripe."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

pytest.importorskip("agents")

from agents import Agent, FunctionTool, RunHooks, Runner, function_tool, set_tracing_disabled
from agents.exceptions import UserError
from agents.testing import ScriptedModel, assistant_message, function_call

from paymaster import (
    FREE,
    Governor,
    HoldState,
    Money,
    Policy,
    PolicyViolation,
    RunPolicy,
    ToolSpec,
    ViolationCode,
)
from paymaster._errors import SpecError
from paymaster.testing.localstripe import LocalStripe
from paymaster_openai_agents import (
    govern_tools,
    governed_function_tool,
    run_id_of_result,
)
from stripe_fixtures import assert_every_hold_accounted_for, localstripe, paid_intent

set_tracing_disabled(True)
__all__ = ["localstripe"]

REFUND_SPEC = ToolSpec(
    vendor="stripe",
    endpoint="/v1/refunds",
    estimate=lambda args: Money(args["amount"], "USD"),
    customer=lambda args: args.get("customer"),
    actual=lambda result: result["amount"],
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


class Shop:
    """The user's own tools: plain function tools that call (local) Stripe themselves."""

    def __init__(self, server: LocalStripe) -> None:
        self.client = server.client()
        self.calls: list[str] = []

        @function_tool
        async def issue_refund(payment_intent: str, amount: int, customer: str = "") -> dict:
            """Refund part of a payment, in cents."""
            self.calls.append("issue_refund")
            refund = await self.client.v1.refunds.create_async(
                params={"payment_intent": payment_intent, "amount": amount}
            )
            return {"id": refund.id, "amount": refund.amount}

        @function_tool
        def lookup_payment(payment_intent: str) -> str:
            """Look a payment up (sync tool)."""
            self.calls.append("lookup_payment")
            return str(self.client.v1.payment_intents.retrieve(payment_intent).status)

        @function_tool
        async def flaky_refund(payment_intent: str, amount: int) -> str:
            """A refund tool with a bug."""
            raise ValueError("the user's own bug")

        @function_tool(failure_error_function=lambda ctx, error: f"custom: {error}")
        async def custom_failure(payment_intent: str, amount: int) -> str:
            """A refund tool with its own failure message."""
            raise ValueError("declined upstream")

        @function_tool(failure_error_function=None)
        async def raising_refund(payment_intent: str, amount: int) -> str:
            """A refund tool whose errors end the run (the SDK's UserError)."""
            raise ValueError("boom")

        self.issue_refund = issue_refund
        self.lookup_payment = lookup_payment
        self.flaky_refund = flaky_refund
        self.custom_failure = custom_failure
        self.raising_refund = raising_refund

    def governed(self, gov: Governor, *names: str, **kwargs: Any) -> list[FunctionTool]:
        specs = {name: FREE if name == "lookup_payment" else REFUND_SPEC for name in names}
        return govern_tools([getattr(self, n) for n in names], gov, specs=specs, **kwargs)


@pytest.fixture
def shop(localstripe: LocalStripe) -> Shop:
    return Shop(localstripe)


def script(*turns: list[tuple[str, dict[str, Any]]]) -> ScriptedModel:
    """One model turn per list of (tool, arguments) calls, then a final answer."""
    steps: list[Any] = [
        [function_call(name, args, call_id=f"call_{t}_{i}") for i, (name, args) in enumerate(turn)]
        for t, turn in enumerate(turns)
    ]
    return ScriptedModel([*steps, [assistant_message("done")]])


def refunds_of(server: LocalStripe, intent: str) -> list[int]:
    data = server.client().v1.refunds.list(params={"limit": 100}).data
    return sorted(r.amount for r in data if r.payment_intent == intent)


# -- wrapping ------------------------------------------------------------------------------
def test_wrapping_keeps_what_the_model_sees(
    make_governor: Callable[..., Governor], shop: Shop
) -> None:
    gov = make_governor(policy())
    original = shop.issue_refund
    (wrapped,) = shop.governed(gov, "issue_refund")
    assert wrapped is not original
    for field in (
        "name",
        "description",
        "params_json_schema",
        "strict_json_schema",
        "is_enabled",
        "needs_approval",
    ):
        assert getattr(wrapped, field) == getattr(original, field), field
    assert original.on_invoke_tool is shop.issue_refund.on_invoke_tool  # left as it was


def test_a_tool_without_a_spec_is_refused_when_wrapped(
    make_governor: Callable[..., Governor], shop: Shop
) -> None:
    gov = make_governor(policy())
    with pytest.raises(ValueError, match=r"no spec for 'lookup_payment'.*FREE"):
        govern_tools(
            [shop.issue_refund, shop.lookup_payment], gov, specs={"issue_refund": REFUND_SPEC}
        )
    with pytest.raises(ValueError, match="not given: issue_refnd"):
        govern_tools([], gov, specs={"issue_refnd": REFUND_SPEC})
    with pytest.raises(TypeError, match="function tools only"):
        govern_tools([object()], gov, specs={})  # type: ignore[list-item]


# -- a run -------------------------------------------------------------------------------
def test_refunds_until_the_cap_then_the_run_stops_at_the_caller(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    refund = ("issue_refund", {"payment_intent": intent, "amount": 3000, "customer": ""})
    model = script([refund], [refund], [refund], [refund])
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"), model=model)
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(agent, "refund, again and again", context={"run_id": "run-1"})
    assert caught.value.code is ViolationCode.CAP_EXCEEDED
    assert caught.value.run == "run-1"
    assert refunds_of(localstripe, intent) == [3000, 3000, 3000]  # the 4th never ran
    assert shop.calls == ["issue_refund"] * 3
    rows = gov.audit.query(run="run-1")
    assert [(r.outcome, r.actual, r.tool_call_id) for r in rows] == [
        ("allowed", 3000, "call_0_0"),
        ("allowed", 3000, "call_1_0"),
        ("allowed", 3000, "call_2_0"),
        ("denied", 0, "call_3_0"),
    ]


@pytest.mark.parametrize("mode", ["run", "run_sync", "run_streamed"])
def test_every_kind_of_run_stops_with_the_violation(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe, mode: str
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    model = script([("issue_refund", {"payment_intent": intent, "amount": 6000, "customer": ""})])
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"), model=model)

    async def streamed() -> None:
        result = Runner.run_streamed(agent, "refund")
        async for _ in result.stream_events():
            pass

    with pytest.raises(PolicyViolation) as caught:
        if mode == "run":
            asyncio.run(Runner.run(agent, "refund"))
        elif mode == "run_sync":
            Runner.run_sync(agent, "refund")
        else:
            asyncio.run(streamed())
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    assert shop.calls == []


def test_a_disallowed_endpoint_and_customer_are_refused(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy(customers=["cus_ok"]))
    intent = paid_intent(localstripe)
    payout_spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/payouts",
        estimate=lambda a: Money(a["amount"], "USD"),
        customer="cus_ok",
    )
    (payout,) = govern_tools([shop.issue_refund], gov, specs={"issue_refund": payout_spec})
    model = script([("issue_refund", {"payment_intent": intent, "amount": 100, "customer": ""})])
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(Agent(name="refund-agent", tools=[payout], model=model), "pay out")
    assert caught.value.code is ViolationCode.ENDPOINT_NOT_ALLOWED

    model = script(
        [("issue_refund", {"payment_intent": intent, "amount": 100, "customer": "cus_evil"})]
    )
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"), model=model)
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(agent, "refund")
    assert caught.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    assert refunds_of(localstripe, intent) == []


def test_the_users_own_errors_keep_their_handling(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe)
    args = {"payment_intent": intent, "amount": 500}
    tools = govern_tools(
        [shop.flaky_refund, shop.custom_failure, shop.raising_refund],
        gov,
        specs={
            "flaky_refund": REFUND_SPEC,
            "custom_failure": REFUND_SPEC,
            "raising_refund": REFUND_SPEC,
        },
    )
    model = script([("flaky_refund", args), ("custom_failure", args)])
    agent = Agent(name="refund-agent", tools=tools, model=model)
    assert Runner.run_sync(agent, "x", context={"run_id": "run-e"}).final_output == "done"
    told = str(model.last_call)
    assert "An error occurred while running the tool. Please try again." in told  # the SDK's
    assert "custom: declined upstream" in told  # the tool's own failure function
    failed = gov.audit.query(run="run-e")
    assert sorted((r.outcome, r.error) for r in failed) == [
        ("failed", "ValueError: declined upstream"),
        ("failed", "ValueError: the user's own bug"),
    ]
    assert gov.holds() == []

    model = script([("raising_refund", args)])
    with pytest.raises(UserError):  # failure_error_function=None: the SDK's behaviour, as before
        Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "x")
    assert gov.holds() == []  # released: the tool failed before anything was sent


def test_tell_model_mode_hands_the_refusal_to_the_model(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    model = script([("issue_refund", {"payment_intent": intent, "amount": 6000, "customer": ""})])
    tools = shop.governed(gov, "issue_refund", on_violation="tell_model")
    result = Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "refund")
    assert result.final_output == "done"
    assert "per_call_cap" in str(model.last_call)
    assert [r.outcome for r in gov.audit.query()] == ["denied"]


def test_parallel_calls_one_denied_leave_no_hold_pending(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    big, small = paid_intent(localstripe, amount=50000), paid_intent(localstripe)
    model = script(
        [
            ("issue_refund", {"payment_intent": big, "amount": 6000, "customer": ""}),
            ("issue_refund", {"payment_intent": small, "amount": 1000, "customer": ""}),
        ]
    )
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"), model=model)
    with pytest.raises(PolicyViolation):
        Runner.run_sync(agent, "refund both", context={"run_id": "run-p"})
    assert refunds_of(localstripe, big) == []
    gov.close()  # waits for calls still in the governor's workers
    url = gov.engine.url.render_as_string(hide_password=False)
    fresh = Governor(url, policies=gov.policies, clock=gov.ledger.now)
    if fresh.budgets(day=gov.ledger.now().date()):
        assert_every_hold_accounted_for(fresh)
    else:  # the SDK cancelled the small refund before it started: nothing was reserved
        assert [r.outcome for r in fresh.audit.query()] == ["denied"]
        fresh.close()


# -- runs, run policies, free tools ------------------------------------------------------------
def test_every_row_of_a_run_shares_a_generated_run_id_readable_afterwards(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())  # free tools need no policy: they reserve nothing
    intent = paid_intent(localstripe)
    tools = shop.governed(gov, "issue_refund", "lookup_payment")
    runs = []
    for _ in range(2):
        model = script(
            [("lookup_payment", {"payment_intent": intent})],
            [
                ("issue_refund", {"payment_intent": intent, "amount": 100, "customer": ""}),
                ("issue_refund", {"payment_intent": intent, "amount": 200, "customer": ""}),
            ],
        )
        result = Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "go")
        runs.append(run_id_of_result(result))
    assert runs[0] != runs[1]
    for run in runs:
        rows = gov.audit.query(run=run)
        assert sorted((r.vendor, r.endpoint, r.tool_call_id, r.actual) for r in rows) == [
            ("stripe", "/v1/refunds", "call_1_0", 100),
            ("stripe", "/v1/refunds", "call_1_1", 200),
            ("tool", "/tools/lookup_payment", "call_0_0", 0),  # free: audited, not reserved
        ]
    assert len(gov.audit.query()) == 6  # nothing outside the two runs


def test_a_run_policy_passed_for_one_run_narrows_it(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    refund = ("issue_refund", {"payment_intent": intent, "amount": 2000, "customer": ""})
    agent = Agent(
        name="refund-agent",
        tools=shop.governed(gov, "issue_refund"),
        model=script([refund], [refund]),
    )
    context = {"run_id": "run-rp", "paymaster_run_policy": RunPolicy(cap="30.00 USD")}
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(agent, "refund", context=context)
    assert caught.value.code is ViolationCode.RUN_CAP_EXCEEDED
    assert refunds_of(localstripe, intent) == [2000]


def test_a_revoke_stops_free_tools_too(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe)
    gov.revoke(run="run-r", reason="incident 7")
    tools = shop.governed(gov, "lookup_payment")
    model = script([("lookup_payment", {"payment_intent": intent})])
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(
            Agent(name="refund-agent", tools=tools, model=model),
            "look",
            context={"run_id": "run-r"},
        )
    assert caught.value.code is ViolationCode.REVOKED
    assert shop.calls == []
    (row,) = gov.audit.query(run="run-r")
    assert (row.outcome, row.violation_code, row.tool_call_id) == ("denied", "revoked", "call_0_0")


def test_the_decorator_makes_a_governed_tool_in_one_step(
    make_governor: Callable[..., Governor], localstripe: LocalStripe
) -> None:
    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    client = localstripe.client()

    @governed_function_tool(gov, REFUND_SPEC)
    def issue_refund(payment_intent: str, amount: int, customer: str = "") -> dict:
        """Refund part of a payment, in cents (a sync tool)."""
        refund = client.v1.refunds.create(
            params={"payment_intent": payment_intent, "amount": amount}
        )
        return {"amount": refund.amount}

    model = script([("issue_refund", {"payment_intent": intent, "amount": 1500, "customer": ""})])
    result = Runner.run_sync(Agent(name="refund-agent", tools=[issue_refund], model=model), "x")
    assert result.final_output == "done"
    (row,) = gov.audit.query()
    assert (row.outcome, row.actual, row.run) == ("allowed", 1500, run_id_of_result(result))
    assert [h.state for h in gov.ledger.holds(states=[HoldState.SETTLED])] == [HoldState.SETTLED]


@pytest.mark.parametrize("mode", ["run_sync", "asyncio.run"])
def test_a_sibling_still_running_when_the_run_ends_is_kept_counted_as_unknown(
    make_governor: Callable[..., Governor], mode: str
) -> None:
    gov = make_governor(policy())
    sibling_in_call = asyncio.Event()  # binds to the loop of the run that first waits

    @function_tool
    async def refused_inside(amount: int) -> str:
        """Waits until its sibling is mid-call, then is refused by a governed call of its own."""
        await sibling_in_call.wait()
        raise PolicyViolation(ViolationCode.CAP_EXCEEDED, "the tool's own governed call")

    @function_tool
    async def slow_refund(amount: int) -> str:
        """Reaches the vendor and never hears back (the run is torn down meanwhile)."""
        sibling_in_call.set()
        await asyncio.Event().wait()
        return "unreachable"

    spec = ToolSpec(
        vendor="stripe", endpoint="/v1/refunds", estimate=lambda a: Money(a["amount"], "USD")
    )
    tools = govern_tools(
        [refused_inside, slow_refund], gov, specs={"refused_inside": spec, "slow_refund": spec}
    )
    model = script([("refused_inside", {"amount": 100}), ("slow_refund", {"amount": 700})])
    agent = Agent(name="refund-agent", tools=tools, model=model)
    with pytest.raises(PolicyViolation, match="own governed call"):
        # The run ends with slow_refund still waiting on the vendor, and its event loop
        # stops (asyncio.run shuts it down; run_sync leaves it idle): its body is
        # cancelled, and whether it paid is truly unknown.
        if mode == "run_sync":
            Runner.run_sync(agent, "go", context={"run_id": "run-c"})
        else:
            asyncio.run(Runner.run(agent, "go", context={"run_id": "run-c"}))
    gov.close()  # waits for the record made in a governor worker
    url = gov.engine.url.render_as_string(hide_password=False)
    with Governor(url, policies=gov.policies, clock=gov.ledger.now) as fresh:
        rows = {r.tool_call_id: r for r in fresh.audit.query(run="run-c")}
        assert rows["call_0_0"].outcome == "failed"  # released: refused before it paid
        assert rows["call_0_1"].outcome == "unknown"  # may have paid: kept counted
        (kept,) = fresh.holds()
        assert (kept.state, kept.estimate) == (HoldState.UNKNOWN, Money(700, "USD"))
        (budget,) = fresh.budgets(day=gov.ledger.now().date())
        assert budget.committed == Money(700, "USD")


# -- outcomes and mechanisms pinned by review ----------------------------------------------------
def test_a_tool_whose_output_the_sdk_refuses_keeps_its_hold_counted(
    make_governor: Callable[..., Governor],
) -> None:
    from pydantic import BaseModel

    gov = make_governor(policy())

    class Refund(BaseModel):
        amount: int

    @function_tool(output_type=Refund)  # type: ignore[call-overload]
    async def pays_wrong_shape(amount: int) -> dict:
        """Pays, then returns something its declared output type refuses."""
        return {"refunded": amount}

    spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=lambda a: Money(a["amount"], "USD"),
        actual=lambda result: result["amount"],
    )
    tools = govern_tools([pays_wrong_shape], gov, specs={"pays_wrong_shape": spec})
    model = script([("pays_wrong_shape", {"amount": 400})])
    Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "go")
    assert [(h.state, h.estimate.amount) for h in gov.holds()] == [(HoldState.UNKNOWN, 400)]


def test_a_callable_needs_approval_still_sees_the_prepared_arguments(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())

    async def big(ctx: Any, params: dict[str, Any], call_id: str) -> bool:
        return int(params.get("amount", 0)) > 1000

    @function_tool(strict_mode=False, needs_approval=big)
    async def refund(amount: int = 4000) -> str:
        """Refund; the default amount needs a human."""
        return "refunded"

    (governed,) = govern_tools(
        [refund],
        gov,
        specs={
            "refund": ToolSpec(
                vendor="stripe", endpoint="/v1/refunds", estimate=lambda a: Money(4000, "USD")
            )
        },
    )
    model = script([("refund", {})])
    result = Runner.run_sync(Agent(name="refund-agent", tools=[governed], model=model), "go")
    assert len(result.interruptions) == 1  # as for the ungoverned tool: a human decides
    assert gov.audit.query() == []


def test_a_refusal_caught_by_the_caller_can_be_pickled(
    make_governor: Callable[..., Governor], shop: Shop, localstripe: LocalStripe
) -> None:
    import pickle

    gov = make_governor(policy())
    intent = paid_intent(localstripe, amount=50000)
    model = script([("issue_refund", {"payment_intent": intent, "amount": 6000, "customer": ""})])
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"), model=model)
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(agent, "refund")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is PolicyViolation
    assert (copy.code, copy.message) == (caught.value.code, caught.value.message)


# -- issue 13: a broken spec ends the run; parallel siblings are settled, not abandoned ------------
def refund_tool(kind: str, body: Callable[[int], dict[str, Any]] | None = None) -> FunctionTool:
    """A refund tool, sync or async, whose body is ``body`` (default: pays ``amount``)."""
    pay = body or (lambda amount: {"amount": amount})

    if kind == "sync":

        def refund(amount: int) -> dict[str, Any]:
            """Refund an amount in cents (a sync tool)."""
            return pay(amount)

    else:

        async def refund(amount: int) -> dict[str, Any]:  # type: ignore[misc]
            """Refund an amount in cents (an async tool)."""
            return pay(amount)

    return function_tool(refund)


#: Reserves the amount asked, settles the amount the tool says it refunded.
READ_REFUND_SPEC = ToolSpec(
    vendor="stripe",
    endpoint="/v1/refunds",
    estimate=lambda a: Money(a["amount"], "USD"),
    actual=lambda result: result["amount"],
)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_spec_that_raises_ends_the_run_with_a_spec_error(
    make_governor: Callable[..., Governor], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    gov = make_governor(policy())
    paid: list[int] = []
    tool = refund_tool(kind, lambda amount: paid.append(amount) or {"amount": amount})
    spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=lambda a: Money(a["amount"], a["currency"]),  # a bug: no currency
    )
    (governed,) = govern_tools([tool], gov, specs={"refund": spec})
    model = script([("refund", {"amount": 700})])
    agent = Agent(name="refund-agent", tools=[governed], model=model)
    with pytest.raises(SpecError) as caught:
        Runner.run_sync(agent, "go", context={"run_id": "run-s"})
    assert (caught.value.tool, caught.value.hold_id) == ("refund", None)
    assert "KeyError" in str(caught.value)
    assert paid == []  # the tool never ran
    (row,) = gov.audit.query(run="run-s")
    assert (row.outcome, row.hold_id, row.tool_call_id) == ("errored", None, "call_0_0")
    assert "KeyError: 'currency'" in (row.error or "")
    assert gov.holds() == [] and gov.budgets() == []  # nothing reserved
    assert any(r.name == "paymaster" and "refund" in r.getMessage() for r in caplog.records)


def test_a_refusal_raised_by_the_spec_itself_stays_a_refusal(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())

    def estimate(args: Mapping[str, Any]) -> Money:
        if args["amount"] > 1000:
            raise PolicyViolation(ViolationCode.PER_CALL_CAP, "refunds above $10 need a human")
        return Money(args["amount"], "USD")

    spec = ToolSpec(vendor="stripe", endpoint="/v1/refunds", estimate=estimate)
    (governed,) = govern_tools([refund_tool("async")], gov, specs={"refund": spec})
    model = script([("refund", {"amount": 2000})])
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(Agent(name="refund-agent", tools=[governed], model=model), "go")
    assert caught.value.code is ViolationCode.PER_CALL_CAP
    (row,) = gov.audit.query()
    assert (row.outcome, row.violation_code) == ("denied", "per_call_cap")


def test_arguments_that_are_not_json_are_still_the_models_to_fix(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    spec = ToolSpec(
        vendor="stripe", endpoint="/v1/refunds", estimate=lambda a: Money(a["amount"], "USD")
    )
    (governed,) = govern_tools([refund_tool("sync")], gov, specs={"refund": spec})
    not_json = function_call("refund", '{"amount": 7', call_id="c1")
    model = ScriptedModel([[not_json], [assistant_message("done")]])
    result = Runner.run_sync(Agent(name="refund-agent", tools=[governed], model=model), "go")
    assert result.final_output == "done"
    assert "Please try again" in str(model.last_call)  # the tool's own failure message
    (row,) = gov.audit.query()
    assert (row.outcome, row.violation_code) == ("denied", "invalid_request")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_actual_that_raises_after_the_tool_paid_keeps_the_hold_and_ends_the_run(
    make_governor: Callable[..., Governor], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    gov = make_governor(policy())
    paid: list[int] = []

    def pays_then_answers_json(amount: int) -> str:
        paid.append(amount)
        return json.dumps({"amount": amount})  # a JSON string; the spec expects a dict

    tool = refund_tool(kind, pays_then_answers_json)
    (governed,) = govern_tools([tool], gov, specs={"refund": READ_REFUND_SPEC})
    model = script([("refund", {"amount": 900})], [("refund", {"amount": 100})])
    agent = Agent(name="refund-agent", tools=[governed], model=model)
    with pytest.raises(SpecError) as caught:
        Runner.run_sync(agent, "go", context={"run_id": "run-a"})
    assert paid == [900]  # the run stopped there
    (kept,) = gov.holds()
    assert (kept.state, kept.estimate) == (HoldState.UNKNOWN, Money(900, "USD"))
    assert (caught.value.tool, caught.value.hold_id) == ("refund", kept.id)
    (row,) = gov.audit.query(run="run-a")
    assert (row.outcome, row.hold_id) == ("unknown", kept.id)
    (budget,) = gov.budgets()
    assert budget.committed == Money(900, "USD")  # counted until reconciled
    assert any(kept.id in r.getMessage() for r in caplog.records if r.name == "paymaster")


class GateTheThirdCall(RunHooks[Any]):
    """Holds the third tool call of the turn back until ``opened`` says so: its refusal
    then comes while its two siblings are mid-call."""

    def __init__(self, opened: Callable[[], Awaitable[None]]) -> None:
        self.opened = opened

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        if getattr(context, "tool_call_id", None) == "call_0_2":
            await self.opened()


def three_refunds_of_40_dollars() -> ScriptedModel:
    # The cap ($100) fits two; the third is refused and the SDK cancels its siblings.
    return script([("refund", {"amount": 4000})] * 3)


def assert_two_settled_and_one_denied(gov: Governor, run: str) -> None:
    assert_every_hold_accounted_for(gov)  # closes gov: waits for calls still in its workers
    url = gov.engine.url.render_as_string(hide_password=False)
    with Governor(url, policies=gov.policies) as fresh:
        rows = fresh.audit.query(run=run)
        assert sorted((r.outcome, r.actual) for r in rows) == [
            ("allowed", 4000),
            ("allowed", 4000),
            ("denied", 0),
        ]
        assert fresh.holds() == []  # none left unknown for an operator to resolve
        (budget,) = [b for b in fresh.budgets(day=gov.ledger.now().date()) if b.kind == "daily"]
        assert budget.committed == budget.settled == Money(8000, "USD")


def test_parallel_sync_siblings_cancelled_mid_call_are_settled_from_their_result(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    in_call = threading.Barrier(3, timeout=30)  # the two bodies and the gate
    release = threading.Event()

    def slow_refund(amount: int) -> dict[str, Any]:
        in_call.wait()
        assert release.wait(timeout=30)  # the vendor answers once the run has been refused
        return {"amount": amount}

    tool = refund_tool("sync", slow_refund)
    (governed,) = govern_tools([tool], gov, specs={"refund": READ_REFUND_SPEC})
    agent = Agent(name="refund-agent", tools=[governed], model=three_refunds_of_40_dollars())
    hooks = GateTheThirdCall(lambda: asyncio.to_thread(in_call.wait))
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(agent, "go", context={"run_id": "run-7"}, hooks=hooks)
    assert caught.value.code is ViolationCode.CAP_EXCEEDED
    release.set()  # both bodies finish after the SDK stopped waiting for them
    assert_two_settled_and_one_denied(gov, "run-7")


def test_parallel_async_siblings_cancelled_mid_call_are_settled_from_their_result(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())

    async def main() -> None:
        both_in_call, release = asyncio.Event(), asyncio.Event()
        in_call: list[int] = []

        @function_tool
        async def refund(amount: int) -> dict[str, Any]:
            """Refund an amount in cents (async, slow)."""
            in_call.append(amount)
            if len(in_call) == 2:
                both_in_call.set()
            await release.wait()  # the vendor answers once the run has been refused
            return {"amount": amount}

        (governed,) = govern_tools([refund], gov, specs={"refund": READ_REFUND_SPEC})
        agent = Agent(name="refund-agent", tools=[governed], model=three_refunds_of_40_dollars())
        hooks = GateTheThirdCall(both_in_call.wait)
        with pytest.raises(PolicyViolation):
            await Runner.run(agent, "go", context={"run_id": "run-7a"}, hooks=hooks)
        # A long-lived loop (a server, say) goes on: the vendor answers the two calls the
        # SDK stopped waiting for, and they settle themselves.
        release.set()
        await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))

    asyncio.run(main())
    assert_two_settled_and_one_denied(gov, "run-7a")


def test_governing_your_own_tools_does_not_import_stripe(tmp_path: Any) -> None:
    import subprocess
    import sys

    code = """
import sys
from agents import function_tool
from paymaster import FREE, Governor
from paymaster_openai_agents import govern_tools

@function_tool
def look(x: int) -> int:
    "Look."
    return x

govern_tools([look], Governor(sys.argv[1], policies=[]), specs={"look": FREE})
assert "stripe" not in sys.modules, "stripe was imported"
import paymaster_openai_agents
assert paymaster_openai_agents.stripe_tools.__name__ == "stripe_tools"
"""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    subprocess.run([sys.executable, "-c", code, url], check=True)


class UpstreamError(Exception):
    """A vendor SDK's error answer, shaped like Stripe's (``http_status``)."""

    def __init__(self, http_status: int) -> None:
        super().__init__(f"HTTP {http_status} from the vendor")
        self.http_status = http_status


@pytest.mark.parametrize(
    ("kind", "status", "state"),
    [
        ("sync", 502, HoldState.UNKNOWN),
        ("async", 500, HoldState.UNKNOWN),
        ("sync", 402, HoldState.RELEASED),
    ],
)
def test_a_vendor_error_answer_keeps_the_hold_unless_it_is_a_refusal(
    make_governor: Callable[..., Governor], kind: str, status: int, state: HoldState
) -> None:
    gov = make_governor(policy())

    def answered_with_an_error(amount: int) -> dict[str, Any]:
        raise UpstreamError(status)  # a 5xx may have charged; a 4xx refused

    (governed,) = govern_tools(
        [refund_tool(kind, answered_with_an_error)], gov, specs={"refund": READ_REFUND_SPEC}
    )
    model = script([("refund", {"amount": 900})])
    result = Runner.run_sync(Agent(name="refund-agent", tools=[governed], model=model), "go")
    assert result.final_output == "done"  # the tool's own failure message went to the model
    (hold,) = gov.ledger.holds(states=[state])
    assert hold.estimate == Money(900, "USD")
    (budget,) = gov.budgets()
    assert budget.committed == (
        Money(900, "USD") if state is HoldState.UNKNOWN else Money(0, "USD")
    )


@pytest.mark.parametrize("unusable", ["900", -900, Money(900, "EUR"), True])
def test_an_actual_returning_no_usable_cost_keeps_the_hold_and_ends_the_run(
    make_governor: Callable[..., Governor], unusable: Any
) -> None:
    gov = make_governor(policy())
    spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=lambda a: Money(a["amount"], "USD"),
        actual=lambda result: unusable,  # the tool ran; its cost cannot be recorded
    )
    (governed,) = govern_tools([refund_tool("async")], gov, specs={"refund": spec})
    model = script([("refund", {"amount": 900})])
    with pytest.raises(SpecError) as caught:
        Runner.run_sync(Agent(name="refund-agent", tools=[governed], model=model), "go")
    (kept,) = gov.holds()
    assert (kept.state, kept.estimate, caught.value.hold_id) == (
        HoldState.UNKNOWN,
        Money(900, "USD"),
        kept.id,
    )
