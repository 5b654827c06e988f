"""Policies: what an agent type may do with a vendor, and how a run narrows it.

A :class:`Policy` governs one agent type's calls to one vendor. A :class:`RunPolicy`
narrows it for one run (never widens: an attempt to widen raises :class:`PolicyError`
naming the field). :func:`effective_policy` combines the two into the
:class:`EffectivePolicy` every call is checked against.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from . import _storable as storable
from ._endpoints import InvalidPath, normalise_path, path_matches, pattern_covers, validate_pattern
from ._errors import PolicyError, PolicyViolation, ViolationCode
from ._money import CURRENCY_EXPONENTS, MAX_AMOUNT, Money, is_currency, major_units

__all__ = ["EffectivePolicy", "Policy", "PolicySet", "RunPolicy", "effective_policy"]

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


#: No cap may exceed what the ledger counts (:data:`paymaster._money.MAX_AMOUNT`).
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


@dataclass(frozen=True)
class _AmountInUnknownCurrency:
    """A bare amount of a policy whose ``currency`` is no ISO 4217 code (only while it is
    validated): its error names that code instead of claiming the amount has none."""

    value: Any
    currency: Any

    def __repr__(self) -> str:
        return repr(self.value)


def _mark_unknown_currency(data: Any, fields: Collection[str]) -> Any:
    """Wrap the bare amounts of ``fields`` in :class:`_AmountInUnknownCurrency` when the raw
    ``currency`` is given but unknown (the currency field reports its own error)."""
    if not isinstance(data, dict) or data.get("currency") is None:
        return data
    currency = data["currency"]
    if is_currency(str(currency).strip().upper()):
        return data
    marked = dict(data)
    for field in fields:
        value = marked.get(field)
        bare = isinstance(value, str) and not any(c.isalpha() for c in value)
        if bare or (isinstance(value, (int, Decimal)) and not isinstance(value, bool)):
            marked[field] = _AmountInUnknownCurrency(value, currency)
    return marked


def _money_field(value: Any, currency: str | None, field: str) -> Any:
    """Read a money value from a policy file: ``"25.00 USD"``, ``"25.00"`` or an int.

    Bare amounts are major units of the policy's currency (``100`` is $100 in a USD
    policy). A float is refused: YAML, JSON and TOML read an unquoted ``100.00`` as one,
    and a float keeps only about 16 digits of what was typed.
    """
    if value is None or isinstance(value, Money):
        return value
    if isinstance(value, dict):
        return value
    if isinstance(value, _AmountInUnknownCurrency):
        raise ValueError(
            f"unknown currency {value.currency!r}: {field} {value.value!r} is in the "
            "policy's currency, which must be an ISO 4217 code such as 'USD', 'EUR' or 'JPY'"
        )
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an amount such as '25.00 USD'")
    if isinstance(value, float):
        raise ValueError(
            f"{field} is the number {value!r}, read as a binary float: money must not be "
            f'a float; quote it, as in {field}: "{_typed(value, currency)}"'
        )
    if isinstance(value, (int, Decimal)):
        if currency is None:
            raise ValueError(f"{field} needs a currency: write it as '{value} USD'")
        return Money.of(value, currency)
    if isinstance(value, str):
        return Money.parse(value, default_currency=currency)
    raise ValueError(f"{field} must be an amount such as '25.00 USD'")


def _typed(value: float, currency: str | None) -> str:
    """``value`` as the text to quote: ``100.0`` in USD is ``100.00``."""
    text = repr(value)
    if currency is None or not is_currency(currency) or not text.replace(".", "").isdigit():
        return text  # no currency to format for, or nan, inf, 1e+20, a sign
    exponent = CURRENCY_EXPONENTS[currency]
    decimal = Decimal(text)
    if decimal != round(decimal, exponent):
        return text  # more decimals than the currency has: its own error says so
    return f"{decimal:.{exponent}f}"


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


def _is_bare(value: Any) -> bool:
    """An amount written without a currency (``"10.00"``, ``10``, ``Decimal("10")``)."""
    if isinstance(value, str):
        return not any(c.isalpha() for c in value)
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


def _bare_amount(value: str | int | Decimal, field: str) -> Decimal:
    """A run policy's amount without a currency, as a ``Decimal`` of major units."""
    try:
        return major_units(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: {exc}") from None


def _resolved(policy: Policy, field: str, value: Money | Decimal | None) -> Money | None:
    """A run policy amount in ``policy``'s currency: a bare amount takes it; an amount in
    another currency is refused."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        try:
            return _positive_cap(Money.of(value, policy.currency))
        except ValueError as exc:
            raise PolicyError(
                f"run policy '{field}' {value} is read in {policy.currency}, the currency of "
                f"policy {policy.id}: {exc}"
            ) from None
    if value.currency != policy.currency:
        raise PolicyError(
            f"run policy '{field}' is in {value.currency} ({value}) but policy {policy.id} is in "
            f"{policy.currency}: a run policy narrows its policy in the policy's currency; "
            f"write it in {policy.currency} or without a currency (as in "
            f"'{str(value).split()[0]}')"
        )
    return value


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
                code,
                message,
                policy_id=self.policy_id,
                agent=self.agent,
                run=run,
                vendor=self.vendor,
                endpoint=endpoint,
                remaining=remaining,
            )

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
    run_cap = _resolved(policy, "cap", rp.cap)
    run_per_call = _resolved(policy, "per_call_cap", rp.per_call_cap)
    if run_cap is not None and run_cap > policy.daily_cap:
        raise _widen("cap", f"{run_cap} is above the daily cap {policy.daily_cap}")
    per_call = policy.per_call_cap
    if run_per_call is not None:
        ceiling = policy.per_call_cap or policy.daily_cap
        if run_per_call > ceiling:
            raise _widen("per_call_cap", f"{run_per_call} is above {ceiling}")
        per_call = run_per_call
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
        run_cap=run_cap,
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

    @property
    def agents(self) -> list[str]:
        """The agent types the policies name, sorted."""
        return sorted({agent for agent, _ in self._by_key})

    def check_agent(self, agent: str) -> str:
        """``agent`` when a policy names it as its agent type (or there are no policies to
        check it against); else a :class:`PolicyError` that lists the agent types the
        policies know and suggests the nearest. For code that is given an agent type
        before any call is made (the adapters, when tools are wrapped), so that a typo or
        a display name fails there instead of as the first call's ``no_policy``."""
        if not self._by_key or agent in self.agents:
            return agent
        raise PolicyError(
            f"no policy names agent type {agent!r}, so every governed call as it would be "
            f"refused (no_policy); {_known_agents(self.agents, agent)}"
        )

    def require(self, agent: str, vendor: str, *, run: str | None = None) -> Policy:
        """The policy for this agent type and vendor, or a ``no_policy`` violation that
        says which agent types (or, for a known one, which vendors) the policies know."""
        policy = self.get(agent, vendor)
        if policy is None:
            message = (
                f"no policy governs agent {agent!r} with vendor {vendor!r}; calls without a "
                "policy are refused"
            )
            vendors = sorted(v for a, v in self._by_key if a == agent)
            if vendors:
                message += f"; agent {agent!r} has policies for {_listed('vendor', vendors)}"
            elif self._by_key:
                known = self.agents
                suggestion = _nearest(agent, known)
                fix = f"agent={suggestion!r}" if suggestion else "agent= naming one of them"
                message += (
                    f". The policies know {_listed('agent type', known)}. Where the agent "
                    "type is the agent's name (no agent= given when its tools were wrapped), "
                    f"pass {fix} there, or name the agent so"
                )
            else:
                message += "; no policies are loaded"
            raise PolicyViolation(
                ViolationCode.NO_POLICY, message, agent=agent, run=run, vendor=vendor
            )
        return policy

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


#: How many names an error message lists before it says how many more there are.
_LISTED = 10


def _listed(what: str, names: Sequence[str]) -> str:
    """``agent types 'a', 'b'`` (at most :data:`_LISTED` of them)."""
    shown = ", ".join(map(repr, names[:_LISTED]))
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{what}{'s' if len(names) != 1 else ''} {shown}{more}"


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", name.casefold()).strip("-")


def _nearest(name: str, known: Sequence[str]) -> str | None:
    """The known agent type ``name`` was probably meant to be: the same once case, spaces
    and punctuation are ignored (``"Refund Agent"`` for ``refund-agent``), else the
    closest by :mod:`difflib`."""
    slugs = {_slug(k): k for k in known}
    if _slug(name) in slugs:
        return slugs[_slug(name)]
    close = difflib.get_close_matches(_slug(name), list(slugs), n=1, cutoff=0.6)
    return slugs[close[0]] if close else None


def _known_agents(known: Sequence[str], agent: str) -> str:
    """What the policies know, and the nearest to ``agent``."""
    text = f"the policies know {_listed('agent type', known)}"
    suggestion = _nearest(agent, known)
    return f"{text}; did you mean {suggestion!r}?" if suggestion else text
