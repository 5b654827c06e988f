"""The API for adapter authors: what a framework adapter needs to govern that framework's
tool calls, and the rules every adapter shares.

``paymaster-openai-agents`` and ``paymaster-langchain`` import only from :mod:`paymaster`,
this module and :mod:`paymaster.vendors.stripe`; a new adapter should too. What it holds:

* **deciding an outcome**: :func:`decide` (what a failed or cancelled call does to its
  hold), :class:`Verdict` / :class:`Resolution`, :func:`conclude` / :func:`aconclude`
  (record a verdict on a :class:`~paymaster.GovernedCall`), :func:`verdict_of_failure`,
  :func:`verdict_of_result`, :data:`OUTCOME_UNKNOWN_EXCEPTIONS`, :func:`is_outcome_unknown`,
  and :class:`CallInProgress` (what they read of a ``guard`` / ``aguard`` call);
* **what the model is told**: :func:`model_message`, :func:`tool_failure_text`,
  :func:`refusal_text`, and :func:`describe` (an exception as an audit row records it);
* **refusals that end the run**: :data:`STOPS_THE_RUN`, :class:`RunStopper` (an
  adapter's ``stop_the_run``) and :func:`reclassed` (re-class an exception so a
  framework's tool-error handling lets it through), :data:`OnViolation`;
* **checking what the user passed**: :func:`check_specs`, :func:`check_agent`;
* **broken specs**: :func:`spec_failed`, :func:`broken_spec` (logged, audited,
  :class:`~paymaster.SpecError`);
* **calls the caller stops waiting for**: :func:`run_detached`, :func:`run_in_worker`,
  :func:`check_not_abandoned`, :class:`NotRun`;
* **the prebuilt Stripe tools**, framework-neutral: :class:`StripeTool`,
  :class:`StripeToolkit` (they import ``stripe`` only when a call is made);
* :func:`requires` (a missing optional dependency names the extra that installs it) and
  :func:`elapsed_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from ._errors import (
    GovernanceUnavailable,
    PaymasterError,
    PolicyViolation,
    SpecError,
    ViolationCode,
    reduce_as,
)
from ._extras import requires
from ._governor import aconclude, conclude
from ._outcomes import (
    OUTCOME_UNKNOWN_EXCEPTIONS,
    Resolution,
    Verdict,
    decide,
    describe,
    is_outcome_unknown,
    model_message,
    tool_failure_text,
)
from ._toolspec import ToolSpec, check_agent, check_specs
from .vendors.stripe._tools import StripeTool, StripeToolkit

if TYPE_CHECKING:
    from ._governor import Governor
    from ._money import Money

__all__ = [
    "OUTCOME_UNKNOWN_EXCEPTIONS",
    "STOPS_THE_RUN",
    "CallInProgress",
    "NotRun",
    "OnViolation",
    "Resolution",
    "RunStopper",
    "StripeTool",
    "StripeToolkit",
    "Verdict",
    "aconclude",
    "broken_spec",
    "check_agent",
    "check_not_abandoned",
    "check_specs",
    "conclude",
    "decide",
    "describe",
    "elapsed_ms",
    "is_outcome_unknown",
    "model_message",
    "reclassed",
    "refusal_text",
    "requires",
    "run_detached",
    "run_in_worker",
    "spec_failed",
    "tool_failure_text",
    "verdict_of_failure",
    "verdict_of_result",
]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

log = logging.getLogger("paymaster")

#: What a governed tool does with a refusal: ``"raise"`` ends the run with the
#: :class:`~paymaster.PolicyViolation`; ``"tell_model"`` hands the model the refusal as the
#: tool's output (still audited).
OnViolation = Literal["raise", "tell_model"]

#: The exceptions that end a run rather than being shown to the model: a refusal, the
#: ledger being unreachable, a tool's spec failing (a bug, not the model's mistake).
STOPS_THE_RUN: tuple[type[Exception], ...] = (PolicyViolation, GovernanceUnavailable, SpecError)


class CallInProgress(Protocol):
    """What the outcome helpers read of the call a ``guard`` (a
    :class:`~paymaster.GovernedCall`) or ``aguard`` block yields."""

    @property
    def reservation(self) -> Any: ...  # its ``resumed``: another attempt holds it too

    @property
    def estimate(self) -> Money: ...

    @property
    def hold_id(self) -> str: ...

    @property
    def unknown_on(self) -> tuple[type[BaseException], ...]: ...

    @property
    def resolved(self) -> bool: ...


# -- refusals that end the run ------------------------------------------------------------------
_RECLASSED: dict[tuple[type[BaseException], type[BaseException]], type[BaseException]] = {}
_reclassing = threading.Lock()


def reclassed(exc: E, base: type[BaseException]) -> E:
    """``exc`` itself, re-classed to a subclass of both its own class and ``base`` (a
    framework's "let this through" exception): ``except PolicyViolation`` still catches
    it, with the same message and fields, and it pickles as its own class. Unchanged if
    it already is a ``base``."""
    if isinstance(exc, base):
        return exc
    cls: type[BaseException] = type(exc)
    with _reclassing:
        passthrough = _RECLASSED.get((cls, base))
        if passthrough is None:
            namespace = {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__reduce__": lambda self: reduce_as(self, cls),  # pickles as ``cls``
            }
            passthrough = type(cls.__name__, (cls, base), namespace)
            _RECLASSED[(cls, base)] = passthrough
    exc.__class__ = passthrough  # type: ignore[assignment]
    return exc


class RunStopper:
    """An adapter's ``stop_the_run(exc) -> exc``: ``exc`` (one of :data:`STOPS_THE_RUN`)
    :func:`reclassed` to the exception its framework lets through every tool-error
    handler to the caller of the run, so the run ends with it.

    ``through`` returns that exception class, or ``None`` when the framework part that
    would catch tool errors is not installed (``exc`` is then returned unchanged);
    ``defaults``: attributes the framework expects on such an exception, set when
    missing. ``doc`` says how the framework handles tool errors.
    """

    def __init__(
        self,
        through: Callable[[], type[BaseException] | None],
        *,
        defaults: dict[str, Any] | None = None,
        doc: str | None = None,
    ) -> None:
        self._through = through
        self._defaults = dict(defaults or {})
        self.__doc__ = doc or RunStopper.__doc__

    def __call__(self, exc: E) -> E:
        base = self._through()
        if base is None or isinstance(exc, base):
            return exc
        exc = reclassed(exc, base)
        for name, value in self._defaults.items():
            if not hasattr(exc, name):
                setattr(exc, name, value)
        return exc


def refusal_text(violation: PolicyViolation, on_violation: OnViolation) -> str | None:
    """What the model is told about a refusal, or ``None`` when it ends the run instead:
    arguments the call cannot take (``invalid_request``) are always the model's to fix;
    any other refusal only with ``on_violation="tell_model"``."""
    if on_violation == "tell_model" or violation.code is ViolationCode.INVALID_REQUEST:
        return model_message(violation) or str(violation)
    return None


# -- outcomes -----------------------------------------------------------------------------------
def verdict_of_failure(
    call: CallInProgress,
    exc: BaseException,
    *,
    unknown_on: tuple[type[BaseException], ...],
    unknown_reason: str = "the tool failed",
    cause: BaseException | None = None,
) -> Verdict:
    """The verdict on a governed tool call whose tool raised ``exc``: ``cause`` (default
    ``exc``; say, the timeout a wrapper exception was raised from) classified against
    ``unknown_on``. A hold another attempt shares is never released. The reason recorded
    is ``exc``, after ``unknown_reason`` when the hold is kept ``unknown``."""
    failure = exc if cause is None else cause
    resolution = decide(failure, shared=call.reservation.resumed, unknown_on=unknown_on)
    if resolution is Resolution.UNKNOWN:
        return Verdict(resolution, reason=f"{unknown_reason}: {describe(exc)}")
    return Verdict(resolution, reason=describe(exc))


def verdict_of_result(spec: ToolSpec, call: CallInProgress, value: Any) -> Verdict:
    """The verdict on a governed tool call that returned ``value``: settled at what the
    spec's ``actual`` reads from it; kept ``unknown`` (``broken``) if ``actual`` raises."""
    try:
        actual = spec.actual_cost(value, call.estimate)
    except Exception as exc:  # the tool ran: its hold stays counted
        reason = f"the tool returned, but its spec's actual failed: {describe(exc)}"
        return Verdict(Resolution.UNKNOWN, reason=reason, broken=exc)
    return Verdict(decide(None), actual=actual)


def spec_failed(governor: Governor, tool: str, exc: Exception, **where: Any) -> SpecError:
    """A spec raised before anything was reserved: audited (``where``: the
    ``record_error`` fields of the call), logged, and returned as the
    :class:`~paymaster.SpecError` that ends the run."""
    error = f"the spec of tool {tool!r} raised {describe(exc)}"
    governor.record_error(error, **where)
    log.error("%s: nothing was reserved or run; the run stops", error, exc_info=exc)
    return SpecError(f"{error}; nothing was reserved or run", tool=tool)


def broken_spec(tool: str, call: CallInProgress, broken: Exception) -> SpecError:
    """The tool ran but its spec could not read what the call cost (``Verdict.broken``):
    logged, and returned as the :class:`~paymaster.SpecError` that ends the run; the hold
    is kept counted as ``unknown``."""
    log.error(
        "the spec of tool %r could not read what its call cost; hold %s is kept counted "
        "as unknown for reconciliation and the run stops",
        tool,
        call.hold_id,
        exc_info=broken,
    )
    return SpecError(
        f"the spec of tool {tool!r} could not read what its call cost "
        f"({describe(broken)}); hold {call.hold_id} is kept counted as unknown: "
        "reconcile it with the vendor",
        tool=tool,
        hold_id=call.hold_id,
    )


def elapsed_ms(started: float) -> int:
    """Milliseconds since ``started`` (a ``time.monotonic()`` reading)."""
    return int((time.monotonic() - started) * 1000)


# -- calls the caller stops waiting for ---------------------------------------------------------
class NotRun(PaymasterError):
    """The caller stopped waiting for the call before its tool started: the tool is not
    run, and its hold is released (nothing was sent)."""


def check_not_abandoned(abandoned: threading.Event | None, message: str) -> None:
    """Raise :class:`NotRun` (``message``) if ``abandoned`` is set: called once admitted,
    before the tool starts."""
    if abandoned is not None and abandoned.is_set():
        raise NotRun(message)


async def run_in_worker(
    governor: Governor, abandoned: threading.Event, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``fn`` (a whole call: reservation, tool, settle) in a governor worker thread.
    Cancelling the awaiting task ends it at once and sets ``abandoned``; work that has
    started runs to its recorded outcome."""
    try:
        return await governor.in_worker(fn, *args, **kwargs)
    except asyncio.CancelledError:
        abandoned.set()
        raise


# Tasks of tool calls whose caller stopped waiting: kept referenced until they end (the
# event loop holds its tasks weakly).
_DETACHED: set[asyncio.Task[Any]] = set()


async def run_detached(
    work: Coroutine[Any, Any, T],
    abandoned: threading.Event,
    on_abandoned: Callable[[asyncio.Task[T]], None] | None = None,
) -> T:
    """Run ``work`` (a whole call) as a task of its own, shielded from the cancellation of
    the awaiting task: cancelled, that task ends at once, ``abandoned`` is set (so that a
    tool not started yet is not started), ``on_abandoned`` gets the task, and ``work``
    runs on to its recorded outcome."""
    task = asyncio.ensure_future(work)
    _DETACHED.add(task)
    task.add_done_callback(_forget)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        abandoned.set()
        if on_abandoned is not None:
            on_abandoned(task)
        raise


def _forget(task: asyncio.Task[Any]) -> None:
    _DETACHED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: its outcome is in the ledger (and the log)
