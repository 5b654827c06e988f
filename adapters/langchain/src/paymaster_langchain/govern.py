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
:mod:`._propagation`).
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.tools import BaseTool, ToolException
from langchain_core.tools.base import _format_output, _handle_tool_error, _handle_validation_error
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from paymaster import Governor, PolicyViolation, ViolationCode
from paymaster.governor import GovernedCall, is_outcome_unknown
from paymaster.toolspec import FreeTool, ToolSpec, check_specs
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
    ) -> Iterator[_Outcome]:  # fmt: skip
        """Govern one tool call made inside the block; the block reports how it ended on
        the yielded :class:`_Outcome` (an exception escaping it is classified too)."""
        if isinstance(spec, FreeTool):
            record = self.governor.free_call(
                agent=self.who(config), vendor=spec.vendor, endpoint=spec.endpoint(name),
                run=self.run_id(config), tool_call_id=call_id,
            )  # fmt: skip
            outcome = _Outcome(None, spec, record)
        else:
            kwargs = self._guard_kwargs(name, spec, args, call_id, config)
            with self.governor.guard(**kwargs) as call:
                yield _Outcome(call, spec, None)
            return
        try:
            yield outcome
        except BaseException as exc:
            if not outcome.done:  # cancelled or failed: its row is written regardless
                self.governor.submit(outcome.failed, exc)
            raise

    @asynccontextmanager
    async def acall(
        self, name: str, spec: Spec, args: Mapping[str, Any], call_id: str | None,
        config: RunnableConfig,
    ) -> Any:  # fmt: skip
        """:meth:`call` for asyncio: the outcome's methods run in worker threads (through
        :meth:`_Outcome.settle_in` and friends)."""
        gov = self.governor
        if isinstance(spec, FreeTool):
            record = await gov.in_worker(
                gov.free_call, agent=self.who(config), vendor=spec.vendor,
                endpoint=spec.endpoint(name), run=self.run_id(config), tool_call_id=call_id,
            )  # fmt: skip
            outcome = _Outcome(None, spec, record)
            try:
                yield outcome
            except BaseException as exc:
                if not outcome.done:
                    gov.submit(outcome.failed, exc)
                raise
            return
        kwargs = await gov.in_worker(self._guard_kwargs, name, spec, args, call_id, config)
        async with gov.aguard(**kwargs) as call:
            yield _Outcome(call, spec, None)


class _Outcome:
    """How one governed tool call ended, recorded once (sync: call it in a worker thread
    from async code)."""

    def __init__(
        self, call: GovernedCall | None, spec: Spec, record: Callable[..., None] | None
    ) -> None:
        self.call, self.spec, self.record = call, spec, record
        self.started = time.monotonic()
        self.done = False

    def ok(self, output: Any, raw: Any = None, has_raw: bool = False) -> None:
        """The tool returned ``output`` (its return value ``raw`` when captured)."""
        self.done = True
        failure = _failure(output)
        if self.record is not None:
            self.record(error=failure, duration_ms=_ms(self.started))
            return
        assert self.call is not None
        assert isinstance(self.spec, ToolSpec)
        if failure is not None:
            # An error message made by something other than the tool's own handler (a
            # middleware, a ToolNode): nobody knows whether the tool paid first.
            GovernedCall.unknown(self.call, f"the tool call ended in an error: {failure}")
            return
        try:
            actual = self.spec.actual_cost(raw if has_raw else _value(output))
        except Exception as exc:  # the tool ran: never release its hold
            GovernedCall.unknown(self.call, f"the tool returned, but its cost is unreadable: {exc}")
            return
        GovernedCall.settle(self.call, actual)

    def failed(self, exc: BaseException) -> None:
        """The tool raised ``exc`` (before any handler turned it into a message)."""
        self.done = True
        if self.record is not None:
            self.record(error=_describe(exc), duration_ms=_ms(self.started))
            return
        assert self.call is not None
        if self.call.resolved:
            return
        if is_outcome_unknown(_root(exc)) or _is_interrupt(exc):
            # A timeout, a lost connection, or interrupt() pausing the run (LangGraph runs
            # the tool again on resume): it may have paid; keep the hold counted.
            GovernedCall.unknown(self.call, f"the tool stopped: {_describe(exc)}")
        else:
            GovernedCall.fail(self.call, error=_describe(exc))


