"""Every use of LangChain's and LangGraph's private names, in one place.

The rest of the adapter uses only their public API and this module. Each touch says
which version it was read from: langchain-core 1.8.3 (``langchain_core/tools/base.py``,
``simple.py``, ``structured.py``, ``language_models/chat_models.py``) and langgraph
1.2.24 (``langgraph/_internal/_constants.py``, ``langgraph/runtime.py``). A new version
is checked here first.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.tools import BaseTool, StructuredTool, Tool

# Read from langchain-core 1.8.3, langchain_core/tools/base.py: the message
# ``BaseTool.run`` makes of a ValidationError from the ``handle_validation_error`` flag
# (True: a fixed text, a str, or a callable). Not exported.
from langchain_core.tools.base import _handle_validation_error

__all__ = [
    "NeverStreams",
    "langgraph_run_id",
    "recording_validation_errors",
    "runs_in_a_thread",
    "wrap_implementation",
    "wrap_sync_or_async",
]


def langgraph_run_id(configurable: Mapping[str, Any]) -> str | None:
    """The ``run_id`` of the LangGraph invocation a tool call belongs to, if any.

    Read from langgraph 1.2.24: Pregel keeps the invocation's ``Runtime`` under the
    private config key ``__pregel_runtime`` (``CONFIG_KEY_RUNTIME`` in
    ``langgraph/_internal/_constants.py``); its ``execution_info.run_id`` is public
    (``langgraph/runtime.py``). ``langgraph.runtime.get_runtime()`` reads the same key,
    but of the context's config, not of the config the tool was given. ``execution_info``
    is there since langgraph 1.1; before it this gives ``None`` (the caller falls back to
    the thread id)."""
    runtime = configurable.get("__pregel_runtime")
    run = getattr(getattr(runtime, "execution_info", None), "run_id", None)
    return str(run) if run else None


def runs_in_a_thread(tool: BaseTool) -> bool:
    """Whether ``tool`` is a sync tool: no coroutine, and the ``_arun`` LangChain gives
    every tool (which runs ``_run`` in an executor thread).

    Read from langchain-core 1.8.3: ``BaseTool._arun`` (base.py), ``Tool._arun``
    (simple.py) and ``StructuredTool._arun`` (structured.py) run ``_run`` with
    ``run_in_executor`` when there is no coroutine."""
    if getattr(tool, "coroutine", None) is not None:
        return False
    return type(tool)._arun in (BaseTool._arun, StructuredTool._arun, Tool._arun)


def wrap_implementation(
    tool: BaseTool, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Replace ``tool``'s (a private copy's) ``_run`` and ``_arun`` with ``wrap`` of each.

    Read from langchain-core 1.8.3, ``BaseTool.run`` / ``arun``: after validating the
    input and injecting the config and ``run_manager`` (it reads the wrapped function's
    signature, kept by ``functools.wraps``), they call ``self._run`` / ``self._arun``
    and apply the tool's own error handling to what they raise. These are the methods a
    tool subclass implements; a pydantic model takes instance attributes that shadow
    them only through ``object.__setattr__``."""
    for name in ("_run", "_arun"):
        object.__setattr__(tool, name, wrap(getattr(tool, name)))


def wrap_sync_or_async(
    method: Callable[..., Any], after: Callable[[Any], Any], failed: Callable[[Exception], None]
) -> Callable[..., Any]:
    """``method`` (sync or async), ``after`` applied to what it returns and ``failed``
    called with what it raises (which is then re-raised)."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def acall(*args: Any, **kwargs: Any) -> Any:
            try:
                return after(await method(*args, **kwargs))
            except Exception as exc:
                failed(exc)
                raise

        return acall

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return after(method(*args, **kwargs))
        except Exception as exc:
            failed(exc)
            raise

    return call


def recording_validation_errors(tool: BaseTool, record: Callable[[Exception], None]) -> None:
    """Make ``tool``'s (a private copy's) own handling of invalid input also ``record``
    the ValidationError: the tool never ran, and the error is its audit reason. The
    message is the one the tool's ``handle_validation_error`` flag makes (see
    ``_handle_validation_error`` above); a tool that does not handle them is unchanged."""
    flag = tool.handle_validation_error
    if not flag:
        return

    def handle(error: Any) -> str:
        record(error)
        return _handle_validation_error(error, flag=flag)

    tool.handle_validation_error = handle


class NeverStreams:
    """A chat model mix-in that never streams (for the offline test model, whose
    streaming would drop tool calls).

    Read from langchain-core 1.8.3, language_models/chat_models.py: ``BaseChatModel``
    streams only when a subclass overrides ``_stream`` / ``_astream``; restoring its own
    (which raise ``NotImplementedError``) makes ``invoke`` use ``_generate``."""

    _stream = BaseChatModel._stream
    _astream = BaseChatModel._astream
