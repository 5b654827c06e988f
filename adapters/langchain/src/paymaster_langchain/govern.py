"""Govern existing LangChain tools, or every tool call of a ``create_agent`` agent.

::

    tools = govern_tools([refund_tool, lookup_tool], governor,
                         specs={"refund_tool": refund_spec, "lookup_tool": FREE})
    agent = create_agent(model, tools=tools, name="refund-agent")
    agent.invoke({"messages": [...]}, config={"metadata": {"run_id": "run-42"}})

or, without wrapping tools one by one::

    agent = create_agent(model, tools=[refund_tool, lookup_tool], name="refund-agent",
                         middleware=[PaymasterMiddleware(governor, specs={...})])

A governed tool call is reserved before the tool runs and settled from its output; the
tool itself is invoked unchanged (the same input, injected arguments and config), so its
own error handling, ``return_direct`` and content-and-artifact output keep working. A
refusal reaches the caller of ``invoke`` / ``ainvoke`` / ``stream`` (see
:mod:`._propagation`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict

from paymaster import Governor, PolicyViolation, ViolationCode
from paymaster.governor import GovernedCall
from paymaster.toolspec import FreeTool, ToolSpec
from paymaster.vendors.stripe.tools import model_message

from ._propagation import STOPS_THE_RUN, stop_the_run

__all__ = ["GovernedTool", "OnViolation", "PaymasterMiddleware", "govern_tools", "run_id_of"]

OnViolation = Literal["raise", "tell_model"]
Spec = ToolSpec | FreeTool


def run_id_of(config: RunnableConfig) -> str | None:
    """The run of a tool call: ``paymaster_run_id`` or ``run_id`` in the invocation's
    ``metadata`` or ``configurable``, else the ``run_id`` passed to ``invoke``, else its
    ``thread_id``. (``None``: the call is audited without a run.)"""
    metadata = config.get("metadata") or {}
    configurable = config.get("configurable") or {}
    for key in ("paymaster_run_id", "run_id"):
        for source in (metadata, configurable):
            if source.get(key):
                return str(source[key])
    runtime = configurable.get("__pregel_runtime")  # LangGraph: the invocation's run_id
    run = getattr(getattr(runtime, "execution_info", None), "run_id", None)
    if run:
        return str(run)
    thread = metadata.get("thread_id") or configurable.get("thread_id")
    return str(thread) if thread else None


@dataclass(frozen=True)
class _Governance:
    """The rules shared by governed tools and the middleware."""

    governor: Governor
    agent: str | None
    on_violation: OnViolation
    run_id: Callable[[RunnableConfig], str | None]

    def who(self, config: RunnableConfig) -> str:
        agent = self.agent or (config.get("metadata") or {}).get("lc_agent_name")
        if not agent:
            raise ValueError(
                "no agent type for this tool call: pass agent= or create the agent with "
                "create_agent(..., name=...)"
            )
        return str(agent)

    def refusal(self, violation: PolicyViolation, call_id: str | None) -> Any:
        """A refusal for the model (``tell_model`` or bad arguments), or raised."""
        if self.on_violation == "tell_model" or violation.code is ViolationCode.INVALID_REQUEST:
            text = model_message(violation) or str(violation)
            if call_id is None:
                return text
            return ToolMessage(content=text, tool_call_id=call_id, status="error")
        raise stop_the_run(violation) from None

    # -- one call -------------------------------------------------------------------------
    def _guard_kwargs(
        self, name: str, spec: ToolSpec, args: Mapping[str, Any], call_id: str | None,
        config: RunnableConfig,
    ) -> dict[str, Any]:  # fmt: skip
        agent, run = self.who(config), self.run_id(config)
        try:
            call = spec.for_call(args)
        except Exception as exc:  # the model's arguments do not fit the spec
            violation = PolicyViolation(
                ViolationCode.INVALID_REQUEST,
                f"cannot tell what {name} would cost from its arguments ({exc})",
                agent=agent, run=run,
            )  # fmt: skip
            raise self.governor.record_refusal(
                violation, agent=agent, vendor=spec.vendor, endpoint=f"/tools/{name}",
                method=spec.method, run=run, tool_call_id=call_id,
            ) from exc  # fmt: skip
        return {"agent": agent, "run": run, "tool_call_id": call_id, **call.as_guard_kwargs()}

    @contextmanager
    def call(
        self, name: str, spec: Spec, args: Mapping[str, Any], call_id: str | None,
        config: RunnableConfig,
    ) -> Iterator[Callable[[Any], None]]:  # fmt: skip
        """Govern one tool call made inside the block; yields ``done(output)``."""
        if isinstance(spec, FreeTool):
            record = self.governor.free_call(
                agent=self.who(config), vendor=spec.vendor, endpoint=spec.endpoint(name),
                run=self.run_id(config), tool_call_id=call_id,
            )  # fmt: skip
            started = time.monotonic()
            try:
                yield lambda output: record(error=_failure(output), duration_ms=_ms(started))
            except Exception as exc:
                record(error=_describe(exc), duration_ms=_ms(started))
                raise
            return
        kwargs = self._guard_kwargs(name, spec, args, call_id, config)
        with self.governor.guard(**kwargs) as call:
            yield lambda output: _resolve(call, spec, output)

    @asynccontextmanager
    async def acall(
        self, name: str, spec: Spec, args: Mapping[str, Any], call_id: str | None,
        config: RunnableConfig,
    ) -> Any:  # fmt: skip
        """:meth:`call` for asyncio: ``done(output)`` is awaited."""
        gov = self.governor
        if isinstance(spec, FreeTool):
            record = await gov.in_worker(
                gov.free_call, agent=self.who(config), vendor=spec.vendor,
                endpoint=spec.endpoint(name), run=self.run_id(config), tool_call_id=call_id,
            )  # fmt: skip
            started = time.monotonic()

            async def done_free(output: Any) -> None:
                await gov.in_worker(record, error=_failure(output), duration_ms=_ms(started))

            try:
                yield done_free
            except Exception as exc:
                await gov.in_worker(record, error=_describe(exc), duration_ms=_ms(started))
                raise
            return
        kwargs = await gov.in_worker(self._guard_kwargs, name, spec, args, call_id, config)
        async with gov.aguard(**kwargs) as call:

            async def done(output: Any) -> None:
                await gov.in_worker(_resolve, call, spec, output)

            yield done


class GovernedTool(BaseTool):
    """A governed stand-in for a LangChain tool: same name, description, argument schema,
    ``return_direct`` and ``response_format``; each call reserved, then the original
    tool invoked with the very same input."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool
    spec: Any
    governance: Any

    def _run(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - invoke is used
        raise NotImplementedError("a GovernedTool is called through invoke / ainvoke")

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        args, call_id = _split(input)
        governance: _Governance = self.governance
        try:
            with governance.call(self.name, self.spec, args, call_id, config) as done:
                output = self.inner.invoke(input, config, **kwargs)
                done(output)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        args, call_id = _split(input)
        governance: _Governance = self.governance
        try:
            async with governance.acall(self.name, self.spec, args, call_id, config) as done:
                output = await self.inner.ainvoke(input, config, **kwargs)
                await done(output)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None


def govern_tools(
    tools: Iterable[BaseTool],
    governor: Governor,
    *,
    specs: Mapping[str, Spec],
    agent: str | None = None,
    on_violation: OnViolation = "raise",
    run_id: Callable[[RunnableConfig], str | None] = run_id_of,
) -> list[BaseTool]:
    """Governed stand-ins for ``tools`` (``@tool`` functions, ``StructuredTool``s, your
    own ``BaseTool`` subclasses; sync and async).

    ``specs`` maps each tool's name to its :class:`~paymaster.ToolSpec`, or to
    :data:`~paymaster.FREE` for a tool that spends nothing; a tool without one is refused
    here. ``agent`` is the policy's agent type (default: the ``name`` given to
    ``create_agent``). ``on_violation="tell_model"`` returns a refusal to the model as an
    error ``ToolMessage`` instead of ending the run.
    """
    tools = list(tools)
    for tool in tools:
        if not isinstance(tool, BaseTool):
            raise TypeError(f"{tool!r} is not a LangChain BaseTool")
    _check_specs([tool.name for tool in tools], specs)
    governance = _Governance(governor, agent, on_violation, run_id)
    return [_governed(tool, specs[tool.name], governance) for tool in tools]


def _governed(tool: BaseTool, spec: Spec, governance: _Governance) -> GovernedTool:
    return GovernedTool(
        name=tool.name, description=tool.description, args_schema=tool.args_schema,
        return_direct=tool.return_direct, response_format=tool.response_format,
        metadata=tool.metadata, tags=tool.tags, extras=getattr(tool, "extras", None),
        inner=tool, spec=spec, governance=governance,
    )  # fmt: skip


def _check_specs(names: Sequence[str], specs: Mapping[str, Spec]) -> None:
    missing = [name for name in names if name not in specs]
    if missing:
        raise ValueError(
            f"no spec for {', '.join(map(repr, missing))}: give each tool a ToolSpec, or "
            "paymaster.FREE if it spends nothing, so that nothing runs ungoverned"
        )
    unknown = sorted(set(specs) - set(names))
    if unknown:
        raise ValueError(f"specs name tools that are not given: {', '.join(unknown)}")


def _middleware_base() -> type:
    try:
        from langchain.agents.middleware import AgentMiddleware
    except ImportError:  # pragma: no cover - the `agents` extra is not installed
        return object
    return AgentMiddleware


class PaymasterMiddleware(_middleware_base()):  # type: ignore[misc]
    """Governs every tool call of a ``create_agent`` agent (``paymaster-langchain[agents]``).

    List it first in ``middleware=[...]`` so that it is the outermost: no other
    middleware then sees (or could swallow) a refusal. A tool call whose tool has no spec
    is refused: nothing runs ungoverned.
    """

    def __init__(
        self,
        governor: Governor,
        *,
        specs: Mapping[str, Spec],
        agent: str | None = None,
        on_violation: OnViolation = "raise",
        run_id: Callable[[RunnableConfig], str | None] = run_id_of,
    ) -> None:
        super().__init__()
        self.specs = dict(specs)
        self.governance = _Governance(governor, agent, on_violation, run_id)

    def _spec(self, request: Any) -> tuple[str, Spec, Mapping[str, Any], str | None]:
        call = request.tool_call
        name, call_id = call["name"], call.get("id")
        spec = self.specs.get(name)
        if spec is None:
            config = ensure_config(request.runtime.config if request.runtime else None)
            agent = self.governance.who(config)
            violation = PolicyViolation(
                ViolationCode.UNKNOWN_OPERATION,
                f"tool {name!r} has no paymaster spec, so it was not run",
                agent=agent,
            )  # fmt: skip
            raise self.governance.governor.record_refusal(
                violation, agent=agent, vendor="tool", endpoint=f"/tools/{name}",
                method="CALL", run=self.governance.run_id(config), tool_call_id=call_id,
            )  # fmt: skip
        return name, spec, call.get("args") or {}, call_id

    def wrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        config = ensure_config(request.runtime.config if request.runtime else None)
        try:
            name, spec, args, call_id = self._spec(request)
            with self.governance.call(name, spec, args, call_id, config) as done:
                output = handler(request)
                done(output)
                return output
        except PolicyViolation as violation:
            return self.governance.refusal(violation, request.tool_call.get("id"))
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None

    async def awrap_tool_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        config = ensure_config(request.runtime.config if request.runtime else None)
        gov = self.governance.governor
        try:
            name, spec, args, call_id = await gov.in_worker(self._spec, request)
            async with self.governance.acall(name, spec, args, call_id, config) as done:
                output = await handler(request)
                await done(output)
                return output
        except PolicyViolation as violation:
            return self.governance.refusal(violation, request.tool_call.get("id"))
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None


# -- outputs ---------------------------------------------------------------------------
def _split(input: Any) -> tuple[Mapping[str, Any], str | None]:
    """The arguments and tool call id of a tool's input (a ToolCall, or bare arguments)."""
    if isinstance(input, Mapping) and input.get("type") == "tool_call":
        return input.get("args") or {}, input.get("id")
    if isinstance(input, Mapping):
        return input, None
    return {"input": input}, None


def _failure(output: Any) -> str | None:
    """An error result the tool's own error handling made (a ToolMessage marked error)."""
    if isinstance(output, ToolMessage) and output.status == "error":
        return str(output.content)[:500] or "the tool reported an error"
    return None


def _value(output: Any) -> Any:
    """What a spec's ``actual`` sees: a ToolMessage's artifact, else its content (JSON
    decoded when it is JSON), else the output itself."""
    if not isinstance(output, ToolMessage):
        return output
    if output.artifact is not None:
        return output.artifact
    if isinstance(output.content, str):
        try:
            return json.loads(output.content)
        except ValueError:
            return output.content
    return output.content


def _resolve(call: GovernedCall, spec: ToolSpec, output: Any) -> None:
    error = _failure(output)
    if error is not None:
        # The tool's own error handling turned its error into a message: nothing was paid
        # that the tool knows of. (Base-class resolvers: this runs in a worker thread.)
        GovernedCall.fail(call, error=error)
    else:
        GovernedCall.settle(call, spec.actual_cost(_value(output)))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:500]


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
