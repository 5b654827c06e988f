"""Which run a tool call belongs to, and the run policy it runs under.

The run id is ``run_id`` (or ``paymaster_run_id``) of the context passed to
``Runner.run`` (a mapping or an object). Without one, paymaster makes one per run: the
SDK gives every tool call of one run the same ``Usage`` object (``ToolContext.usage``,
and ``result.context_wrapper.usage`` afterwards), so the generated id is kept on that
object and :func:`run_id_of_result` reads it back. Pass ``run_id`` for runs resumed from a
serialised ``RunState``. A test checks that every audit
row of one run shares the id, so an SDK change to that sharing is caught.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from agents.run_context import RunContextWrapper

from paymaster import RunPolicy

__all__ = ["run_id_of", "run_id_of_result", "run_policy_of"]

_KEYS = ("paymaster_run_id", "run_id")
_ATTRIBUTE = "_paymaster_run_id"
_lock = threading.Lock()


def _from_context(context: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = context.get(key) if isinstance(context, dict) else getattr(context, key, None)
        if value:
            return value
    return None


def _generated_for(usage: object) -> str:
    """Kept on the run's ``Usage`` object itself, so that a run paused for approval and
    resumed from its in-memory ``RunState`` (which deep-copies it) keeps its id. A run
    resumed from a serialised state must pass ``run_id`` in its context."""
    with _lock:
        run = getattr(usage, _ATTRIBUTE, None)
        if run is None:
            run = f"run_{uuid.uuid4().hex}"
            setattr(usage, _ATTRIBUTE, run)
        return str(run)


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
