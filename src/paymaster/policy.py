"""Policies: what an agent type may do with a vendor, and how a run narrows it.

A :class:`Policy` governs one agent type's calls to one vendor. A :class:`RunPolicy`
narrows it for one run (never widens: an attempt to widen raises :class:`PolicyError`
naming the field). :func:`effective_policy` combines the two into the
:class:`EffectivePolicy` every call is checked against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, NoReturn

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import storable
from .endpoints import InvalidPath, normalise_path, path_matches, pattern_covers, validate_pattern
from .errors import PolicyError, PolicyViolation, ViolationCode
from .money import MAX_AMOUNT, Money, is_currency

__all__ = ["EffectivePolicy", "Policy", "PolicySet", "RunPolicy", "effective_policy"]

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


#: No cap may exceed what the ledger counts (:data:`paymaster.money.MAX_AMOUNT`).
MAX_MINOR_UNITS = MAX_AMOUNT
#: The most calls a limit may allow: a billion a window is no limit at all in practice,
#: and keeps the ledger's call counters far inside their columns.
MAX_CALLS = 10**9
CallLimit = Annotated[int, Field(gt=0, le=MAX_CALLS)]


def _positive_cap(value: Money | None) -> Money | None:
    if value is not None:
        if value.amount <= 0:
            raise ValueError("must be positive")
        if value.amount > MAX_MINOR_UNITS:
            raise ValueError(f"must be at most {MAX_MINOR_UNITS} minor units")
    return value


def _money_field(value: Any, currency: str | None, field: str) -> Any:
    """Read a money value from a policy file: ``"25.00 USD"``, ``"25.00"`` or a number.

    Bare numbers are major units of the policy's currency. A YAML float such as ``25.5`` is
    read through its shortest decimal repr (what the user typed), never as binary float.
    """
    if value is None or isinstance(value, Money):
        return value
    if isinstance(value, dict):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an amount such as '25.00 USD'")
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, (int, Decimal)):
        if currency is None:
            raise ValueError(f"{field} needs a currency: write it as '{value} USD'")
        return Money.of(value, currency)
    if isinstance(value, str):
        return Money.parse(value, default_currency=currency)
    raise ValueError(f"{field} must be an amount such as '25.00 USD'")


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
            data["daily_cap"] = data.pop("daily_usd_cap")
        return data

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
    """

    vendor: str | None = None
    currency: str | None = None
    cap: Money | None = Field(default=None, validation_alias=AliasChoices("cap", "run_cap"))
    per_call_cap: Money | None = None
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

    @field_validator("cap", "per_call_cap", mode="before")
    @classmethod
    def _caps(cls, value: Any, info: ValidationInfo) -> Any:
        return _money_field(value, info.data.get("currency"), str(info.field_name))

    @field_validator("cap", "per_call_cap", mode="after")
    @classmethod
    def _positive(cls, value: Money | None) -> Money | None:
        return _positive_cap(value)


def _widen(field: str, detail: str) -> PolicyError:
    return PolicyError(f"run policy widens '{field}': {detail}; a run policy may only narrow")


