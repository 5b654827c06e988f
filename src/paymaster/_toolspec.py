"""How an agent's tool maps to a governed call: declared once per tool, used by adapters.

::

    refund_spec = ToolSpec(
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=lambda args: Money(args["amount"], args["currency"]),
        customer=lambda args: args["customer"],
        actual=lambda result: result["amount"],
    )
    specs = {"issue_refund": refund_spec, "lookup_charge": FREE}

Every field but ``vendor`` and ``endpoint`` may be a constant or a function of the tool's
parsed arguments (``actual``: of its result). A tool marked :data:`FREE` spends nothing
and reserves nothing; its calls are still audited and stopped by a revoke.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._governor.request import CallRequest
from ._money import Money

if TYPE_CHECKING:
    from ._governor import Governor
    from ._policy import RunPolicy

__all__ = ["FREE", "FreeTool", "GovernedCallSpec", "ToolSpec", "check_agent", "check_specs"]

Arguments = Mapping[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class GovernedCallSpec:
    """One tool call's governed call: what its :class:`~paymaster.CallRequest` takes from
    the tool's spec (the adapters add who makes it)."""

    vendor: str
    endpoint: str
    method: str
    estimate: Money | None
    customer: str | None

    def call_request(
        self,
        *,
        agent: str,
        run: str | None = None,
        run_policy: RunPolicy | None = None,
        tool_call_id: str | None = None,
    ) -> CallRequest:
        """The request to govern this tool call with, made by ``agent`` in ``run``."""
        return CallRequest(
            agent=agent,
            run=run,
            run_policy=run_policy,
            tool_call_id=tool_call_id,
            vendor=self.vendor,
            endpoint=self.endpoint,
            method=self.method,
            estimate=self.estimate,
            customer=self.customer,
        )

    def as_guard_kwargs(self) -> dict[str, Any]:
        """These fields as keywords of ``Governor.guard`` (for callers that still spell
        the call as keywords; :meth:`call_request` builds the whole request)."""
        return {
            "vendor": self.vendor,
            "endpoint": self.endpoint,
            "method": self.method,
            "estimate": self.estimate,
            "customer": self.customer,
        }


@dataclass(frozen=True)
class ToolSpec:
    """Which vendor call a tool makes, and what it costs."""

    vendor: str
    endpoint: str | Callable[[Arguments], str]
    method: str = "POST"
    estimate: Money | Callable[[Arguments], Money | None] | None = None
    """What the call may cost, reserved before it runs (``None``: nothing)."""
    customer: str | Callable[[Arguments], str | None] | None = None
    actual: Callable[[Any], Money | int | None] | None = None
    """What it cost, from the tool's result (default: the estimate). An int is minor
    units in the estimate's currency. A spec function that raises is a bug, not the
    model's mistake: the adapters end the run with :class:`~paymaster.SpecError`
    (raise :class:`~paymaster.PolicyViolation` from ``estimate``, ``customer`` or
    ``endpoint`` to refuse a call instead)."""

    def for_call(self, arguments: Arguments) -> GovernedCallSpec:
        """The governed call of one tool call with these parsed arguments."""
        estimate = _value(self.estimate, arguments)
        if estimate is not None and not isinstance(estimate, Money):
            raise TypeError(f"a tool's estimate must be Money or None, got {estimate!r}")
        return GovernedCallSpec(
            vendor=self.vendor,
            endpoint=str(_value(self.endpoint, arguments)),
            method=self.method.upper(),
            estimate=estimate,
            customer=_value(self.customer, arguments),
        )

    def actual_cost(self, result: Any, estimate: Money | None = None) -> Money | int | None:
        """What a call that returned ``result`` cost (``None``: its estimate), checked
        before anything is settled: Money (in ``estimate``'s currency when given) or an
        int of minor units, not negative. Raises what ``actual`` raises, and
        ``TypeError`` / ``ValueError`` for anything else it returns."""
        if self.actual is None:
            return None
        cost = self.actual(result)
        if cost is None:
            return None
        if isinstance(cost, bool) or not isinstance(cost, (Money, int)):
            raise TypeError(
                f"a tool's actual must return Money, an int of minor units or None, got "
                f"{type(cost).__name__} {cost!r}"
            )
        amount = cost.amount if isinstance(cost, Money) else cost
        if amount < 0:
            raise ValueError(f"a tool's actual cannot be negative, got {cost!r}")
        if isinstance(cost, Money) and estimate is not None and cost.currency != estimate.currency:
            raise ValueError(
                f"a tool's actual must be in its estimate's currency ({estimate.currency}), "
                f"got {cost}"
            )
        return cost


