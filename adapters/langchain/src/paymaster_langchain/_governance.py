"""One governed LangChain tool call: admission, the reservation around the tool, and the
recorded outcome, shared by governed tools and the middleware.

:class:`Governance` holds the rules (agent type, run id, what a refusal does); its
:meth:`~Governance.call` / :meth:`~Governance.acall` blocks reserve before the tool runs,
and the yielded :class:`Tracked` records how the call ended, once.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ValidationError

from paymaster import FreeTool, Governor, PolicyViolation, ToolSpec, ViolationCode
from paymaster.integrations import (
    OUTCOME_UNKNOWN_EXCEPTIONS,
    STOPS_THE_RUN,
    OnViolation,
    RunStopper,
    Verdict,
    aconclude,
    broken_spec,
    check_not_abandoned,
    conclude,
    decide,
    describe,
    elapsed_ms,
    is_outcome_unknown,
    refusal_text,
    spec_failed,
    verdict_of_failure,
    verdict_of_result,
)

__all__ = [
    "STOPS_THE_RUN",
    "Captured",
    "Governance",
    "Tracked",
    "agent_name",
    "priced_arguments",
    "stop_the_run",
]

Spec = ToolSpec | FreeTool
_NOT_STARTED = "the caller stopped waiting for this call before its tool started"


def _graph_bubble_up() -> type[BaseException] | None:
    try:
        from langgraph.errors import GraphBubbleUp
    except ImportError:  # without LangGraph there is no tool-error handler to pass
        return None
    return GraphBubbleUp


stop_the_run = RunStopper(
    _graph_bubble_up,
    doc="""``exc`` re-classed so that no tool-error handler turns it into a message for the
    model (without LangGraph installed there is no such handler: ``exc`` is returned
    unchanged).

    LangGraph's ``ToolNode`` can turn tool exceptions into ``ToolMessage``s for the model
    (``handle_tool_errors``), and middleware such as ``ToolRetryMiddleware`` retries or
    reports them; none of them ever catch ``GraphBubbleUp`` (``langgraph/prebuilt/
    tool_node.py``), which Pregel re-raises to the caller. So a
    :class:`~paymaster.PolicyViolation` (or any exception of :data:`STOPS_THE_RUN`)
    leaves a governed tool as an instance of a subclass of both its own class and
    ``GraphBubbleUp``: ``except PolicyViolation`` still catches it, with the same message
    and fields, whatever error handling the user configured.""",
)


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
class Governance:
    """The rules shared by governed tools and the middleware."""

    governor: Governor
    agent: str | None
    on_violation: OnViolation
    run_id: Callable[[RunnableConfig], str | None]

    def who(self, config: RunnableConfig) -> str:
        return self.agent or agent_name(config, self.governor.policies.agents)

    def refusal(self, violation: PolicyViolation, call_id: str | None) -> Any:
        """A refusal for the model (``tell_model`` or bad arguments), or raised."""
        text = refusal_text(violation, self.on_violation)
        if text is None:
            raise stop_the_run(violation) from None
        if call_id is None:
            return text
        return ToolMessage(content=text, tool_call_id=call_id, status="error")

    def guard_kwargs(
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
        failing on arguments the tool accepts is a bug (:class:`~paymaster.SpecError`)."""
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
            if valid:
                raise spec_failed(self.governor, name, exc, **where) from exc
            invalid = PolicyViolation(  # the tool would refuse these arguments itself
                ViolationCode.INVALID_REQUEST,
                f"cannot tell what {name} would cost from its arguments ({exc})",
                agent=agent,
                run=run,
            )
            raise self.governor.record_refusal(invalid, **where) from exc
        return {"agent": agent, "run": run, "tool_call_id": call_id, **call.as_guard_kwargs()}

    def _free_kwargs(
        self, name: str, spec: FreeTool, call_id: str | None, config: RunnableConfig
    ) -> dict[str, Any]:
        return {
            "agent": self.who(config),
            "vendor": spec.vendor,
            "endpoint": spec.endpoint(name),
            "run": self.run_id(config),
            "tool_call_id": call_id,
        }

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
    ) -> Iterator[Tracked]:
        """Govern one tool call made inside the block; the block reports how it ended on
        the yielded :class:`Tracked` (an exception escaping it is classified too).
        ``abandoned`` set once admitted: the caller stopped waiting, the tool is not run."""
        if isinstance(spec, FreeTool):
            record = self.governor.free_call(**self._free_kwargs(name, spec, call_id, config))
            tracked = Tracked(name, spec, None, record)
            try:
                check_not_abandoned(abandoned, _NOT_STARTED)
                yield tracked
            except BaseException as exc:
                if not tracked.done:  # cancelled or failed: its row is written regardless
                    self.governor.submit(tracked.failed, exc)
                raise
            return
        kwargs = self.guard_kwargs(name, spec, args, valid, call_id, config)
        with self.governor.guard(**kwargs) as call:
            check_not_abandoned(abandoned, _NOT_STARTED)
            yield Tracked(name, spec, call, None)

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
    ) -> AsyncIterator[Tracked]:
        """:meth:`call` for asyncio (report through :meth:`Tracked.aok` and friends)."""
        gov = self.governor
        if isinstance(spec, FreeTool):
            kwargs = self._free_kwargs(name, spec, call_id, config)
            record = await gov.in_worker(gov.free_call, **kwargs)
            tracked = Tracked(name, spec, None, record)
            try:
                check_not_abandoned(abandoned, _NOT_STARTED)
                yield tracked
            except BaseException as exc:
                if not tracked.done:
                    gov.submit(tracked.failed, exc)
                raise
            return
        kwargs = await gov.in_worker(self.guard_kwargs, name, spec, args, valid, call_id, config)
        async with gov.aguard(**kwargs) as call:
            check_not_abandoned(abandoned, _NOT_STARTED)
            yield Tracked(name, spec, call, None)


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


