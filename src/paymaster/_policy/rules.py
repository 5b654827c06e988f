"""The policy models as a policy file declares them: :class:`Policy` (one agent type with
one vendor) and :class:`RunPolicy` (one run's narrowing), and their validation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from .. import _storable as storable
from .._endpoints import validate_pattern
from .._money import Money, is_currency
from .amounts import (
    _bare_amount,
    _is_bare,
    _mark_unknown_currency,
    _money_field,
    _positive_cap,
)

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

#: The most calls a limit may allow: a billion a window is no limit at all in practice,
#: and keeps the ledger's call counters far inside their columns.
MAX_CALLS = 10**9
CallLimit = Annotated[int, Field(gt=0, le=MAX_CALLS)]


def _clean_strings(values: Sequence[str] | None, field: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise ValueError(f"{field} must be a list, e.g. [{values!r}]")
    if not isinstance(values, (list, tuple)):
        # A TypeError from iterating would escape pydantic as a raw exception.
        raise ValueError(f"{field} must be a list of strings, got {type(values).__name__}")
    cleaned = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{field} entries must be non-empty strings")
        cleaned.append(value.strip())
    return tuple(cleaned)


class _Rules(BaseModel):
    """Validation shared by agent-type and run policies."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("endpoints", mode="before", check_fields=False)
    @classmethod
    def _endpoints(cls, value: Any) -> Any:
        cleaned = _clean_strings(value, "endpoints")
        if cleaned is None:
            return None
        if not cleaned:
            raise ValueError("endpoints must name at least one path, e.g. ['/v1/refunds']")
        return tuple(validate_pattern(p) for p in cleaned)

    @field_validator("methods", mode="before", check_fields=False)
    @classmethod
    def _methods(cls, value: Any) -> Any:
        cleaned = _clean_strings(value, "methods")
        if cleaned is None:
            return None
        upper = tuple(m.upper() for m in cleaned)
        unknown = [m for m in upper if m not in HTTP_METHODS]
        if unknown:
            raise ValueError(f"unknown HTTP method(s) {unknown}; use {sorted(HTTP_METHODS)}")
        return upper

    @field_validator("customers", mode="before", check_fields=False)
    @classmethod
    def _customers(cls, value: Any) -> Any:
        return _clean_strings(value, "customers")

    @field_validator("accounts", mode="before", check_fields=False)
    @classmethod
    def _accounts(cls, value: Any) -> Any:
        return _clean_strings(value, "accounts")

    @field_validator("currency", mode="before", check_fields=False)
    @classmethod
    def _currency(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None:
            if cls.model_fields[str(info.field_name)].is_required():
                raise ValueError("is required: an ISO 4217 currency code such as 'USD'")
            return None
        code = str(value).strip().upper()
        if not is_currency(code):
            raise ValueError(f"{value!r} is not an ISO 4217 currency code (e.g. 'USD', 'JPY')")
        return code

    @field_validator("expires_at", mode="after", check_fields=False)
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(timezone.utc) if value is not None else None


class Policy(_Rules):
    """The rules for one agent type's calls to one vendor.

    ``daily_cap`` bounds pending plus settled spend per UTC day; ``per_call_cap`` bounds a
    single call's estimate; ``max_calls_per_day`` bounds the number of calls. ``endpoints``
    is a segment-aware allowlist; ``methods`` and ``customers`` are allowlists where
    ``None`` means any. A policy past ``expires_at`` refuses every call.
    """

    # Bounded as the ledger stores them, so a policy that loads is one the ledger can
    # name in full in every hold and audit row.
    id: str = Field(default="", max_length=storable.limit("policy_id"))
    agent: str = Field(
        validation_alias=AliasChoices("agent", "agent_type", "agent_id"),
        max_length=storable.limit("agent"),
    )
    vendor: str = Field(max_length=storable.limit("vendor"))
    currency: str
    daily_cap: Money
    per_call_cap: Money | None = None
    max_calls_per_day: CallLimit | None = None
    endpoints: tuple[str, ...] = Field(
        validation_alias=AliasChoices("endpoints", "allowed_endpoints")
    )
    methods: tuple[str, ...] | None = Field(
        default=None, validation_alias=AliasChoices("methods", "allowed_methods")
    )
    customers: tuple[str, ...] | None = Field(
        default=None,
        validation_alias=AliasChoices("customers", "allowed_customers", "allowed_customer_ids"),
    )
    accounts: tuple[str, ...] = Field(
        default=(), validation_alias=AliasChoices("accounts", "allowed_accounts")
    )
    """Connected accounts (a vendor's sub-accounts: Stripe's ``Stripe-Account`` header,
    ``transfer_data[destination]``, ``on_behalf_of``) the agent may act for or route money
    to. None by default: a call naming any account is refused (``account_not_allowed``)."""
    expires_at: AwareDatetime | None = None
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _blog_shape(cls, data: Any) -> Any:
        """Accept the common blog-post field ``daily_usd_cap`` (a USD daily cap)."""
        if isinstance(data, dict) and "daily_usd_cap" in data:
            data = dict(data)
            if "daily_cap" in data:
                raise ValueError("give either daily_cap or daily_usd_cap, not both")
            currency = str(data.setdefault("currency", "USD")).upper()
            if currency != "USD":
                raise ValueError(f"daily_usd_cap is in USD but currency is {currency}")
            if isinstance(data["daily_usd_cap"], float):
                # Named here: once moved, the field's own error would say daily_cap.
                _money_field(data["daily_usd_cap"], "USD", "daily_usd_cap")
            data["daily_cap"] = data.pop("daily_usd_cap")
        return _mark_unknown_currency(data, ("daily_cap", "per_call_cap"))

    @field_validator("agent", "vendor")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("daily_cap", "per_call_cap", mode="before")
    @classmethod
    def _caps(cls, value: Any, info: ValidationInfo) -> Any:
        return _money_field(value, info.data.get("currency"), str(info.field_name))

    @field_validator("daily_cap", "per_call_cap", mode="after")
    @classmethod
    def _positive(cls, value: Money | None, info: ValidationInfo) -> Money | None:
        currency = info.data.get("currency")
        value = _positive_cap(value)
        if value is not None and currency and value.currency != currency:
            raise ValueError(f"is in {value.currency} but the policy's currency is {currency}")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Policy:
        if not self.id:
            object.__setattr__(self, "id", f"{self.agent}/{self.vendor}")
        if self.per_call_cap is not None and self.per_call_cap > self.daily_cap:
            raise ValueError("per_call_cap is above daily_cap: no call could ever use it all")
        return self


class RunPolicy(_Rules):
    """A tighter policy for one run: every field narrows the agent type's policy.

    ``cap`` and ``max_calls`` are the run's own budget (across its whole life, not per
    day); a call counts against both the run's budget and the type's daily one.

    Amounts are written as in a :class:`Policy`: ``"10.00 USD"``, or without a currency
    (``"10.00"``, ``10``) in the run policy's ``currency`` when it has one, else in the
    currency of the policy it narrows (kept as a ``Decimal`` of major units until
    :func:`effective_policy` resolves it; an amount in another currency is refused there).
    """

    vendor: str | None = None
    currency: str | None = None
    cap: Money | Decimal | None = Field(
        default=None, validation_alias=AliasChoices("cap", "run_cap")
    )
    per_call_cap: Money | Decimal | None = None
    max_calls: CallLimit | None = None
    endpoints: tuple[str, ...] | None = Field(
        default=None, validation_alias=AliasChoices("endpoints", "allowed_endpoints")
    )
    methods: tuple[str, ...] | None = Field(
        default=None, validation_alias=AliasChoices("methods", "allowed_methods")
    )
    customers: tuple[str, ...] | None = Field(
        default=None,
        validation_alias=AliasChoices("customers", "allowed_customers", "allowed_customer_ids"),
    )
    accounts: tuple[str, ...] | None = Field(
        default=None, validation_alias=AliasChoices("accounts", "allowed_accounts")
    )
    expires_at: AwareDatetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _unknown_currency(cls, data: Any) -> Any:
        return _mark_unknown_currency(data, ("cap", "run_cap", "per_call_cap"))

    @field_serializer("cap", "per_call_cap", mode="wrap", when_used="json")
    def _plain_amount(
        self, value: Money | Decimal | None, handler: SerializerFunctionWrapHandler
    ) -> Any:
        # An amount without a currency is written as plain digits ("100.00", never
        # "1E+2"), the form it is read back from (a vault key stores its run policy so).
        if isinstance(value, Decimal):
            return format(value, "f")
        return handler(value)

    @field_validator("cap", "per_call_cap", mode="before")
    @classmethod
    def _caps(cls, value: Any, info: ValidationInfo) -> Any:
        currency = info.data.get("currency")
        if currency is None and _is_bare(value):
            # No currency here: the amount is in the currency of the policy it narrows.
            return _bare_amount(value, str(info.field_name))
        return _money_field(value, currency, str(info.field_name))

    @field_validator("cap", "per_call_cap", mode="after")
    @classmethod
    def _positive(cls, value: Money | Decimal | None) -> Money | Decimal | None:
        if isinstance(value, Decimal):
            if value <= 0:
                raise ValueError("must be positive")
            return value
        return _positive_cap(value)
