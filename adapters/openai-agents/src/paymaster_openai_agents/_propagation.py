"""Make paymaster's refusals end an Agents SDK run instead of reaching the model.

The SDK re-raises a tool's exception as ``UserError("Error running tool ...")`` unless it
is an ``AgentsException`` (``agents/run_internal/tool_execution.py``), and its default
``failure_error_function`` turns exceptions into "please try again" for the model. So a
:class:`~paymaster.PolicyViolation` (or :class:`~paymaster.GovernanceUnavailable`) leaves a
governed tool as the *same* exception object, re-classed to a subclass of both its own
class and ``AgentsException``: the SDK lets it through untouched and the caller's
``except PolicyViolation`` catches it.
"""

from __future__ import annotations

from typing import TypeVar

from agents.exceptions import AgentsException

from paymaster._errors import GovernanceUnavailable, PolicyViolation, SpecError, reduce_as

__all__ = ["STOPS_THE_RUN", "stop_the_run"]

#: The exceptions that end a run rather than being shown to the model: a refusal, the
#: ledger being unreachable, a tool's spec failing (a bug, not the model's mistake).
STOPS_THE_RUN: tuple[type[BaseException], ...] = (
    PolicyViolation,
    GovernanceUnavailable,
    SpecError,
)

E = TypeVar("E", bound=BaseException)
_PASSTHROUGH: dict[type[BaseException], type[BaseException]] = {}


def stop_the_run(exc: E) -> E:
    """Return ``exc`` re-classed so the Agents SDK propagates it unchanged to the caller
    of ``Runner.run`` / ``run_sync`` / ``run_streamed``."""
    if isinstance(exc, AgentsException):
        return exc
    cls: type[BaseException] = type(exc)
    passthrough = _PASSTHROUGH.get(cls)
    if passthrough is None:
        passthrough = type(
            cls.__name__,
            (cls, AgentsException),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__reduce__": lambda self: reduce_as(self, cls),  # pickles as ``cls``
            },
        )
        _PASSTHROUGH[cls] = passthrough
    exc.__class__ = passthrough  # type: ignore[assignment]
    if not hasattr(exc, "run_data"):  # the SDK attaches the run's details here
        exc.run_data = None  # type: ignore[attr-defined]
    return exc
