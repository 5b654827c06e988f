"""One call of a governed Agents SDK tool, from its admission to its recorded outcome.

A call's reservation, its tool's body and the recording of its outcome run as one piece
of work that the SDK cancelling the call cannot cut in two (it does, to the siblings of
a call that fails or is refused): a sync tool's in the governor's worker threads (as the
prebuilt Stripe tools), an async tool's as a task of its own. The cancelled call ends at
once; its body, once started, runs on and settles from its result. Only a body that is
itself cancelled (its event loop stopping: ``asyncio.run`` shutting down, or
``Runner.run_sync`` returning) is kept ``unknown``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import threading
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from agents import FunctionTool
from agents.exceptions import UserError
from agents.tool_context import ToolContext

from paymaster import FreeTool, Governor, PolicyViolation, ToolSpec, ViolationCode
from paymaster.integrations import (
    STOPS_THE_RUN,
    CallInProgress,
    Verdict,
    aconclude,
    broken_spec,
    check_not_abandoned,
    conclude,
    describe,
    elapsed_ms,
    run_detached,
    run_in_worker,
    spec_failed,
    verdict_of_failure,
    verdict_of_result,
)

from ._compat import cancel_when_the_loop_stops, keep_markers
from ._runs import run_id_of, run_policy_of

__all__ = ["BadArguments", "ToolCall", "noting"]

Invoke = Callable[[ToolContext[Any], str], Awaitable[Any]]
Spec = ToolSpec | FreeTool

#: After these the tool may have paid, besides the governor's own ``unknown_on``. A
#: ``UserError`` comes from the SDK checking the tool's output: its body ran.
_ALSO_UNKNOWN_ON: tuple[type[BaseException], ...] = (UserError,)
_NOT_STARTED = "the run stopped waiting for this call before its tool started"


class _Attempt:
    """What the tool's own invocation did, seen from inside the SDK's failure handling."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


_attempt: ContextVar[_Attempt | None] = ContextVar("paymaster_tool_attempt", default=None)


def noting(impl: Invoke) -> Invoke:
    """``impl`` (the tool's own invocation), its raw exceptions noted for the governor
    before the SDK's failure handling (if the tool has any) turns them into a message."""

    @functools.wraps(impl)
    async def noted(ctx: ToolContext[Any], args_json: str) -> Any:
        try:
            return await impl(ctx, args_json)
        except Exception as exc:
            attempt = _attempt.get()
            if attempt is not None:
                attempt.error = exc
            raise

    keep_markers(impl, noted)
    return noted


class BadArguments(Exception):
    """The model's arguments are not a JSON object: the call is refused as
    ``invalid_request`` (audited) and answered by the tool's own failure policy, as
    arguments the tool itself cannot take are."""

    def __init__(self, violation: PolicyViolation) -> None:
        super().__init__(str(violation))
        self.violation = violation


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