def _unknown_on(call: Any = None) -> tuple[type[BaseException], ...]:
    base = OUTCOME_UNKNOWN_EXCEPTIONS if call is None else call.unknown_on
    return (*base, *_also_unknown_on())


class Tracked:
    """How one governed tool call ended, recorded once: with the sync methods (from
    async code, the ``a``-methods). ``call``: the ``guard``'s call, or the ``aguard``'s
    (``None`` for a free tool, whose row ``record`` writes)."""

    def __init__(
        self, name: str, spec: Spec, call: Any, record: Callable[..., None] | None
    ) -> None:
        self.name, self.spec, self.call, self.record = name, spec, call, record
        self.started = time.monotonic()
        self.done = False

    def ended(self, output: Any, captured: Captured) -> None:
        """The tool call returned ``output``: the tool's own return value, or the message
        its own error handling made of what it raised (``captured`` tells which)."""
        if captured.error is not None:
            self.failed(captured.error)
        else:
            self.ok(output, captured)

    async def aended(self, governor: Governor, output: Any, captured: Captured) -> None:
        """:meth:`ended` from async code."""
        if captured.error is not None:
            await self.afailed(governor, captured.error)
        else:
            await self.aok(governor, output, captured)

    def ok(self, output: Any, captured: Captured | None = None) -> None:
        """The tool returned ``output`` (``captured``: its own return value)."""
        self.done = True
        if self.record is not None:
            self.record(error=_failure(output), duration_ms=elapsed_ms(self.started))
            return
        verdict = self._returned(output, captured)
        conclude(self.call, verdict)
        self._raise_if_broken(verdict)

    def failed(self, exc: BaseException) -> None:
        """The tool raised ``exc`` (before any handler turned it into a message)."""
        self.done = True
        if self.record is not None:
            self.record(error=describe(exc), duration_ms=elapsed_ms(self.started))
            return
        if not self.call.resolved:
            conclude(self.call, self._raised(exc))

    async def aok(self, governor: Governor, output: Any, captured: Captured | None = None) -> None:
        """:meth:`ok` from async code."""
        if self.record is not None or self.call is None:
            await governor.in_worker(self.ok, output, captured)
            return
        self.done = True
        verdict = self._returned(output, captured)
        await aconclude(self.call, verdict)
        self._raise_if_broken(verdict)

    async def afailed(self, governor: Governor, exc: BaseException) -> None:
        """:meth:`failed` from async code."""
        if self.record is not None or self.call is None:
            await governor.in_worker(self.failed, exc)
            return
        self.done = True
        if not self.call.resolved:
            await aconclude(self.call, self._raised(exc))

    def _returned(self, output: Any, captured: Captured | None) -> Verdict:
        assert isinstance(self.spec, ToolSpec)
        failure = _failure(output)
        if failure is None:
            return verdict_of_result(self.spec, self.call, _value(output, captured))
        shared = self.call.reservation.resumed
        resolution = decide(_ErrorResult(failure), shared=shared, unknown_on=_unknown_on(self.call))
        return Verdict(resolution, reason=f"the tool call ended in an error: {failure}")

    def _raised(self, exc: BaseException) -> Verdict:
        unknown_on = _unknown_on(self.call)
        return verdict_of_failure(
            self.call,
            exc,
            unknown_on=unknown_on,
            unknown_reason="the tool stopped",
            cause=_root(exc, unknown_on),
        )

    def _raise_if_broken(self, verdict: Verdict) -> None:
        if verdict.broken is not None:
            raise broken_spec(self.name, self.call, verdict.broken) from verdict.broken


