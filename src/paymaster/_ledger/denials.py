"""Audit rows of calls that reserved nothing: a free tool's call, an attempt that ended
before anything was reserved (:meth:`record`), and a refused call
(:meth:`record_denial`, which also records the 100% threshold of the budget whose cap
refused it)."""

from __future__ import annotations

from sqlalchemy import Connection

from .._audit import AuditEntry, Outcome
from .._audit import chain as audit_chain
from .._errors import PolicyViolation
from ._core import _LedgerCore, _Notes, _token, _written
from .models import ReserveRequest
from .refusals import _Exhausted


def _denial_entry(request: ReserveRequest, violation: PolicyViolation) -> AuditEntry:
    """The audit row of a refused call, from its request."""
    return AuditEntry(
        agent=request.agent,
        run=request.run,
        vendor=request.vendor,
        endpoint=request.endpoint,
        method=request.method,
        customer=request.customer,
        outcome=Outcome.DENIED,
        currency=request.estimate.currency,
        estimate=request.estimate.amount,
        actual=0,
        policy_id=request.policy.policy_id,
        policy_hash=request.policy.hash,
        violation_code=violation.code.value,
        error=violation.message,
        tool_call_id=request.tool_call_id,
        credential=request.credential,
    )


class _Recording(_LedgerCore):
    """Audit rows of calls that hold nothing."""

    def record(self, entry: AuditEntry) -> None:
        """Append the audit row of a call that reserved nothing (a free tool's call, or an
        attempt that ended before anything was reserved)."""
        at, token = self.now(), _token()

        def work(conn: Connection, retrying: bool) -> None:
            if not (retrying and _written(conn, at, token)):
                audit_chain.append(conn, entry, at, token, last=True)

        self._write("auditing a call", "so this call's audit row was not written", work)

    def record_denial(
        self,
        request: ReserveRequest | None,
        violation: PolicyViolation,
        *,
        entry: AuditEntry | None = None,
        exhausted: _Exhausted | None = None,
    ) -> None:
        """Append the audit row of a refused call (nothing else is written but, with alerts
        on, the 100% threshold of the budget whose cap refused it, the first time)."""
        if entry is None:
            assert request is not None
            entry = _denial_entry(request, violation)
        consequence = f"the call was refused ({violation.code}) but its audit row was not written"
        at, token = self.now(), _token()
        observer = self.observer
        notes = None if observer is None else _Notes(observer)

        def work(conn: Connection, retrying: bool) -> None:
            if notes is not None:
                notes.notes.clear()
            if retrying and _written(conn, at, token):  # the first try's COMMIT reply was lost
                return
            if notes is not None and exhausted is not None:
                # Before the audit append: alert rows, then the chain head (one lock order).
                ref, committed, cap = exhausted.budget, exhausted.committed, exhausted.cap
                notes.budget_rose(conn, ref.id, committed, cap, at, lambda: ref, exhausted.refused)
            audit_chain.append(conn, entry, at, token, last=True)

        self._write("auditing a denial", consequence, work)
        if observer is not None:
            assert notes is not None
            notes.committed()
            observer.denied(entry, violation, at)