class ToolCall:
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
        return await run_in_worker(self.governor, self.abandoned, self._work)

    async def run_detached(self) -> Any:
        """The whole call as a task of its own, shielded from the awaiting task's
        cancellation: it settles itself when the tool's body completes."""
        return await run_detached(self._awork(), self.abandoned, cancel_when_the_loop_stops)

    # -- the work -----------------------------------------------------------------------------
    def _work(self) -> Any:
        check_not_abandoned(self.abandoned, _NOT_STARTED)  # cancelled as it was picked up
        if isinstance(self.spec, FreeTool):
            return self._free_work(self.spec)
        with self.governor.guard(**self._priced(self.spec)) as call:
            check_not_abandoned(self.abandoned, _NOT_STARTED)
            ran = asyncio.run(self._body())  # the SDK's invocation, on a loop of this thread
            verdict = self._verdict(self.spec, call, ran)
            conclude(call, verdict)
        return self._returned(call, verdict, ran)

    async def _awork(self) -> Any:
        gov = self.governor
        check_not_abandoned(self.abandoned, _NOT_STARTED)  # cancelled before the task ran
        if isinstance(self.spec, FreeTool):
            return await self._afree_work(self.spec)
        kwargs = await gov.in_worker(self._priced, self.spec)
        async with gov.aguard(**kwargs) as call:
            check_not_abandoned(self.abandoned, _NOT_STARTED)
            ran = await self._body()
            verdict = self._verdict(self.spec, call, ran)
            await aconclude(call, verdict)
        return self._returned(call, verdict, ran)

    def _free_work(self, spec: FreeTool) -> Any:
        record = self.governor.free_call(**self._free_kwargs(spec))
        started = time.monotonic()
        if self.abandoned.is_set():
            record(error="cancelled before the tool ran", duration_ms=0)
            check_not_abandoned(self.abandoned, _NOT_STARTED)
        try:
            ran = asyncio.run(self._body())
        except BaseException as exc:
            record(error=describe(exc), duration_ms=elapsed_ms(started))
            raise
        record(error=_text(ran.error), duration_ms=elapsed_ms(started))
        return ran.value()

    async def _afree_work(self, spec: FreeTool) -> Any:
        gov = self.governor
        record = await gov.in_worker(gov.free_call, **self._free_kwargs(spec))
        started = time.monotonic()
        if self.abandoned.is_set():
            await gov.in_worker(record, error="cancelled before the tool ran", duration_ms=0)
            check_not_abandoned(self.abandoned, _NOT_STARTED)
        try:
            ran = await self._body()
        except BaseException as exc:  # cancelled: write its row without waiting for it
            gov.submit(record, error=describe(exc), duration_ms=elapsed_ms(started))
            raise
        await gov.in_worker(record, error=_text(ran.error), duration_ms=elapsed_ms(started))
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

    # -- admission ----------------------------------------------------------------------------
    def _priced(self, spec: ToolSpec) -> dict[str, Any]:
        """The ``guard`` arguments of this call (in a worker: the spec is user code). A
        refusal by the spec itself stays a refusal; any other failure is a SpecError."""
        try:
            arguments = json.loads(self.args_json or "{}")
            if not isinstance(arguments, dict):
                raise ValueError(f"expected an object, got {type(arguments).__name__}")
        except ValueError as exc:  # the model's mistake, not the spec's
            violation = PolicyViolation(
                ViolationCode.INVALID_REQUEST,
                f"the arguments of {self.tool.name} are not a JSON object ({exc})",
                agent=self.agent,
                run=self.run_id,
            )
            self.governor.record_refusal(violation, **self._where(spec))
            raise BadArguments(violation) from exc
        try:
            call = spec.for_call(arguments)
        except PolicyViolation as violation:
            raise self.governor.record_refusal(violation, **self._where(spec)) from None
        except Exception as exc:
            where = self._where(spec)
            raise spec_failed(self.governor, self.tool.name, exc, **where) from exc
        return {
            "agent": self.agent,
            "run": self.run_id,
            "run_policy": self.run_policy,
            "tool_call_id": self.ctx.tool_call_id,
            **call.as_guard_kwargs(),
        }

    def _where(self, spec: ToolSpec) -> dict[str, Any]:
        """The audit fields of a refusal or a spec's failure before anything was reserved."""
        return {
            "agent": self.agent,
            "vendor": spec.vendor,
            "endpoint": f"/tools/{self.tool.name}",
            "method": spec.method,
            "run": self.run_id,
            "tool_call_id": self.ctx.tool_call_id,
        }

    def _free_kwargs(self, spec: FreeTool) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "vendor": spec.vendor,
            "endpoint": spec.endpoint(self.tool.name),
            "run": self.run_id,
            "tool_call_id": self.ctx.tool_call_id,
        }

    # -- outcome ------------------------------------------------------------------------------
    def _verdict(self, spec: ToolSpec, call: CallInProgress, ran: _Ran) -> Verdict:
        if ran.error is not None:
            unknown_on = (*call.unknown_on, *_ALSO_UNKNOWN_ON)
            return verdict_of_failure(call, ran.error, unknown_on=unknown_on)
        return verdict_of_result(spec, call, ran.result)

    def _returned(self, call: CallInProgress, verdict: Verdict, ran: _Ran) -> Any:
        if verdict.broken is not None:
            raise broken_spec(self.tool.name, call, verdict.broken) from verdict.broken
        return ran.value()


def _text(error: BaseException | None) -> str | None:
    return None if error is None else describe(error)
