"""Governing a user's existing Agents SDK function tools, end to end with the real
``Runner`` and a scripted model; the tools themselves call localstripe."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("agents")

from agents import Agent, FunctionTool, Runner, function_tool, set_tracing_disabled
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
        "id": "refunds", "agent": "refund-agent", "vendor": "stripe", "currency": "USD",
        "daily_cap": "100.00", "per_call_cap": "50.00", "endpoints": ["/v1/refunds"],
    }  # fmt: skip
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
        [function_call(name, args, call_id=f"call_{t}_{i}") for i, (name, args) in
         enumerate(turn)]
        for t, turn in enumerate(turns)
    ]  # fmt: skip
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
    for field in ("name", "description", "params_json_schema", "strict_json_schema",
                  "is_enabled", "needs_approval"):  # fmt: skip
        assert getattr(wrapped, field) == getattr(original, field), field
    assert original.on_invoke_tool is shop.issue_refund.on_invoke_tool  # left as it was


def test_a_tool_without_a_spec_is_refused_when_wrapped(
    make_governor: Callable[..., Governor], shop: Shop
) -> None:
    gov = make_governor(policy())
    with pytest.raises(ValueError, match=r"no spec for 'lookup_payment'.*FREE"):
        govern_tools([shop.issue_refund, shop.lookup_payment], gov,
                     specs={"issue_refund": REFUND_SPEC})  # fmt: skip
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
        ("allowed", 3000, "call_0_0"), ("allowed", 3000, "call_1_0"),
        ("allowed", 3000, "call_2_0"), ("denied", 0, "call_3_0"),
    ]  # fmt: skip


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
    payout_spec = ToolSpec(vendor="stripe", endpoint="/v1/payouts",
                           estimate=lambda a: Money(a["amount"], "USD"),
                           customer="cus_ok")  # fmt: skip
    (payout,) = govern_tools([shop.issue_refund], gov, specs={"issue_refund": payout_spec})
    model = script([("issue_refund", {"payment_intent": intent, "amount": 100, "customer": ""})])
    with pytest.raises(PolicyViolation) as caught:
        Runner.run_sync(Agent(name="refund-agent", tools=[payout], model=model), "pay out")
    assert caught.value.code is ViolationCode.ENDPOINT_NOT_ALLOWED

    model = script([("issue_refund",
                     {"payment_intent": intent, "amount": 100, "customer": "cus_evil"})])
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
    tools = govern_tools([shop.flaky_refund, shop.custom_failure, shop.raising_refund], gov,
                         specs={"flaky_refund": REFUND_SPEC, "custom_failure": REFUND_SPEC,
                                "raising_refund": REFUND_SPEC})  # fmt: skip
    model = script([("flaky_refund", args), ("custom_failure", args)])
    agent = Agent(name="refund-agent", tools=tools, model=model)
    assert Runner.run_sync(agent, "x", context={"run_id": "run-e"}).final_output == "done"
    told = str(model.last_call)
    assert "An error occurred while running the tool. Please try again." in told  # the SDK's
    assert "custom: declined upstream" in told  # the tool's own failure function
    failed = gov.audit.query(run="run-e")
    assert sorted((r.outcome, r.error) for r in failed) == [
        ("failed", "ValueError: declined upstream"), ("failed", "ValueError: the user's own bug"),
    ]  # fmt: skip
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
    model = script([
        ("issue_refund", {"payment_intent": big, "amount": 6000, "customer": ""}),
        ("issue_refund", {"payment_intent": small, "amount": 1000, "customer": ""}),
    ])  # fmt: skip
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"), model=model)
    with pytest.raises(PolicyViolation):
        Runner.run_sync(agent, "refund both", context={"run_id": "run-p"})
    assert refunds_of(localstripe, big) == []
    assert_every_hold_accounted_for(gov)


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
            [("issue_refund", {"payment_intent": intent, "amount": 100, "customer": ""}),
             ("issue_refund", {"payment_intent": intent, "amount": 200, "customer": ""})],
        )  # fmt: skip
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
    agent = Agent(name="refund-agent", tools=shop.governed(gov, "issue_refund"),
                  model=script([refund], [refund]))  # fmt: skip
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
        Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "look",
                        context={"run_id": "run-r"})  # fmt: skip
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
        refund = client.v1.refunds.create(params={"payment_intent": payment_intent,
                                                  "amount": amount})  # fmt: skip
        return {"amount": refund.amount}

    model = script([("issue_refund", {"payment_intent": intent, "amount": 1500, "customer": ""})])
    result = Runner.run_sync(Agent(name="refund-agent", tools=[issue_refund], model=model), "x")
    assert result.final_output == "done"
    (row,) = gov.audit.query()
    assert (row.outcome, row.actual, row.run) == ("allowed", 1500, run_id_of_result(result))
    assert [h.state for h in gov.ledger.holds(states=[HoldState.SETTLED])] == [HoldState.SETTLED]


def test_a_sibling_cancelled_mid_call_is_kept_counted_as_unknown(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor(policy())
    sibling_in_call = asyncio.Event()

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

    spec = ToolSpec(vendor="stripe", endpoint="/v1/refunds",
                    estimate=lambda a: Money(a["amount"], "USD"))  # fmt: skip
    tools = govern_tools([refused_inside, slow_refund], gov,
                         specs={"refused_inside": spec, "slow_refund": spec})  # fmt: skip
    model = script([("refused_inside", {"amount": 100}), ("slow_refund", {"amount": 700})])
    with pytest.raises(PolicyViolation, match="own governed call"):
        Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "go",
                        context={"run_id": "run-c"})  # fmt: skip
    rows = {r.tool_call_id: r for r in gov.audit.query(run="run-c")}
    assert rows["call_0_0"].outcome == "errored"  # released: refused before it paid
    assert rows["call_0_1"].outcome == "unknown"  # may have paid: kept counted
    (kept,) = gov.holds()
    assert (kept.state, kept.estimate) == (HoldState.UNKNOWN, Money(700, "USD"))
    (budget,) = gov.budgets()
    assert budget.committed == Money(700, "USD")


# -- outcomes and mechanisms pinned by review ----------------------------------------------------
def test_a_tool_that_paid_but_cannot_be_read_keeps_its_hold_counted(
    make_governor: Callable[..., Governor],
) -> None:
    from pydantic import BaseModel

    gov = make_governor(policy())

    class Refund(BaseModel):
        amount: int

    @function_tool
    async def pays_in_prose(amount: int) -> str:
        """Pays, then answers in prose (the spec expects a dict)."""
        return "refunded"

    @function_tool(output_type=Refund)  # type: ignore[call-overload]
    async def pays_wrong_shape(amount: int) -> dict:
        """Pays, then returns something its declared output type refuses."""
        return {"refunded": amount}

    spec = ToolSpec(vendor="stripe", endpoint="/v1/refunds",
                    estimate=lambda a: Money(a["amount"], "USD"),
                    actual=lambda result: result["amount"])  # fmt: skip
    tools = govern_tools([pays_in_prose, pays_wrong_shape], gov,
                         specs={"pays_in_prose": spec, "pays_wrong_shape": spec})  # fmt: skip
    model = script([("pays_in_prose", {"amount": 300})], [("pays_wrong_shape", {"amount": 400})])
    Runner.run_sync(Agent(name="refund-agent", tools=tools, model=model), "go")
    assert sorted((h.state, h.estimate.amount) for h in gov.holds()) == [
        (HoldState.UNKNOWN, 300), (HoldState.UNKNOWN, 400),
    ]  # fmt: skip


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

    (governed,) = govern_tools([refund], gov, specs={"refund": ToolSpec(
        vendor="stripe", endpoint="/v1/refunds", estimate=lambda a: Money(4000, "USD"))})
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