class GovernedTool(BaseTool):
    """A governed stand-in for a LangChain tool: the same name, description, schemas
    (injected arguments included), ``return_direct`` and ``response_format``. Each call
    is reserved, then a copy of the original tool runs with the very same input and
    config; the original's own error handling is applied after paymaster has seen the
    raw exception, so a timeout it turns into a message still keeps the hold counted."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool
    spec: Any
    governance: Any
    _raw: BaseTool = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        self._raw = _raw_copy(self.inner)

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

    # -- calls ---------------------------------------------------------------------------
    def run(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        """``BaseTool.run``, governed (routed through :meth:`invoke`)."""
        return self.invoke(*_as_invoke(tool_input, kwargs))

    async def arun(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        """``BaseTool.arun``, governed (routed through :meth:`ainvoke`)."""
        return await self.ainvoke(*_as_invoke(tool_input, kwargs))

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        args, call_id = _split(input)
        governance: _Governance = self.governance
        try:
            priced = _priced_arguments(self.inner, args, governance, self.spec, call_id, config)
            with governance.call(self.name, self.spec, priced, call_id, config) as outcome:
                captured = _Captured()
                token = _captured.set(captured)
                try:
                    output = self._raw.invoke(input, config, **kwargs)
                except Exception as exc:
                    outcome.failed(exc)
                    handled = _handled(self.inner, exc, call_id)
                    if handled is _UNHANDLED:
                        raise
                    return handled
                finally:
                    _captured.reset(token)
                outcome.ok(output, captured.value, captured.set)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        config = ensure_config(config)
        args, call_id = _split(input)
        governance: _Governance = self.governance
        gov = governance.governor
        try:
            priced = await gov.in_worker(
                _priced_arguments, self.inner, args, governance, self.spec, call_id, config
            )
            async with governance.acall(self.name, self.spec, priced, call_id, config) as outcome:
                captured = _Captured()
                token = _captured.set(captured)
                try:
                    output = await self._raw.ainvoke(input, config, **kwargs)
                except Exception as exc:
                    await gov.in_worker(outcome.failed, exc)
                    handled = _handled(self.inner, exc, call_id)
                    if handled is _UNHANDLED:
                        raise
                    return handled
                finally:
                    _captured.reset(token)
                await gov.in_worker(outcome.ok, output, captured.value, captured.set)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept


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
    check_specs([tool.name for tool in tools], specs)
    governance = _Governance(governor, agent, on_violation, run_id)
    return [_governed(tool, specs[tool.name], governance) for tool in tools]


def _governed(tool: BaseTool, spec: Spec, governance: _Governance) -> GovernedTool:
    return GovernedTool(
        name=tool.name, description=tool.description, args_schema=tool.args_schema,
        return_direct=tool.return_direct, response_format=tool.response_format,
        metadata=tool.metadata, tags=tool.tags, extras=getattr(tool, "extras", None),
        inner=tool, spec=spec, governance=governance,
    )  # fmt: skip


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
    ``unknown`` (it cannot tell a decline from a timeout); wrap tools with
    :func:`govern_tools` to have paymaster see the raw exception.
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
        if request.tool is None:  # a tool the model made up: nothing can run
            return handler(request)
        config = ensure_config(request.runtime.config if request.runtime else None)
        try:
            name, spec, args, call_id = self._spec(request)
            with self.governance.call(name, spec, args, call_id, config) as outcome:
                try:
                    output = handler(request)
                except Exception as exc:
                    outcome.failed(exc)
                    raise
                outcome.ok(output)
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
            name, spec, args, call_id = await gov.in_worker(self._spec, request)
            async with self.governance.acall(name, spec, args, call_id, config) as outcome:
                try:
                    output = await handler(request)
                except Exception as exc:
                    await gov.in_worker(outcome.failed, exc)
                    raise
                await gov.in_worker(outcome.ok, output)
                return output
        except PolicyViolation as violation:
            return self.governance.refusal(violation, request.tool_call.get("id"))
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept


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


class _Captured:
    """The tool's own return value, caught on its way out of ``_run`` / ``_arun``."""

    __slots__ = ("set", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.set = False


_captured: ContextVar[_Captured | None] = ContextVar("paymaster_tool_return", default=None)
_UNHANDLED = object()


def _raw_copy(tool: BaseTool) -> BaseTool:
    """A copy of ``tool`` that raises its errors (so paymaster sees them before the
    tool's own handling is applied) and reports its return value (for ``actual``)."""
    raw: BaseTool = tool.model_copy(
        update={"handle_tool_error": False, "handle_validation_error": False}
    )
    for name in ("_run", "_arun"):
        method = getattr(raw, name)
        object.__setattr__(raw, name, _capturing(method))
    return raw


def _capturing(method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def acapture(*args: Any, **kwargs: Any) -> Any:
            return _keep(await method(*args, **kwargs))

        return acapture

    @functools.wraps(method)
    def capture(*args: Any, **kwargs: Any) -> Any:
        return _keep(method(*args, **kwargs))

    return capture


def _keep(value: Any) -> Any:
    captured = _captured.get()
    if captured is not None:
        captured.value = value[1] if _is_content_and_artifact(value) else value
        captured.set = True
    return value


def _is_content_and_artifact(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2  # (content, artifact)


def _handled(tool: BaseTool, exc: Exception, call_id: str | None) -> Any:
    """What ``tool``'s own error handling makes of ``exc`` (as ``BaseTool.run`` does), or
    ``_UNHANDLED`` when it lets the exception through."""
    content: Any
    if isinstance(exc, ValidationError) and tool.handle_validation_error:
        content = _handle_validation_error(exc, flag=tool.handle_validation_error)
    elif isinstance(exc, ToolException) and tool.handle_tool_error:
        content = _handle_tool_error(exc, flag=tool.handle_tool_error)
    else:
        return _UNHANDLED
    return _format_output(content, None, call_id, tool.name, "error")


def _priced_arguments(
    tool: BaseTool, args: Mapping[str, Any], governance: _Governance, spec: Spec,
    call_id: str | None, config: RunnableConfig,
) -> Mapping[str, Any]:  # fmt: skip
    """The arguments as the tool will see them (validated, with defaults), for the spec."""
    schema = tool.tool_call_schema
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return args
    fields = set(schema.model_fields)
    try:
        parsed = schema.model_validate({k: v for k, v in args.items() if k in fields})
    except ValidationError:
        return args  # the tool's own validation will refuse them, before it runs
    return {**args, **parsed.model_dump()}


def _root(exc: BaseException) -> BaseException:
    """A ToolException raised ``from`` a timeout is a timeout."""
    seen = exc
    while seen.__cause__ is not None and not is_outcome_unknown(seen):
        seen = seen.__cause__
    return seen


def _is_interrupt(exc: BaseException) -> bool:
    try:
        from langgraph.errors import GraphBubbleUp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, GraphBubbleUp)


def _as_invoke(tool_input: Any, kwargs: Mapping[str, Any]) -> tuple[Any, RunnableConfig]:
    """``BaseTool.run`` arguments as ``invoke`` arguments."""
    config: RunnableConfig = dict(kwargs.get("config") or {})  # type: ignore[assignment]
    for key in ("callbacks", "tags", "metadata", "run_name", "run_id"):
        if kwargs.get(key) is not None:
            config[key] = kwargs[key]
    call_id = kwargs.get("tool_call_id")
    if call_id is not None and isinstance(tool_input, Mapping):
        return {"type": "tool_call", "id": call_id, "name": "", "args": tool_input}, config
    return tool_input, config


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:500]


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
