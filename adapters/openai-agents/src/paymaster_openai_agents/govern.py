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
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from paymaster.governor import is_outcome_unknown
from paymaster.toolspec import FreeTool, ToolSpec, check_specs
from paymaster.vendors.stripe.tools import model_message

from ._propagation import STOPS_THE_RUN, stop_the_run
from ._runs import run_id_of, run_policy_of

__all__ = ["OnViolation", "govern_tool", "govern_tools", "governed_function_tool"]

OnViolation = Literal["raise", "tell_model"]
Invoke = Callable[[ToolContext[Any], str], Awaitable[Any]]
Spec = ToolSpec | FreeTool


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
    here, so nothing is silently ungoverned. ``agent`` is the policy's agent type
    (default: the name of the Agent running the tool). ``on_violation="tell_model"``
    hands a refusal to the model as the tool's output instead of ending the run.
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
    """

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
    """A governed copy of one tool; see :func:`govern_tools`."""
    invoke = _watched(tool)

    async def on_invoke_tool(ctx: ToolContext[Any], args_json: str) -> Any:
        who = agent or _agent_name(ctx)
        attempt = _Attempt()
        token = _attempt.set(attempt)
        try:
            if isinstance(spec, FreeTool):
                return await _free(governor, spec, tool.name, who, ctx, args_json, invoke, attempt)
            return await _governed(governor, tool, spec, who, ctx, args_json, invoke, attempt)
        except PolicyViolation as violation:
            if on_violation == "tell_model" or violation.code is ViolationCode.INVALID_REQUEST:
                return model_message(violation) or str(violation)
            raise stop_the_run(violation) from None
        except STOPS_THE_RUN as exc:
            raise stop_the_run(exc) from None
        finally:
            _attempt.reset(token)

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


async def _governed(
    governor: Governor,
    tool: FunctionTool,
    spec: ToolSpec,
    agent: str,
    ctx: ToolContext[Any],
    args_json: str,
    invoke: Invoke,
    attempt: _Attempt,
) -> Any:
    run = run_id_of(ctx)
    try:
        call_spec = spec.for_call(json.loads(args_json or "{}"))
    except Exception as exc:  # the model's arguments do not fit the spec
        violation = PolicyViolation(
            ViolationCode.INVALID_REQUEST,
            f"cannot tell what {ctx.tool_name} would cost from its arguments ({exc})",
            agent=agent, run=run,
        )  # fmt: skip
        await governor.in_worker(
            governor.record_refusal, violation, agent=agent, vendor=spec.vendor,
            endpoint=f"/tools/{ctx.tool_name}", method=spec.method, run=run,
            tool_call_id=ctx.tool_call_id,
        )  # fmt: skip
        # Arguments the spec cannot read: the tool's own failure policy decides, as it
        # would for arguments the tool itself cannot take.
        if resolve_function_tool_failure_error_function(tool, ctx) is None:
            raise violation from exc
        message = await maybe_invoke_function_tool_failure_error_function(
            function_tool=tool, context=ctx, error=violation
        )
        return message if message is not None else str(violation)
    async with governor.aguard(
        agent=agent, run=run, run_policy=run_policy_of(ctx), tool_call_id=ctx.tool_call_id,
        **call_spec.as_guard_kwargs(),
    ) as call:  # fmt: skip
        result = await invoke(ctx, args_json)
        error = attempt.error
        if error is None:
            try:
                actual = spec.actual_cost(result)
            except Exception as exc:  # the tool ran: never release its hold
                await call.unknown(f"the tool returned, but its cost is unreadable: {exc}")
                return result
            await call.settle(actual)
        elif isinstance(error, STOPS_THE_RUN):  # raised by the tool itself: not the model's
            raise error
        elif is_outcome_unknown(error) or isinstance(error, UserError):
            # A UserError comes from checking the tool's output: its body ran and may
            # have paid. A timeout or a lost connection may have paid too.
            await call.unknown(f"the tool failed: {_describe(error)}")
        else:
            await call.fail(error=_describe(error))
        return result


async def _free(
    governor: Governor,
    spec: FreeTool,
    name: str,
    agent: str,
    ctx: ToolContext[Any],
    args_json: str,
    invoke: Invoke,
    attempt: _Attempt,
) -> Any:
    record = await governor.in_worker(
        governor.free_call, agent=agent, vendor=spec.vendor, endpoint=spec.endpoint(name),
        run=run_id_of(ctx), tool_call_id=ctx.tool_call_id,
    )  # fmt: skip
    started = time.monotonic()
    try:
        result = await invoke(ctx, args_json)
    except Exception as exc:
        await governor.in_worker(record, error=_describe(exc))
        raise
    except BaseException as exc:  # cancelled: write its row without waiting for it
        governor.submit(record, error=_describe(exc) or "cancelled", duration_ms=_ms(started))
        raise
    if isinstance(attempt.error, STOPS_THE_RUN):
        await governor.in_worker(record, error=_describe(attempt.error))
        raise attempt.error
    error = _describe(attempt.error) if attempt.error is not None else None
    await governor.in_worker(record, error=error, duration_ms=_ms(started))
    return result


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
        raise ValueError("the tool call has no agent: pass agent= to govern_tools()")
    return ctx.agent.name


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:500]


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _ignore_handled_error(
    tool: FunctionTool, error: Exception, input_json: str, ctx: ToolContext[Any]
) -> None:
    """The no-op trace hook of an invoker that wraps a hand-made tool."""
