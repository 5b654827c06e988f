"""One request object: ``guard`` and ``aguard`` take a :class:`paymaster.CallRequest` or
its fields as keywords (the same call, the same audit row), never both at once."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from paymaster import CallRequest, Governor, Money, PolicyViolation, RunPolicy
from paymaster._governor.request import CallKeywords
from paymaster._toolspec import ToolSpec

MakeGov = Callable[..., Governor]
FIELDS: dict[str, Any] = {
    "agent": "refund-agent",
    "vendor": "stripe",
    "endpoint": "/v1/refunds",
    "method": "post",
    "estimate": Money.parse("12.00 USD"),
    "customer": "cus_1",
    "run": "run-1",
    "run_policy": RunPolicy(cap="50.00"),
    "tool_call_id": "tc_1",
    "credential": "key_1",
    "subject": "stripe:ch_1",
}
# What an audit row says about its call (not when, nor where in the chain).
ROW = (
    "agent",
    "run",
    "vendor",
    "endpoint",
    "method",
    "customer",
    "outcome",
    "http_status",
    "currency",
    "estimate",
    "actual",
    "policy_id",
    "violation_code",
    "error",
    "tool_call_id",
    "credential",
)


def _rows(gov: Governor) -> list[dict[str, Any]]:
    return [{name: getattr(row, name) for name in ROW} for row in gov.audit.query()]


def _settle(gov: Governor, *args: Any, **kwargs: Any) -> None:
    with gov.guard(*args, **kwargs) as call:
        call.settle(Money.parse("11.00 USD"), http_status=200)


def test_a_request_and_its_keywords_leave_the_same_row(make_governor: MakeGov) -> None:
    by_keywords, by_request = make_governor(), make_governor()
    _settle(by_keywords, **FIELDS)
    _settle(by_request, CallRequest(**FIELDS))
    _settle(by_request, request=CallRequest(**FIELDS))
    [keywords_row, request_row, named_row] = _rows(by_keywords)
    assert keywords_row == request_row == named_row
    assert keywords_row["method"] == "POST" and keywords_row["outcome"] == "allowed"


def test_a_refused_request_and_its_keywords_leave_the_same_row(make_governor: MakeGov) -> None:
    gov = make_governor()
    too_much = {**FIELDS, "estimate": Money.parse("60.00 USD")}  # over the $50 per call cap
    with pytest.raises(PolicyViolation):
        _settle(gov, **too_much)
    with pytest.raises(PolicyViolation):
        _settle(gov, CallRequest(**too_much))
    first, second = _rows(gov)
    assert first == second and first["outcome"] == "denied"


def test_aguard_takes_a_request_too(make_governor: MakeGov) -> None:
    gov = make_governor()

    async def main() -> None:
        async with gov.aguard(**FIELDS) as call:
            await call.settle(Money.parse("11.00 USD"), http_status=200)
        async with gov.aguard(CallRequest(**FIELDS)) as call:
            await call.settle(Money.parse("11.00 USD"), http_status=200)

    asyncio.run(main())
    first, second = _rows(gov)
    assert first == second


@pytest.mark.parametrize("name", ["guard", "aguard"])
def test_a_request_and_keywords_at_once_are_refused(make_governor: MakeGov, name: str) -> None:
    gov = make_governor()
    open_guard = getattr(gov, name)
    with pytest.raises(
        TypeError,
        match=rf"{name}\(\) takes a CallRequest or its fields as "
        r"keywords, not both.*dataclasses\.replace\(request, run=\.\.\.\)",
    ):
        open_guard(CallRequest(**FIELDS), run="run-2")
    with pytest.raises(TypeError, match=rf"{name}\(\) takes a paymaster\.CallRequest, got dict"):
        open_guard(FIELDS)
    assert gov.audit.query() == []  # refused before anything was checked or written


def test_a_request_is_a_frozen_value() -> None:
    request = CallRequest(**FIELDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.run = "run-2"  # type: ignore[misc]
    assert request == CallRequest(**FIELDS)
    assert dataclasses.replace(request, run="run-2").run == "run-2"
    with pytest.raises(TypeError):
        CallRequest("refund-agent", "stripe", "/v1/refunds")  # type: ignore[misc]


def test_the_keywords_of_guard_are_the_fields_of_a_request() -> None:
    fields = {field.name for field in dataclasses.fields(CallRequest)}
    assert CallKeywords.__required_keys__ == {"agent", "vendor", "endpoint"}
    assert CallKeywords.__required_keys__ | CallKeywords.__optional_keys__ == fields


def test_a_tool_spec_builds_the_request_of_a_tool_call() -> None:
    spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/refunds",
        method="post",
        estimate=lambda args: Money(args["amount"], "USD"),
        customer=lambda args: args["customer"],
    )
    call = spec.for_call({"amount": 500, "customer": "cus_1"})
    request = call.call_request(agent="refund-agent", run="run-1", tool_call_id="tc_1")
    assert request == CallRequest(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        method="POST",
        estimate=Money(500, "USD"),
        customer="cus_1",
        run="run-1",
        tool_call_id="tc_1",
    )
    assert request == CallRequest(
        agent="refund-agent", run="run-1", tool_call_id="tc_1", **call.as_guard_kwargs()
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CreditedRequest(CallRequest):
    """A subclass whose ``__post_init__`` is not idempotent: each construction takes
    another $20 off the estimate."""

    def __post_init__(self) -> None:
        if self.estimate is not None:
            object.__setattr__(self, "estimate", self.estimate - Money.parse("20.00 USD"))


def test_a_subclassed_request_is_read_once_as_built(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor()
    request = _CreditedRequest(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("50.00 USD"),
    )
    assert request.estimate == Money.parse("30.00 USD")
    with gov.guard(request) as call:
        assert call.estimate == request.estimate  # what was checked is what is reserved
    [row] = gov.audit.query(agent="refund-agent")
    assert row.estimate == 3000
