"""The prebuilt governed Stripe tools as LangChain tools.

::

    toolkit = PaymasterStripeToolkit(governor, stripe_client, agent="refund-agent",
                                     only=["create_refund"])
    agent = create_agent(model, tools=toolkit.get_tools())
    agent.invoke({"messages": [...]}, config={"metadata": {"run_id": "run-42"}})

The tools come from :class:`paymaster.integrations.StripeToolkit`: the same names, descriptions,
argument schemas and governance as the Agents SDK tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import stripe
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, InjectedToolCallId, StructuredTool
from pydantic import BaseModel, create_model

from paymaster import Governor, RunPolicy
from paymaster.integrations import (
    STOPS_THE_RUN,
    OnViolation,
    StripeTool,
    StripeToolkit,
    tool_failure_text,
)

from .govern import agent_name, run_id_of, stop_the_run

__all__ = ["PaymasterStripeToolkit"]


class PaymasterStripeToolkit:
    """Governed Stripe tools for LangChain agents; :meth:`get_tools` returns them.

    ``agent`` names the policy (agent type) the calls are checked against; given, it is
    checked here against the governor's policies (a :class:`~paymaster.PolicyError`
    lists the agent types they know). Without it, as for
    :func:`~paymaster_langchain.govern_tools`: the agent type of a governed ``client``
    (``governed_client(..., agent=...)``), else the ``name`` given to ``create_agent``, at
    each call. A refused call raises :class:`~paymaster.PolicyViolation` out of
    ``invoke`` / ``ainvoke`` / ``stream`` whatever tool-error handling is configured; with
    ``on_violation="tell_model"`` the model gets the refusal as the tool's result instead
    (still audited). Stripe's own errors and invalid arguments go to the model.
    """

    def __init__(
        self,
        governor: Governor,
        client: stripe.StripeClient,
        *,
        agent: str | None = None,
        only: Sequence[str] | None = None,
        run_policy: RunPolicy | None = None,
        on_violation: OnViolation = "raise",
        run_id: Callable[[RunnableConfig], str | None] = run_id_of,
    ) -> None:
        self.toolkit = StripeToolkit(
            governor, client, agent=agent, run_policy=run_policy, only=only
        )
        self.on_violation = on_violation
        self.run_id = run_id

    def get_tools(self) -> list[BaseTool]:
        return [self._tool(tool) for tool in self.toolkit.tools]

    def _tool(self, tool: StripeTool) -> BaseTool:
        toolkit, on_violation, run_id = self.toolkit, self.on_violation, self.run_id
        known = toolkit.governor.policies.agents

        def outcome(exc: Exception) -> str:
            text = tool_failure_text(exc, tell_model_violations=on_violation == "tell_model")
            if text is not None:
                return text
            if isinstance(exc, STOPS_THE_RUN):
                raise stop_the_run(exc) from None
            raise exc

        def call(tool_call_id: str, config: RunnableConfig, **arguments: Any) -> str:
            try:
                result = toolkit.invoke(
                    tool.name,
                    arguments,
                    run=run_id(config),
                    tool_call_id=tool_call_id,
                    agent=toolkit.agent or agent_name(config, known),
                )
            except Exception as exc:
                return outcome(exc)
            return json.dumps(result)

        async def acall(tool_call_id: str, config: RunnableConfig, **arguments: Any) -> str:
            try:
                result = await toolkit.ainvoke(
                    tool.name,
                    arguments,
                    run=run_id(config),
                    tool_call_id=tool_call_id,
                    agent=toolkit.agent or agent_name(config, known),
                )
            except Exception as exc:
                return outcome(exc)
            return json.dumps(result)

        return StructuredTool.from_function(
            func=call,
            coroutine=acall,
            name=tool.name,
            description=tool.description,
            args_schema=_with_call_id(tool.args_schema),
        )


def _with_call_id(schema: type[BaseModel]) -> type[BaseModel]:
    """The tool's arguments plus the tool call id, which LangChain injects (the model
    never sees it)."""
    return create_model(
        schema.__name__,
        __base__=schema,
        tool_call_id=(Annotated[str, InjectedToolCallId], ...),
    )
