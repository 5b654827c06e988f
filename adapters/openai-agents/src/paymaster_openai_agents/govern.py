"""Govern existing Agents SDK function tools.

::

    tools = govern_tools([issue_refund, lookup_charge], governor,
                         specs={"issue_refund": refund_spec, "lookup_charge": FREE})
    agent = Agent(name="refund-agent", tools=tools, ...)
    await Runner.run(agent, "...", context={"run_id": "run-42"})  # PolicyViolation lands here

Each call of a governed tool is reserved before the tool runs and settled from its result;
a refusal ends the run (see :mod:`._propagation`). The tool's name, description, JSON
schema, strictness, ``is_enabled`` and its own failure handling are kept: the governance
wraps the tool's raw invocation *inside* the SDK's failure handling (so the user's errors
reach the model exactly as before, and paymaster sees the raw exception to decide whether
money may have moved), and the reservation *outside* it (so a refusal is never turned
into a message for the model).

A call's reservation, its tool's body and the recording of its outcome run as one piece
of work that the SDK cancelling the call cannot cut in two (it does, to the siblings of
a call that fails or is refused): a sync tool's in the governor's worker threads (as the
prebuilt Stripe tools), an async tool's as a task of its own. The cancelled call ends at
once; its body, once started, runs on and settles from its result. Only a body that is
itself cancelled (its event loop stopping: ``asyncio.run`` shutting down, or
``Runner.run_sync`` returning) is kept ``unknown``. A spec that raises is a bug: it ends
the run as :class:`~paymaster.SpecError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Literal

from agents import FunctionTool, function_tool
from agents.exceptions import UserError
from agents.tool import (
    _FailureHandlingFunctionToolInvoker,
    maybe_invoke_function_tool_failure_error_function,
    resolve_function_tool_failure_error_function,
)
from agents.tool_context import ToolContext

from paymaster import Governor, PolicyViolation, ViolationCode
from paymaster._errors import SpecError
from paymaster._governor import GovernedCall, aconclude, conclude
from paymaster._outcomes import (
    Resolution,
    Verdict,
    decide,
    describe,
    model_message,
)
from paymaster._toolspec import FreeTool, ToolSpec, check_agent, check_specs

from ._propagation import STOPS_THE_RUN, stop_the_run
from ._runs import run_id_of, run_policy_of

__all__ = ["OnViolation", "govern_tool", "govern_tools", "governed_function_tool"]

OnViolation = Literal["raise", "tell_model"]
Invoke = Callable[[ToolContext[Any], str], Awaitable[Any]]
Spec = ToolSpec | FreeTool

log = logging.getLogger("paymaster")


class _Attempt:
    """What the tool's own invocation did, seen from inside the SDK's failure handling."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


_attempt: ContextVar[_Attempt | None] = ContextVar("paymaster_tool_attempt", default=None)


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
    in_worker = bool(getattr(tool.on_invoke_tool, "__agents_sync_function_tool__", False))

    async def on_invoke_tool(ctx: ToolContext[Any], args_json: str) -> Any:
        call = _ToolCall(governor, tool, spec, agent or _agent_name(ctx), ctx, args_json, invoke)
        try:
            if in_worker:
                return await call.run_in_worker()
            return await call.run_detached()
        except _BadArguments as bad:
            return await _told(tool, ctx, bad.violation)
        except PolicyViolation as violation:
            if on_violation == "tell_model" or violation.code is ViolationCode.INVALID_REQUEST:
                return model_message(violation) or str(violation)
            raise stop_the_run(violation) from None
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None

    return dataclasses.replace(tool, on_invoke_tool=_GovernedInvoker(on_invoke_tool, invoke))


class _GovernedInvoker(_FailureHandlingFunctionToolInvoker):
    """The governed tool's invoker. It is an SDK failure-handling invoker so that the SDK
    treats it as one: a callable ``needs_approval`` still compares the arguments as
    prepared by the tool (``prepare_arguments``), and the sync mark still stops
    ``timeout_seconds`` on sync tools. Its calls run the governance, which runs the tool's
    own (failure-handling) invoker inside."""

    def __init__(self, governed: Invoke, watched: Any) -> None:
        # Not the parent's __init__: this invoker's call is the governed one.
        self._governed = governed
        self._watched = watched
        self._invoke_tool_impl = getattr(watched, "_invoke_tool_impl", watched)
        self._on_handled_error = getattr(watched, "_on_handled_error", _ignore_handled_error)
        self._function_tool = getattr(watched, "_function_tool", None)
        if getattr(watched, "__agents_sync_function_tool__", False):
            self.__agents_sync_function_tool__ = True

    def __agents_bind_function_tool__(self, function_tool: FunctionTool) -> _GovernedInvoker:
        return self

    def prepare_arguments(self, input: str, tool_name: str) -> Any:
        prepare = getattr(self._watched, "prepare_arguments", None)
        return prepare(input, tool_name) if prepare is not None else None

    async def __call__(self, ctx: ToolContext[Any], input: str) -> Any:
        return await self._governed(ctx, input)


