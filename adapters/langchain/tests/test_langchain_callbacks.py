"""A governed tool reports to LangChain callbacks exactly as the tool it governs does:
LangChain's own ``BaseTool.run`` runs the tool (its error handling included), so a
handled error ends with ``on_tool_end`` (an error ToolMessage), an unhandled one with
``on_tool_error``; the audit row records the raw exception either way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tools import BaseTool, StructuredTool, ToolException

from paymaster import Governor, HoldState, Money, Policy, ToolSpec
from paymaster_langchain import govern_tools

SPEC = ToolSpec(vendor="stripe", endpoint="/v1/refunds", estimate=lambda a: Money(300, "USD"))


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def on_tool_start(self, serialized: Any, input_str: str, **kwargs: Any) -> None:
        self.seen.append(("start", input_str))

    def on_tool_end(self, output: Any, **kwargs: Any) -> None:
        self.seen.append(("end", (getattr(output, "status", None), str(output.content))))

    def on_tool_error(self, error: BaseException, **kwargs: Any) -> None:
        self.seen.append(("error", repr(error)))


def refund(amount: int) -> dict[str, int]:
    """Refund an amount in cents."""
    return {"amount": amount}


def declined(amount: int) -> str:
    """Refund; the bank declines."""
    raise ToolException("declined by the bank")


def broken(amount: int) -> str:
    """Refund; the tool has a bug."""
    raise RuntimeError("a bug")


def events_of(tool: BaseTool, args: dict[str, Any]) -> tuple[list[tuple[str, Any]], Any]:
    events = Events()
    call = {"type": "tool_call", "id": "c1", "name": tool.name, "args": args}
    try:
        output: Any = tool.invoke(call, config={"callbacks": [events]})
    except Exception as exc:
        output = repr(exc)
    return events.seen, output if isinstance(output, str) else output.content


@pytest.mark.parametrize(
    ("tool", "args", "outcome", "state"),
    [
        (StructuredTool.from_function(refund), {"amount": 5}, "allowed", HoldState.SETTLED),
        (
            StructuredTool.from_function(declined, handle_tool_error=True),
            {"amount": 5},
            "failed",
            HoldState.RELEASED,
        ),
        (StructuredTool.from_function(broken), {"amount": 5}, "failed", HoldState.RELEASED),
        (
            StructuredTool.from_function(refund, name="strict", handle_validation_error=True),
            {"amount": "five"},
            "failed",
            HoldState.RELEASED,
        ),
    ],
    ids=["returns", "handled-error", "unhandled-error", "handled-invalid-input"],
)
def test_a_governed_tool_reports_to_callbacks_as_the_tool_does(
    make_governor: Callable[..., Governor],
    tool: BaseTool,
    args: dict[str, Any],
    outcome: str,
    state: HoldState,
) -> None:
    policy = Policy.model_validate(
        {
            "id": "refunds",
            "agent": "refund-agent",
            "vendor": "stripe",
            "currency": "USD",
            "daily_cap": "100.00",
            "per_call_cap": "50.00",
            "endpoints": ["/v1/refunds"],
        }
    )
    gov = make_governor(policy)
    (governed,) = govern_tools([tool], gov, specs={tool.name: SPEC}, agent="refund-agent")
    assert events_of(governed, args) == events_of(tool, args)
    (row,) = gov.audit.query()
    assert row.outcome == outcome
    assert len(gov.ledger.holds(states=[state])) == 1
    assert gov.holds() == []  # nothing left pending
