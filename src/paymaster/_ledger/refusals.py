"""Why a reserve is refused: revoked, a frozen budget, over a cap or a call limit, a
subject busy, an idempotency key reused, a run policy widened. Each check raises
:class:`_Denied`, which the reserve turns into the denial's audit row and a
:class:`~paymaster.PolicyViolation`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from sqlalchemy import Connection

from .. import _driver
from .. import _statements as S
from .._errors import PolicyViolation, ViolationCode
from .._money import Money
from ._core import _LedgerCore, _Retry, _StaleBudgetId
from .models import BudgetRef, Hold, HoldState, ReserveRequest
from .revocations import stopped_because


@dataclass(frozen=True)
class _Exhausted:
    """The budget that refused a reserve for its cap, as the refusal saw it."""

    budget: BudgetRef
    committed: int
    cap: int
    refused: Money


class _Denied(Exception):
    def __init__(self, violation: PolicyViolation, exhausted: _Exhausted | None = None) -> None:
        self.violation = violation
        self.exhausted = exhausted


def _budget_ref(key: tuple[str, ...], budget_id: int, run: str | None) -> BudgetRef:
    kind, agent, vendor, currency, _, window = key
    return BudgetRef(budget_id, kind, agent, vendor, currency, run, window or None)


def _over_cap(
    req: ReserveRequest, code: ViolationCode, label: str, cap: int, committed: int
) -> PolicyViolation:
    currency = req.policy.currency
    left = Money(max(cap - committed, 0), currency)
    scope = f"run {req.run!r}" if label == "run" else "today"
    return PolicyViolation(
        code,
        f"{req.estimate.format()} would exceed the {label} cap of "
        f"{Money(cap, currency).format()} for {req.agent}/{req.vendor} ({scope}): "
        f"{Money(committed, currency).format()} already committed, "
        f"{left.format()} remaining",
        policy_id=req.policy.policy_id,
        agent=req.agent,
        run=req.run,
        vendor=req.vendor,
        endpoint=req.endpoint,
        remaining=left,
    )


def _call_limit(
    req: ReserveRequest, label: str, calls_cap: int, calls: int, cap: int | None, committed: int
) -> PolicyViolation:
    currency = req.policy.currency
    return PolicyViolation(
        ViolationCode.CALL_LIMIT,
        f"the {label} limit of {calls_cap} calls for {req.agent}/{req.vendor} is "
        f"reached ({calls} made)",
        policy_id=req.policy.policy_id,
        agent=req.agent,
        run=req.run,
        vendor=req.vendor,
        endpoint=req.endpoint,
        calls_remaining=0,
        remaining=None if cap is None else Money(cap - committed, currency),
    )


class _Refusals(_LedgerCore):
    """The reserve's checks: each raises :class:`_Denied` saying why."""

    def _refused(
        self,
        conn: Connection,
        req: ReserveRequest,
        budget_id: int,
        cap: int | None,
        calls_cap: int | None,
        *,
        check_revoked: bool,
        code: ViolationCode,
        key: tuple[str, ...],
        created: bool,
    ) -> NoReturn:
        """A budget's conditional UPDATE took nothing (:meth:`_take`): raise why."""
        label = key[0]  # daily | run
        # Refused: say why, in this order. A state that no longer refuses means another
        # transaction freed room since the UPDATE ran: run the reserve again.
        self._check_revoked(conn, req)
        row = _driver.run(conn, S.BUDGET_STATE, {"p_bid": budget_id}).first()
        if row is None:
            raise _StaleBudgetId
        committed, calls = int(row.committed), int(row.calls)
        self._refuse_if_frozen(conn, req, budget_id, int(row.frozen), daily=check_revoked)
        if cap is not None and committed + req.estimate.amount > cap:
            # A budget this transaction created (and will roll back), or one nothing was
            # spent from, is not exhausted: the call alone is too big for its cap.
            exhausted = (
                None
                if created or committed == 0
                else _Exhausted(_budget_ref(key, budget_id, req.run), committed, cap, req.estimate)
            )
            raise _Denied(_over_cap(req, code, label, cap, committed), exhausted)
        if calls_cap is not None and calls >= calls_cap:
            raise _Denied(_call_limit(req, label, calls_cap, calls, cap, committed))
        raise _Retry

    def _check_subject_free(self, conn: Connection, req: ReserveRequest, own: str | None) -> None:
        """Refuse a call on a subject another call in flight is changing. The partial
        unique index on the hold's subject settles races between processes: the loser's
        insert fails, and its retry is refused here."""
        busy = _driver.run(conn, S.HOLD_ON_SUBJECT, {"p_subject": req.subject}).first()
        if busy is not None and busy.id != own:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.SUBJECT_BUSY,
                    f"another call on {req.subject} is in flight ({busy.method} "
                    f"{busy.endpoint}, hold {busy.id}, {busy.state}); retry once it has "
                    "ended (an unknown one ends when an operator resolves it: "
                    f"paymaster holds resolve {busy.id})",
                )
            )

    def _check_same_call(self, found: Hold, req: ReserveRequest) -> None:
        """An idempotency key names one call: a different call reusing it is refused. A
        released hold (nothing moved) may come back at another price: a re-arm re-prices."""
        repriced = found.state is HoldState.RELEASED
        mine = (
            req.agent,
            req.run,
            req.vendor,
            req.endpoint,
            req.method,
            req.customer,
            None if repriced else req.estimate,
        )
        theirs = (
            found.agent,
            found.run,
            found.vendor,
            found.endpoint,
            found.method,
            found.customer,
            None if repriced else found.estimate,
        )
        if mine != theirs:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.IDEMPOTENCY_KEY_REUSED,
                    f"idempotency key {req.idempotency_key!r} belongs to another call "
                    f"({found.agent} {found.method} {found.endpoint} {found.estimate}); "
                    "use a new key for a new call",
                )
            )

    def _run_limits(
        self, conn: Connection, req: ReserveRequest, budget_id: int
    ) -> tuple[Money | None, int | None]:
        """The run budget's limits for this call: those it stored, narrowed by the call's
        run policy. Widening is refused: a run's budget binds for the run's whole life."""
        row = _driver.run(conn, S.RUN_BUDGET_LOCKED, {"p_bid": budget_id}).first()
        if row is None:
            raise _StaleBudgetId
        currency = req.policy.currency
        stored_cap = None if row.cap is None else Money(int(row.cap), currency)
        stored_calls = None if row.calls_cap is None else int(row.calls_cap)
        asked_cap, asked_calls = req.policy.run_cap, req.policy.run_max_calls
        widened = []
        if asked_cap is not None and stored_cap is not None and asked_cap > stored_cap:
            widened.append(f"cap {asked_cap.format()} above its {stored_cap.format()}")
        if asked_calls is not None and stored_calls is not None and asked_calls > stored_calls:
            widened.append(f"max_calls {asked_calls} above its {stored_calls}")
        if widened:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.RUN_POLICY_WIDENED,
                    f"run {req.run!r} already has a budget; a run policy may narrow it, never "
                    f"widen it ({'; '.join(widened)})",
                )
            )
        cap = min((c for c in (stored_cap, asked_cap) if c is not None), default=None)
        calls = min((c for c in (stored_calls, asked_calls) if c is not None), default=None)
        return cap, calls

    def _refuse_if_frozen(
        self, conn: Connection, req: ReserveRequest, budget_id: int, frozen: int, daily: bool
    ) -> None:
        """Refuse a call on a budget that an unacknowledged overrun froze: one of its own
        holds' (its ``frozen`` count) or, for a daily budget, any of its agent type's, so
        that a freeze outlives the day it happened on."""
        if frozen <= 0 and not daily:
            return
        overruns = _driver.run(
            conn,
            S.UNACKNOWLEDGED_OVERRUNS,
            {
                "p_bid": budget_id,
                "p_agent": req.agent,
                "p_vendor": req.vendor,
                "p_currency": req.policy.currency,
            },
        ).all()
        if not overruns and frozen <= 0:
            return
        named = ", ".join(
            f"hold {r.id} (over by {Money(int(r.overrun), r.currency).format()})" for r in overruns
        )
        first = overruns[0].id if overruns else "HOLD"
        raise _Denied(
            self._violation(
                req,
                ViolationCode.BUDGET_FROZEN,
                f"the budget is frozen: a call moved money its reservation did not cover "
                f"({named or 'an overrun'}); an operator must acknowledge it first: "
                f"Governor.acknowledge_overrun({first!r}, reason=...) or "
                f"`paymaster holds acknowledge {first} --reason ...`",
            )
        )

    def _check_revoked(self, conn: Connection, req: ReserveRequest) -> None:
        stopped = stopped_because(conn, req.agent, req.run, req.credential, self.now())
        if stopped is not None:
            raise _Denied(self._violation(req, *stopped))

    @staticmethod
    def _violation(req: ReserveRequest, code: ViolationCode, message: str) -> PolicyViolation:
        return PolicyViolation(
            code,
            message,
            policy_id=req.policy.policy_id,
            agent=req.agent,
            run=req.run,
            vendor=req.vendor,
            endpoint=req.endpoint,
        )
