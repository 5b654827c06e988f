"""The one rule that decides what a failed or cancelled call does to its hold.

A hold may be **released** (its estimate freed) only when no attempt under it can have
moved money. Everything else keeps it counted: **unknown** (flagged for reconciliation),
or, for a call that returned, **settled**. Every path that ends a governed call asks
:func:`decide`: the governor's ``guard``/``aguard`` blocks, the Stripe transport, and
both framework adapters. The ledger enforces the shared-hold half of the rule as well (a
hold that more than one attempt holds is never released by one of them), so a caller that
gets this wrong still cannot free money another attempt may be spending.

It also says what a failed tool call tells the model (:func:`model_message`), so that no
adapter needs a vendor module for it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ._errors import GovernanceUnavailable, PolicyViolation, SpecError, ViolationCode

__all__ = [
    "OUTCOME_UNKNOWN_EXCEPTIONS",
    "Resolution",
    "Verdict",
    "decide",
    "describe",
    "http_status_of",
    "is_outcome_unknown",
    "model_message",
    "resolution_of_status",
    "tool_failure_text",
]


class Resolution(str, Enum):
    """What an attempt does to its hold."""

    SETTLE = "settle"
    """The call returned: spend its actual cost."""
    RELEASE = "release"
    """Nothing this attempt did can have moved money: free its share of the hold."""
    UNKNOWN = "unknown"
    """Money may have moved: keep the hold counted and flag it for reconciliation."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    """What one call does to its hold: its :class:`Resolution`, the actual cost of a
    settle, the reason recorded otherwise. ``broken`` is the exception of a spec whose
    ``actual`` raised or returned something unusable (the hold is then kept unknown)."""

    resolution: Resolution
    actual: Any = None
    reason: str = ""
    broken: Exception | None = None


#: Exceptions after which nobody knows whether the vendor call moved money.
OUTCOME_UNKNOWN_EXCEPTIONS: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
    TimeoutError,
    # Sockets, TLS and HTTP framing failing mid-request (ConnectionResetError, SSLEOFError,
    # BadStatusLine, ...): the request may have been processed.
    OSError,
    http.client.HTTPException,
    # A spec that failed after the tool ran: the tool may have paid.
    SpecError,
)

# HTTP clients' own timeout and connection-lost errors mostly do not derive from the
# built-ins (requests' ReadTimeout and ConnectionError, httpx's ReadTimeout and ReadError,
# urllib3's ProtocolError, http.client's IncompleteRead, Stripe's and OpenAI's
# APIConnectionError / APITimeoutError); the core cannot import them, so they are
# recognised by class name. Err towards "unknown": a wrong "unknown" keeps budget counted
# until someone reconciles it, a wrong release can let the cap be overshot.
_UNKNOWN_NAME_PARTS = (
    "Timeout",
    "ConnectionError",
    "ProtocolError",
    "Disconnected",
    "ReadError",
    "IncompleteRead",
    "ChunkedEncoding",
    "PayloadError",
    "ConnectionClosed",
    "BadStatusLine",
)


def is_outcome_unknown(
    exc: BaseException, extra: tuple[type[BaseException], ...] = OUTCOME_UNKNOWN_EXCEPTIONS
) -> bool:
    """Whether an exception leaves it unknown if the vendor acted (timeouts, cancellation,
    a lost connection, the process exiting, a spec failing after the tool ran, a vendor's
    error answer whose HTTP status is not a 4xx refusal)."""
    if isinstance(exc, extra):
        return True
    # A vendor SDK's error for a 5xx answer (stripe.APIError, an HTTP client's status
    # error) is an ordinary exception: its status says the vendor may have acted.
    status = http_status_of(exc)
    if status is not None and resolution_of_status(status) is Resolution.UNKNOWN:
        return True
    return any(
        part in klass.__name__ for klass in type(exc).__mro__ for part in _UNKNOWN_NAME_PARTS
    )


def http_status_of(exc: BaseException) -> int | None:
    """The HTTP status of the vendor's answer an exception reports, if it carries one:
    ``http_status`` (Stripe's errors), ``status_code`` (OpenAI's), ``status`` (aiohttp's),
    or its ``response``'s ``status_code`` (requests', httpx')."""
    found = [_attribute(exc, name) for name in ("http_status", "status_code", "status")]
    response = _attribute(exc, "response")
    if response is not None:
        found += [_attribute(response, "status_code"), _attribute(response, "status")]
    for status in found:
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
            return status
    return None


def _attribute(thing: object, name: str) -> Any:
    try:
        return getattr(thing, name, None)
    except Exception:  # a property that raises (httpx's ``request`` when unset, say)
        return None


def decide(
    failure: BaseException | None,
    *,
    attempted: bool = False,
    shared: bool = False,
    moves_money: bool = True,
    unknown_on: tuple[type[BaseException], ...] = OUTCOME_UNKNOWN_EXCEPTIONS,
) -> Resolution:
    """What a call that ended with ``failure`` does to its hold.

    ``failure`` is the exception the call ended with (``None``: it returned, and its
    outcome is read from its result). ``attempted``: recording an outcome was already
    tried and failed (the vendor call had returned, so its actual is not known).
    ``shared``: the hold was found by its idempotency key, so another attempt holds it
    too and may have paid. ``moves_money``: ``False`` for an operation declared free,
    whose failure never leaves anything to reconcile.
    """
    if failure is None:
        return Resolution.UNKNOWN if attempted else Resolution.SETTLE
    if not moves_money:
        return Resolution.RELEASE
    if attempted or shared or is_outcome_unknown(failure, unknown_on):
        return Resolution.UNKNOWN
    return Resolution.RELEASE


def describe(exc: BaseException, limit: int = 500) -> str:
    """An exception as a hold's audit row records it: its class and message, cut to
    ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:limit]


def resolution_of_status(status: int) -> Resolution:
    """What an HTTP answer from a vendor means for money, before its body is read: a 2xx
    settles; a 4xx is a refusal after which nothing moved (release); anything else (5xx,
    1xx, 3xx) may have acted."""
    if 200 <= status < 300:
        return Resolution.SETTLE
    if 400 <= status < 500:
        return Resolution.RELEASE
    return Resolution.UNKNOWN


def model_message(exc: BaseException) -> str | None:
    """What a model is told when a tool call fails in a way it can act on (bad arguments,
    the vendor refusing the call, a policy refusal in "tell the model" mode); ``None`` for
    anything else, which the adapter lets propagate. Vendor errors are recognised by
    shape (an ``http_status`` and a ``user_message``), so no vendor library is imported."""
    if isinstance(exc, PolicyViolation) and exc.code is ViolationCode.INVALID_REQUEST:
        return f"Invalid request, nothing was sent: {exc.message}"
    if isinstance(exc, PolicyViolation):
        return (
            f"Refused by the spending policy [{exc.code.value}]: {exc.message}. The call was "
            "not made. Do not retry it; change the request or stop."
        )
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):  # pydantic's
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'arguments'}: {error['msg']}"
            for error in _validation_errors(errors)
        )
        return f"Invalid arguments, nothing was sent: {problems}"
    if isinstance(exc, json.JSONDecodeError):
        return f"The arguments are not valid JSON ({exc.msg}); nothing was sent."
    status, user_message = getattr(exc, "http_status", None), getattr(exc, "user_message", None)
    if isinstance(status, int) and user_message is not None:  # stripe.StripeError's shape
        code = getattr(exc, "code", None)
        detail = f" {code}" if code else ""
        vendor = type(exc).__module__.split(".")[0].capitalize() or "The vendor"
        return f"{vendor} refused the call (HTTP {status}{detail}): {user_message}"
    return None


def _validation_errors(errors: Any) -> list[dict[str, Any]]:
    try:
        found = errors()
    except Exception:  # not pydantic's after all
        return []
    return [e for e in found if isinstance(e, dict) and "loc" in e and "msg" in e]


def tool_failure_text(exc: Exception, *, tell_model_violations: bool) -> str | None:
    """What a failed tool call hands the model as its result, or ``None`` when the
    exception must end the run instead: a policy refusal (unless
    ``tell_model_violations``), the ledger being unavailable, a broken spec, or an
    unexpected error. Arguments the vendor would refuse (``invalid_request``) always go to
    the model to fix."""
    if isinstance(exc, PolicyViolation) and exc.code is not ViolationCode.INVALID_REQUEST:
        return model_message(exc) if tell_model_violations else None
    if isinstance(exc, (GovernanceUnavailable, SpecError)):
        return None
    return model_message(exc)
