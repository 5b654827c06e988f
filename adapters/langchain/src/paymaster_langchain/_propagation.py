"""Make paymaster's refusals reach the caller of a LangChain / LangGraph agent.

LangGraph's ``ToolNode`` can turn tool exceptions into ``ToolMessage``s for the model
(``handle_tool_errors``), and middleware such as ``ToolRetryMiddleware`` retries or
reports them; none of them ever catch ``GraphBubbleUp`` (``langgraph/prebuilt/
tool_node.py``), which Pregel re-raises to the caller. So a
:class:`~paymaster.PolicyViolation` leaves a governed tool as an instance of a subclass of
both its own class and ``GraphBubbleUp``: ``except PolicyViolation`` still catches it,
with the same message and fields, whatever error handling the user configured.
"""

from __future__ import annotations

from typing import TypeVar

from paymaster._errors import GovernanceUnavailable, PolicyViolation, SpecError, reduce_as

__all__ = ["STOPS_THE_RUN", "stop_the_run"]

#: The exceptions that end a run rather than being shown to the model: a refusal, the
#: ledger being unreachable, a tool's spec failing (a bug, not the model's mistake).
STOPS_THE_RUN: tuple[type[Exception], ...] = (PolicyViolation, GovernanceUnavailable, SpecError)

E = TypeVar("E", bound=Exception)


_ESCAPING: dict[type[Exception], type[Exception]] = {}


def _escaping(cls: type[Exception]) -> type[Exception]:
    from langgraph.errors import GraphBubbleUp

    if cls not in _ESCAPING:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__reduce__": lambda self: reduce_as(self, cls),  # pickles as ``cls``
        }
        _ESCAPING[cls] = type(cls.__name__, (cls, GraphBubbleUp), namespace)
    return _ESCAPING[cls]


def stop_the_run(exc: E) -> E:
    """``exc`` re-classed so that no tool-error handler turns it into a message for the
    model (without LangGraph installed there is no such handler: ``exc`` is returned
    unchanged)."""
    try:
        from langgraph.errors import GraphBubbleUp
    except ImportError:
        return exc
    if not isinstance(exc, GraphBubbleUp):
        exc.__class__ = _escaping(type(exc))  # type: ignore[assignment]
    return exc