#: After these the tool may have paid, besides the governor's own ``unknown_on``. A
#: ``UserError`` comes from the SDK checking the tool's output: its body ran.
_ALSO_UNKNOWN_ON: tuple[type[BaseException], ...] = (UserError,)

# Tasks of async tool calls whose caller stopped waiting: kept referenced until they end
# (the event loop holds its tasks weakly).
_DETACHED: set[asyncio.Task[Any]] = set()


class _BadArguments(Exception):
    """The model's arguments are not a JSON object: the call is refused as
    ``invalid_request`` (audited) and answered by the tool's own failure policy, as
    arguments the tool itself cannot take are."""

    def __init__(self, violation: PolicyViolation) -> None:
        super().__init__(str(violation))
        self.violation = violation


class _NotRun(Exception):
    """The SDK stopped waiting for the call before its tool started: the tool is not
    run, and its hold is released (nothing was sent)."""


@dataclasses.dataclass(frozen=True)
class _Ran:
    """How the tool's own invocation ended: its result, and the raw exception it raised,
    which either reached us (``raised``) or was made into a message for the model by the
    tool's failure handling."""

    result: Any
    error: Exception | None = None
    raised: bool = False

    def value(self) -> Any:
        """What the call returns to the SDK (or raises)."""
        if self.error is not None and (self.raised or isinstance(self.error, STOPS_THE_RUN)):
            # A refusal of the tool's own governed call is not the model's to see.
            raise self.error
        return self.result


