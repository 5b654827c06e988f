"""Govern existing Agents SDK function tools.

::

    tools = govern_tools([issue_refund, lookup_charge], governor,
                         specs={"issue_refund": refund_spec, "lookup_charge": FREE})
    agent = Agent(name="refund-agent", tools=tools, ...)
    await Runner.run(agent, "...", context={"run_id": "run-42"})  # PolicyViolation lands here

Each call of a governed tool is reserved before the tool runs and settled from its result;
a refusal ends the run (:func:`stop_the_run`). The tool's name, description, JSON
schema, strictness, ``is_enabled`` and its own failure handling are kept: the governance
wraps the tool's raw invocation *inside* the SDK's failure handling (so the user's errors
reach the model exactly as before, and paymaster sees the raw exception to decide whether
money may have moved), and the reservation *outside* it (so a refusal is never turned
into a message for the model).

How one call runs (as one piece of work the SDK cancelling it cannot cut in two) is
:mod:`._call`; the SDK's private names it relies on are all in :mod:`._compat`. A spec
that raises is a bug: it ends the run as :class:`~paymaster.SpecError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agents import FunctionTool, function_tool
from agents.exceptions import AgentsException
from agents.tool_context import ToolContext

from paymaster import FreeTool, Governor, PolicyViolation, ToolSpec
from paymaster.integrations import (
    STOPS_THE_RUN,
    OnViolation,
    RunStopper,
    check_agent,
    check_specs,
    model_message,
    refusal_text,
)

from ._call import BadArguments, Invoke, ToolCall, noting
from ._compat import (
    GovernedInvoker,
    failure_function,
    failure_message,
    is_sync_tool,
    raw_implementation,
    rebuild_invoker,
)

__all__ = [
    "STOPS_THE_RUN",
    "OnViolation",
    "govern_tool",
    "govern_tools",
    "governed_function_tool",
    "stop_the_run",
]

Spec = ToolSpec | FreeTool


stop_the_run = RunStopper(
    lambda: AgentsException,
    defaults={"run_data": None},  # the SDK attaches the run's details here
    doc="""``exc`` re-classed so the Agents SDK propagates it unchanged to the caller of
    ``Runner.run`` / ``run_sync`` / ``run_streamed``.

    The SDK re-raises a tool's exception as ``UserError("Error running tool ...")`` unless
    it is an ``AgentsException`` (``agents/run_internal/tool_execution.py``), and its
    default ``failure_error_function`` turns exceptions into "please try again" for the
    model. So a :class:`~paymaster.PolicyViolation` (or
    :class:`~paymaster.GovernanceUnavailable`, :class:`~paymaster.SpecError`: the
    exceptions of :data:`STOPS_THE_RUN`) leaves a governed tool as the *same* exception
    object, re-classed to a subclass of both its own class and ``AgentsException``: the
    SDK lets it through untouched and the caller's ``except PolicyViolation`` catches it.
    """,
)


def govern_tools(
    tools: Iterable[FunctionTool],
    governor: Governor,
    *,
    specs: Mapping[str, Spec],
    agent: str | None = None,
    on_violation: OnViolation = "raise",
) -> list[FunctionTool]:
    """Governed copies of ``tools`` (the originals are left as they are).

    ``specs`` maps each tool's name to its :class:`~paymaster.ToolSpec`, or to
    :data:`~paymaster.FREE` for a tool that spends nothing; a tool without one is refused
    here, so nothing is silently ungoverned. ``agent`` is the policy's agent type; given,
    it is checked here against the governor's policies (a
    :class:`~paymaster.PolicyError` lists the agent types they know). Without it,
    the agent type is the ``name`` of the Agent running the tool, at each call, so
    ``Agent(name="Refund Agent")`` needs ``agent="refund-agent"`` here, or
    ``Agent(name="refund-agent")``. ``on_violation="tell_model"``
    hands a refusal to the model as the tool's output instead of ending the run. A spec
    that raises ends the run with :class:`~paymaster.SpecError` (logged, audited;
    when its ``actual`` raises, the tool's hold is kept ``unknown``).
    """
    tools = list(tools)
    for tool in tools:
        if not isinstance(tool, FunctionTool):
            raise TypeError(
                f"{tool!r} is not a FunctionTool; paymaster governs function tools only"
            )
    check_specs([tool.name for tool in tools], specs)
    return [
        govern_tool(tool, governor, specs[tool.name], agent=agent, on_violation=on_violation)
        for tool in tools
    ]


def governed_function_tool(
    governor: Governor,
    spec: Spec,
    *,
    agent: str | None = None,
    on_violation: OnViolation = "raise",
    **function_tool_options: Any,
) -> Callable[[Callable[..., Any]], FunctionTool]:
    """``@function_tool`` and governance in one step::

    @governed_function_tool(gov, ToolSpec(vendor="stripe", endpoint="/v1/refunds", ...))
    async def issue_refund(charge: str, amount: int) -> dict: ...

    ``agent`` as for :func:`govern_tools` (default: the running Agent's ``name``).
    """
    check_agent(governor, agent, [spec])

    def decorate(fn: Callable[..., Any]) -> FunctionTool:
        tool = function_tool(fn, **function_tool_options)
        return govern_tool(tool, governor, spec, agent=agent, on_violation=on_violation)

    return decorate


def govern_tool(
    tool: FunctionTool,
    governor: Governor,
    spec: Spec,
    *,
    agent: str | None = None,
    on_violation: OnViolation = "raise",
) -> FunctionTool:
    """A governed copy of one tool; see :func:`govern_tools` (``agent`` given is checked
    here; default: the running Agent's ``name``)."""
    check_agent(governor, agent, [spec])
    invoke = _watched(tool)
    # The SDK runs a sync function in a thread of its own and forgets it when the call is
    # cancelled; run it in the governor's workers instead, together with its settle.
    in_worker = is_sync_tool(tool.on_invoke_tool)

    async def on_invoke_tool(ctx: ToolContext[Any], args_json: str) -> Any:
        call = ToolCall(governor, tool, spec, agent or _agent_name(ctx), ctx, args_json, invoke)
        try:
            if in_worker:
                return await call.run_in_worker()
            return await call.run_detached()
        except BadArguments as bad:
            return await _told(tool, ctx, bad.violation)
        except PolicyViolation as violation:
            text = refusal_text(violation, on_violation)
            if text is not None:
                return text
            raise stop_the_run(violation) from None
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None

    return dataclasses.replace(tool, on_invoke_tool=GovernedInvoker(on_invoke_tool, invoke))


async def _told(tool: FunctionTool, ctx: ToolContext[Any], violation: PolicyViolation) -> Any:
    """What the model is told about arguments that are not JSON: the tool's own failure
    message, as for arguments the tool itself cannot take."""
    if failure_function(tool, ctx) is None:
        return model_message(violation) or str(violation)
    message = await failure_message(function_tool=tool, context=ctx, error=violation)
    return message if message is not None else str(violation)


def _watched(tool: FunctionTool) -> Invoke:
    """The tool's invocation, with its raw exceptions noted for the governor before the
    SDK's failure handling (if the tool has any) turns them into a message."""
    invoker: Any = tool.on_invoke_tool
    impl = raw_implementation(invoker)
    if impl is None:  # a hand-made FunctionTool: its exceptions reach the runner anyway
        return noting(invoker)
    # An SDK failure-handling invoker: rebuild it around the noted raw implementation,
    # bound to the same tool, so its failure policy is resolved exactly as before.
    return rebuild_invoker(invoker, noting(impl), tool)


def _agent_name(ctx: ToolContext[Any]) -> str:
    if ctx.agent is None:
        raise ValueError("the tool call has no agent: pass agent= when wrapping its tools")
    return ctx.agent.name
