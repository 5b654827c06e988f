"""The tool paid, then LangChain's own ``run`` raised (a content-and-artifact tool whose
body returned no pair; a callback with ``raise_error`` failing in ``on_tool_end``): the
tool's outcome stands. The hold is settled and counted against the cap, never released
because of what LangChain did afterwards, and the error still reaches the caller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tools import BaseTool, tool

from paymaster import Governor, Money, ToolSpec
from paymaster_langchain import govern_tools

SPEC = ToolSpec(
    vendor="stripe", endpoint="/v1/refunds", estimate=lambda a: Money(a["amount"], "USD")
)
PAID: list[int] = []  # what the vendor moved, as the tools' bodies record it


@tool(response_format="content_and_artifact")
def refund_pair(amount: int) -> Any:
    """Refund an amount in cents."""
    PAID.append(amount)
    return {"refunded": amount}  # not the (content, artifact) pair LangChain needs


@tool
def refund(amount: int) -> dict[str, int]:
    """Refund an amount in cents."""
    PAID.append(amount)
    return {"refunded": amount}


class BrokenCallback(BaseCallbackHandler):
    raise_error = True

    def on_tool_end(self, output: Any, **kwargs: Any) -> None:
        raise RuntimeError("the callback broke")


CASES: dict[str, tuple[BaseTool, dict[str, Any]]] = {
    "artifact": (refund_pair, {}),
    "callback": (refund, {"callbacks": [BrokenCallback()]}),
}


def _invoke(governed: BaseTool, config: dict[str, Any], asynchronous: bool, n: int) -> None:
    call = {"type": "tool_call", "id": f"c{n}", "name": governed.name, "args": {"amount": 4000}}
    if asynchronous:
        asyncio.run(governed.ainvoke(call, config))  # type: ignore[arg-type]
    else:
        governed.invoke(call, config)  # type: ignore[arg-type]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["invoke", "ainvoke"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tool_that_paid_is_counted_when_langchain_raises_after_it(
    make_governor: Callable[..., Governor], case: str, asynchronous: bool
) -> None:
    gov = make_governor()  # $100 a day, $50 a call
    inner, config = CASES[case]
    [governed] = govern_tools([inner], gov, specs={inner.name: SPEC}, agent="refund-agent")
    PAID.clear()
    for n in range(4):
        try:
            _invoke(governed, config, asynchronous, n)
        except Exception as exc:  # LangChain's error still reaches the caller
            assert "refunded" not in str(exc)
    assert sum(PAID) == 8000  # two $40 refunds paid; the cap refused the rest
    committed = [b.committed for b in gov.budgets() if b.cap is not None]
    assert committed == [Money(8000, "USD")]  # the ledger counts what moved
    outcomes = [r.outcome for r in gov.audit.query(agent="refund-agent")]
    assert sorted(str(o) for o in outcomes) == ["allowed", "allowed", "denied", "denied"]
