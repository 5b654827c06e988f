"""The audit rows of attempts that reserve nothing: refusals before any policy applied,
errors before anything was reserved, and free calls (:meth:`Governor.free_call`).

Each function takes the governor first: the :class:`~paymaster.Governor` facade uses
them as its methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._audit import AuditEntry, Outcome
from .._audit.records import row_number_problem
from .._errors import PolicyViolation
from .._money import Money

if TYPE_CHECKING:
    from .governor import Governor

__all__ = ["free_call", "record_error", "record_refusal"]


def record_refusal(
    governor: Governor,
    violation: PolicyViolation,
    *,
    agent: str,
    vendor: str,
    endpoint: str,
    method: str,
    run: str | None = None,
    customer: str | None = None,
    estimate: Money | None = None,
    tool_call_id: str | None = None,
    credential: str | None = None,
) -> PolicyViolation:
    """Audit a call refused before any policy applied (no policy for the agent, or a
    vendor operation paymaster cannot govern); returns ``violation`` for raising."""
    governor.ledger.record_denial(
        None,
        violation,
        entry=AuditEntry(
            agent=agent,
            run=run,
            vendor=vendor,
            endpoint=endpoint,
            method=method.upper(),
            customer=customer,
            outcome=Outcome.DENIED,
            currency=estimate.currency if estimate else None,
            estimate=estimate.amount if estimate else 0,
            violation_code=violation.code.value,
            error=violation.message,
            tool_call_id=tool_call_id,
            credential=credential,
        ),
    )
    return violation


def record_error(
    governor: Governor,
    error: str,
    *,
    agent: str,
    vendor: str,
    endpoint: str,
    method: str,
    run: str | None = None,
    customer: str | None = None,
    tool_call_id: str | None = None,
    credential: str | None = None,
) -> None:
    """Audit an attempt that ended in an error before anything was reserved (a tool's
    spec that raised, say): one ``errored`` row with no hold, no budget moved."""
    governor.ledger.record(
        AuditEntry(
            agent=agent,
            run=run,
            vendor=vendor,
            endpoint=endpoint,
            method=method.upper(),
            customer=customer,
            outcome=Outcome.ERRORED,
            error=error,
            tool_call_id=tool_call_id,
            credential=credential,
        )
    )


def free_call(
    governor: Governor,
    *,
    agent: str,
    vendor: str,
    endpoint: str,
    method: str = "CALL",
    run: str | None = None,
    tool_call_id: str | None = None,
    credential: str | None = None,
) -> Callable[..., None]:
    """Admit a call that spends nothing and reserves nothing (an agent's tool marked
    free): refused, and audited, if its agent or run is revoked. Returns the function
    that writes its audit row once it is done: ``record(error=None, duration_ms=...)``,
    which also takes the row's ``http_status`` and ``vendor_request_id``. A free call
    has no hold. Given an ``http_status`` or ``duration_ms`` a row cannot hold, record()
    writes the row as ``errored``, saying so, then raises ``ValueError``.
    """
    base = AuditEntry(
        agent=agent,
        vendor=vendor,
        endpoint=endpoint,
        method=method.upper(),
        run=run,
        outcome=Outcome.ALLOWED,
        tool_call_id=tool_call_id,
        credential=credential,
    )
    _check_not_revoked(governor, base)
    return _FreeCallRecord(governor, base)


def _check_not_revoked(governor: Governor, base: AuditEntry) -> None:
    """Refuse, and audit, a free call whose agent, run or vault key is revoked (or whose
    vault key has expired)."""
    agent, run = base.agent, base.run
    stopped = governor.ledger.stopped(agent, run, base.credential)
    if stopped is None:
        return
    violation = PolicyViolation(
        *stopped,
        agent=agent,
        run=run,
        vendor=base.vendor,
        endpoint=base.endpoint,
    )
    governor.ledger.record_denial(
        None,
        violation,
        entry=dataclasses.replace(
            base,
            outcome=Outcome.DENIED,
            violation_code=violation.code.value,
            error=violation.message,
        ),
    )
    raise violation


class _FreeCallRecord:
    """The ``record()`` of one admitted free call: writes its audit row, once."""

    def __init__(self, governor: Governor, base: AuditEntry) -> None:
        self._governor = governor
        self._base = base
        self._written = False

    def __call__(
        self,
        error: str | None = None,
        duration_ms: int | None = None,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
    ) -> None:
        if self._written:
            raise RuntimeError(
                "record() was called already for this free call: each admitted call "
                "writes one audit row; admit the next call with free_call() again"
            )
        self._written = True
        problem = row_number_problem(http_status=http_status, duration_ms=duration_ms)
        if problem is not None:
            # The call was made: its row is written, saying what record() was given
            # that a row cannot hold, before the caller hears of the mistake.
            error, duration_ms, http_status = f"record(): {problem}", None, None
        outcome = Outcome.ERRORED if error else Outcome.ALLOWED
        self._governor.ledger.record(
            dataclasses.replace(
                self._base,
                outcome=outcome,
                error=error,
                duration_ms=duration_ms,
                http_status=http_status,
                vendor_request_id=vendor_request_id,
            )
        )
        if problem is not None:
            raise ValueError(problem)
