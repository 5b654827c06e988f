"""The checks of a governed call before anything is reserved: :func:`prepare` turns a
:class:`~paymaster._governor.request.CallRequest` into the ledger's
:class:`~paymaster._ledger.ReserveRequest` (the one place one is built from the other),
auditing and raising a refusal."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .. import _storable as storable
from .._errors import PolicyError, PolicyViolation, ViolationCode
from .._ledger import ReserveRequest, check_amount
from .._money import Money
from .._policy import EffectivePolicy, RunPolicy
from .request import CallRequest

if TYPE_CHECKING:
    from .governor import Governor

__all__ = ["prepare"]


def prepare(gov: Governor, call: CallRequest) -> ReserveRequest:
    """The pure checks; a violation is audited (the only I/O) and raised.

    The policy decides on the caller's text as given; the ledger stores, compares and
    audits its storable form only (:mod:`paymaster._storable`), on every backend."""
    asked = dataclasses.replace(
        call, method=call.method.upper(), free=call.free or call.pricing_lookup
    )
    stored = _storable_form(asked)
    policy = _policy_of(gov, asked, stored)
    request = _reserve_request(stored, policy)
    canonical = _check(gov, asked, request)
    return dataclasses.replace(request, endpoint=storable.field("endpoint", canonical))


def _storable_form(asked: CallRequest) -> CallRequest:
    return dataclasses.replace(
        asked,
        agent=storable.field("agent", asked.agent),
        vendor=storable.field("vendor", asked.vendor),
        endpoint=storable.field("endpoint", asked.endpoint),
        method=storable.field("method", asked.method),
        run=storable.field("run", asked.run),
        customer=storable.field("customer", asked.customer),
        idempotency_key=storable.field("idempotency_key", asked.idempotency_key),
        tool_call_id=storable.field("tool_call_id", asked.tool_call_id),
        credential=storable.field("credential", asked.credential),
        subject=storable.field("subject", asked.subject),
    )


def _refuse(
    gov: Governor, stored: CallRequest, violation: PolicyViolation, cost: Money | None
) -> None:
    """Audit a refusal made before anything is reserved (its row, as every attempt
    leaves one)."""
    gov.record_refusal(
        violation,
        agent=stored.agent,
        vendor=stored.vendor,
        endpoint=stored.endpoint,
        method=stored.method,
        run=stored.run,
        customer=stored.customer,
        estimate=cost,
        tool_call_id=stored.tool_call_id,
        credential=stored.credential,
    )


def _policy_of(gov: Governor, asked: CallRequest, stored: CallRequest) -> EffectivePolicy:
    """The effective policy of the call; a refusal or bad input is audited and raised."""
    estimate, run_policy = asked.estimate, asked.run_policy
    try:
        policy_set_entry = gov.policies.require(asked.agent, asked.vendor, run=stored.run)
    except PolicyViolation as violation:
        _refuse(gov, stored, violation, estimate if isinstance(estimate, Money) else None)
        raise
    try:
        _check_estimate(estimate, asked.free)
        if run_policy is not None and not isinstance(run_policy, RunPolicy):
            raise TypeError(
                f"run_policy must be a paymaster.RunPolicy, got {type(run_policy).__name__}"
                ': build one, as in RunPolicy(cap="10.00", endpoints=["/v1/refunds"])'
            )
        return gov._effective(policy_set_entry, run_policy)
    except (TypeError, ValueError) as bad:
        # Bad input is the caller's error, raised as it is; the attempt still leaves
        # its row (a refusal naming what was wrong).
        code = (
            ViolationCode.RUN_POLICY_WIDENED
            if isinstance(bad, PolicyError)
            else ViolationCode.INVALID_REQUEST
        )
        refusal = PolicyViolation(
            code, str(bad), agent=stored.agent, run=stored.run, vendor=stored.vendor
        )
        # A bad estimate is not written as the row's estimate.
        _refuse(gov, stored, refusal, None)
        raise


def _reserve_request(stored: CallRequest, policy: EffectivePolicy) -> ReserveRequest:
    """The ledger's request for a checked call (its fields in their storable form)."""
    return ReserveRequest(
        agent=stored.agent,
        vendor=stored.vendor,
        endpoint=stored.endpoint,
        method=stored.method,
        estimate=stored.estimate if stored.estimate is not None else Money.zero(policy.currency),
        policy=policy,
        run=stored.run,
        customer=stored.customer,
        idempotency_key=stored.idempotency_key,
        tool_call_id=stored.tool_call_id,
        credential=stored.credential,
        subject=stored.subject,
        free=stored.free,
    )


def _check(gov: Governor, asked: CallRequest, request: ReserveRequest) -> str:
    """The policy's pure checks of the call; returns its canonical endpoint. A refusal is
    audited and raised."""
    policy = request.policy
    try:
        canonical = policy.check(
            endpoint=asked.endpoint,
            method=asked.method,
            customer=asked.customer,
            estimate=request.estimate,
            now=gov.ledger.now(),
            run=request.run,
            customer_checked_later=asked.pricing_lookup,
            accounts=asked.accounts,
        )
    except PolicyViolation as violation:
        gov.ledger.record_denial(request, violation)
        raise
    if asked.estimate is None and not asked.free:
        # Every policy has a cap: a call that reserves nothing could settle anything.
        agent, vendor, method, endpoint = (
            request.agent,
            request.vendor,
            request.method,
            request.endpoint,
        )
        missing = PolicyViolation(
            ViolationCode.ESTIMATE_REQUIRED,
            f"{agent}/{vendor} {method} {endpoint} carries no estimate, and its policy "
            f"{policy.policy_id!r} has a cap: pass estimate=Money(...) (what the call may "
            "cost at most), or free=True for a call that moves no money",
            policy_id=policy.policy_id,
            agent=agent,
            run=request.run,
            vendor=vendor,
            endpoint=endpoint,
        )
        gov.ledger.record_denial(request, missing)
        raise missing
    return canonical


def _check_estimate(estimate: Money | None, free: bool) -> None:
    if estimate is None:
        return
    check_amount(estimate, "estimate")
    if free and estimate.amount:
        raise ValueError(
            "a free call (free=True or pricing_lookup=True) cannot carry an "
            f"estimate of {estimate.format()}: drop free=True, or the estimate"
        )