def _root(exc: BaseException, unknown_on: tuple[type[BaseException], ...]) -> BaseException:
    """A ToolException raised ``from`` a timeout is a timeout."""
    seen = exc
    while seen.__cause__ is not None and not is_outcome_unknown(seen, unknown_on):
        seen = seen.__cause__
    return seen


# -- what the tool returned ------------------------------------------------------------------
class Captured:
    """What the tool itself did, caught on its way out of ``_run`` / ``_arun`` (before
    LangChain's handling of its errors): its return value (its artifact, for a
    content-and-artifact tool), or the exception it raised; or the ValidationError of
    input it never ran with."""

    __slots__ = ("artifact", "error", "set", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.set = False
        self.artifact = False
        self.error: Exception | None = None

    def returned(self, value: Any, artifact: bool) -> None:
        pair = artifact and isinstance(value, tuple) and len(value) == 2  # (content, artifact)
        self.value = value[1] if pair else value
        self.artifact = pair
        self.set = True

    def raised(self, error: Exception) -> None:
        self.error = error

    @property
    def finished(self) -> bool:
        """Whether the tool itself returned or raised. If LangChain's ``run`` raises
        after that (a content-and-artifact pair it cannot split, a callback that raises),
        the tool's own outcome is the call's: what LangChain did afterwards cannot undo a
        payment, so the hold is settled from what the tool returned, never released."""
        return self.set or self.error is not None


#: The call in progress in this context (each governed call sets its own).
captured: ContextVar[Captured | None] = ContextVar("paymaster_tool_return", default=None)


def _failure(output: Any) -> str | None:
    """An error result the tool's own error handling made (a ToolMessage marked error)."""
    if isinstance(output, ToolMessage) and output.status == "error":
        return str(output.content)[:500] or "the tool reported an error"
    return None


def _value(output: Any, caught: Captured | None = None) -> Any:
    """What a spec's ``actual`` sees (as the README says): the artifact of a
    content-and-artifact tool, else its content, JSON-decoded when it is JSON text. The
    content is the tool's own return value when it was caught (a dict stays a dict),
    else the ToolMessage's (or the output itself)."""
    if caught is not None and caught.set:
        return caught.value if caught.artifact else _decoded(caught.value)
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


# -- what the tool is called with ---------------------------------------------------------------
def priced_arguments(tool: BaseTool, args: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
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
