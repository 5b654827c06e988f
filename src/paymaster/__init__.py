"""paymaster: pre-call governance for the API calls AI agents make.

Policies say what an agent may spend and call; a shared ledger reserves every call's
estimated cost before the call leaves the process, with zero overshoot across threads,
tasks, processes and hosts; an audit log keeps one row per call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .alerts import (
        Alert,
        AlertConfig,
        AlertKind,
        AlertSink,
        CallbackSink,
        LoggingSink,
        WebhookSink,
    )
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

# The names above are imported on first use (PEP 562), not by ``import paymaster``: the
# ledger's modules pull in SQLAlchemy and pydantic, which a program that only imports the
# package (or runs ``paymaster --help``) should not wait for.
_SOURCES: dict[str, str] = {
    **dict.fromkeys(
        (
            "Alert",
            "AlertConfig",
            "AlertKind",
            "AlertSink",
            "CallbackSink",
            "LoggingSink",
            "WebhookSink",
        ),
        "alerts",
    ),
    **dict.fromkeys(("AuditLog", "AuditRecord", "RunSummary", "VerifyResult"), "audit"),
    "Outcome": "_outcome",
    **dict.fromkeys(
        (
            "GovernanceUnavailable",
            "HoldAlreadyResolved",
            "HoldNotFound",
            "PaymasterError",
            "PolicyError",
            "PolicyViolation",
            "SchemaVersionError",
            "SpecError",
            "ViolationCode",
        ),
        "errors",
    ),
    **dict.fromkeys(("GovernedCall", "Governor"), "governor"),
    **dict.fromkeys(("BudgetStatus", "Hold", "HoldState"), "ledger"),
    **dict.fromkeys(("load_policies", "load_run_policy"), "loading"),
    **dict.fromkeys(("CurrencyMismatch", "Money"), "money"),
    **dict.fromkeys(
        ("EffectivePolicy", "Policy", "PolicySet", "RunPolicy", "effective_policy"), "policy"
    ),
    **dict.fromkeys(("FREE", "FreeTool", "ToolSpec"), "toolspec"),
}


if not TYPE_CHECKING:  # hidden from mypy, which checks the names imported above

    def __getattr__(name: str) -> Any:
        """``paymaster.Governor``, ``from paymaster import Governor``: imported on first
        use; a submodule (``paymaster.db``) too, as when the package imported them all."""
        source = _SOURCES.get(name)
        if source is not None:
            value = getattr(importlib.import_module(f".{source}", __name__), name)
        elif name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
