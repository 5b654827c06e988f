"""The effective policy: an agent type's policy narrowed by a run policy (refused if it
would widen), and the pure checks every call must pass against it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from typing import NoReturn, Protocol

from pydantic import BaseModel, ConfigDict

from .. import _storable as storable
from .._endpoints import InvalidPath, normalise_path, path_matches, pattern_covers
from .._errors import PolicyError, PolicyViolation, ViolationCode
from .._money import Money
from .amounts import _positive_cap
from .rules import Policy, RunPolicy


class _Deny(Protocol):
    """Raise the :class:`PolicyViolation` of a failed check."""

    def __call__(
        self, code: ViolationCode, message: str, remaining: Money | None = None
    ) -> NoReturn: ...


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
        deny = self._denier(endpoint=endpoint, run=run)
        if self.expires_at is not None and now >= self.expires_at:
            deny(ViolationCode.EXPIRED, f"policy {self.policy_id} expired at {self.expires_at}")
        path = self._allowed_path(endpoint, deny)
        upper = method.upper()
        if self.methods is not None and upper not in self.methods:
            deny(ViolationCode.METHOD_NOT_ALLOWED, f"{upper} is not in {list(self.methods)}")
        self._check_customer(customer, customer_checked_later, deny)
        self._check_estimate(estimate, deny)
        self._check_accounts(accounts, deny)
        return path

    def _denier(self, *, endpoint: str, run: str | None) -> _Deny:
        """What a failed check calls: raise the :class:`PolicyViolation` naming this call."""

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

        return deny

    def _allowed_path(self, endpoint: str, deny: _Deny) -> str:
        """The canonical ``endpoint``, if it is in every endpoint allowlist."""
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
        return path

    def _check_customer(
        self, customer: str | None, customer_checked_later: bool, deny: _Deny
    ) -> None:
        """The customer, against every customer allowlist."""
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

    def _check_estimate(self, estimate: Money, deny: _Deny) -> None:
        """The estimate's currency, sign, and the daily and per-call caps."""
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

    def _check_accounts(self, accounts: Collection[str], deny: _Deny) -> None:
        """The connected accounts the call acts for or pays, against every allowlist."""
        for account in sorted(accounts):
            for allowlist in self.account_allowlists:
                if account not in allowlist:
                    deny(
                        ViolationCode.ACCOUNT_NOT_ALLOWED,
                        f"the call acts for or pays connected account {account!r}, which "
                        f"policy {self.policy_id} does not list in 'accounts' "
                        f"({list(allowlist) or 'none'}); add it there to allow it",
                    )


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
    run_cap, per_call = _narrowed_caps(policy, rp)
    endpoint_lists = _endpoint_allowlists(policy, rp)
    methods = _narrowed_methods(policy, rp)
    customer_lists = _customer_allowlists(policy, rp)
    account_lists = _account_allowlists(policy, rp)
    expires = _narrowed_expiry(policy, rp)
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


def _narrowed_caps(policy: Policy, rp: RunPolicy) -> tuple[Money | None, Money | None]:
    """The run's cap and the per-call cap, neither above the policy's; the run's call
    limit checked against the policy's daily one."""
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
    return run_cap, per_call


def _endpoint_allowlists(policy: Policy, rp: RunPolicy) -> list[tuple[str, ...]]:
    """The policy's endpoints, then the run's, each pattern within the policy's."""
    endpoint_lists = [policy.endpoints]
    if rp.endpoints is not None:
        for pattern in rp.endpoints:
            if not any(pattern_covers(outer, pattern) for outer in policy.endpoints):
                raise _widen("endpoints", f"{pattern} is not within {list(policy.endpoints)}")
        endpoint_lists.append(rp.endpoints)
    return endpoint_lists


def _narrowed_methods(policy: Policy, rp: RunPolicy) -> tuple[str, ...] | None:
    """The run's methods, if given and within the policy's; else the policy's."""
    methods = policy.methods
    if rp.methods is not None:
        if policy.methods is not None:
            extra = sorted(set(rp.methods) - set(policy.methods))
            if extra:
                raise _widen("methods", f"{extra} not in {list(policy.methods)}")
        methods = rp.methods
    return methods


def _customer_allowlists(policy: Policy, rp: RunPolicy) -> list[tuple[str, ...]]:
    """The policy's customers (if it lists any), then the run's, within the policy's."""
    customer_lists = [c for c in (policy.customers,) if c is not None]
    if rp.customers is not None:
        if policy.customers is not None:
            extra = sorted(set(rp.customers) - set(policy.customers))
            if extra:
                raise _widen("customers", f"{extra} not in the policy's customers")
        customer_lists.append(rp.customers)
    return customer_lists


def _account_allowlists(policy: Policy, rp: RunPolicy) -> list[tuple[str, ...]]:
    """The policy's accounts, then the run's, within the policy's."""
    account_lists = [policy.accounts]
    if rp.accounts is not None:
        extra = sorted(set(rp.accounts) - set(policy.accounts))
        if extra:
            raise _widen("accounts", f"{extra} not in the policy's accounts")
        account_lists.append(rp.accounts)
    return account_lists


def _narrowed_expiry(policy: Policy, rp: RunPolicy) -> datetime | None:
    """The earlier expiry: the run's may not be after the policy's."""
    expires = policy.expires_at
    if rp.expires_at is not None:
        if expires is not None and rp.expires_at > expires:
            raise _widen("expires_at", f"{rp.expires_at} is after {expires}")
        expires = rp.expires_at
    return expires
