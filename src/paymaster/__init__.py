"""paymaster: pre-call governance for the API calls AI agents make.

Policies say what an agent may spend and call; a shared ledger reserves every call's
estimated cost before the call leaves the process, with zero overshoot across threads,
tasks, processes and hosts; an audit log keeps one row per call.
"""

from .alerts import Alert, AlertConfig, AlertKind, AlertSink, CallbackSink, LoggingSink, WebhookSink
from .audit import AuditLog, AuditRecord, Outcome, RunSummary, VerifyResult
from .errors import (
    GovernanceUnavailable,
    HoldAlreadyResolved,
    HoldNotFound,
    PaymasterError,
    PolicyError,
    PolicyViolation,
    SchemaVersionError,
    SpecError,
    ViolationCode,
)
from .governor import GovernedCall, Governor
from .ledger import BudgetStatus, Hold, HoldState
from .loading import load_policies, load_run_policy
from .money import CurrencyMismatch, Money
from .policy import EffectivePolicy, Policy, PolicySet, RunPolicy, effective_policy
from .toolspec import FREE, FreeTool, ToolSpec

__version__ = "0.1.0"

__all__ = [
    "FREE",
    "Alert",
    "AlertConfig",
    "AlertKind",
    "AlertSink",
    "AuditLog",
    "AuditRecord",
    "BudgetStatus",
    "CallbackSink",
    "CurrencyMismatch",
    "EffectivePolicy",
    "FreeTool",
    "GovernanceUnavailable",
    "GovernedCall",
    "Governor",
    "Hold",
    "HoldAlreadyResolved",
    "HoldNotFound",
    "HoldState",
    "LoggingSink",
    "Money",
    "Outcome",
    "PaymasterError",
    "Policy",
    "PolicyError",
    "PolicySet",
    "PolicyViolation",
    "RunPolicy",
    "RunSummary",
    "SchemaVersionError",
    "SpecError",
    "ToolSpec",
    "VerifyResult",
    "ViolationCode",
    "WebhookSink",
    "__version__",
    "effective_policy",
    "load_policies",
    "load_run_policy",
]