class _ToolCall:
    """One call of a governed tool, from its admission to its recorded outcome, run as one
    piece of work: :meth:`run_in_worker` (sync tools) or :meth:`run_detached` (async)."""

    def __init__(
        self,
        governor: Governor,
        tool: FunctionTool,
        spec: Spec,
        agent: str,
        ctx: ToolContext[Any],
        args_json: str,
        invoke: Invoke,
    ) -> None:
        self.governor, self.tool, self.spec, self.agent = governor, tool, spec, agent
        self.ctx, self.args_json, self.invoke = ctx, args_json, invoke
        self.run_id = run_id_of(ctx)
        self.run_policy = run_policy_of(ctx)
        # Set (from the event loop) when the SDK stops waiting for the call; read by the
        # work before the tool starts.
        self.abandoned = threading.Event()

    # -- where the work runs ----------------------------------------------------------------
    async def run_in_worker(self) -> Any:
        """The whole call in a governor worker thread: cancelling the awaiting task ends it
        at once, while a call whose work has started runs to its recorded outcome."""
        try:
            return await self.governor.in_worker(self._work)
        except asyncio.CancelledError:
            self.abandoned.set()
            raise

    async def run_detached(self) -> Any:
        """The whole call as a task of its own, shielded from the awaiting task's
        cancellation: it settles itself when the tool's body completes."""
        task = asyncio.ensure_future(self._awork())
        _DETACHED.add(task)
        task.add_done_callback(_forget)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.abandoned.set()
            _cancel_when_the_loop_stops(task)
            raise

    # -- the work -----------------------------------------------------------------------------
    def _work(self) -> Any:
        self._check_not_abandoned()  # cancelled as it was picked up: never started
        if isinstance(self.spec, FreeTool):
            return self._free_work(self.spec)
        with self.governor.guard(**self._priced(self.spec)) as call:
            self._check_not_abandoned()
            ran = asyncio.run(self._body())  # the SDK's invocation, on a loop of this thread
            verdict = self._verdict(self.spec, call, ran)
            conclude(call, verdict)
        return self._returned(call, verdict, ran)

    async def _awork(self) -> Any:
        gov = self.governor
        self._check_not_abandoned()  # cancelled before the task first ran: never started
        if isinstance(self.spec, FreeTool):
            return await self._afree_work(self.spec)
        kwargs = await gov.in_worker(self._priced, self.spec)
        async with gov.aguard(**kwargs) as call:
            self._check_not_abandoned()
            ran = await self._body()
            verdict = self._verdict(self.spec, call, ran)
            await aconclude(call, verdict)
        return self._returned(call, verdict, ran)

    def _free_work(self, spec: FreeTool) -> Any:
        record = self.governor.free_call(**self._free_kwargs(spec))
        started = time.monotonic()
        if self.abandoned.is_set():
            record(error="cancelled before the tool ran", duration_ms=0)
            raise _NotRun
        try:
            ran = asyncio.run(self._body())
        except BaseException as exc:
            record(error=describe(exc), duration_ms=_ms(started))
            raise
        record(error=_text(ran.error), duration_ms=_ms(started))
        return ran.value()

    async def _afree_work(self, spec: FreeTool) -> Any:
        gov = self.governor
        record = await gov.in_worker(gov.free_call, **self._free_kwargs(spec))
        started = time.monotonic()
        if self.abandoned.is_set():
            await gov.in_worker(record, error="cancelled before the tool ran", duration_ms=0)
            raise _NotRun
        try:
            ran = await self._body()
        except BaseException as exc:  # cancelled: write its row without waiting for it
            gov.submit(record, error=describe(exc), duration_ms=_ms(started))
            raise
        await gov.in_worker(record, error=_text(ran.error), duration_ms=_ms(started))
        return ran.value()

    async def _body(self) -> _Ran:
        """The tool's own (failure-handling) invocation, its raw exception noted."""
        attempt = _Attempt()
        token = _attempt.set(attempt)
        try:
            result = await self.invoke(self.ctx, self.args_json)
        except Exception as exc:
            return _Ran(None, exc, raised=True)
        finally:
            _attempt.reset(token)
        return _Ran(result, attempt.error)

    def _check_not_abandoned(self) -> None:
        # The SDK stopped waiting for this call before its tool started: do not start it
        # now (a hold reserved meanwhile is released by the guard: nothing was sent).
        if self.abandoned.is_set():
            raise _NotRun("the run stopped waiting for this call before its tool started")

    # -- admission ----------------------------------------------------------------------------
    def _priced(self, spec: ToolSpec) -> dict[str, Any]:
        """The ``guard`` arguments of this call (in a worker: the spec is user code). A
        refusal by the spec itself stays a refusal; any other failure is a SpecError."""
        name = self.tool.name
        try:
            arguments = json.loads(self.args_json or "{}")
            if not isinstance(arguments, dict):
                raise ValueError(f"expected an object, got {type(arguments).__name__}")
        except ValueError as exc:  # the model's mistake, not the spec's
            violation = PolicyViolation(
                ViolationCode.INVALID_REQUEST,
                f"the arguments of {name} are not a JSON object ({exc})",
                agent=self.agent,
                run=self.run_id,
            )
            self._refused(spec, violation)
            raise _BadArguments(violation) from exc
        try:
            call = spec.for_call(arguments)
        except PolicyViolation as violation:
            raise self._refused(spec, violation) from None
        except Exception as exc:
            raise self._spec_failed(spec, exc) from exc
        return {
            "agent": self.agent,
            "run": self.run_id,
            "run_policy": self.run_policy,
            "tool_call_id": self.ctx.tool_call_id,
            **call.as_guard_kwargs(),
        }

    def _refused(self, spec: ToolSpec, violation: PolicyViolation) -> PolicyViolation:
        return self.governor.record_refusal(
            violation,
            agent=self.agent,
            vendor=spec.vendor,
            endpoint=f"/tools/{self.tool.name}",
            method=spec.method,
            run=self.run_id,
            tool_call_id=self.ctx.tool_call_id,
        )

    def _spec_failed(self, spec: ToolSpec, exc: Exception) -> SpecError:
        name = self.tool.name
        error = f"the spec of tool {name!r} raised {describe(exc)}"
        self.governor.record_error(
            error,
            agent=self.agent,
            vendor=spec.vendor,
            endpoint=f"/tools/{name}",
            method=spec.method,
            run=self.run_id,
            tool_call_id=self.ctx.tool_call_id,
        )
        log.error("%s: nothing was reserved or run; the run stops", error, exc_info=exc)
        return SpecError(f"{error}; nothing was reserved or run", tool=name)

    def _free_kwargs(self, spec: FreeTool) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "vendor": spec.vendor,
            "endpoint": spec.endpoint(self.tool.name),
            "run": self.run_id,
            "tool_call_id": self.ctx.tool_call_id,
        }

    # -- outcome ------------------------------------------------------------------------------
    def _verdict(self, spec: ToolSpec, call: GovernedCall, ran: _Ran) -> Verdict:
        if ran.error is not None:
            resolution = decide(
                ran.error,
                shared=call.reservation.resumed,
                unknown_on=(*call.unknown_on, *_ALSO_UNKNOWN_ON),
            )
            if resolution is Resolution.UNKNOWN:
                return Verdict(resolution, reason=f"the tool failed: {describe(ran.error)}")
            return Verdict(resolution, reason=describe(ran.error))
        try:
            actual = spec.actual_cost(ran.result, call.estimate)
        except Exception as exc:  # the tool ran: its hold stays counted
            reason = f"the tool returned, but its spec's actual failed: {describe(exc)}"
            return Verdict(Resolution.UNKNOWN, reason=reason, broken=exc)
        return Verdict(decide(None), actual=actual)

    def _returned(self, call: GovernedCall, verdict: Verdict, ran: _Ran) -> Any:
        if verdict.broken is not None:
            name = self.tool.name
            log.error(
                "the spec of tool %r could not read what its call cost; hold %s is kept "
                "counted as unknown for reconciliation and the run stops",
                name,
                call.hold_id,
                exc_info=verdict.broken,
            )
            raise SpecError(
                f"the spec of tool {name!r} could not read what its call cost "
                f"({describe(verdict.broken)}); hold {call.hold_id} is kept counted as "
                "unknown: reconcile it with the vendor",
                tool=name,
                hold_id=call.hold_id,
            ) from verdict.broken
        return ran.value()


