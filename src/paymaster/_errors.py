"""The exceptions paymaster raises, each with a stable machine code.

Every exception paymaster raises to its callers derives from :class:`PaymasterError`
(and from the built-in class a caller may already catch, where there is one)::

    PaymasterError
    ├── PolicyViolation                 a call refused before it happened (``code``)
    │   └── InvalidStripeRequest        (also ValueError) a request Stripe would refuse
    ├── PolicyError                     (also ValueError) a policy that cannot be used
    ├── GovernanceUnavailable           the ledger cannot be reached: fail closed
    ├── SchemaVersionError              the database is at a schema this version cannot use
    ├── HoldNotFound                    (also LookupError)
    ├── HoldAlreadyResolved
    ├── SpecError                       a tool spec failed: a bug, not the model's mistake
    ├── CurrencyMismatch                (also ValueError) amounts in two currencies combined
    ├── InvalidPath                     (also ValueError) a path not in canonical form
    ├── StripeAmountError               (also ValueError) an amount Stripe cannot represent
    ├── CheckpointError                 (also ValueError) an unreadable audit checkpoint
    ├── MissingExtra                    (also ModuleNotFoundError) names the extra to install
    ├── VaultKeyError
    │   ├── VaultKeyNotFound            (also LookupError)
    │   └── VaultKeyRefused             a proxy request's key does not authenticate
    ├── NotRun                          an adapter's caller stopped waiting: tool not run
    └── UpstreamNotReached              (also httpx.TransportError) the proxy's upstream
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._money import Money

__all__ = [
    "GovernanceUnavailable",
    "HoldAlreadyResolved",
    "HoldNotFound",
    "PaymasterError",
    "PolicyError",
    "PolicyViolation",
    "SchemaVersionError",
    "ViolationCode",
]


class ViolationCode(str, Enum):
    """Why a governed call was refused. The values are stable: match on them."""

    NO_POLICY = "no_policy"
    CAP_EXCEEDED = "cap_exceeded"
    RUN_CAP_EXCEEDED = "run_cap_exceeded"
    PER_CALL_CAP = "per_call_cap"
    CALL_LIMIT = "call_limit"
    ENDPOINT_NOT_ALLOWED = "endpoint_not_allowed"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CUSTOMER_NOT_ALLOWED = "customer_not_allowed"
    CURRENCY_MISMATCH = "currency_mismatch"
    EXPIRED = "expired"
    REVOKED = "revoked"
    ALREADY_COMPLETED = "already_completed"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    UNKNOWN_OPERATION = "unknown_operation"
    """The vendor call is not one paymaster knows how to govern, so it is refused."""
    INVALID_REQUEST = "invalid_request"
    """The call could not be priced from what it sends (a missing or malformed amount)."""
    ESTIMATE_REQUIRED = "estimate_required"
    """The policy has a cap but the call carries no estimate and is not declared free."""
    BUDGET_FROZEN = "budget_frozen"
    """A call on this budget settled above its reservation; an operator must acknowledge
    the overrun (``Governor.acknowledge_overrun`` or ``paymaster holds acknowledge``)."""
    RUN_POLICY_WIDENED = "run_policy_widened"
    """A run policy tried to raise a limit its run's budget already has."""
    SUBJECT_BUSY = "subject_busy"
    """Another call changing the same object (an invoice being finalized, say) is in
    flight; retry once it has ended."""
    STALE_PRICE = "stale_price"
    """The object a call was priced from changed before the call was sent; retry, and it
    is priced again."""
    ACCOUNT_NOT_ALLOWED = "account_not_allowed"
    """The call acts for, or routes money to, a connected account the policy does not
    list in ``accounts``."""

    def __str__(self) -> str:
        return self.value


class PaymasterError(Exception):
    """Base class of every paymaster exception."""


class PolicyViolation(PaymasterError):
    """A governed call was refused before it happened.

    ``code`` is a :class:`ViolationCode`; ``remaining`` is what is left of the budget
    that refused the call (``None`` when no budget was involved).
    """

    def __init__(
        self,
        code: ViolationCode,
        message: str,
        *,
        policy_id: str | None = None,
        agent: str | None = None,
        run: str | None = None,
        vendor: str | None = None,
        endpoint: str | None = None,
        remaining: Money | None = None,
        calls_remaining: int | None = None,
    ) -> None:
        super().__init__(f"[{code.value}] {message}")
        self.code = code
        self.message = message
        self.policy_id = policy_id
        self.agent = agent
        self.run = run
        self.vendor = vendor
        self.endpoint = endpoint
        self.remaining = remaining
        self.calls_remaining = calls_remaining

    def __reduce__(self) -> tuple[object, ...]:
        # Keep violations picklable across process pools with their keyword fields.
        return (_rebuild_violation, (type(self), self.code, self.message, dict(self.__dict__)))


def _rebuild_violation(
    cls: type[PolicyViolation], code: ViolationCode, message: str, state: dict[str, object]
) -> PolicyViolation:
    violation = cls.__new__(cls)  # subclasses may have another __init__ signature
    PolicyViolation.__init__(violation, code, message)
    violation.__dict__.update(state)
    return violation


def _restore_exception(
    cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]
) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def reduce_as(
    exc: BaseException, cls: type[BaseException], *, drop: tuple[str, ...] = ("run_data",)
) -> tuple[object, ...]:
    """Pickle ``exc`` as an instance of ``cls``: for the subclasses adapters make at run
    time so that a framework lets a refusal through (they cannot be found by name)."""
    state = {key: value for key, value in exc.__dict__.items() if key not in drop}
    if isinstance(exc, PolicyViolation):
        return (_rebuild_violation, (cls, exc.code, exc.message, state))
    return (_restore_exception, (cls, exc.args, state))


class GovernanceUnavailable(PaymasterError):
    """The ledger could not be reached or written: the call did not happen (fail closed)."""


class PolicyError(PaymasterError, ValueError):
    """A policy, run policy or policy file is invalid, or an agent type given when tools are
    wrapped is one no policy names; the message names where and what."""


class SchemaVersionError(PaymasterError):
    """The database schema is not one this version of paymaster can use."""


class HoldNotFound(PaymasterError, LookupError):
    """No hold has the given id."""


class SpecError(PaymasterError):
    """A tool's spec (its ``estimate``, ``customer``, ``endpoint`` or ``actual``) raised or
    returned something unusable: a programming error, not the model's. It ends the run the
    way a :class:`PolicyViolation` does. ``hold_id`` names the hold that stays counted when
    the tool had already run (``None`` when nothing was reserved)."""

    def __init__(self, message: str, *, tool: str | None = None, hold_id: str | None = None):
        super().__init__(message)
        self.tool = tool
        self.hold_id = hold_id


class HoldAlreadyResolved(PaymasterError):
    """A hold was settled, released or resolved already; a hold resolves exactly once."""
