"""The ``@gov.governed(...)`` decorator: each call of the decorated function (sync or
async) is governed, in ``guard`` or ``aguard``.

:func:`governed` takes the governor first: the :class:`~paymaster.Governor` facade uses
it as its method.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .._errors import SpecError
from .._ledger import check_amount
from .._money import Money
from .._outcomes import describe
from .call import GovernedCall
from .request import CallRequest

if TYPE_CHECKING:
    from .governor import Governor

__all__ = ["governed"]

F = TypeVar("F", bound=Callable[..., Any])
Spec = Callable[[tuple[Any, ...], dict[str, Any]], CallRequest]


def governed(
    governor: Governor,
    *,
    agent: str,
    vendor: str,
    endpoint: str,
    method: str = "POST",
    estimate: Money | Callable[..., Money | None] | None = None,
    customer: str | Callable[..., str | None] | None = None,
    run: str | Callable[..., str | None] | None = None,
    actual: Callable[[Any], Money | int | None] | None = None,
    free: bool = False,
) -> Callable[[F], F]:
    """Decorate a function (sync or async) so each call of it is governed.

    ``estimate``, ``customer`` and ``run`` may be callables of the function's
    arguments; ``actual`` maps its result to the actual cost (default: the estimate).
    A function that moves no money passes ``free=True`` instead of an estimate.
    """
    if estimate is None and not free:
        raise ValueError(
            f"governed(agent={agent!r}, endpoint={endpoint!r}) needs estimate= (Money, or "
            "a function of the call's arguments returning Money): what one call may cost "
            "at most; or free=True if it moves no money"
        )
    if estimate is not None and not callable(estimate):
        check_amount(estimate, "estimate")  # refused when decorating, not at each call
    base = CallRequest(agent=agent, vendor=vendor, endpoint=endpoint, method=method, free=free)

    def decorate(fn: F) -> F:
        name = getattr(fn, "__qualname__", repr(fn))

        def spec(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallRequest:
            try:
                return _worked_out(base, estimate, customer, run, args, kwargs)
            except Exception as exc:
                # A bug in the decorator's own arguments: nothing was reserved or
                # sent, and the attempt still leaves its row.
                message = (
                    f"estimate=, customer= or run= of {name} raised ({describe(exc)}); "
                    "nothing was reserved or sent: fix that function"
                )
                governor.record_error(
                    f"SpecError: {message}",
                    agent=agent,
                    vendor=vendor,
                    endpoint=endpoint,
                    method=method,
                )
                raise SpecError(message, tool=name) from exc

        return _wrap(governor, fn, spec, actual)

    return decorate


def _worked_out(
    base: CallRequest,
    estimate: Any,
    customer: Any,
    run: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> CallRequest:
    """The request of one call of the decorated function, with its arguments."""

    def resolve(value: Any) -> Any:
        return value(*args, **kwargs) if callable(value) else value

    return dataclasses.replace(
        base, estimate=resolve(estimate), customer=resolve(customer), run=resolve(run)
    )


def _wrap(
    governor: Governor,
    fn: F,
    spec: Spec,
    actual: Callable[[Any], Money | int | None] | None,
) -> F:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            async with governor.aguard(spec(args, kwargs)) as call:
                result = await fn(*args, **kwargs)
                await call.settle(_cost_of(call.sync_call, fn, actual, result))
                return result

        return cast(F, async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with governor.guard(spec(args, kwargs)) as call:
            result = fn(*args, **kwargs)
            call.settle(_cost_of(call, fn, actual, result))
            return result

    return cast(F, wrapper)


def _cost_of(
    call: GovernedCall,
    fn: Callable[..., Any],
    actual: Callable[[Any], Money | int | None] | None,
    result: Any,
) -> Money | int | None:
    """What a decorated call cost, by its ``actual=``. The function has returned, so money
    may have moved: from here on a failure keeps the hold counted (unknown), never releases
    it, and a failing ``actual`` is a :class:`SpecError` naming the hold."""
    call._attempted = True
    if actual is None:
        return None
    try:
        return actual(result)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SpecError(
            f"actual= of {name} raised after the call returned ({describe(exc)}); hold "
            f"{call.hold_id} stays counted as unknown until an operator reconciles it: "
            "fix the actual function",
            tool=name,
            hold_id=call.hold_id,
        ) from exc
