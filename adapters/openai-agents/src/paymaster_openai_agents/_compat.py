"""Every use of the OpenAI Agents SDK's (and asyncio's) private names, in one place.

The rest of the adapter uses only the SDK's public API and this module. Each touch says
which version it was read from: openai-agents 0.24.0 (``agents/tool.py``) and CPython
3.10-3.13 (``asyncio/base_events.py``). A new SDK version is checked here first; the
tests that exercise each touch are named with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from agents import FunctionTool

# Read from openai-agents 0.24.0, agents/strict_schema.py: the SDK's conversion of a JSON
# schema to its strict form (what ``@function_tool`` applies); not exported from ``agents``.
from agents.strict_schema import ensure_strict_json_schema

# Read from openai-agents 0.24.0, agents/tool.py: the SDK's failure-handling invoker (a
# FunctionTool's ``on_invoke_tool`` made by ``@function_tool``). The governed invoker
# subclasses it so the SDK treats it as one (``needs_approval`` and ``timeout_seconds``
# check for it). Not exported by the SDK.
from agents.tool import _FailureHandlingFunctionToolInvoker

# Read from openai-agents 0.24.0, agents/tool.py: how the SDK turns a tool's exception
# into the model's message (``failure_error_function``); module functions not exported
# from ``agents``.
from agents.tool import (
    maybe_invoke_function_tool_failure_error_function as failure_message,
)
from agents.tool import (
    resolve_function_tool_failure_error_function as failure_function,
)
from agents.tool_context import ToolContext

__all__ = [
    "GovernedInvoker",
    "cancel_when_the_loop_stops",
    "ensure_strict_json_schema",
    "failure_function",
    "failure_message",
    "is_sync_tool",
    "keep_markers",
    "raw_implementation",
    "rebuild_invoker",
]

Invoke = Callable[[ToolContext[Any], str], Awaitable[Any]]

# Read from openai-agents 0.24.0, agents/tool.py (``_SYNC_FUNCTION_TOOL_MARKER``): set on
# the invoker of a sync ``@function_tool``; the SDK runs those in a thread and does not
# apply ``timeout_seconds`` to them.
_SYNC = "__agents_sync_function_tool__"
# Read from openai-agents 0.24.0, agents/tool.py: set on the invocation implementation of
# a ``@function_tool`` (``prepare_arguments`` for ``needs_approval``, and the wrapped
# function, ``_FUNCTION_TOOL_WRAPPED_CALLABLE_MARKER``); kept on a wrapped implementation.
_IMPL_MARKERS = ("__agents_prepare_arguments__", "__agents_function_tool_wrapped_callable__")


def is_sync_tool(invoker: Any) -> bool:
    """Whether ``invoker`` is a sync ``@function_tool``'s (see ``_SYNC``)."""
    return bool(getattr(invoker, _SYNC, False))


def raw_implementation(invoker: Any) -> Invoke | None:
    """The tool's own invocation inside the SDK's failure handling, or ``None`` for a
    hand-made ``FunctionTool`` (read from openai-agents 0.24.0:
    ``_FailureHandlingFunctionToolInvoker._invoke_tool_impl``)."""
    return getattr(invoker, "_invoke_tool_impl", None)


def rebuild_invoker(invoker: Any, impl: Invoke, tool: FunctionTool) -> Invoke:
    """``invoker`` (an SDK failure-handling invoker) rebuilt around ``impl``, bound to the
    same tool, so its failure policy is resolved exactly as before (read from
    openai-agents 0.24.0: its ``__init__(invoke_tool_impl, on_handled_error,
    function_tool=)`` and ``_on_handled_error``)."""
    rebuilt = type(invoker)(impl, invoker._on_handled_error, function_tool=tool)
    if is_sync_tool(invoker):
        setattr(rebuilt, _SYNC, True)
    return rebuilt  # type: ignore[no-any-return]


def keep_markers(impl: Any, wrapper: Any) -> None:
    """Copy the SDK's markers of ``impl`` onto ``wrapper`` (see ``_IMPL_MARKERS``)."""
    for marker in _IMPL_MARKERS:
        if hasattr(impl, marker):
            setattr(wrapper, marker, getattr(impl, marker))


class GovernedInvoker(_FailureHandlingFunctionToolInvoker):
    """The governed tool's invoker. It is an SDK failure-handling invoker so that the SDK
    treats it as one: a callable ``needs_approval`` still compares the arguments as
    prepared by the tool (``prepare_arguments``), and the sync mark still stops
    ``timeout_seconds`` on sync tools. Its calls run the governance, which runs the tool's
    own (failure-handling) invoker inside.

    Read from openai-agents 0.24.0: the attributes the SDK reads on such an invoker
    (``_invoke_tool_impl``, ``_on_handled_error``, ``_function_tool``) and its
    ``__agents_bind_function_tool__`` hook (``FunctionTool.__post_init__`` and
    ``dataclasses.replace`` rebind an invoker to its copy of the tool)."""

    def __init__(self, governed: Invoke, watched: Any) -> None:
        # Not the parent's __init__: this invoker's call is the governed one.
        self._governed = governed
        self._watched = watched
        self._invoke_tool_impl = getattr(watched, "_invoke_tool_impl", watched)
        self._on_handled_error = getattr(watched, "_on_handled_error", _ignore_handled_error)
        self._function_tool = getattr(watched, "_function_tool", None)
        if is_sync_tool(watched):
            setattr(self, _SYNC, True)

    def __agents_bind_function_tool__(self, function_tool: FunctionTool) -> GovernedInvoker:
        return self

    def prepare_arguments(self, input: str, tool_name: str) -> Any:
        prepare = getattr(self._watched, "prepare_arguments", None)
        return prepare(input, tool_name) if prepare is not None else None

    async def __call__(self, ctx: ToolContext[Any], input: str) -> Any:
        return await self._governed(ctx, input)


def _ignore_handled_error(
    tool: FunctionTool, error: Exception, input_json: str, ctx: ToolContext[Any]
) -> None:
    """The no-op trace hook of an invoker that wraps a hand-made tool."""


def cancel_when_the_loop_stops(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if it is still running when the task its event loop runs until
    complete ends, as ``asyncio.run``'s shutdown would. ``Runner.run_sync`` leaves its loop
    open but idle after the run: a body still in flight then would stay suspended, its
    hold pending, until the loop next runs. Cancelled, it is kept ``unknown`` (the
    cancellation is delivered when ``run_sync`` flushes the loop's async generators; the
    record is made in a governor worker). On a loop that keeps running (a server's),
    the body runs on and settles.

    Read from CPython 3.10-3.13, asyncio/base_events.py: ``run_until_complete`` adds
    ``_run_until_complete_cb`` to its future's ``_callbacks`` (asyncio has no public
    accessor for either); the tests of a body cut off by its loop stopping (``run_sync``
    and ``asyncio.run``) catch a change."""
    loop = task.get_loop()
    for root in asyncio.all_tasks(loop):
        callbacks = getattr(root, "_callbacks", None) or ()
        if root is not task and any(_stops_the_loop(callback) for callback in callbacks):
            root.add_done_callback(lambda _: task.cancel())
            return


def _stops_the_loop(callback: Any) -> bool:
    function = callback[0] if isinstance(callback, tuple) else callback
    return getattr(function, "__name__", None) == "_run_until_complete_cb"