class EffectivePolicy(BaseModel):
    """An agent type's policy narrowed by a run policy: what one call is checked against.

    Allowlists are kept as lists of lists: a call must pass every one of them, so the
    effective policy can never be wider than either part.
    """

    model_config = ConfigDict(frozen=True)

    policy_id: str
    agent: str
    vendor: str
    currency: str
    daily_cap: Money
    per_call_cap: Money | None
    max_calls_per_day: int | None
    run_cap: Money | None
    run_max_calls: int | None
    endpoint_allowlists: tuple[tuple[str, ...], ...]
    methods: tuple[str, ...] | None
    customer_allowlists: tuple[tuple[str, ...], ...]
    account_allowlists: tuple[tuple[str, ...], ...] = ((),)
    expires_at: datetime | None

    @cached_property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of these rules: which rules were in force."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def has_run_budget(self) -> bool:
        return self.run_cap is not None or self.run_max_calls is not None

    def check(
        self,
        *,
        endpoint: str,
        method: str,
        customer: str | None,
        estimate: Money,
        now: datetime,
        run: str | None = None,
        customer_checked_later: bool = False,
        accounts: Collection[str] = (),
    ) -> str:
        """The pure checks, in order: expiry, endpoint, method, customer, currency and
        per-call cap, then the connected ``accounts`` the call acts for or routes money to.
        Returns the canonical endpoint; raises :class:`PolicyViolation`.

        ``customer_checked_later`` lets a call with no customer pass a customer allowlist:
        only for a free read whose result never reaches the agent and is used to price
        another governed call, which is checked against the allowlist itself.
        """

        def deny(code: ViolationCode, message: str, remaining: Money | None = None) -> NoReturn:
            raise PolicyViolation(
                code, message, policy_id=self.policy_id, agent=self.agent, run=run,
                vendor=self.vendor, endpoint=endpoint, remaining=remaining,
            )  # fmt: skip

        if self.expires_at is not None and now >= self.expires_at:
            deny(ViolationCode.EXPIRED, f"policy {self.policy_id} expired at {self.expires_at}")
        try:
            path = normalise_path(endpoint)
        except InvalidPath as exc:
            deny(ViolationCode.ENDPOINT_NOT_ALLOWED, str(exc))
        for allowlist in self.endpoint_allowlists:
            if not any(path_matches(pattern, path) for pattern in allowlist):
                deny(
                    ViolationCode.ENDPOINT_NOT_ALLOWED,
                    f"{path} is not in the allowed endpoints {list(allowlist)}",
                )
        upper = method.upper()
        if self.methods is not None and upper not in self.methods:
            deny(ViolationCode.METHOD_NOT_ALLOWED, f"{upper} is not in {list(self.methods)}")
        for allowlist in self.customer_allowlists:
            if customer is None and customer_checked_later:
                break
            if customer is None:
                deny(
                    ViolationCode.CUSTOMER_NOT_ALLOWED,
                    "this policy has a customer allowlist, so the call must name its customer",
                )
            elif customer not in allowlist:
                deny(ViolationCode.CUSTOMER_NOT_ALLOWED, f"customer {customer} is not allowed")
        if estimate.currency != self.currency:
            deny(
                ViolationCode.CURRENCY_MISMATCH,
                f"the call is in {estimate.currency} but policy {self.policy_id} is in "
                f"{self.currency}",
            )
        if estimate.amount < 0:
            deny(ViolationCode.PER_CALL_CAP, "a call's estimated cost cannot be negative")
        if estimate > self.daily_cap:  # could never fit, and would overflow the ledger
            deny(
                ViolationCode.CAP_EXCEEDED,
                f"{estimate.format()} is above the whole daily cap of {self.daily_cap.format()}",
                self.daily_cap,
            )
        if self.per_call_cap is not None and estimate > self.per_call_cap:
            deny(
                ViolationCode.PER_CALL_CAP,
                f"{estimate.format()} is above the per-call cap of {self.per_call_cap.format()}",
                self.per_call_cap,
            )
        for account in sorted(accounts):
            for allowlist in self.account_allowlists:
                if account not in allowlist:
                    deny(
                        ViolationCode.ACCOUNT_NOT_ALLOWED,
                        f"the call acts for or pays connected account {account!r}, which "
                        f"policy {self.policy_id} does not list in 'accounts' "
                        f"({list(allowlist) or 'none'}); add it there to allow it",
                    )
        return path


