"""Which run a tool call belongs to, and the run policy it runs under.

The run id is ``run_id`` (or ``paymaster_run_id``) of the context passed to
``Runner.run`` (a mapping or an object). Without one, paymaster makes one per run: the
SDK gives every tool call of one run the same ``Usage`` object (``ToolContext.usage``,
and ``result.context_wrapper.usage`` afterwards), so the generated id is kept against
that object and :func:`run_id_of_result` reads it back. A test checks that every audit
row of one run shares the id, so an SDK change to that sharing is caught.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any

from agents.run_context import RunContextWrapper

from paymaster import RunPolicy

__all__ = ["run_id_of", "run_id_of_result", "run_policy_of"]

_KEYS = ("paymaster_run_id", "run_id")
_generated: dict[int, str] = {}
_lock = threading.Lock()


def _from_context(context: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = context.get(key) if isinstance(context, dict) else getattr(context, key, None)
        if value:
            return value
    return None


def _generated_for(usage: object) -> str:
    with _lock:
        run = _generated.get(id(usage))
        if run is None:
            run = f"run_{uuid.uuid4().hex}"
            _generated[id(usage)] = run
            weakref.finalize(usage, _generated.pop, id(usage), None)
        return run


def run_id_of(ctx: RunContextWrapper[Any]) -> str:
    """The run id of a tool call (see the module's docstring)."""
    given = _from_context(ctx.context, _KEYS)
    return str(given) if given else _generated_for(ctx.usage)


def run_id_of_result(result: Any) -> str:
    """The run id a finished (or failed-and-caught) run's tool calls were audited under:
    pass the ``RunResult`` or ``RunResultStreaming``."""
    return run_id_of(result.context_wrapper)


def run_policy_of(ctx: RunContextWrapper[Any]) -> RunPolicy | None:
    """A tighter policy for this run: ``paymaster_run_policy`` (or ``run_policy``) of the
    context passed to ``Runner.run``."""
    policy = _from_context(ctx.context, ("paymaster_run_policy", "run_policy"))
    if policy is not None and not isinstance(policy, RunPolicy):
        raise TypeError(f"the run policy in the run's context must be a RunPolicy, not {policy!r}")
    return policy