@dataclass(frozen=True)
class FreeTool:
    """Marks a tool that spends nothing: not reserved, still audited (as ``vendor`` and
    ``/tools/<name>``) and stopped by a revoke of its agent or run."""

    vendor: str = "tool"

    def endpoint(self, tool_name: str) -> str:
        return f"/tools/{tool_name}"


#: The mark for a tool that costs nothing.
FREE = FreeTool()


def check_specs(names: Sequence[str] | None, specs: Mapping[str, ToolSpec | FreeTool]) -> None:
    """Refuse, when tools are wrapped, a spec that is not a :class:`ToolSpec` or
    :data:`FREE`, a tool without a spec (nothing runs ungoverned), a spec naming no given
    tool (a typo would leave the real tool without one; the nearest tool name is
    suggested) and a spec without an estimate. ``names=None``: the tools are not known
    yet (a middleware), so only the specs themselves are checked."""
    for name, spec in specs.items():
        if not isinstance(spec, (ToolSpec, FreeTool)):
            raise TypeError(
                f"the spec of tool {name!r} must be a ToolSpec, got {type(spec).__name__}: "
                f"write {_spec_hint(spec)}, or paymaster.FREE if the tool spends nothing"
            )
    problems = []
    if names is not None:
        unknown = sorted(set(specs) - set(names))
        if unknown:
            without = [name for name in names if name not in specs]
            problems.append(
                "unused specs name tools that are not given: "
                + ", ".join(_with_suggestion(name, without or list(names)) for name in unknown)
            )
        missing = [name for name in names if name not in specs]
        if missing:
            problems.append(
                f"no spec for {', '.join(map(repr, missing))}: give each tool a ToolSpec, or "
                "paymaster.FREE if it spends nothing, so that nothing runs ungoverned"
            )
    if problems:
        raise ValueError("; ".join(problems))
    unpriced = [
        name for name, spec in specs.items() if isinstance(spec, ToolSpec) and spec.estimate is None
    ]
    if unpriced:
        raise ValueError(
            f"the spec of {', '.join(map(repr, sorted(unpriced)))} has no estimate: give it "
            "estimate= (Money, or a function of the arguments returning Money: what one call "
            "may cost at most), or mark the tool paymaster.FREE if it spends nothing"
        )


def check_agent(
    governor: Governor, agent: str | None, specs: Iterable[ToolSpec | FreeTool]
) -> None:
    """Refuse, when tools are wrapped for an explicit ``agent``, an agent type no policy
    of ``governor`` names (:meth:`~paymaster.Governor.check_agent`), if any of the tools
    spends money (a free tool needs no policy). ``agent=None``: the agent type is the
    agent's name, known only at each call (a ``no_policy`` refusal then lists the known
    agent types)."""
    if agent is not None and any(isinstance(spec, ToolSpec) for spec in specs):
        governor.check_agent(agent)


def _with_suggestion(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"{name} (did you mean {close[0]!r}?)" if close else name


def _spec_hint(spec: object) -> str:
    """The ``ToolSpec(...)`` to write instead of ``spec`` (a dict's keys as arguments)."""
    fields = {field.name for field in dataclasses.fields(ToolSpec)}
    if isinstance(spec, Mapping) and spec and set(spec) <= fields:
        shown = ", ".join(
            f"{key}={value!r}" if isinstance(value, (str, Money)) else f"{key}=..."
            for key, value in spec.items()
        )
        return f"ToolSpec({shown})"
    return "ToolSpec(vendor='stripe', endpoint='/v1/refunds', estimate=...)"


def _value(field: T | Callable[[Arguments], T], arguments: Arguments) -> T:
    return field(arguments) if callable(field) else field
