"""Who a governed Stripe call is attributed to: :class:`StripeBinding`, set per block
by :func:`bind` and read by :func:`current_binding`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ..._policy import RunPolicy

__all__ = ["StripeBinding", "bind", "current_binding"]


@dataclass(frozen=True)
class StripeBinding:
    """Who is calling: fills what the governed client was not given, per context."""

    agent: str | None = None
    run: str | None = None
    run_policy: RunPolicy | None = None
    tool_call_id: str | None = None
    credential: str | None = None
    """What the calls were presented with (the proxy's vault key id), on their rows."""
    run_policy_conflict: str | None = None
    """Set when two different run policies were given for the same calls (a client's or a
    toolkit's, and a bound one): they do not stack, and neither may replace the other
    (the second could widen the first), so the calls are refused."""


def _stacked(
    outer: RunPolicy | None, inner: RunPolicy | None, earlier: str | None
) -> tuple[RunPolicy | None, str | None]:
    """The run policy of calls given ``outer`` and then ``inner``, and a conflict if they
    are two different ones (the outer one is kept, and the calls are refused)."""
    if earlier is not None:
        return outer, earlier
    if outer is None or inner is None or inner == outer:
        return outer or inner, None
    return outer, (
        "two different run policies were given for this call (one by the governed client "
        "or toolkit, one bound for the call or run): run policies do not stack, and one may "
        "not replace the other, so the call was refused; give the run's policy in one place"
    )


_NOBODY = StripeBinding()
_binding: ContextVar[StripeBinding | None] = ContextVar("paymaster_stripe_binding", default=None)


def current_binding() -> StripeBinding:
    """Who the governed Stripe calls of this context are attributed to (by :func:`bind`)."""
    return _binding.get() or _NOBODY


@contextmanager
def bind(
    *,
    agent: str | None = None,
    run: str | None = None,
    run_policy: RunPolicy | None = None,
    tool_call_id: str | None = None,
    credential: str | None = None,
) -> Iterator[StripeBinding]:
    """Attribute the governed Stripe calls made inside the block (in this thread or task
    and the tasks it starts) to ``agent``, ``run`` and the tool call that makes them: how
    tools tie calls to their run."""
    outer = current_binding()
    stacked, conflict = _stacked(outer.run_policy, run_policy, outer.run_policy_conflict)
    binding = StripeBinding(
        agent=agent or outer.agent,
        run=run or outer.run,
        run_policy=stacked,
        tool_call_id=tool_call_id or outer.tool_call_id,
        credential=credential or outer.credential,
        run_policy_conflict=conflict,
    )
    token = _binding.set(binding)
    try:
        yield binding
    finally:
        _binding.reset(token)
