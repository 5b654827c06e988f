"""The prebuilt governed Stripe tools as Agents SDK ``FunctionTool`` objects.

::

    tools = stripe_tools(governor, stripe_client, agent="refund-agent", only=["create_refund"])
    agent = Agent(name="refund-agent", tools=tools, ...)
    await Runner.run(agent, "...", context={"run_id": "run-42"})

The tools come from :class:`paymaster.integrations.StripeToolkit`: the same names, descriptions,
argument schemas and governance as the LangChain toolkit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import stripe
from agents import FunctionTool
from agents.tool_context import ToolContext

from paymaster import Governor, RunPolicy
from paymaster.integrations import (
    STOPS_THE_RUN,
    OnViolation,
    StripeTool,
    StripeToolkit,
    tool_failure_text,
)

from ._compat import ensure_strict_json_schema
from ._runs import run_id_of, run_policy_of
from .govern import _agent_name, stop_the_run

__all__ = ["stripe_tools"]


def stripe_tools(
    governor: Governor,
    client: stripe.StripeClient,
    *,
    agent: str | None = None,
    only: Sequence[str] | None = None,
    run_policy: RunPolicy | None = None,
    on_violation: OnViolation = "raise",
    run_id: Callable[[ToolContext[Any]], str | None] = run_id_of,
) -> list[FunctionTool]:
    """Governed Stripe tools for an Agents SDK agent.

    ``agent`` names the policy (agent type) the calls are checked against; given, it is
    checked here against the governor's policies (a :class:`~paymaster.PolicyError`
    lists the agent types they know). Without it, as for
    :func:`~paymaster_openai_agents.govern_tools`: the agent type of a governed ``client``
    (``governed_client(..., agent=...)``), else the ``name`` of the Agent running the tool,
    at each call (``Agent(name="Refund Agent")`` needs ``agent="refund-agent"``). A refused
    call raises :class:`~paymaster.PolicyViolation` out of ``Runner.run`` (the run stops);
    with ``on_violation="tell_model"`` the model gets the refusal as the tool's output
    instead (still audited). Stripe's own errors and invalid arguments go to the model,
    as the SDK does for any tool error.
    """
    toolkit = StripeToolkit(governor, client, agent=agent, run_policy=run_policy, only=only)
    return [_function_tool(toolkit, tool, on_violation, run_id) for tool in toolkit.tools]


def _function_tool(
    toolkit: StripeToolkit,
    tool: StripeTool,
    on_violation: OnViolation,
    run_id: Callable[[ToolContext[Any]], str | None],
) -> FunctionTool:
    async def on_invoke_tool(ctx: ToolContext[Any], args_json: str) -> str:
        try:
            arguments = json.loads(args_json or "{}")
            result = await toolkit.ainvoke(
                tool.name,
                arguments,
                run=run_id(ctx),
                tool_call_id=ctx.tool_call_id,
                run_policy=run_policy_of(ctx),
                agent=toolkit.agent or _agent_name(ctx),
            )
        except Exception as exc:
            text = tool_failure_text(exc, tell_model_violations=on_violation == "tell_model")
            if text is not None:
                return text
            if isinstance(exc, STOPS_THE_RUN):
                raise stop_the_run(exc) from None
            raise
        return json.dumps(result)

    return FunctionTool(
        name=tool.name,
        description=tool.description,
        params_json_schema=ensure_strict_json_schema(tool.args_schema.model_json_schema()),
        on_invoke_tool=on_invoke_tool,
        strict_json_schema=True,
    )