def effective_policy(policy: Policy, run_policy: RunPolicy | None = None) -> EffectivePolicy:
    """Narrow ``policy`` by ``run_policy``; raise :class:`PolicyError` if it would widen."""
    rp = run_policy or RunPolicy()
    if rp.vendor is not None and rp.vendor != policy.vendor:
        raise PolicyError(
            f"run policy is for vendor {rp.vendor!r} but the policy is for {policy.vendor!r}"
        )
    if rp.currency is not None and rp.currency != policy.currency:
        raise PolicyError(
            f"run policy 'currency' is {rp.currency} but policy {policy.id} is in {policy.currency}"
        )
    for name in ("cap", "per_call_cap"):
        value: Money | None = getattr(rp, name)
        if value is not None and value.currency != policy.currency:
            raise PolicyError(
                f"run policy '{name}' is in {value.currency} but policy {policy.id} is in "
                f"{policy.currency}"
            )
    if rp.cap is not None and rp.cap > policy.daily_cap:
        raise _widen("cap", f"{rp.cap} is above the daily cap {policy.daily_cap}")
    per_call = policy.per_call_cap
    if rp.per_call_cap is not None:
        ceiling = policy.per_call_cap or policy.daily_cap
        if rp.per_call_cap > ceiling:
            raise _widen("per_call_cap", f"{rp.per_call_cap} is above {ceiling}")
        per_call = rp.per_call_cap
    if (
        rp.max_calls is not None
        and policy.max_calls_per_day is not None
        and rp.max_calls > policy.max_calls_per_day
    ):
        raise _widen("max_calls", f"{rp.max_calls} is above {policy.max_calls_per_day} a day")
    endpoint_lists = [policy.endpoints]
    if rp.endpoints is not None:
        for pattern in rp.endpoints:
            if not any(pattern_covers(outer, pattern) for outer in policy.endpoints):
                raise _widen("endpoints", f"{pattern} is not within {list(policy.endpoints)}")
        endpoint_lists.append(rp.endpoints)
    methods = policy.methods
    if rp.methods is not None:
        if policy.methods is not None:
            extra = sorted(set(rp.methods) - set(policy.methods))
            if extra:
                raise _widen("methods", f"{extra} not in {list(policy.methods)}")
        methods = rp.methods
    customer_lists = [c for c in (policy.customers,) if c is not None]
    if rp.customers is not None:
        if policy.customers is not None:
            extra = sorted(set(rp.customers) - set(policy.customers))
            if extra:
                raise _widen("customers", f"{extra} not in the policy's customers")
        customer_lists.append(rp.customers)
    account_lists = [policy.accounts]
    if rp.accounts is not None:
        extra = sorted(set(rp.accounts) - set(policy.accounts))
        if extra:
            raise _widen("accounts", f"{extra} not in the policy's accounts")
        account_lists.append(rp.accounts)
    expires = policy.expires_at
    if rp.expires_at is not None:
        if expires is not None and rp.expires_at > expires:
            raise _widen("expires_at", f"{rp.expires_at} is after {expires}")
        expires = rp.expires_at
    return EffectivePolicy(
        # As every hold and audit row stores it (PostgreSQL refuses a NUL in an id).
        policy_id=storable.field("policy_id", policy.id),
        agent=policy.agent,
        vendor=policy.vendor,
        currency=policy.currency,
        daily_cap=policy.daily_cap,
        per_call_cap=per_call,
        max_calls_per_day=policy.max_calls_per_day,
        run_cap=rp.cap,
        run_max_calls=rp.max_calls,
        endpoint_allowlists=tuple(endpoint_lists),
        methods=methods,
        customer_allowlists=tuple(customer_lists),
        account_allowlists=tuple(account_lists),
        expires_at=expires,
    )


class PolicySet:
    """The policies in force, at most one per (agent type, vendor)."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._by_key: dict[tuple[str, str], Policy] = {}
        ids: set[str] = set()
        for policy in policies:
            key = (policy.agent, policy.vendor)
            if key in self._by_key:
                raise PolicyError(
                    f"two policies govern agent {policy.agent!r} with vendor {policy.vendor!r}: "
                    f"{self._by_key[key].id!r} and {policy.id!r}; keep one"
                )
            if policy.id in ids:
                raise PolicyError(f"policy id {policy.id!r} is used twice; ids must be unique")
            ids.add(policy.id)
            self._by_key[key] = policy

    def get(self, agent: str, vendor: str) -> Policy | None:
        return self._by_key.get((agent, vendor))

    def require(self, agent: str, vendor: str, *, run: str | None = None) -> Policy:
        """The policy for this agent type and vendor, or a ``no_policy`` violation."""
        policy = self.get(agent, vendor)
        if policy is None:
            raise PolicyViolation(
                ViolationCode.NO_POLICY,
                f"no policy governs agent {agent!r} with vendor {vendor!r}; "
                "calls without a policy are refused",
                agent=agent, run=run, vendor=vendor,
            )  # fmt: skip
        return policy

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)