def _cancel_when_the_loop_stops(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if it is still running when the task its event loop runs until
    complete ends, as ``asyncio.run``'s shutdown would. ``Runner.run_sync`` leaves its loop
    open but idle after the run: a body still in flight then would stay suspended, its
    hold pending, until the loop next runs. Cancelled, it is kept ``unknown`` (the
    cancellation is delivered when ``run_sync`` flushes the loop's async generators; the
    record is made in a governor worker). On a loop that keeps running (a server's),
    the body runs on and settles."""
    loop = task.get_loop()
    for root in asyncio.all_tasks(loop):
        # The loop's run_until_complete callback, which stops the loop once its task ends
        # (asyncio has no public accessor for it).
        callbacks = getattr(root, "_callbacks", None) or ()
        if root is not task and any(_stops_the_loop(callback) for callback in callbacks):
            root.add_done_callback(lambda _: task.cancel())
            return


def _stops_the_loop(callback: Any) -> bool:
    function = callback[0] if isinstance(callback, tuple) else callback
    return getattr(function, "__name__", None) == "_run_until_complete_cb"


def _forget(task: asyncio.Task[Any]) -> None:
    _DETACHED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: its outcome is in the ledger (and the log)


async def _told(tool: FunctionTool, ctx: ToolContext[Any], violation: PolicyViolation) -> Any:
    """What the model is told about arguments that are not JSON: the tool's own failure
    message, as for arguments the tool itself cannot take."""
    if resolve_function_tool_failure_error_function(tool, ctx) is None:
        return model_message(violation) or str(violation)
    message = await maybe_invoke_function_tool_failure_error_function(
        function_tool=tool, context=ctx, error=violation
    )
    return message if message is not None else str(violation)


def _watched(tool: FunctionTool) -> Invoke:
    """The tool's invocation, with its raw exceptions noted for the governor before the
    SDK's failure handling (if the tool has any) turns them into a message."""
    invoker: Any = tool.on_invoke_tool
    impl = getattr(invoker, "_invoke_tool_impl", None)
    if impl is None:  # a hand-made FunctionTool: its exceptions reach the runner anyway
        return _noting(invoker)
    # An SDK failure-handling invoker: rebuild it around the noted raw implementation,
    # bound to the same tool, so its failure policy is resolved exactly as before.
    watched = type(invoker)(
        _noting(impl),
        invoker._on_handled_error,
        function_tool=tool,
    )
    if getattr(invoker, "__agents_sync_function_tool__", False):
        watched.__agents_sync_function_tool__ = True
    return watched  # type: ignore[no-any-return]


def _noting(impl: Invoke) -> Invoke:
    @functools.wraps(impl)
    async def noted(ctx: ToolContext[Any], args_json: str) -> Any:
        try:
            return await impl(ctx, args_json)
        except Exception as exc:
            attempt = _attempt.get()
            if attempt is not None:
                attempt.error = exc
            raise

    for marker in ("__agents_prepare_arguments__", "__agents_function_tool_wrapped_callable__"):
        if hasattr(impl, marker):
            setattr(noted, marker, getattr(impl, marker))
    return noted


def _agent_name(ctx: ToolContext[Any]) -> str:
    if ctx.agent is None:
        raise ValueError("the tool call has no agent: pass agent= when wrapping its tools")
    return ctx.agent.name


def _text(error: BaseException | None) -> str | None:
    return None if error is None else describe(error)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _ignore_handled_error(
    tool: FunctionTool, error: Exception, input_json: str, ctx: ToolContext[Any]
) -> None:
    """The no-op trace hook of an invoker that wraps a hand-made tool."""
