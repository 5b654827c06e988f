"""Govern existing LangChain tools, or every tool call of a ``create_agent`` agent.

::

    tools = govern_tools([refund_tool, lookup_tool], governor,
                         specs={"refund_tool": refund_spec, "lookup_tool": FREE})
    agent = create_agent(model, tools=tools, name="refund-agent")
    agent.invoke({"messages": [...]}, config={"metadata": {"run_id": "run-42"}})

or, without wrapping tools one by one (listed last: the innermost middleware)::

    agent = create_agent(model, tools=[refund_tool, lookup_tool], name="refund-agent",
                         middleware=[..., PaymasterMiddleware(governor, specs={...})])

A governed tool call is reserved before the tool runs and settled from its output; the
tool itself is invoked unchanged (the same input, injected arguments and config), so its
own error handling, ``return_direct`` and content-and-artifact output keep working. A
refusal reaches the caller of ``invoke`` / ``ainvoke`` / ``stream`` (see
:func:`stop_the_run`), and so does a spec that raises (a bug:
:class:`~paymaster.SpecError`).

Called asynchronously, a governed tool's reservation, body and settle run as one piece of
work that cancelling the awaiting task (LangGraph cancelling a step, the caller giving
up) cannot cut in two: a sync tool's in the governor's worker threads, an async tool's as
a task of its own. The cancelled call ends at once; its body, once started, runs on and
settles from its result. Only a body that is itself cancelled (the event loop shutting
down under it) is kept ``unknown``.

The hook: a governed tool wraps the tool's ``invoke`` (where the tool call id and config
are known) around a copy of the tool whose ``_run`` / ``_arun`` report what the tool
itself returned or raised (see :mod:`._compat`); LangChain's own ``BaseTool.run`` does
everything else, unchanged. One call's admission and outcome are
:mod:`._governance`'s, shared with :class:`PaymasterMiddleware`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, PrivateAttr

from paymaster import FreeTool, Governor, PolicyViolation, ToolSpec, ViolationCode
from paymaster.integrations import (
    STOPS_THE_RUN,
    OnViolation,
    check_agent,
    check_not_abandoned,
    check_specs,
    run_detached,
    run_in_worker,
)

from ._compat import (
    langgraph_run_id,
    recording_validation_errors,
    runs_in_a_thread,
    wrap_implementation,
    wrap_sync_or_async,
)
from ._governance import (
    Captured,
    Governance,
    agent_name,
    captured,
    priced_arguments,
    stop_the_run,
)

__all__ = [
    "STOPS_THE_RUN",
    "GovernedTool",
    "OnViolation",
    "PaymasterMiddleware",
    "agent_name",
    "govern_tools",
    "run_id_of",
    "stop_the_run",
]

Spec = ToolSpec | FreeTool
_NOT_STARTED = "the caller stopped waiting for this call before its tool started"


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
    run = langgraph_run_id(configurable)  # LangGraph: the invocation's run_id
    if run:
        return run
    thread = metadata.get("thread_id") or configurable.get("thread_id")
    return str(thread) if thread else None


class GovernedTool(BaseTool):
    """A governed stand-in for a LangChain tool: the same name, description, schemas
    (injected arguments included), ``return_direct`` and ``response_format``. Each call
    is reserved, then a copy of the original tool runs with the very same input and
    config, through LangChain's own ``invoke`` (its validation, injection, callbacks and
    error handling); paymaster sees what the tool itself returned or raised on its way
    out of ``_run`` / ``_arun``, so a timeout the tool's handling turns into a message
    still keeps the hold counted."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool
    spec: Any
    governance: Any
    _raw: BaseTool = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        self._raw = _watched_copy(self.inner)

    # -- what the model and LangGraph see: the inner tool's ------------------------------
    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        return self.inner.get_input_schema(config)

    @property
    def tool_call_schema(self) -> Any:
        return self.inner.tool_call_schema

    @property
    def args(self) -> dict[str, Any]:
        return self.inner.args

    @property
    def is_single_input(self) -> bool:
        return self.inner.is_single_input

    @property
    def func(self) -> Callable[..., Any] | None:
        """The inner function's signature, for LangGraph's injection; calling it is
        refused (call the tool)."""
        inner = getattr(self.inner, "func", None) or getattr(self.inner, "coroutine", None)
        if inner is None:
            return None

        @functools.wraps(inner)
        def signature_only(*args: Any, **kwargs: Any) -> Any:
            raise TypeError(f"call the governed tool {self.name!r}, not its function")

        return signature_only

    def _run(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - invoke is used
        raise NotImplementedError("a GovernedTool is called through invoke / run")

    # -- calls: ``invoke`` / ``ainvoke`` (LangChain's) come here ----------------------------
    def run(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        """``BaseTool.run``, governed: reserve, run the tool (LangChain's own ``run`` of a
        copy of it, with the very same arguments), settle from its output (or refuse)."""
        return self._governed_run(None, tool_input, *args, **kwargs)

    async def arun(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        """``BaseTool.arun``, governed. Cancelled, it ends at once; a call whose tool had
        started runs on and settles from its output (see the module's docstring)."""
        abandoned = threading.Event()
        if runs_in_a_thread(self.inner):
            # LangChain would run it in a thread of its own and forget it if cancelled: run
            # it in the governor's workers, reservation to settle, instead.
            gov = self.governance.governor
            run = self._governed_run
            return await run_in_worker(gov, abandoned, run, abandoned, tool_input, *args, **kwargs)
        work = self._governed_arun(abandoned, tool_input, *args, **kwargs)
        return await run_detached(work, abandoned)

    def _governed_run(
        self, abandoned: threading.Event | None, tool_input: Any, *args: Any, **kwargs: Any
    ) -> Any:
        check_not_abandoned(abandoned, _NOT_STARTED)  # cancelled as it was picked up
        call_id, config = kwargs.get("tool_call_id"), _config_of(kwargs)
        governance: Governance = self.governance
        try:
            priced, valid = priced_arguments(self.inner, _arguments(tool_input))
            with governance.call(
                self.name, self.spec, priced, valid, call_id, config, abandoned
            ) as tracked:
                caught = Captured()
                token = captured.set(caught)
                try:
                    output = self._raw.run(tool_input, *args, **kwargs)
                except Exception as exc:
                    if caught.finished:  # the tool's own outcome stands
                        tracked.ended(None, caught)
                    else:
                        tracked.failed(exc)
                    raise
                finally:
                    captured.reset(token)
                tracked.ended(output, caught)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept

    async def _governed_arun(
        self, abandoned: threading.Event, tool_input: Any, *args: Any, **kwargs: Any
    ) -> Any:
        check_not_abandoned(abandoned, _NOT_STARTED)  # cancelled before the task first ran
        call_id, config = kwargs.get("tool_call_id"), _config_of(kwargs)
        governance: Governance = self.governance
        gov = governance.governor
        try:
            priced, valid = await gov.in_worker(
                priced_arguments, self.inner, _arguments(tool_input)
            )
            async with governance.acall(
                self.name, self.spec, priced, valid, call_id, config, abandoned
            ) as tracked:
                caught = Captured()
                token = captured.set(caught)
                try:
                    output = await self._raw.arun(tool_input, *args, **kwargs)
                except Exception as exc:
                    if caught.finished:  # the tool's own outcome stands
                        await tracked.aended(gov, None, caught)
                    else:
                        await tracked.afailed(gov, exc)
                    raise
                finally:
                    captured.reset(token)
                await tracked.aended(gov, output, caught)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept


def _watched_copy(tool: BaseTool) -> BaseTool:
    """A copy of ``tool`` that tells the call in progress (:data:`captured`) what the
    tool itself returned or raised, before LangChain's handling of its errors, and the
    ValidationError of input it refused before running."""
    raw: BaseTool = tool.model_copy()
    artifact = tool.response_format == "content_and_artifact"

    def returned(value: Any) -> Any:
        caught = captured.get()
        if caught is not None:
            caught.returned(value, artifact)
        return value

    def raised(error: Exception) -> None:
        caught = captured.get()
        if caught is not None:
            caught.raised(error)

    wrap_implementation(raw, lambda method: wrap_sync_or_async(method, returned, raised))
    recording_validation_errors(raw, raised)
    return raw


def _arguments(tool_input: Any) -> Mapping[str, Any]:
    """A tool's input as arguments (a single-input tool's string is ``input``)."""
    return tool_input if isinstance(tool_input, Mapping) else {"input": tool_input}


def _config_of(run_kwargs: Mapping[str, Any]) -> RunnableConfig:
    """The config of a ``BaseTool.run`` call (``invoke`` passes its own, and its
    ``metadata`` again), for the run id and agent name of the call."""
    config: RunnableConfig = dict(run_kwargs.get("config") or {})  # type: ignore[assignment]
    if run_kwargs.get("metadata") is not None:
        config["metadata"] = run_kwargs["metadata"]
    return ensure_config(config)


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
    here. ``agent`` is the policy's agent type; given, it is checked here against the
    governor's policies (a :class:`~paymaster.PolicyError` lists the agent types
    they know). Without it, the agent type is the ``name`` given to ``create_agent``, at
    each call: ``create_agent(..., name="Refund Agent")`` needs ``agent="refund-agent"``
    here, or ``name="refund-agent"``. ``on_violation="tell_model"`` returns a refusal to
    the model as an error ``ToolMessage`` instead of ending the run. A spec that raises
    ends the run with :class:`~paymaster.SpecError` (logged, audited; when its
    ``actual`` raises, the tool's hold is kept ``unknown``). ``actual`` sees the tool's
    artifact, else its content, JSON-decoded when it is JSON text.
    """
    tools = list(tools)
    for tool in tools:
        if not isinstance(tool, BaseTool):
            raise TypeError(f"{tool!r} is not a LangChain BaseTool")
    check_specs([tool.name for tool in tools], specs)
    check_agent(governor, agent, [specs[tool.name] for tool in tools])
    governance = Governance(governor, agent, on_violation, run_id)
    return [_governed(tool, specs[tool.name], governance) for tool in tools]


def _governed(tool: BaseTool, spec: Spec, governance: Governance) -> GovernedTool:
    return GovernedTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        metadata=tool.metadata,
        tags=tool.tags,
        extras=getattr(tool, "extras", None),
        inner=tool,
        spec=spec,
        governance=governance,
    )


def _middleware_base() -> type:
    try:
        from langchain.agents.middleware import AgentMiddleware
    except ImportError:  # pragma: no cover - the `agents` extra is not installed
        return object
    return AgentMiddleware


class PaymasterMiddleware(_middleware_base()):  # type: ignore[misc]
    """Governs every tool call of a ``create_agent`` agent (``paymaster-langchain[agents]``).

    List it last in ``middleware=[...]``, so that it is the innermost: each attempt a
    retry middleware makes is then its own governed call, and a refusal (a
    ``GraphBubbleUp``) still passes every LangChain tool-error middleware outside it. A
    tool call whose tool has no spec is refused: nothing runs ungoverned. An error
    message that reaches it from the tool's own handling keeps the hold counted as
    ``unknown`` (it cannot tell a decline from a timeout), and so does a call cancelled
    mid-body (it runs inside LangGraph's task); wrap tools with :func:`govern_tools` to
    have paymaster see the raw exception and settle a call its caller stopped waiting for.

    ``agent`` as for :func:`govern_tools`: given, it is checked here; default, the
    ``name`` given to ``create_agent``, at each call.
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
        check_specs(None, specs)  # the tools are known at each call, not here
        check_agent(governor, agent, specs.values())
        self.specs = dict(specs)
        self.governance = Governance(governor, agent, on_violation, run_id)

    def _spec(self, request: Any) -> tuple[str, Spec, Mapping[str, Any], bool, str | None]:
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
            )
            raise self.governance.governor.record_refusal(
                violation,
                agent=agent,
                vendor="tool",
                endpoint=f"/tools/{name}",
                method="CALL",
                run=self.governance.run_id(config),
                tool_call_id=call_id,
            )
        args, valid = priced_arguments(request.tool, call.get("args") or {})
        return name, spec, args, valid, call_id

    def wrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        if request.tool is None:  # a tool the model made up: nothing can run
            return handler(request)
        config = ensure_config(request.runtime.config if request.runtime else None)
        try:
            name, spec, args, valid, call_id = self._spec(request)
            with self.governance.call(name, spec, args, valid, call_id, config) as tracked:
                try:
                    output = handler(request)
                except Exception as exc:
                    tracked.failed(exc)
                    raise
                tracked.ok(output)
                return output
        except PolicyViolation as violation:
            return self.governance.refusal(violation, request.tool_call.get("id"))
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept

    async def awrap_tool_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        if request.tool is None:
            return await handler(request)
        config = ensure_config(request.runtime.config if request.runtime else None)
        gov = self.governance.governor
        try:
            name, spec, args, valid, call_id = await gov.in_worker(self._spec, request)
            async with self.governance.acall(name, spec, args, valid, call_id, config) as tracked:
                try:
                    output = await handler(request)
                except Exception as exc:
                    await tracked.afailed(gov, exc)
                    raise
                await tracked.aok(gov, output)
                return output
        except PolicyViolation as violation:
            return self.governance.refusal(violation, request.tool_call.get("id"))
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept
