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
:mod:`._propagation`), and so does a spec that raises (a bug:
:class:`~paymaster.SpecError`).

Called asynchronously, a governed tool's reservation, body and settle run as one piece of
work that cancelling the awaiting task (LangGraph cancelling a step, the caller giving
up) cannot cut in two: a sync tool's in the governor's worker threads, an async tool's as
a task of its own. The cancelled call ends at once; its body, once started, runs on and
settles from its result. Only a body that is itself cancelled (the event loop shutting
down under it) is kept ``unknown``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.tools import BaseTool, StructuredTool, Tool, ToolException
from langchain_core.tools.base import _format_output, _handle_tool_error, _handle_validation_error
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from paymaster import Governor, PolicyViolation, ViolationCode
from paymaster._errors import SpecError
from paymaster._governor import GovernedCall, aconclude, conclude
from paymaster._outcomes import (
    OUTCOME_UNKNOWN_EXCEPTIONS,
    Resolution,
    Verdict,
    decide,
    describe,
    is_outcome_unknown,
    model_message,
)
from paymaster._toolspec import FreeTool, ToolSpec, check_agent, check_specs

from ._propagation import STOPS_THE_RUN, stop_the_run

__all__ = [
    "GovernedTool",
    "OnViolation",
    "PaymasterMiddleware",
    "agent_name",
    "govern_tools",
    "run_id_of",
]

OnViolation = Literal["raise", "tell_model"]
Spec = ToolSpec | FreeTool
T = TypeVar("T")

log = logging.getLogger("paymaster")


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


def agent_name(config: RunnableConfig, known: Sequence[str] = ()) -> str:
    """The agent type of a tool call made without an explicit ``agent=``: the ``name``
    given to ``create_agent`` (LangChain's ``lc_agent_name``). ``known``: the agent types
    the policies name, listed when there is none."""
    agent = (config.get("metadata") or {}).get("lc_agent_name")
    if not agent:
        listed = f" (the policies know {', '.join(map(repr, known))})" if known else ""
        raise ValueError(
            "no agent type for this tool call: pass agent= when wrapping its tools, or "
            f"create the agent with create_agent(..., name=...){listed}"
        )
    return str(agent)


@dataclass(frozen=True)
class _Governance:
    """The rules shared by governed tools and the middleware."""

    governor: Governor
    agent: str | None
    on_violation: OnViolation
    run_id: Callable[[RunnableConfig], str | None]

    def who(self, config: RunnableConfig) -> str:
        return self.agent or agent_name(config, self.governor.policies.agents)

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
        self,
        name: str,
        spec: ToolSpec,
        args: Mapping[str, Any],
        valid: bool,
        call_id: str | None,
        config: RunnableConfig,
    ) -> dict[str, Any]:
        """The ``guard`` arguments of one call (in a worker from async code: the spec is
        user code). A refusal raised by the spec stays a refusal; the spec failing on
        arguments the tool's own schema refuses is the model's mistake (``invalid_request``);
        failing on arguments the tool accepts is a bug (:class:`SpecError`)."""
        agent, run = self.who(config), self.run_id(config)
        where: dict[str, Any] = {
            "agent": agent,
            "vendor": spec.vendor,
            "endpoint": f"/tools/{name}",
            "method": spec.method,
            "run": run,
            "tool_call_id": call_id,
        }
        try:
            call = spec.for_call(args)
        except PolicyViolation as violation:
            raise self.governor.record_refusal(violation, **where) from None
        except Exception as exc:
            if not valid:  # the tool would refuse these arguments itself
                invalid = PolicyViolation(
                    ViolationCode.INVALID_REQUEST,
                    f"cannot tell what {name} would cost from its arguments ({exc})",
                    agent=agent,
                    run=run,
                )
                raise self.governor.record_refusal(invalid, **where) from exc
            error = f"the spec of tool {name!r} raised {describe(exc)}"
            self.governor.record_error(error, **where)
            log.error("%s: nothing was reserved or run; the run stops", error, exc_info=exc)
            raise SpecError(f"{error}; nothing was reserved or run", tool=name) from exc
        return {"agent": agent, "run": run, "tool_call_id": call_id, **call.as_guard_kwargs()}

    @contextmanager
    def call(
        self,
        name: str,
        spec: Spec,
        args: Mapping[str, Any],
        valid: bool,
        call_id: str | None,
        config: RunnableConfig,
        abandoned: threading.Event | None = None,
    ) -> Iterator[_Tracked]:
        """Govern one tool call made inside the block; the block reports how it ended on
        the yielded :class:`_Tracked` (an exception escaping it is classified too).
        ``abandoned`` set once admitted: the caller stopped waiting, the tool is not run."""
        if isinstance(spec, FreeTool):
            record = self.governor.free_call(
                agent=self.who(config),
                vendor=spec.vendor,
                endpoint=spec.endpoint(name),
                run=self.run_id(config),
                tool_call_id=call_id,
            )
            tracked = _Tracked(name, spec, None, record)
            try:
                _check_not_abandoned(abandoned)
                yield tracked
            except BaseException as exc:
                if not tracked.done:  # cancelled or failed: its row is written regardless
                    self.governor.submit(tracked.failed, exc)
                raise
            return
        kwargs = self._guard_kwargs(name, spec, args, valid, call_id, config)
        with self.governor.guard(**kwargs) as call:
            _check_not_abandoned(abandoned)
            yield _Tracked(name, spec, call, None)

    @asynccontextmanager
    async def acall(
        self,
        name: str,
        spec: Spec,
        args: Mapping[str, Any],
        valid: bool,
        call_id: str | None,
        config: RunnableConfig,
        abandoned: threading.Event | None = None,
    ) -> AsyncIterator[_Tracked]:
        """:meth:`call` for asyncio (report through :meth:`_Tracked.aok` and friends)."""
        gov = self.governor
        if isinstance(spec, FreeTool):
            record = await gov.in_worker(
                gov.free_call,
                agent=self.who(config),
                vendor=spec.vendor,
                endpoint=spec.endpoint(name),
                run=self.run_id(config),
                tool_call_id=call_id,
            )
            tracked = _Tracked(name, spec, None, record)
            try:
                _check_not_abandoned(abandoned)
                yield tracked
            except BaseException as exc:
                if not tracked.done:
                    gov.submit(tracked.failed, exc)
                raise
            return
        kwargs = await gov.in_worker(self._guard_kwargs, name, spec, args, valid, call_id, config)
        async with gov.aguard(**kwargs) as call:
            _check_not_abandoned(abandoned)
            yield _Tracked(name, spec, call, None)


class _NotRun(Exception):
    """The caller stopped waiting for the call before its tool started: the tool is not
    run, and its hold is released (nothing was sent)."""


def _check_not_abandoned(abandoned: threading.Event | None) -> None:
    if abandoned is not None and abandoned.is_set():
        raise _NotRun("the caller stopped waiting for this call before its tool started")


class _ErrorResult(Exception):
    """An error result a tool call returned instead of raising, made by something other
    than the tool's own error handling (a middleware, a ToolNode): nobody knows whether
    the tool paid first."""


@functools.cache
def _also_unknown_on() -> tuple[type[BaseException], ...]:
    """After these the tool may have paid, besides the governor's ``unknown_on``: an error
    result, and ``interrupt()`` pausing the run (LangGraph runs the tool again on resume)."""
    try:
        from langgraph.errors import GraphBubbleUp
    except ImportError:  # pragma: no cover - langgraph is not installed
        return (_ErrorResult,)
    return (_ErrorResult, GraphBubbleUp)


def _unknown_on(call: GovernedCall | None = None) -> tuple[type[BaseException], ...]:
    base = OUTCOME_UNKNOWN_EXCEPTIONS if call is None else call.unknown_on
    return (*base, *_also_unknown_on())


class _Tracked:
    """How one governed tool call ended, recorded once: with the sync methods (from
    async code, the ``a``-methods)."""

    def __init__(
        self,
        name: str,
        spec: Spec,
        call: GovernedCall | None,
        record: Callable[..., None] | None,
    ) -> None:
        self.name, self.spec, self.call, self.record = name, spec, call, record
        self.started = time.monotonic()
        self.done = False

    def ok(self, output: Any, captured: _Captured | None = None) -> None:
        """The tool returned ``output`` (``captured``: its own return value)."""
        self.done = True
        if self.record is not None:
            self.record(error=_failure(output), duration_ms=_ms(self.started))
            return
        assert self.call is not None
        verdict = self._returned(self.call, output, captured)
        conclude(self.call, verdict)
        self._raise_if_broken(self.call, verdict)

    def failed(self, exc: BaseException) -> None:
        """The tool raised ``exc`` (before any handler turned it into a message)."""
        self.done = True
        if self.record is not None:
            self.record(error=describe(exc), duration_ms=_ms(self.started))
            return
        assert self.call is not None
        if not self.call.resolved:
            conclude(self.call, self._raised(self.call, exc))

    async def aok(self, governor: Governor, output: Any, captured: _Captured | None = None) -> None:
        """:meth:`ok` from async code."""
        if self.record is not None or self.call is None:
            await governor.in_worker(self.ok, output, captured)
            return
        self.done = True
        verdict = self._returned(self.call, output, captured)
        await aconclude(self.call, verdict)
        self._raise_if_broken(self.call, verdict)

    async def afailed(self, governor: Governor, exc: BaseException) -> None:
        """:meth:`failed` from async code."""
        if self.record is not None or self.call is None:
            await governor.in_worker(self.failed, exc)
            return
        self.done = True
        if not self.call.resolved:
            await aconclude(self.call, self._raised(self.call, exc))

    def _returned(self, call: GovernedCall, output: Any, captured: _Captured | None) -> Verdict:
        assert isinstance(self.spec, ToolSpec)
        failure = _failure(output)
        if failure is not None:
            resolution = decide(
                _ErrorResult(failure), shared=call.reservation.resumed, unknown_on=_unknown_on(call)
            )
            return Verdict(resolution, reason=f"the tool call ended in an error: {failure}")
        try:
            actual = self.spec.actual_cost(_value(output, captured), call.estimate)
        except Exception as exc:  # the tool ran: its hold stays counted
            reason = f"the tool returned, but its spec's actual failed: {describe(exc)}"
            return Verdict(Resolution.UNKNOWN, reason=reason, broken=exc)
        return Verdict(decide(None), actual=actual)

    def _raised(self, call: GovernedCall, exc: BaseException) -> Verdict:
        unknown_on = _unknown_on(call)
        resolution = decide(
            _root(exc, unknown_on), shared=call.reservation.resumed, unknown_on=unknown_on
        )
        if resolution is Resolution.UNKNOWN:
            return Verdict(resolution, reason=f"the tool stopped: {describe(exc)}")
        return Verdict(resolution, reason=describe(exc))

    def _raise_if_broken(self, call: GovernedCall, verdict: Verdict) -> None:
        if verdict.broken is None:
            return
        log.error(
            "the spec of tool %r could not read what its call cost; hold %s is kept counted "
            "as unknown for reconciliation and the run stops",
            self.name,
            call.hold_id,
            exc_info=verdict.broken,
        )
        raise SpecError(
            f"the spec of tool {self.name!r} could not read what its call cost "
            f"({describe(verdict.broken)}); hold {call.hold_id} is kept counted as unknown: "
            "reconcile it with the vendor",
            tool=self.name,
            hold_id=call.hold_id,
        ) from verdict.broken


# Tasks of async tool calls whose caller stopped waiting: kept referenced until they end
# (the event loop holds its tasks weakly).
_DETACHED: set[asyncio.Task[Any]] = set()


async def _detached(work: Coroutine[Any, Any, T], abandoned: threading.Event) -> T:
    """Run ``work`` as a task of its own, shielded from the cancellation of the awaiting
    task: cancelled, that task ends at once and ``work`` runs on to its recorded outcome
    (``abandoned`` tells it, so that a tool not started yet is not started)."""
    task = asyncio.ensure_future(work)
    _DETACHED.add(task)
    task.add_done_callback(_forget)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        abandoned.set()
        raise


def _forget(task: asyncio.Task[Any]) -> None:
    _DETACHED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: its outcome is in the ledger (and the log)


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
        """Reserve, invoke the tool, settle from its output (or refuse)."""
        return self._invoke(input, ensure_config(config), None, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """:meth:`invoke` for asyncio. Cancelled, it ends at once; a call whose tool had
        started runs on and settles from its output (see the module's docstring)."""
        config = ensure_config(config)
        abandoned = threading.Event()
        if _runs_in_a_thread(self.inner):
            # LangChain would run it in a thread of its own and forget it if cancelled: run
            # it in the governor's workers, reservation to settle, instead.
            gov = self.governance.governor
            try:
                return await gov.in_worker(self._invoke, input, config, abandoned, **kwargs)
            except asyncio.CancelledError:
                abandoned.set()
                raise
        return await _detached(self._ainvoke(input, config, abandoned, **kwargs), abandoned)

    def _invoke(
        self,
        input: Any,
        config: RunnableConfig,
        abandoned: threading.Event | None,
        **kwargs: Any,
    ) -> Any:
        _check_not_abandoned(abandoned)  # cancelled as it was picked up: never started
        args, call_id = _split(input)
        governance: _Governance = self.governance
        try:
            priced, valid = _priced_arguments(self.inner, args)
            with governance.call(
                self.name, self.spec, priced, valid, call_id, config, abandoned
            ) as tracked:
                captured = _Captured()
                token = _captured.set(captured)
                try:
                    output = self._raw.invoke(input, config, **kwargs)
                except Exception as exc:
                    tracked.failed(exc)
                    handled = _handled(self.inner, exc, call_id)
                    if handled is _UNHANDLED:
                        raise
                    return handled
                finally:
                    _captured.reset(token)
                tracked.ok(output, captured)
                return output
        except PolicyViolation as violation:
            return governance.refusal(violation, call_id)
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc)  # noqa: B904 - the same object, its cause kept

    async def _ainvoke(
        self,
        input: Any,
        config: RunnableConfig,
        abandoned: threading.Event,
        **kwargs: Any,
    ) -> Any:
        _check_not_abandoned(abandoned)  # cancelled before the task first ran: never started
        args, call_id = _split(input)
        governance: _Governance = self.governance
        gov = governance.governor
        try:
            priced, valid = await gov.in_worker(_priced_arguments, self.inner, args)
            async with governance.acall(
                self.name, self.spec, priced, valid, call_id, config, abandoned
            ) as tracked:
                captured = _Captured()
                token = _captured.set(captured)
                try:
                    output = await self._raw.ainvoke(input, config, **kwargs)
                except Exception as exc:
                    await tracked.afailed(gov, exc)
                    handled = _handled(self.inner, exc, call_id)
                    if handled is _UNHANDLED:
                        raise
                    return handled
                finally:
                    _captured.reset(token)
                await tracked.aok(gov, output, captured)
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
    governance = _Governance(governor, agent, on_violation, run_id)
    return [_governed(tool, specs[tool.name], governance) for tool in tools]


def _governed(tool: BaseTool, spec: Spec, governance: _Governance) -> GovernedTool:
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
        self.governance = _Governance(governor, agent, on_violation, run_id)

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
        args, valid = _priced_arguments(request.tool, call.get("args") or {})
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


def _value(output: Any, captured: _Captured | None = None) -> Any:
    """What a spec's ``actual`` sees (as the README says): the artifact of a
    content-and-artifact tool, else its content, JSON-decoded when it is JSON text. The
    content is the tool's own return value when it was caught (a dict stays a dict),
    else the ToolMessage's (or the output itself)."""
    if captured is not None and captured.set:
        return captured.value if captured.artifact else _decoded(captured.value)
    if not isinstance(output, ToolMessage):
        return _decoded(output)
    if output.artifact is not None:
        return output.artifact
    return _decoded(output.content)


def _decoded(content: Any) -> Any:
    if isinstance(content, (str, bytes, bytearray)):
        try:
            return json.loads(content)
        except ValueError:  # not JSON: prose, seen as it is
            return content
    return content


class _Captured:
    """The tool's own return value (its artifact, for a content-and-artifact tool),
    caught on its way out of ``_run`` / ``_arun``."""

    __slots__ = ("artifact", "set", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.set = False
        self.artifact = False


_captured: ContextVar[_Captured | None] = ContextVar("paymaster_tool_return", default=None)
_UNHANDLED = object()


def _raw_copy(tool: BaseTool) -> BaseTool:
    """A copy of ``tool`` that raises its errors (so paymaster sees them before the
    tool's own handling is applied) and reports its return value (for ``actual``)."""
    raw: BaseTool = tool.model_copy(
        update={"handle_tool_error": False, "handle_validation_error": False}
    )
    artifact = tool.response_format == "content_and_artifact"
    for name in ("_run", "_arun"):
        method = getattr(raw, name)
        object.__setattr__(raw, name, _capturing(method, artifact))
    return raw


def _capturing(method: Callable[..., Any], artifact: bool) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def acapture(*args: Any, **kwargs: Any) -> Any:
            return _keep(await method(*args, **kwargs), artifact)

        return acapture

    @functools.wraps(method)
    def capture(*args: Any, **kwargs: Any) -> Any:
        return _keep(method(*args, **kwargs), artifact)

    return capture


def _keep(value: Any, artifact: bool) -> Any:
    captured = _captured.get()
    if captured is not None:
        pair = artifact and isinstance(value, tuple) and len(value) == 2  # (content, artifact)
        captured.value = value[1] if pair else value
        captured.artifact = pair
        captured.set = True
    return value


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


def _priced_arguments(tool: BaseTool, args: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """The arguments as the tool will see them (validated, with defaults), for the spec,
    and whether the tool's own schema accepts them."""
    schema = tool.tool_call_schema
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return args, True
    fields = set(schema.model_fields)
    try:
        parsed = schema.model_validate({k: v for k, v in args.items() if k in fields})
    except ValidationError:
        return args, False  # the tool's own validation will refuse them, before it runs
    return {**args, **parsed.model_dump()}, True


def _runs_in_a_thread(tool: BaseTool) -> bool:
    """Whether ``tool`` is a sync tool: no coroutine, and the ``_arun`` LangChain gives
    every tool (which runs ``_run`` in a thread)."""
    if getattr(tool, "coroutine", None) is not None:
        return False
    return type(tool)._arun in (BaseTool._arun, StructuredTool._arun, Tool._arun)


def _root(
    exc: BaseException, unknown_on: tuple[type[BaseException], ...] | None = None
) -> BaseException:
    """A ToolException raised ``from`` a timeout is a timeout."""
    seen = exc
    known = _unknown_on() if unknown_on is None else unknown_on
    while seen.__cause__ is not None and not is_outcome_unknown(seen, known):
        seen = seen.__cause__
    return seen


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


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
