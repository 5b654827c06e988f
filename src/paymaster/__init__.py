"""paymaster: pre-call governance for the API calls AI agents make.

Policies say what an agent may spend and call; a shared ledger reserves every call's
estimated cost before the call leaves the process, with zero overshoot across threads,
tasks, processes and hosts; an audit log keeps one row per call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._alerts import (
        Alert,
        AlertConfig,
        AlertKind,
        AlertSink,
        CallbackSink,
        LoggingSink,
        WebhookSink,
    )
    from ._audit import (
        AuditFilter,
        AuditLog,
        AuditRecord,
        ChainHead,
        Checkpoint,
        CheckpointError,
        RunSummary,
        VerifyProblem,
        VerifyResult,
        load_key,
    )
    from ._db import (
        connect,
        ensure_schema,
    )
    from ._endpoints import (
        InvalidPath,
    )
    from ._errors import (
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
    from ._extras import (
        MissingExtra,
    )
    from ._governor import (
        AsyncGovernedCall,
        CallRequest,
        GovernedCall,
        Governor,
    )
    from ._grants import (
        grants_sql,
    )
    from ._ledger import (
        BudgetStatus,
        Hold,
        HoldState,
    )
    from ._loading import (
        load_policies,
        load_run_policy,
    )
    from ._money import (
        CurrencyMismatch,
        Money,
    )
    from ._outcome import Outcome
    from ._policy import (
        EffectivePolicy,
        Policy,
        PolicySet,
        RunPolicy,
        effective_policy,
    )
    from ._telemetry import (
        Telemetry,
        instrument,
        uninstrument,
    )
    from ._toolspec import (
        FREE,
        FreeTool,
        ToolSpec,
    )
    from ._vault import (
        NewVaultKey,
        VaultKey,
        VaultKeyError,
        VaultKeyNotFound,
        VaultKeyRefused,
        VaultKeys,
    )

__version__ = "0.1.0"

#: The stable API: everything else lives in private modules (``paymaster._ledger``, ...)
#: that may change in any release. ``paymaster.testing``, ``paymaster.vendors.stripe`` and
#: ``paymaster.integrations`` (for adapter authors) are public too. See docs/api.md.
__all__ = [
    "FREE",
    "Alert",
    "AlertConfig",
    "AlertKind",
    "AlertSink",
    "AsyncGovernedCall",
    "AuditFilter",
    "AuditLog",
    "AuditRecord",
    "BudgetStatus",
    "CallRequest",
    "CallbackSink",
    "ChainHead",
    "Checkpoint",
    "CheckpointError",
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
    "InvalidPath",
    "LoggingSink",
    "MissingExtra",
    "Money",
    "NewVaultKey",
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
    "Telemetry",
    "ToolSpec",
    "VaultKey",
    "VaultKeyError",
    "VaultKeyNotFound",
    "VaultKeyRefused",
    "VaultKeys",
    "VerifyProblem",
    "VerifyResult",
    "ViolationCode",
    "WebhookSink",
    "__version__",
    "connect",
    "effective_policy",
    "ensure_schema",
    "grants_sql",
    "instrument",
    "load_key",
    "load_policies",
    "load_run_policy",
    "uninstrument",
]

# The names above are imported on first use (PEP 562), not by ``import paymaster``: the
# ledger's modules pull in SQLAlchemy and pydantic, which a program that only imports the
# package (or runs ``paymaster --help``) should not wait for.
_SOURCES: dict[str, str] = {
    name: module
    for module, names in (
        (
            "_alerts",
            (
                "Alert",
                "AlertConfig",
                "AlertKind",
                "AlertSink",
                "CallbackSink",
                "LoggingSink",
                "WebhookSink",
            ),
        ),
        (
            "_audit",
            (
                "AuditFilter",
                "AuditLog",
                "AuditRecord",
                "ChainHead",
                "Checkpoint",
                "CheckpointError",
                "RunSummary",
                "VerifyProblem",
                "VerifyResult",
                "load_key",
            ),
        ),
        ("_db", ("connect", "ensure_schema")),
        ("_endpoints", ("InvalidPath",)),
        (
            "_errors",
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
        ),
        ("_extras", ("MissingExtra",)),
        ("_governor", ("AsyncGovernedCall", "CallRequest", "GovernedCall", "Governor")),
        ("_grants", ("grants_sql",)),
        ("_ledger", ("BudgetStatus", "Hold", "HoldState")),
        ("_loading", ("load_policies", "load_run_policy")),
        ("_money", ("CurrencyMismatch", "Money")),
        ("_outcome", ("Outcome",)),
        ("_policy", ("EffectivePolicy", "Policy", "PolicySet", "RunPolicy", "effective_policy")),
        ("_telemetry", ("Telemetry", "instrument", "uninstrument")),
        ("_toolspec", ("FREE", "FreeTool", "ToolSpec")),
        (
            "_vault",
            (
                "NewVaultKey",
                "VaultKey",
                "VaultKeyError",
                "VaultKeyNotFound",
                "VaultKeyRefused",
                "VaultKeys",
            ),
        ),
    )
    for name in names
}


if not TYPE_CHECKING:  # hidden from mypy, which checks the names imported above

    def __getattr__(name: str) -> Any:
        """``paymaster.Governor``, ``from paymaster import Governor``: imported on first
        use; a submodule (``paymaster._db``) too, as when the package imported them all."""
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
