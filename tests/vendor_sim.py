"""The vendor-truth simulation (issue 13): a seeded random driver checked against the books
of a fake vendor (:mod:`paymaster.testing.vendor`).

Agents run against a few budgets through ``Governor.guard`` in threads, ``Governor.aguard``
in asyncio tasks, the ``Governor.governed`` decorator (sync and async), two worker
processes charging over the vendor's HTTP face, and both agent adapters. They draw random
estimates and actuals (now and then above the estimate: an overrun), share idempotency
keys between overlapping attempts, retry after failures, revoke and restore, and cancel
tasks mid-call, while the vendor injects refusals, 429s, 5xx before and after charging,
lost responses and timeouts. The code inside each governed block does what a correct user
does. Afterwards, per budget (an agent type's day, and each run with a run budget):

* ``cap``: what the vendor charged within the reservations is at most the cap (money above
  a reservation is an overrun, checked by the next two);
* ``overrun_flagged``: every overrun has an ``overrun`` audit row, and
  ``overrun_frozen``: its budget refuses new reserves (``budget_frozen``) until the
  overrun is acknowledged;
* ``ledger_covers_vendor``: the ledger's ``committed`` is at least what the vendor charged,
  and ``ledger_consistent``: ``committed`` is settled plus pending; and per charge,
  ``every_charge_counted``: the holds of the call that charged count at least the charge
  (an aggregate can hide one released hold behind others kept unknown), and
  ``run_budget_binds``: within its run's budget when the run has one;
* ``audit_one_row_per_attempt``: every attempt leaves exactly one audit row (counted by its
  ``tool_call_id``, and per run), ``audit_row_names_its_attempt``: that row carries the
  attempt's own ``tool_call_id`` (not another attempt's of a shared hold), and
  ``audit_verify``: the hash chains verify;
* ``no_hold_left_pending``: once every attempt has ended, no hold is ``pending`` (each is
  settled, released or ``unknown``), and ``adapter_settles_completed_calls``: a tool call
  whose body charged and returned is settled, not left ``unknown``;
* and the contract checks made as the calls happen (a call admitted in a revoked run, a
  hold resumed across runs, a widening run policy or a missing estimate admitted, a
  ``HoldAlreadyResolved`` escaping a block, a budget not frozen right after its overrun).

A failure is reported as ``(invariant, detail)`` with the seed and the command replaying it.

Replay a seed with ``PAYMASTER_SIM_SEED=<seed>``. ``python tests/vendor_sim.py`` (``make
soak``) runs seed after seed for ``PAYMASTER_SOAK_SECONDS`` (default 600) on SQLite, and on
PostgreSQL too when ``PAYMASTER_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from paymaster import (
    Governor,
    HoldAlreadyResolved,
    Money,
    Policy,
    PolicyViolation,
    RunPolicy,
    ViolationCode,
)
from paymaster._outcomes import OUTCOME_UNKNOWN_EXCEPTIONS
from paymaster.testing.vendor import (
    ChargeResult,
    FakeVendor,
    Fault,
    VendorAPI,
    VendorClient,
    VendorRefused,
    VendorServer,
    VendorServerError,
)

SEED_ENV = "PAYMASTER_SIM_SEED"
SOAK_ENV = "PAYMASTER_SOAK_SECONDS"
PG_ENV = "PAYMASTER_TEST_POSTGRES_URL"
DEFAULT_SEED = 20261124
ENDPOINT = "/v1/charges"
BASE_TIME = datetime(2026, 11, 24, 1, 0, tzinfo=timezone.utc)
#: A safety net against a deadlocked choreography, never a means of synchronisation.
STUCK_AFTER = 60.0


class GatewayFault(Exception):
    """A user's own exception for its vendor's 5xx, carrying no HTTP status: only
    ``Governor(unknown_on=...)`` tells paymaster that money may have moved."""


#: A correct user tells paymaster that its vendor's 5xx leaves the outcome unknown.
UNKNOWN_ON = (*OUTCOME_UNKNOWN_EXCEPTIONS, VendorServerError, GatewayFault)
ATTEMPT_OUTCOMES = frozenset(
    {"allowed", "failed", "errored", "denied", "unknown", "overrun", "reconciled"}
)


# -- the world ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgentType:
    """One agent type, its vendor and its policy's caps (minor units)."""

    name: str
    vendor: str
    currency: str
    daily_cap: int
    per_call: int

    def policy(self) -> Policy:
        return Policy.model_validate(
            {
                "id": f"{self.name}-policy",
                "agent": self.name,
                "vendor": self.vendor,
                "currency": self.currency,
                "daily_cap": Money(self.daily_cap, self.currency),
                "per_call_cap": Money(self.per_call, self.currency),
                "endpoints": [ENDPOINT],
            }
        )

    def money(self, amount: int) -> Money:
        return Money(amount, self.currency)


AGENT_TYPES = (
    AgentType("refund-agent", "stripe", "USD", 40_000, 4_000),  # a tight cap, hit early
    AgentType("sms-agent", "twilio", "EUR", 60_000, 2_500),
    AgentType("ads-agent", "adsco", "JPY", 100_000, 3_000),
)
TYPES_BY_NAME = {t.name: t for t in AGENT_TYPES}

#: Per-attempt fault weights (the rest: no fault).
FAULTS: dict[Fault, float] = {
    Fault.DECLINED: 0.04,
    Fault.RATE_LIMITED: 0.05,
    Fault.SERVER_ERROR_BEFORE: 0.04,
    Fault.SERVER_ERROR_AFTER: 0.05,
    Fault.LOST_BEFORE: 0.04,
    Fault.LOST_AFTER_CHARGE: 0.05,
    Fault.TIMEOUT_THEN_CHARGE: 0.05,
    Fault.TIMEOUT_NO_CHARGE: 0.04,
}
#: Faults after which nothing moved or the client heard the answer: an overrun (an actual
#: above its reservation) only ever meets these, since a ledger cannot count more than
#: the estimate of a call whose answer it never heard.
HEARD_OR_NOTHING_MOVED = (
    Fault.DECLINED,
    Fault.RATE_LIMITED,
    Fault.SERVER_ERROR_BEFORE,
    Fault.LOST_BEFORE,
    Fault.TIMEOUT_NO_CHARGE,
)


@dataclass(frozen=True)
class SimConfig:
    """How big one simulation is."""

    thread_agents: int = 3
    async_agents: int = 4
    processes: int = 2
    runs_per_agent: int = 7
    ops_per_run: tuple[int, int] = (3, 7)
    process_runs: int = 7
    adapter_runs: int = 2
    chaos_every: int = 20


SHORT = SimConfig()
#: The short run's seeds (``make test``), each on a fresh database per backend.
SHORT_SEEDS = 6
SOAK = SimConfig(runs_per_agent=10, process_runs=10, adapter_runs=3)

#: Weights of what an agent does next.
OPS = {
    "single": 0.46,
    "pair": 0.20,
    "overrun": 0.05,
    "revoke_check": 0.04,
    "cross_run": 0.06,
    "widen": 0.03,
    "no_estimate": 0.02,
    "free": 0.04,
    "cancel": 0.10,  # asyncio agents only (a single call elsewhere)
}


class SimClock:
    """The ledger's clock: a fixed UTC day, advancing with the wall clock (picklable, so
    worker processes share it)."""

    def __init__(self, start_wall: float) -> None:
        self.start_wall = start_wall

    def __call__(self) -> datetime:
        return BASE_TIME + timedelta(seconds=time.time() - self.start_wall)

    @property
    def day(self) -> date:
        return BASE_TIME.date()


# -- what happened ------------------------------------------------------------------------
@dataclass
class Attempt:
    """One governed attempt the driver made; ``rows``: how many audit rows it must leave
    (``(1, 1)``; ``(0, 1)`` for a task cancelled before its reserve could land)."""

    marker: str | None
    run: str
    agent: str
    path: str
    op: str
    rows: tuple[int, int] = (1, 1)
    expect_outcome: str | None = None
    hold_id: str | None = None
    resumed: bool = False
    key: str | None = None
    fault: str = ""
    outcome: str = ""


@dataclass
class RunInfo:
    agent: str
    run: str
    cap: int | None
    established: bool = False


@dataclass
class OverrunRec:
    hold_id: str
    agent: str
    run: str
    excess: int
    state: str = "probing"  # probing -> left | acknowledged


@dataclass
class AdapterRun:
    path: str
    run: str
    turns: list[list[str]]
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # tool call id: arguments


@dataclass
class Record:
    """What one worker (a thread, the asyncio agents, a process) saw; merged at the end."""

    attempts: list[Attempt] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    runs: dict[str, RunInfo] = field(default_factory=dict)
    overruns: dict[str, OverrunRec] = field(default_factory=dict)
    adapter_runs: list[AdapterRun] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Record) -> None:
        self.attempts += other.attempts
        self.failures += other.failures
        self.runs.update(other.runs)
        self.overruns.update(other.overruns)
        self.adapter_runs += other.adapter_runs
        self.counts.update(other.counts)


class Recorder:
    """A thread-safe :class:`Record`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data = Record()

    def attempt(self, attempt: Attempt) -> None:
        with self.lock:
            self.data.attempts.append(attempt)

    def fail(self, invariant: str, detail: str) -> None:
        with self.lock:
            self.data.failures.append((invariant, detail))

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.data.counts[what] += n

    def run(self, info: RunInfo) -> None:
        with self.lock:
            self.data.runs[info.run] = info

    def establish(self, run: str) -> None:
        with self.lock:
            self.data.runs[run].established = True

    def established(self, run: str) -> bool:
        with self.lock:
            info = self.data.runs.get(run)
            return info is not None and info.established

    def overrun(self, rec: OverrunRec) -> None:
        with self.lock:
            self.data.overruns[rec.hold_id] = rec

    def overrun_state(self, hold_id: str, state: str) -> None:
        with self.lock:
            self.data.overruns[hold_id].state = state

    def left_overruns(self) -> list[str]:
        with self.lock:
            return [h for h, o in self.data.overruns.items() if o.state == "left"]


# -- plans ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One vendor call an agent means to make (all its attempts share it)."""

    type: AgentType
    run: str
    key: str | None
    estimate: int | None
    amount: int
    run_policy: RunPolicy | None = None
    free: bool = False

    def labels(self) -> tuple[str, str]:
        return f"day:{self.type.name}", f"run:{self.type.name}:{self.run}"

    def guard_kwargs(self, marker: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "agent": self.type.name,
            "vendor": self.type.vendor,
            "endpoint": ENDPOINT,
            "method": "POST",
            "estimate": None if self.estimate is None else self.type.money(self.estimate),
            "run": self.run,
            "run_policy": self.run_policy,
            "idempotency_key": self.key,
            "tool_call_id": marker,
        }
        if self.free:
            kwargs["free"] = True
        return kwargs

    def charge(self, vendor: VendorAPI, key: str | None, fault: Fault) -> ChargeResult:
        return vendor.charge(
            self.amount,
            self.type.currency,
            idempotency_key=key,
            labels=self.labels(),
            metadata={"estimate": str(self.estimate or 0), "run": self.run},
            fault=fault,
        )


class _Abandon(Exception):
    """Leave a block that should never have been entered, keeping its hold as it is."""


@dataclass
class Outcome:
    kind: str = "error"  # settled | refused | unknown | denied | error | cancelled
    status: int | None = None
    code: ViolationCode | None = None
    hold_id: str | None = None
    resumed: bool = False


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    draw = rng.random() * sum(weights.values())
    for name, weight in weights.items():
        if draw < weight:
            return name
        draw -= weight
    return next(iter(weights))


def _fault(rng: random.Random, allowed: Sequence[Fault] | None = None) -> Fault:
    draw = rng.random()
    for fault, weight in FAULTS.items():
        if draw < weight:
            return fault if allowed is None or fault in allowed else Fault.NONE
        draw -= weight
    return Fault.NONE


def _faults_for(plan: Plan) -> Sequence[Fault] | None:
    """The faults a call may meet: a call charging above its estimate (an overrun, or a
    call without an estimate) only those after which nothing moved or the answer was heard
    (see :data:`HEARD_OR_NOTHING_MOVED`); any other, all."""
    if plan.amount > (plan.estimate or 0):
        return HEARD_OR_NOTHING_MOVED
    return None


def _interleave(rng: random.Random, *sequences: list[str]) -> list[str]:
    """A random merge keeping each sequence's order."""
    pending = [list(s) for s in sequences if s]
    merged: list[str] = []
    while pending:
        pick = rng.choice(pending)
        merged.append(pick.pop(0))
        pending = [s for s in pending if s]
    return merged


def _pair_order(rng: random.Random, fx: Fault, fy: Fault) -> list[str]:
    """The order of two overlapping attempts' steps (X reserves first), and maybe of the
    vendor finishing a timed-out request."""
    order = [
        "reserveX",
        *_interleave(rng, ["sendX", "resolveX"], ["reserveY", "sendY", "resolveY"]),
    ]
    timed_out = [
        f"send{me}"
        for me, fault in (("X", fx), ("Y", fy))
        if fault in (Fault.TIMEOUT_THEN_CHARGE, Fault.TIMEOUT_NO_CHARGE)
    ]
    if timed_out and rng.random() < 0.7:
        first = min(order.index(s) for s in timed_out)
        order.insert(rng.randint(first + 1, len(order)), "release")
    return order


class Choreo:
    """Lets threads take their steps in a given global order (``None``: no order)."""

    def __init__(self, order: Sequence[str] = ()) -> None:
        self._order = list(order)
        self._done: set[str] = set()
        self._cond = threading.Condition()

    def wait(self, step: str) -> None:
        if step not in self._order:
            return
        before = self._order[: self._order.index(step)]
        with self._cond:
            if not self._cond.wait_for(lambda: self._done.issuperset(before), STUCK_AFTER):
                raise RuntimeError(f"choreography stuck before {step} ({self._order})")

    def done(self, *steps: str) -> None:
        with self._cond:
            self._done.update(steps)
            self._cond.notify_all()

    def finish(self, me: str) -> None:
        """Every step of ``me`` is done (or will never happen)."""
        self.done(*(s for s in self._order if s.endswith(me)))


class AChoreo:
    """:class:`Choreo` for asyncio tasks on one loop."""

    def __init__(self, order: Sequence[str] = ()) -> None:
        self._order = list(order)
        self._done: set[str] = set()
        self._cond = asyncio.Condition()

    async def wait(self, step: str) -> None:
        if step not in self._order:
            return
        before = self._order[: self._order.index(step)]
        async with self._cond:
            await asyncio.wait_for(
                self._cond.wait_for(lambda: self._done.issuperset(before)), STUCK_AFTER
            )

    async def done(self, *steps: str) -> None:
        async with self._cond:
            self._done.update(steps)
            self._cond.notify_all()

    async def finish(self, me: str) -> None:
        await self.done(*(s for s in self._order if s.endswith(me)))


# -- agents -----------------------------------------------------------------------------
class Agent:
    """What sync and async agents share: planning, and the checks made on a reservation."""

    path = "guard"

    def __init__(
        self,
        name: str,
        gov: Governor,
        vendor: VendorAPI,
        rec: Recorder,
        stream: str,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.gov = gov
        self.vendor = vendor
        self.rec = rec
        self.stream = stream
        self.rng = random.Random(stream)
        self.tick = tick
        self._markers = itertools.count()
        self._keys = itertools.count()
        self._runs = itertools.count()
        self.unknown: list[Plan] = []  # plans whose last attempt ended unknown
        self.free_supported = "free" in _guard_parameters(gov)
        self.decorated: dict[str, Any] = {}

    def reseed(self, *where: object) -> None:
        """A fresh random stream for each run and each operation, so that one outcome
        decided by the interleaving changes no later choice."""
        self.rng = random.Random(":".join(map(str, (self.stream, *where))))

    def marker(self) -> str:
        return f"{self.name}-a{next(self._markers)}"

    def key(self) -> str:
        return f"{self.name}-k{next(self._keys)}"

    def new_run(self) -> tuple[AgentType, RunInfo]:
        run = f"{self.name}-r{next(self._runs)}"
        self.reseed(run)
        kind = self.rng.choice(AGENT_TYPES)
        cap = None
        if self.rng.random() < 0.45:
            cap = self.rng.randint(kind.per_call, 3 * kind.per_call)
        info = RunInfo(kind.name, run, cap)
        self.rec.run(info)
        return kind, info

    def run_policy(self, info: RunInfo) -> RunPolicy | None:
        if info.cap is None:
            return None
        if self.rec.established(info.run) and self.rng.random() < 0.5:
            return None  # the run's budget binds it anyway
        return RunPolicy(cap=TYPES_BY_NAME[info.agent].money(info.cap))

    def plan(self, kind: AgentType, info: RunInfo, *, overrun: bool = False) -> Plan:
        estimate = self.rng.randint(max(1, kind.per_call // 20), kind.per_call)
        amount = estimate
        if overrun:
            amount = estimate + self.rng.randint(1, max(1, estimate // 2))
        elif self.rng.random() < 0.3:
            amount = self.rng.randint(estimate // 2, estimate)
        return Plan(kind, info.run, self.key(), estimate, amount, self.run_policy(info))

    def choose_op(self, info: RunInfo, *, can_cancel: bool) -> str:
        op = _weighted(self.rng, OPS)
        if op == "cancel" and not can_cancel:
            return "single"
        if op == "widen" and not (info.cap is not None and self.rec.established(info.run)):
            return "single"
        if op == "free" and not self.free_supported:
            return "single"
        return op

    def decorator_ok(self, info: RunInfo) -> bool:
        """The decorator passes no run policy: use it in a run without a cap, or whose
        budget exists already (and binds the call)."""
        return info.cap is None or self.rec.established(info.run)

    def cross_run_plan(self, kind: AgentType, info: RunInfo) -> tuple[Plan, str] | None:
        """An earlier run's call whose outcome was left unknown, presented again by this
        run with the same idempotency key; and that earlier run."""
        for i, old in enumerate(self.unknown):
            if old.type == kind and old.run != info.run:
                del self.unknown[i]
                plan = dataclasses.replace(old, run=info.run, run_policy=self.run_policy(info))
                return plan, old.run
        return None

    def attempt_record(self, plan: Plan, marker: str | None, op: str, **kw: Any) -> Attempt:
        attempt = Attempt(marker, plan.run, plan.type.name, self.path, op, key=plan.key, **kw)
        self.rec.attempt(attempt)
        return attempt

    def on_reserved(self, plan: Plan, call: Any, op: str, marker: str | None) -> None:
        """Contract checks on a reservation just made."""
        where = f"{marker} ({op}, run {plan.run}, key {plan.key})"
        hold_run = getattr(call.hold, "run", plan.run)
        if hold_run != plan.run:
            self.rec.fail(
                "resumed_across_runs",
                f"{where}: got the hold {call.hold_id} of run {hold_run!r} "
                f"(resumed={call.reservation.resumed})",
            )
        if plan.estimate is None and not plan.free:
            self.rec.fail("estimate_required", f"{where}: estimate=None admitted under a cap")
        if plan.run_policy is not None and plan.run_policy.cap is not None:
            self.rec.establish(plan.run)

    def denied(self, violation: PolicyViolation) -> None:
        self.rec.count(f"denied:{violation.code.value}")

    def admitted_unexpectedly(self, plan: Plan, op: str, marker: str | None, expect: Any) -> None:
        self.rec.fail(
            f"refused_{expect.value}" if isinstance(expect, ViolationCode) else "refused",
            f"{marker} ({op}, run {plan.run}): expected a refusal ({expect}), admitted",
        )

    def check_outcome(self, plan: Plan, op: str, marker: str | None, out: Outcome) -> None:
        detail = out.code.value if out.code is not None else out.status
        self.rec.count(f"outcome:{op}:{out.kind}" + (f":{detail}" if detail else ""))
        if op == "revoke_check" and out.kind == "denied" and out.code is not ViolationCode.REVOKED:
            self.rec.count("inconclusive")

    def unexpected(self, where: str, exc: BaseException) -> None:
        if isinstance(exc, HoldAlreadyResolved):
            self.rec.fail("no_hold_already_resolved", f"{where}: {exc}")
        else:
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.rec.fail("unexpected_error", f"{where}: {text}")

    def overrun_probe_plan(self, plan: Plan) -> Plan:
        """A tiny call on the budgets an overrun just froze."""
        return dataclasses.replace(plan, key=None, estimate=1, amount=1, run_policy=None)


def _guard_parameters(gov: Governor) -> set[str]:
    return set(inspect.signature(gov.guard).parameters)


class SyncAgent(Agent):
    """An agent in a thread (or a worker process): ``guard`` and the sync decorator."""

    def main(self, runs: int, ops: tuple[int, int]) -> None:
        for _ in range(runs):
            kind, info = self.new_run()
            for n in range(self.rng.randint(*ops)):
                self.reseed(info.run, n)
                try:
                    self.op(kind, info, self.choose_op(info, can_cancel=False))
                except Exception as exc:
                    self.unexpected(f"{self.name} op in {info.run}", exc)
                self.tick()

    def op(self, kind: AgentType, info: RunInfo, op: str) -> None:
        self.rec.count(f"op:{op}")
        if op == "pair":
            self.pair(self.plan(kind, info))
        elif op == "overrun":
            self.single(self.plan(kind, info, overrun=True), "overrun", HEARD_OR_NOTHING_MOVED)
        elif op == "revoke_check":
            self.revoke_check(kind, info)
        elif op == "cross_run":
            found = self.cross_run_plan(kind, info)
            if found is None:
                self.single(self.plan(kind, info), "single")
                return
            if self.rng.random() < 0.5:  # the earlier run is over: revoke it
                self.gov.revoke(run=found[1], reason="sim: run over", by="sim")
                self.rec.count("revoke:run")
            self.single(found[0], "cross_run")
        elif op == "widen":
            assert info.cap is not None
            plan = dataclasses.replace(
                self.plan(kind, info), run_policy=RunPolicy(cap=kind.money(2 * info.cap))
            )
            self.single(plan, "widen", expect=ViolationCode.RUN_POLICY_WIDENED)
        elif op == "no_estimate":
            plan = dataclasses.replace(self.plan(kind, info), estimate=None)
            self.single(plan, "no_estimate", expect=ViolationCode.ESTIMATE_REQUIRED)
        elif op == "free":
            plan = dataclasses.replace(self.plan(kind, info), estimate=None, amount=0, free=True)
            self.attempt(plan, Fault.NONE, "free")
        elif self.decorator_ok(info) and self.rng.random() < 0.15:
            self.decorated_single(self.plan(kind, info))
        else:
            self.single(self.plan(kind, info), "single")

    # -- one attempt ---------------------------------------------------------------------
    def attempt(
        self,
        plan: Plan,
        fault: Fault,
        op: str,
        choreo: Choreo | None = None,
        me: str = "X",
        expect: ViolationCode | None = None,
        abort_if_admitted: bool = False,
    ) -> Outcome:
        choreo = choreo or Choreo()
        marker = self.marker()
        attempt = self.attempt_record(plan, marker, op, fault=fault.value)
        out = Outcome()
        where = f"{marker} ({op}, run {plan.run}, key {plan.key}, fault {fault})"
        try:
            choreo.wait("reserve" + me)
            with self.gov.guard(**plan.guard_kwargs(marker)) as call:
                choreo.done("reserve" + me)
                out.hold_id, out.resumed = call.hold_id, call.reservation.resumed
                attempt.hold_id, attempt.resumed = out.hold_id, out.resumed
                self.on_reserved(plan, call, op, marker)
                if expect is not None:
                    self.admitted_unexpectedly(plan, op, marker, expect)
                    if abort_if_admitted:
                        if call.reservation.resumed:
                            raise _Abandon("admitted, not sent")
                        call.fail(error="sim: admitted unexpectedly, not sent")
                        out.kind = "refused"
                        return out
                if plan.free:
                    out.kind = "settled"
                    return out
                choreo.wait("send" + me)
                got: ChargeResult | BaseException
                try:
                    got = plan.charge(self.vendor, call.idempotency_key, fault)
                except Exception as exc:
                    got = exc
                finally:
                    choreo.done("send" + me)
                choreo.wait("resolve" + me)
                if isinstance(got, ChargeResult):
                    call.settle(
                        Money(got.amount, got.currency),
                        http_status=200,
                        vendor_request_id=got.request_id,
                    )
                    out.kind = "settled"
                    if got.amount > (plan.estimate or 0) and not got.replayed:
                        attempt.expect_outcome = "overrun"
                        self.after_overrun(plan, call.hold_id, got.amount - (plan.estimate or 0))
                elif isinstance(got, VendorRefused):
                    call.fail(
                        http_status=got.http_status,
                        vendor_request_id=got.request_id,
                        error=str(got),
                    )
                    out.kind, out.status = "refused", got.http_status
                else:
                    raise got
        except PolicyViolation as violation:
            out.kind, out.code = "denied", violation.code
            self.denied(violation)
        except (VendorServerError, TimeoutError, ConnectionResetError, _Abandon):
            out.kind = "unknown"
        except Exception as exc:
            self.unexpected(where, exc)
        finally:
            choreo.finish(me)
        attempt.outcome = f"{out.kind}:{out.code.value if out.code else out.status}"
        self.check_outcome(plan, op, marker, out)
        return out

    def after_overrun(self, plan: Plan, hold_id: str, excess: int) -> None:
        """Right after an overrun settled: its budgets refuse a new reserve; then maybe
        acknowledge it (as its operator would)."""
        self.rec.overrun(OverrunRec(hold_id, plan.type.name, plan.run, excess))
        self.rec.count("overruns")
        probe = self.overrun_probe_plan(plan)
        marker = self.marker()
        self.attempt_record(probe, marker, "overrun_probe")
        try:
            with self.gov.guard(**probe.guard_kwargs(marker)) as call:
                self.rec.fail(
                    "overrun_frozen",
                    f"{marker}: a reserve on {plan.type.name} (run {plan.run}) was admitted "
                    f"right after the overrun of hold {hold_id}",
                )
                call.fail(error="sim: probe, not sent")
        except PolicyViolation as violation:
            if violation.code is not ViolationCode.BUDGET_FROZEN:
                self.rec.count("inconclusive")
        self.acknowledge_maybe(hold_id)

    def acknowledge_maybe(self, hold_id: str) -> None:
        acknowledge = getattr(self.gov, "acknowledge_overrun", None)
        if acknowledge is not None and self.rng.random() < 0.85:
            acknowledge(hold_id, reason="sim: seen", by="sim")
            self.rec.overrun_state(hold_id, "acknowledged")
        else:
            self.rec.overrun_state(hold_id, "left")

    # -- operations ------------------------------------------------------------------------
    def single(
        self,
        plan: Plan,
        op: str,
        allowed: Sequence[Fault] | None = None,
        expect: ViolationCode | None = None,
    ) -> None:
        """One call, retried with the same key after failures a retry can fix."""
        out = Outcome()
        allowed = allowed or _faults_for(plan)
        for _ in range(3):
            fault = _fault(self.rng, allowed)
            out = self.attempt(plan, fault, op, expect=expect)
            if not self.retry(out):
                break
            if self.rng.random() < 0.5:
                self.vendor.release(plan.key)
        self.finish_plan(plan, out)

    def retry(self, out: Outcome) -> bool:
        if out.kind == "unknown" or (out.kind == "refused" and out.status in (409, 429)):
            return self.rng.random() < 0.6
        return False

    def finish_plan(self, plan: Plan, out: Outcome) -> None:
        if out.kind == "unknown":
            self.unknown.append(plan)
        if self.rng.random() < 0.7:  # the vendor finishes parked requests, sooner or later
            self.vendor.release(plan.key)

    def pair(self, plan: Plan) -> None:
        """Two attempts with one idempotency key, overlapping as a retrying agent's do."""
        self.rec.count("pairs")
        fx, fy = _fault(self.rng), _fault(self.rng)
        choreo = Choreo(_pair_order(self.rng, fx, fy))
        outs: dict[str, Outcome] = {}

        def run(me: str, fault: Fault) -> None:
            outs[me] = self.attempt(plan, fault, "pair", choreo, me)

        threads = [
            threading.Thread(target=run, args=(me, f), name=f"{self.name}-{me}")
            for me, f in (("X", fx), ("Y", fy))
        ]
        for thread in threads:
            thread.start()
        try:
            choreo.wait("release")
            self.vendor.release(plan.key)
        finally:
            choreo.done("release")
            for thread in threads:
                thread.join(STUCK_AFTER)
        last = outs.get("Y") or outs.get("X") or Outcome()
        self.finish_plan(plan, last)

    def revoke_check(self, kind: AgentType, info: RunInfo) -> None:
        """Revoke this run: its next call, and a retry of a call it left unknown, are
        refused; then restore it."""
        self.gov.revoke(run=info.run, reason="sim: revoke check", by="sim")
        self.rec.count("revoke:run")
        try:
            plan = self.plan(kind, info)
            self.attempt(
                plan,
                Fault.NONE,
                "revoke_check",
                expect=ViolationCode.REVOKED,
                abort_if_admitted=True,
            )
            mine = [p for p in self.unknown if p.run == info.run]
            if mine:
                self.attempt(
                    mine[0],
                    Fault.NONE,
                    "revoke_check",
                    expect=ViolationCode.REVOKED,
                    abort_if_admitted=True,
                )
        finally:
            self.gov.restore(run=info.run, reason="sim: checked", by="sim")
            self.rec.count("restore:run")

    def decorated_single(self, plan: Plan) -> None:
        """One call through ``Governor.governed`` (no idempotency key of paymaster's: the
        user sends the vendor its own, the same on each retry)."""
        fn = self.decorated.get(plan.type.name)
        if fn is None:
            fn = self.decorated[plan.type.name] = _decorate(self.gov, plan.type, is_async=False)
        out = Outcome()
        for _ in range(3):
            fault = _fault(self.rng)
            self.attempt_record(plan, None, "decorator", fault=fault.value)
            out = Outcome()
            try:
                fn(plan, self.vendor, fault)
                out.kind = "settled"
            except PolicyViolation:
                out.kind = "denied"
            except VendorRefused as exc:
                out.kind, out.status = "refused", exc.http_status
            except (VendorServerError, TimeoutError, ConnectionResetError):
                out.kind = "unknown"
            except Exception as exc:
                self.unexpected(f"decorator ({plan.run}, key {plan.key})", exc)
            if not self.retry(out):
                break
        if self.rng.random() < 0.7:
            self.vendor.release(plan.key)


def _decorate(gov: Governor, kind: AgentType, *, is_async: bool) -> Any:
    """The user's own charge function for ``kind``, governed by the decorator."""
    governed = gov.governed(
        agent=kind.name,
        vendor=kind.vendor,
        endpoint=ENDPOINT,
        estimate=lambda plan, vendor, fault: kind.money(plan.estimate),
        run=lambda plan, vendor, fault: plan.run,
        # The decorator takes no idempotency key: the user's own key, sent to the vendor,
        # is named as the customer, so that the books can be matched to the holds.
        customer=lambda plan, vendor, fault: plan.key,
        actual=lambda result: Money(result.amount, result.currency),
    )
    if is_async:

        async def acharge(plan: Plan, vendor: VendorAPI, fault: Fault) -> ChargeResult:
            return await asyncio.to_thread(plan.charge, vendor, plan.key, fault)

        return governed(acharge)

    def charge(plan: Plan, vendor: VendorAPI, fault: Fault) -> ChargeResult:
        return plan.charge(vendor, plan.key, fault)

    return governed(charge)


class AsyncAgent(Agent):
    """An agent of asyncio tasks: ``aguard``, the async decorator, cancellations."""

    path = "aguard"

    async def main(self, runs: int, ops: tuple[int, int]) -> None:
        for _ in range(runs):
            kind, info = self.new_run()
            for n in range(self.rng.randint(*ops)):
                self.reseed(info.run, n)
                try:
                    await self.op(kind, info, self.choose_op(info, can_cancel=True))
                except Exception as exc:
                    self.unexpected(f"{self.name} op in {info.run}", exc)
                self.tick()

    async def op(self, kind: AgentType, info: RunInfo, op: str) -> None:
        self.rec.count(f"op:{op}")
        if op == "pair":
            await self.pair(self.plan(kind, info))
        elif op == "overrun":
            plan = self.plan(kind, info, overrun=True)
            await self.single(plan, "overrun", HEARD_OR_NOTHING_MOVED)
        elif op == "cancel":
            await self.cancelled(self.plan(kind, info))
        elif op == "revoke_check":
            await self.revoke_check(kind, info)
        elif op == "cross_run":
            found = self.cross_run_plan(kind, info)
            if found is None:
                await self.single(self.plan(kind, info), "single")
                return
            if self.rng.random() < 0.5:  # the earlier run is over: revoke it
                await asyncio.to_thread(
                    self.gov.revoke, run=found[1], reason="sim: run over", by="sim"
                )
                self.rec.count("revoke:run")
            await self.single(found[0], "cross_run")
        elif op == "widen":
            assert info.cap is not None
            plan = dataclasses.replace(
                self.plan(kind, info), run_policy=RunPolicy(cap=kind.money(2 * info.cap))
            )
            await self.single(plan, "widen", expect=ViolationCode.RUN_POLICY_WIDENED)
        elif op == "no_estimate":
            plan = dataclasses.replace(self.plan(kind, info), estimate=None)
            await self.single(plan, "no_estimate", expect=ViolationCode.ESTIMATE_REQUIRED)
        elif op == "free":
            plan = dataclasses.replace(self.plan(kind, info), estimate=None, amount=0, free=True)
            await self.attempt(plan, Fault.NONE, "free")
        elif self.decorator_ok(info) and self.rng.random() < 0.15:
            await self.decorated_single(self.plan(kind, info))
        else:
            await self.single(self.plan(kind, info), "single")

    async def attempt(
        self,
        plan: Plan,
        fault: Fault,
        op: str,
        choreo: AChoreo | None = None,
        me: str = "X",
        expect: ViolationCode | None = None,
        abort_if_admitted: bool = False,
        hook: CancelHook | None = None,
    ) -> Outcome:
        choreo = choreo or AChoreo()
        marker = self.marker()
        attempt = self.attempt_record(
            plan,
            marker,
            op,
            rows=(0, 1) if hook is not None and hook.early else (1, 1),
            fault=fault.value,
        )
        out = Outcome()
        where = f"{marker} ({op}, run {plan.run}, key {plan.key}, fault {fault})"
        try:
            await choreo.wait("reserve" + me)
            if hook is not None:
                hook.entering.set()
            async with self.gov.aguard(**plan.guard_kwargs(marker)) as call:
                await choreo.done("reserve" + me)
                out.hold_id, out.resumed = call.hold_id, call.reservation.resumed
                attempt.hold_id, attempt.resumed = out.hold_id, out.resumed
                self.on_reserved(plan, call, op, marker)
                if expect is not None:
                    self.admitted_unexpectedly(plan, op, marker, expect)
                    if abort_if_admitted:
                        if call.reservation.resumed:
                            raise _Abandon("admitted, not sent")
                        await call.fail(error="sim: admitted unexpectedly, not sent")
                        out.kind = "refused"
                        return out
                if plan.free:
                    out.kind = "settled"
                    return out
                await choreo.wait("send" + me)
                got: ChargeResult | BaseException
                try:
                    if hook is not None and not hook.early:
                        got = await asyncio.to_thread(self._charge_held, plan, call, fault, hook)
                    else:
                        got = await asyncio.to_thread(
                            plan.charge, self.vendor, call.idempotency_key, fault
                        )
                except Exception as exc:
                    got = exc
                finally:
                    await choreo.done("send" + me)
                await choreo.wait("resolve" + me)
                if isinstance(got, ChargeResult):
                    await call.settle(
                        Money(got.amount, got.currency),
                        http_status=200,
                        vendor_request_id=got.request_id,
                    )
                    out.kind = "settled"
                    if got.amount > (plan.estimate or 0) and not got.replayed:
                        attempt.expect_outcome = "overrun"
                        await self.after_overrun(
                            plan, call.hold_id, got.amount - (plan.estimate or 0)
                        )
                elif isinstance(got, VendorRefused):
                    await call.fail(
                        http_status=got.http_status,
                        vendor_request_id=got.request_id,
                        error=str(got),
                    )
                    out.kind, out.status = "refused", got.http_status
                else:
                    raise got
        except PolicyViolation as violation:
            out.kind, out.code = "denied", violation.code
            self.denied(violation)
        except (VendorServerError, TimeoutError, ConnectionResetError, _Abandon):
            out.kind = "unknown"
        except asyncio.CancelledError:
            out.kind = "cancelled"
            raise
        except Exception as exc:
            self.unexpected(where, exc)
        finally:
            await choreo.finish(me)
        attempt.outcome = f"{out.kind}:{out.code.value if out.code else out.status}"
        self.check_outcome(plan, op, marker, out)
        return out

    def _charge_held(
        self, plan: Plan, call: Any, fault: Fault, hook: CancelHook
    ) -> ChargeResult | BaseException:
        """Charge, tell the canceller the call is at the vendor, and hold the answer until
        the cancellation is delivered (in a worker thread)."""
        try:
            got: ChargeResult | BaseException = plan.charge(
                self.vendor, call.idempotency_key, fault
            )
        except Exception as exc:
            got = exc
        hook.loop.call_soon_threadsafe(hook.in_call.set)
        hook.delivered.wait(STUCK_AFTER)
        return got

    async def after_overrun(self, plan: Plan, hold_id: str, excess: int) -> None:
        self.rec.overrun(OverrunRec(hold_id, plan.type.name, plan.run, excess))
        self.rec.count("overruns")
        probe = self.overrun_probe_plan(plan)
        marker = self.marker()
        self.attempt_record(probe, marker, "overrun_probe")
        try:
            async with self.gov.aguard(**probe.guard_kwargs(marker)) as call:
                self.rec.fail(
                    "overrun_frozen",
                    f"{marker}: a reserve on {plan.type.name} (run {plan.run}) was admitted "
                    f"right after the overrun of hold {hold_id}",
                )
                await call.fail(error="sim: probe, not sent")
        except PolicyViolation as violation:
            if violation.code is not ViolationCode.BUDGET_FROZEN:
                self.rec.count("inconclusive")
        acknowledge = getattr(self.gov, "acknowledge_overrun", None)
        if acknowledge is not None and self.rng.random() < 0.85:
            await asyncio.to_thread(acknowledge, hold_id, reason="sim: seen", by="sim")
            self.rec.overrun_state(hold_id, "acknowledged")
        else:
            self.rec.overrun_state(hold_id, "left")

    async def single(
        self,
        plan: Plan,
        op: str,
        allowed: Sequence[Fault] | None = None,
        expect: ViolationCode | None = None,
    ) -> None:
        out = Outcome()
        allowed = allowed or _faults_for(plan)
        for _ in range(3):
            out = await self.attempt(plan, _fault(self.rng, allowed), op, expect=expect)
            if not self.retry(out):
                break
            if self.rng.random() < 0.5:
                await asyncio.to_thread(self.vendor.release, plan.key)
        await self.finish_plan(plan, out)

    def retry(self, out: Outcome) -> bool:
        if out.kind == "unknown" or (out.kind == "refused" and out.status in (409, 429)):
            return self.rng.random() < 0.6
        return False

    async def finish_plan(self, plan: Plan, out: Outcome) -> None:
        if out.kind in ("unknown", "cancelled"):
            self.unknown.append(plan)
        if self.rng.random() < 0.7:
            await asyncio.to_thread(self.vendor.release, plan.key)

    async def pair(self, plan: Plan) -> None:
        self.rec.count("pairs")
        fx, fy = _fault(self.rng), _fault(self.rng)
        choreo = AChoreo(_pair_order(self.rng, fx, fy))

        async def release() -> None:
            try:
                await choreo.wait("release")
                await asyncio.to_thread(self.vendor.release, plan.key)
            finally:
                await choreo.done("release")

        outs = await asyncio.gather(
            self.attempt(plan, fx, "pair", choreo, "X"),
            self.attempt(plan, fy, "pair", choreo, "Y"),
            release(),
        )
        await self.finish_plan(plan, outs[1])

    async def cancelled(self, plan: Plan) -> None:
        """A task cancelled mid-call: while its reserve is in flight, or once its vendor
        call has reached the vendor (the answer is held until the cancellation lands)."""
        self.rec.count("cancellations")
        hook = CancelHook(asyncio.get_running_loop(), early=self.rng.random() < 0.3)
        task = asyncio.create_task(self.attempt(plan, _fault(self.rng), "cancel", hook=hook))
        if hook.early:
            await hook.entering.wait()
            for _ in range(self.rng.randint(0, 4)):
                await asyncio.sleep(0)  # let the reserve get somewhere, or not
            task.cancel()
        else:
            waiter = asyncio.create_task(hook.in_call.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            task.cancel()
            hook.delivered.set()
        try:
            out = await task
        except asyncio.CancelledError:
            out = Outcome("cancelled")
        await self.finish_plan(plan, out)

    async def revoke_check(self, kind: AgentType, info: RunInfo) -> None:
        await asyncio.to_thread(self.gov.revoke, run=info.run, reason="sim: revoke check", by="sim")
        self.rec.count("revoke:run")
        try:
            await self.attempt(
                self.plan(kind, info),
                Fault.NONE,
                "revoke_check",
                expect=ViolationCode.REVOKED,
                abort_if_admitted=True,
            )
            mine = [p for p in self.unknown if p.run == info.run]
            if mine:
                await self.attempt(
                    mine[0],
                    Fault.NONE,
                    "revoke_check",
                    expect=ViolationCode.REVOKED,
                    abort_if_admitted=True,
                )
        finally:
            await asyncio.to_thread(self.gov.restore, run=info.run, reason="sim: checked", by="sim")
            self.rec.count("restore:run")

    async def decorated_single(self, plan: Plan) -> None:
        fn = self.decorated.get(plan.type.name)
        if fn is None:
            fn = self.decorated[plan.type.name] = _decorate(self.gov, plan.type, is_async=True)
        out = Outcome()
        for _ in range(3):
            fault = _fault(self.rng)
            self.attempt_record(plan, None, "decorator", fault=fault.value)
            out = Outcome()
            try:
                await fn(plan, self.vendor, fault)
                out.kind = "settled"
            except PolicyViolation:
                out.kind = "denied"
            except VendorRefused as exc:
                out.kind, out.status = "refused", exc.http_status
            except (VendorServerError, TimeoutError, ConnectionResetError):
                out.kind = "unknown"
            except Exception as exc:
                self.unexpected(f"async decorator ({plan.run}, key {plan.key})", exc)
            if not self.retry(out):
                break
        if self.rng.random() < 0.7:
            await asyncio.to_thread(self.vendor.release, plan.key)


class CancelHook:
    """How a task to be cancelled and its canceller meet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, early: bool) -> None:
        self.loop = loop
        self.early = early
        self.entering = asyncio.Event()
        self.in_call = asyncio.Event()
        self.delivered = threading.Event()


# -- chaos: the operator ------------------------------------------------------------------
class Chaos:
    """Revokes and restores agent types (now and then everything), and acknowledges
    overruns left for the operator; woken by the agents' progress, never by a clock."""

    def __init__(self, gov: Governor, rec: Recorder, rng: random.Random, every: int) -> None:
        self.gov, self.rec, self.rng, self.every = gov, rec, rng, every
        self._lock = threading.Lock()
        self._ticks = 0
        self._wake = threading.Event()
        self._stopping = False
        self._active: tuple[str, str | None] | None = None
        self._thread = threading.Thread(target=self._main, name="chaos", daemon=True)

    def start(self) -> Chaos:
        self._thread.start()
        return self

    def tick(self) -> None:
        with self._lock:
            self._ticks += 1
            if self._ticks % self.every == 0:
                self._wake.set()

    def _main(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._act()
            except Exception as exc:
                self.rec.fail("unexpected_error", f"chaos: {exc!r}")

    def _act(self) -> None:
        if self._active is not None:
            self._lift()
        elif self.rng.random() < 0.4:
            if self.rng.random() < 0.1:
                self._active = ("everything", None)
                self.gov.revoke(everything=True, reason="sim: chaos", by="chaos")
            else:
                agent = self.rng.choice(AGENT_TYPES).name
                self._active = ("agent", agent)
                self.gov.revoke(agent=agent, reason="sim: chaos", by="chaos")
            self.rec.count(f"revoke:{self._active[0]}")
        acknowledge = getattr(self.gov, "acknowledge_overrun", None)
        if acknowledge is not None:
            for hold_id in self.rec.left_overruns():
                if self.rng.random() < 0.5:
                    acknowledge(hold_id, reason="sim: operator", by="chaos")
                    self.rec.overrun_state(hold_id, "acknowledged")

    def _lift(self) -> None:
        assert self._active is not None
        scope, target = self._active
        if scope == "everything":
            self.gov.restore(everything=True, reason="sim: chaos over", by="chaos")
        else:
            self.gov.restore(agent=target, reason="sim: chaos over", by="chaos")
        self.rec.count(f"restore:{scope}")
        self._active = None

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(STUCK_AFTER)
        if self._active is not None:
            self._lift()


# -- adapters -----------------------------------------------------------------------------
def _adapter_script(
    rng: random.Random, run: str, kind: AgentType
) -> tuple[list[list[str]], list[list[dict[str, Any]]]]:
    """Four model turns (the second makes two parallel calls): ids and arguments."""
    ids: list[list[str]] = []
    args: list[list[dict[str, Any]]] = []
    for t, width in enumerate((1, 2, 1, 1)):
        turn_ids, turn_args = [], []
        for i in range(width):
            estimate = rng.randint(max(1, kind.per_call // 20), kind.per_call)
            amount = estimate if rng.random() < 0.7 else rng.randint(estimate // 2, estimate)
            turn_ids.append(f"{run}-c{t}-{i}")
            turn_args.append(
                {
                    "amount": amount,
                    "estimate": estimate,
                    "currency": kind.currency,
                    "key": f"{run}-k{t}-{i}",
                    "run": run,
                    "agent": kind.name,
                    "fault": _fault(rng).value,
                    "wrap": rng.random() < 0.5,
                }
            )
        ids.append(turn_ids)
        args.append(turn_args)
    return ids, args


def _tool_charge(vendor: VendorAPI, a: dict[str, Any]) -> dict[str, Any]:
    """The adapters' tool body: the user's own vendor call (half of the tools wrap their
    vendor's 5xx in their own exception, registered with ``Governor(unknown_on=...)``)."""
    try:
        result = vendor.charge(
            int(a["amount"]),
            str(a["currency"]),
            idempotency_key=str(a["key"]),
            labels=(f"day:{a['agent']}", f"run:{a['agent']}:{a['run']}"),
            metadata={"estimate": str(a["estimate"]), "run": str(a["run"])},
            fault=Fault(a["fault"]),
        )
    except VendorServerError as exc:
        if a.get("wrap"):
            raise GatewayFault(f"the payments gateway failed: {exc.user_message}") from None
        raise
    return {"amount": result.amount, "id": result.charge_id}


def run_adapters(
    gov: Governor, vendor: FakeVendor, rec: Recorder, rng: random.Random, n: int
) -> None:
    """A small part of the simulation through both adapters, with scripted models."""
    for i in range(n):
        for path, runner in (("openai", _openai_run), ("langchain", _langchain_run)):
            kind = rng.choice(AGENT_TYPES)
            run = f"{path}-r{i}"
            rec.run(RunInfo(kind.name, run, None))
            ids, args = _adapter_script(rng, run, kind)
            with rec.lock:
                calls = {
                    c: a for turn in zip(ids, args, strict=True) for c, a in zip(*turn, strict=True)
                }
                rec.data.adapter_runs.append(AdapterRun(path, run, ids, calls))
            rec.count(f"op:{path}")
            try:
                runner(gov, vendor, kind, run, ids, args, use_async=rng.random() < 0.5)
            except PolicyViolation as violation:
                rec.count(f"denied:{violation.code.value}")
            except (
                VendorRefused,
                VendorServerError,
                GatewayFault,
                TimeoutError,
                ConnectionResetError,
            ):
                rec.count(f"{path}:tool_error_ended_run")
            except ImportError as exc:
                if (exc.name or "").startswith("paymaster"):  # the adapter itself is broken
                    rec.fail("unexpected_error", f"{path} run {run}: {exc!r}")
                else:  # the framework is not installed
                    rec.count(f"{path}:skipped ({exc.name})")
            except Exception as exc:
                rec.count(f"{path}:ended:{type(exc).__name__}")
                if type(exc).__name__ in ("SpecError", "GovernanceUnavailable"):
                    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    rec.fail("unexpected_error", f"{path} run {run}: {text}")


def _spec(kind: AgentType) -> Any:
    from paymaster import ToolSpec

    return ToolSpec(
        vendor=kind.vendor,
        endpoint=ENDPOINT,
        estimate=lambda a: Money(int(a["estimate"]), str(a["currency"])),
        actual=lambda result: int(result["amount"]),
    )


def _openai_run(
    gov: Governor,
    vendor: FakeVendor,
    kind: AgentType,
    run: str,
    ids: list[list[str]],
    args: list[list[dict[str, Any]]],
    *,
    use_async: bool,
) -> None:
    import json

    from agents import Agent as SdkAgent
    from agents import Runner, function_tool, set_tracing_disabled
    from agents.testing import ScriptedModel, assistant_message, function_call

    from paymaster_openai_agents import govern_tools

    set_tracing_disabled(True)

    def pay(
        amount: int,
        estimate: int,
        currency: str,
        key: str,
        run: str,
        agent: str,
        fault: str,
        wrap: bool,
    ) -> str:
        """Charge the customer (minor units)."""
        a = dict(
            amount=amount,
            estimate=estimate,
            currency=currency,
            key=key,
            run=run,
            agent=agent,
            fault=fault,
            wrap=wrap,
        )
        return json.dumps(_tool_charge(vendor, a))

    async def apay(
        amount: int,
        estimate: int,
        currency: str,
        key: str,
        run: str,
        agent: str,
        fault: str,
        wrap: bool,
    ) -> str:
        """Charge the customer (minor units)."""
        a = dict(
            amount=amount,
            estimate=estimate,
            currency=currency,
            key=key,
            run=run,
            agent=agent,
            fault=fault,
            wrap=wrap,
        )
        return json.dumps(await asyncio.to_thread(_tool_charge, vendor, a))

    tool = function_tool(apay if use_async else pay, name_override="pay")
    spec = dataclasses.replace(_spec(kind), actual=lambda result: int(json.loads(result)["amount"]))
    tools = govern_tools([tool], gov, specs={"pay": spec})
    steps: list[Any] = [
        [function_call("pay", a, call_id=cid) for cid, a in zip(turn_ids, turn_args, strict=True)]
        for turn_ids, turn_args in zip(ids, args, strict=True)
    ]
    model = ScriptedModel([*steps, [assistant_message("done")]])
    Runner.run_sync(
        SdkAgent(name=kind.name, tools=tools, model=model), "go", context={"run_id": run}
    )


def _langchain_run(
    gov: Governor,
    vendor: FakeVendor,
    kind: AgentType,
    run: str,
    ids: list[list[str]],
    args: list[list[dict[str, Any]]],
    *,
    use_async: bool,
) -> None:
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool

    from paymaster_langchain import govern_tools
    from paymaster_langchain.testing import ScriptedChatModel

    @tool
    def pay(
        amount: int,
        estimate: int,
        currency: str,
        key: str,
        run: str,
        agent: str,
        fault: str,
        wrap: bool,
    ) -> dict[str, Any]:
        """Charge the customer (minor units)."""
        a = dict(
            amount=amount,
            estimate=estimate,
            currency=currency,
            key=key,
            run=run,
            agent=agent,
            fault=fault,
            wrap=wrap,
        )
        return _tool_charge(vendor, a)

    @tool("pay")
    async def apay(
        amount: int,
        estimate: int,
        currency: str,
        key: str,
        run: str,
        agent: str,
        fault: str,
        wrap: bool,
    ) -> dict[str, Any]:
        """Charge the customer (minor units)."""
        a = dict(
            amount=amount,
            estimate=estimate,
            currency=currency,
            key=key,
            run=run,
            agent=agent,
            fault=fault,
            wrap=wrap,
        )
        return await asyncio.to_thread(_tool_charge, vendor, a)

    tools = govern_tools([apay if use_async else pay], gov, specs={"pay": _spec(kind)})
    messages = [
        AIMessage(
            "",
            tool_calls=[
                {"name": "pay", "args": a, "id": cid}
                for cid, a in zip(turn_ids, turn_args, strict=True)
            ],
        )
        for turn_ids, turn_args in zip(ids, args, strict=True)
    ]
    model = ScriptedChatModel(messages=iter([*messages, AIMessage("done")]))
    agent = create_agent(model, tools=tools, name=kind.name)
    request = {"messages": [("user", "go")]}
    config: Any = {"metadata": {"run_id": run}}
    if use_async:
        asyncio.run(agent.ainvoke(request, config=config))
    else:
        agent.invoke(request, config=config)


# -- worker processes ------------------------------------------------------------------------
def process_agent(
    db_url: str,
    seed: int,
    index: int,
    vendor_url: str,
    start_wall: float,
    runs: int,
    ops: tuple[int, int],
) -> Record:
    """A worker process: its own Governor on the same database, charging the vendor's
    books over HTTP."""
    rec = Recorder()
    gov = Governor(
        db_url,
        policies=[t.policy() for t in AGENT_TYPES],
        clock=SimClock(start_wall),
        unknown_on=UNKNOWN_ON,
        sqlite_synchronous="NORMAL",
    )
    try:
        agent = SyncAgent(f"p{index}", gov, VendorClient(vendor_url), rec, f"{seed}:p{index}")
        agent.path = "process"
        agent.main(runs, ops)
    except Exception as exc:
        rec.fail("unexpected_error", f"process p{index}: {traceback.format_exc()}{exc!r}")
    finally:
        gov.close()
    return rec.data


# -- one simulation ---------------------------------------------------------------------------
@dataclass
class SimReport:
    seed: int
    backend: str
    seconds: float = 0.0
    operations: int = 0
    attempts: int = 0
    overruns: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    vendor: dict[str, Any] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    replay: str = ""

    def line(self) -> str:
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items()) if k != "none")
        status = "ok" if not self.failures else f"FAILED ({len(self.failure_kinds())} kinds)"
        return (
            f"seed {self.seed} [{self.backend}] {status}: {self.operations} operations, "
            f"{self.attempts} attempts, {self.overruns} overruns, "
            f"{self.vendor.get('charges', 0)} charges, faults: {faults} ({self.seconds:.1f}s)"
        )

    def failure_kinds(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.failures)

    def failure_text(self, limit: int = 40) -> str:
        lines = [
            f"vendor-truth simulation failed: seed {self.seed} on {self.backend}",
            f"replay: {self.replay or self.pytest_replay()}",
            "invariants broken: "
            + ", ".join(f"{k} x{n}" for k, n in sorted(self.failure_kinds().items())),
        ]
        seen: Counter[str] = Counter()
        for kind, detail in self.failures:
            seen[kind] += 1
            if seen[kind] <= max(3, limit // max(1, len(self.failure_kinds()))):
                lines.append(f"  [{kind}] {detail}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  what happened: " + self.happened())
        return "\n".join(lines)

    def pytest_replay(self) -> str:
        return (
            f"{SEED_ENV}={self.seed} .venv/bin/python -m pytest tests/test_vendor_truth.py "
            f"-k 'simulation and {self.backend}'"
        )

    def happened(self) -> str:
        return ", ".join(f"{k}={n}" for k, n in sorted(self.counts.items()))


def simulate(
    seed: int,
    db_url: str,
    cfg: SimConfig = SHORT,
    *,
    pool: Executor | None = None,
    backend: str | None = None,
) -> SimReport:
    """Run one seeded simulation on a fresh database; check the invariants."""
    backend = backend or ("postgresql" if db_url.startswith("postgresql") else "sqlite")
    report = SimReport(seed, backend)
    started = time.monotonic()
    clock = SimClock(time.time())
    rec = Recorder()
    vendor = FakeVendor()
    policies = [t.policy() for t in AGENT_TYPES]

    def governor() -> Governor:
        return Governor(
            db_url,
            policies=policies,
            clock=clock,
            unknown_on=UNKNOWN_ON,
            sqlite_synchronous="NORMAL",
        )

    gov, agov = governor(), governor()
    own_pool = None
    try:
        with VendorServer(vendor) as server:
            if cfg.processes:
                if pool is None:
                    pool = own_pool = ProcessPoolExecutor(
                        cfg.processes, mp_context=multiprocessing.get_context("spawn")
                    )
                procs = [
                    pool.submit(
                        process_agent,
                        db_url,
                        seed,
                        i,
                        server.url,
                        clock.start_wall,
                        cfg.process_runs,
                        cfg.ops_per_run,
                    )
                    for i in range(cfg.processes)
                ]
            else:
                procs = []
            chaos = Chaos(gov, rec, random.Random(f"{seed}:chaos"), cfg.chaos_every).start()
            threads = []
            for i in range(cfg.thread_agents):
                agent = SyncAgent(f"t{i}", gov, vendor, rec, f"{seed}:t{i}", chaos.tick)
                threads.append(
                    threading.Thread(
                        target=_guarded(rec, agent.name, agent.main),
                        args=(cfg.runs_per_agent, cfg.ops_per_run),
                        name=agent.name,
                    )
                )
            threads.append(
                threading.Thread(
                    target=_guarded(rec, "adapters", run_adapters),
                    args=(gov, vendor, rec, random.Random(f"{seed}:adapters"), cfg.adapter_runs),
                    name="adapters",
                )
            )
            for thread in threads:
                thread.start()
            asyncio.run(_async_agents(seed, agov, vendor, rec, chaos.tick, cfg))
            for thread in threads:
                thread.join()
            for proc in procs:
                try:
                    rec.data.merge(proc.result())
                except Exception as exc:
                    rec.fail("unexpected_error", f"a worker process failed: {exc!r}")
            chaos.stop()
            report.vendor = vendor.stats()  # before the parked requests finish
            vendor.release()
        # Closing waits for work still in the governors' threads (a cancelled call's row);
        # a fresh governor then reads what every process left.
        gov.close()
        agov.close()
        with governor() as fresh:
            _check(report, rec.data, fresh, vendor, clock)
    finally:
        gov.close()
        agov.close()
        if own_pool is not None:
            own_pool.shutdown()
    data = rec.data
    report.failures = data.failures
    report.attempts = len(data.attempts)
    report.overruns = len(data.overruns)
    report.counts = data.counts
    report.operations = sum(n for k, n in data.counts.items() if k.startswith("op:"))
    report.faults = Counter(report.vendor.get("faults", {}))
    report.faults["cancel"] = data.counts["cancellations"]
    report.faults["revoke"] = sum(n for k, n in data.counts.items() if k.startswith("revoke:"))
    report.faults["shared_key_pair"] = data.counts["pairs"]
    report.seconds = time.monotonic() - started
    return report


def _guarded(rec: Recorder, name: str, fn: Callable[..., Any]) -> Callable[..., None]:
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            rec.fail("unexpected_error", f"{name}: {traceback.format_exc()}{exc!r}")

    return run


async def _async_agents(
    seed: int,
    gov: Governor,
    vendor: FakeVendor,
    rec: Recorder,
    tick: Callable[[], None],
    cfg: SimConfig,
) -> None:
    agents = [
        AsyncAgent(f"aio{i}", gov, vendor, rec, f"{seed}:aio{i}", tick)
        for i in range(cfg.async_agents)
    ]
    results = await asyncio.gather(
        *(a.main(cfg.runs_per_agent, cfg.ops_per_run) for a in agents), return_exceptions=True
    )
    for agent, result in zip(agents, results, strict=True):
        if isinstance(result, BaseException):
            rec.fail("unexpected_error", f"{agent.name}: {result!r}")


# -- the invariants ---------------------------------------------------------------------------
def _check(
    report: SimReport, data: Record, gov: Governor, vendor: FakeVendor, clock: SimClock
) -> None:
    fail = data.failures.append
    charges = vendor.charges()
    charged: Counter[str] = Counter()
    excess: Counter[str] = Counter()
    for charge in charges:
        over = max(0, charge.amount - int(charge.metadata.get("estimate", "0")))
        for label in charge.labels:
            charged[label] += charge.amount
            excess[label] += over

    rows = [r for r in gov.audit.iter_records()]
    books = _Books(gov, rows, data)
    # Every charge is counted by the holds of its call, within its run's budget if the run
    # has one.
    for charge in charges:
        found = books.holds_of(charge)
        if sum(books.counted(h) for h in found) < charge.amount:
            fail(("every_charge_counted", books.describe_charge(charge)))
        info = data.runs.get(str(charge.metadata.get("run")))
        if (
            info is not None
            and info.cap is not None
            and info.established
            and any(h.run_budget_id is None for h in found)
        ):
            fail(("run_budget_binds", f"outside its run's budget: {books.describe_charge(charge)}"))
    attempt_rows = [r for r in rows if r.outcome in ATTEMPT_OUTCOMES]
    events = Counter(r.outcome for r in rows if r.outcome not in ATTEMPT_OUTCOMES)
    if events:
        report.notes.append(f"event rows (not attempts): {dict(events)}")
    overrun_rows = [r for r in attempt_rows if r.outcome == "overrun"]

    budgets = gov.budgets(day=clock.day)
    daily = {b.agent: b for b in budgets if b.kind == "daily"}
    run_budgets = {b.run: b for b in budgets if b.kind == "run"}

    # Budgets to check: each agent type's day, and each run that has a run budget.
    checked: list[tuple[str, str, Any, int | None, list[OverrunRec], list[Any]]] = []
    for kind in AGENT_TYPES:
        label = f"day:{kind.name}"
        ovs = [o for o in data.overruns.values() if o.agent == kind.name]
        flagged = [r for r in overrun_rows if r.agent == kind.name]
        checked.append((label, kind.name, daily.get(kind.name), kind.daily_cap, ovs, flagged))
    for info in data.runs.values():
        if info.cap is None or not info.established:
            continue
        label = f"run:{info.agent}:{info.run}"
        ovs = [o for o in data.overruns.values() if o.run == info.run]
        flagged = [r for r in overrun_rows if r.run == info.run]
        checked.append((label, info.agent, run_budgets.get(info.run), info.cap, ovs, flagged))

    frozen_probes: list[tuple[str, str, str | None]] = []
    for label, agent, status, cap, ovs, flagged in checked:
        total, over = charged[label], excess[label]
        kind = TYPES_BY_NAME[agent]
        fmt = kind.money
        if cap is not None and total - over > cap:
            fail(
                (
                    "cap",
                    f"{label}: the vendor charged {fmt(total)} ({fmt(total - over)} within "
                    f"reservations) against a cap of {fmt(cap)}",
                )
            )
        if over > 0 and not flagged:
            fail(
                (
                    "overrun_flagged",
                    f"{label}: the vendor charged {fmt(over)} above the "
                    f"estimates, with no 'overrun' audit row",
                )
            )
        committed = status.committed.amount if status is not None else 0
        if committed < total:
            fail(
                (
                    "ledger_covers_vendor",
                    f"{label}: the ledger's committed is {fmt(committed)}, "
                    f"the vendor charged {fmt(total)}"
                    + (books.explain_run(label, charges) if label.startswith("run:") else ""),
                )
            )
        if status is not None and status.committed != status.settled + status.pending:
            fail(
                (
                    "ledger_consistent",
                    f"{label}: committed {status.committed} != settled "
                    f"{status.settled} + pending {status.pending}",
                )
            )
        if any(o.state != "acknowledged" for o in ovs):
            run = label.split(":", 2)[2] if label.startswith("run:") else None
            frozen_probes.append((label, agent, run))

    # Exactly one audit row per attempt: by tool_call_id, and counted per run.
    by_marker: dict[str, list[Any]] = {}
    for row in attempt_rows:
        if row.tool_call_id:
            by_marker.setdefault(row.tool_call_id, []).append(row)
    adapter_ids = {cid for ar in data.adapter_runs for turn in ar.turns for cid in turn}
    known = {a.marker for a in data.attempts if a.marker} | adapter_ids
    rows_per_hold = Counter(r.hold_id for r in attempt_rows if r.hold_id)
    attempts_per_hold = Counter(a.hold_id for a in data.attempts if a.hold_id)
    for attempt in data.attempts:
        if attempt.marker is None:
            continue
        found = by_marker.get(attempt.marker, [])
        low, high = attempt.rows
        hold = attempt.hold_id
        if (
            not low <= len(found) <= high
            and hold is not None
            and attempts_per_hold[hold] > 1
            and rows_per_hold[hold] == attempts_per_hold[hold]
        ):
            # One row per attempt of a shared hold, but not each under its own attempt.
            fail(
                (
                    "audit_row_names_its_attempt",
                    f"{attempt.marker} ({attempt.path} {attempt.op}, run {attempt.run}, "
                    f"resumed={attempt.resumed}): {len(found)} rows carry its tool_call_id; "
                    f"hold {hold} has {rows_per_hold[hold]} rows for "
                    f"{attempts_per_hold[hold]} attempts",
                )
            )
        elif not low <= len(found) <= high:
            outcomes = [r.outcome for r in found]
            fail(
                (
                    "audit_one_row_per_attempt",
                    f"{attempt.marker} ({attempt.path} {attempt.op}, "
                    f"run {attempt.run}): {len(found)} rows {outcomes}",
                )
            )
        elif found and attempt.expect_outcome and found[0].outcome != attempt.expect_outcome:
            fail(
                (
                    "overrun_flagged",
                    f"{attempt.marker} settled above its estimate: its row "
                    f"says {found[0].outcome!r}, not {attempt.expect_outcome!r}",
                )
            )
    for marker in sorted(set(by_marker) - known):
        fail(("audit_one_row_per_attempt", f"rows for no attempt: tool_call_id {marker}"))
    per_run: dict[str, list[int]] = {}
    for attempt in data.attempts:
        bounds = per_run.setdefault(attempt.run, [0, 0])
        bounds[0] += attempt.rows[0]
        bounds[1] += attempt.rows[1]
    rows_per_run = Counter(r.run for r in attempt_rows)
    adapter_run_ids = {ar.run for ar in data.adapter_runs}
    for run in sorted(set(per_run) | set(rows_per_run)):
        if run in adapter_run_ids or run is None:
            continue
        low, high = per_run.get(run, [0, 0])
        if not low <= rows_per_run[run] <= high:
            fail(
                (
                    "audit_one_row_per_attempt",
                    f"run {run}: {rows_per_run[run]} attempt rows for {low}..{high} attempts",
                )
            )
    charged_keys = {c.idempotency_key for c in charges}
    for ar in data.adapter_runs:
        _check_adapter_run(ar, by_marker, charged_keys, fail)

    # Nothing left pending: every attempt recorded how its call ended.
    from paymaster import HoldState

    for hold in gov.ledger.holds(states=[HoldState.PENDING]):
        fail(
            (
                "no_hold_left_pending",
                f"hold {hold.id} ({hold.agent}, run {hold.run}, tool_call_id "
                f"{hold.tool_call_id}, key {hold.idempotency_key}, attempts "
                f"{getattr(hold, 'attempts', '?')}) is still pending after every attempt ended; "
                f"its attempts: {[(a.marker, a.op) for a in data.attempts if a.hold_id == hold.id]}"
                f", its rows: {[(r.tool_call_id, r.outcome) for r in rows if r.hold_id == hold.id]}"
                f", the vendor charged: "
                f"{[c.amount for c in charges if c.idempotency_key == hold.idempotency_key]}",
            )
        )

    # Frozen budgets refuse; then the chains verify (probes included).
    for label, agent, run in frozen_probes:
        kind = TYPES_BY_NAME[agent]
        probe = Plan(kind, run or f"probe-{uuid.uuid4().hex[:6]}", None, 1, 1)
        try:
            with gov.guard(**probe.guard_kwargs("final-probe")) as call:
                call.fail(error="sim: final probe, not sent")
                fail(
                    (
                        "overrun_frozen",
                        f"{label}: an overrun left unacknowledged, yet a "
                        "reserve on it was admitted at the end",
                    )
                )
        except PolicyViolation as violation:
            if violation.code in (ViolationCode.CAP_EXCEEDED, ViolationCode.RUN_CAP_EXCEEDED):
                report.notes.append(f"final probe of {label} inconclusive: {violation.code}")
            elif violation.code is not ViolationCode.BUDGET_FROZEN:
                fail(
                    (
                        "overrun_frozen",
                        f"{label}: an unacknowledged overrun's budget refused "
                        f"with {violation.code.value}, not budget_frozen",
                    )
                )
        except Exception as exc:
            fail(("unexpected_error", f"final probe of {label}: {exc!r}"))
    verified = gov.audit.verify()
    if not verified.ok:
        fail(("audit_verify", f"row {verified.first_bad_id}: {verified.reason}"))


class _Books:
    """The ledger's holds indexed by the call they belong to, set against the vendor's
    charges: by idempotency key and run (a guard's), by customer (the decorator's, whose
    user key is named as the customer) or by tool call (an adapter's)."""

    def __init__(self, gov: Governor, rows: Sequence[Any], data: Record) -> None:
        from paymaster import HoldState

        self._settled, self._released = HoldState.SETTLED, HoldState.RELEASED
        self.rows = rows
        self.attempts = data.attempts
        self.tool_calls: dict[str, tuple[str, str]] = {
            str(args["key"]): (
                cid,
                str(args["fault"]) + (", raised as GatewayFault" if args.get("wrap") else ""),
            )
            for ar in data.adapter_runs
            for cid, args in ar.calls.items()
        }
        self.by_key: dict[tuple[str | None, str | None], list[Any]] = {}
        self.by_call: dict[str | None, list[Any]] = {}
        for h in gov.ledger.holds(states=list(HoldState)):
            self.by_key.setdefault((h.idempotency_key, h.run), []).append(h)
            self.by_call.setdefault(h.tool_call_id, []).append(h)
            if h.idempotency_key is None and h.customer is not None:
                self.by_key.setdefault((h.customer, h.run), []).append(h)

    def holds_of(self, charge: Any) -> list[Any]:
        found = self.by_key.get((charge.idempotency_key, charge.metadata.get("run")), [])
        if not found and charge.idempotency_key in self.tool_calls:
            found = self.by_call.get(self.tool_calls[charge.idempotency_key][0], [])
        return found

    def counted(self, h: Any) -> int:
        """What a hold counts against its budgets now."""
        if h.state is self._settled:
            return int(h.actual.amount) if h.actual is not None else 0
        return 0 if h.state is self._released else int(h.estimate.amount)

    def describe_charge(self, charge: Any) -> str:
        found = self.holds_of(charge)
        tool = self.tool_calls.get(str(charge.idempotency_key))
        via = f" (tool call {tool[0]}, fault {tool[1]})" if tool else ""
        tried = [
            f"{a.marker or a.op}:{a.fault}->{a.outcome or '?'}"
            for a in self.attempts
            if a.key == charge.idempotency_key
        ]
        return (
            f"charge {charge.idempotency_key}{via} of {charge.amount} (estimate "
            f"{charge.metadata.get('estimate')}, run {charge.metadata.get('run')}): "
            + ("; ".join(self.describe(h) for h in found) or "no hold for this call")
            + (f"; attempts {tried}" if tried else "")
        )

    def describe(self, h: Any) -> str:
        actual = h.actual.amount if h.actual is not None else None
        mine = [(r.tool_call_id, r.outcome) for r in self.rows if r.hold_id == h.id]
        return (
            f"hold {h.id[:8]} {h.state} estimate {h.estimate.amount} actual {actual} "
            f"run-budget {h.run_budget_id} attempts {getattr(h, 'attempts', '?')} rows {mine}"
        )

    def explain_run(self, label: str, charges: Sequence[Any]) -> str:
        """Every charge of a run's budget, with the holds of its call."""
        lines = [f"      {self.describe_charge(c)}" for c in charges if label in c.labels]
        return "\n" + "\n".join(lines[:40]) if lines else ""


def _check_adapter_run(
    ar: AdapterRun,
    by_marker: dict[str, list[Any]],
    charged_keys: set[str | None],
    fail: Callable[[tuple[str, str]], None],
) -> None:
    """The turns that left rows are a prefix of the script; every call of a turn before
    the last one reached left exactly one row; those of the last, at most one. A call
    whose tool body charged and returned normally is settled, not left unknown (its
    siblings' refusal must not abandon it)."""
    reached = [any(cid in by_marker for cid in turn) for turn in ar.turns]
    last = max((i for i, r in enumerate(reached) if r), default=-1)
    for t, turn in enumerate(ar.turns):
        for cid in turn:
            n = len(by_marker.get(cid, []))
            args = ar.calls.get(cid, {})
            if (
                n == 1
                and args.get("fault") == Fault.NONE.value
                and args.get("key") in charged_keys
                and by_marker[cid][0].outcome not in ("allowed", "overrun", "reconciled")
            ):
                fail(
                    (
                        "adapter_settles_completed_calls",
                        f"{ar.path} {cid}: the tool charged and returned, yet its row says "
                        f"{by_marker[cid][0].outcome!r} ({by_marker[cid][0].error})",
                    )
                )
            if t > last and n:
                fail(("audit_one_row_per_attempt", f"{ar.path} {cid}: a row after the run ended"))
            if (t < last and n != 1) or (t == last and n > 1):
                fail(("audit_one_row_per_attempt", f"{ar.path} {cid}: {n} rows"))


# -- databases and the soak ------------------------------------------------------------------
@contextmanager
def postgres_schema(admin_url: str) -> Iterator[str]:
    """A fresh schema on the PostgreSQL at ``admin_url``; dropped afterwards."""
    from sqlalchemy import create_engine, text

    if "+" not in admin_url.split("://", 1)[0]:
        admin_url = admin_url.replace("postgresql://", "postgresql+psycopg://", 1)
    schema = "sim_" + uuid.uuid4().hex[:12]
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in admin_url else "?"
    try:
        yield f"{admin_url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def soak(seconds: float, first_seed: int, cfg: SimConfig = SOAK) -> int:
    """Seed after seed on every backend until ``seconds`` have passed; 1 if any failed."""
    pg = os.environ.get(PG_ENV)
    deadline = time.monotonic() + seconds
    totals: Counter[str] = Counter()
    failed: list[SimReport] = []
    seeds = 0
    backends = ["sqlite", *(["postgresql"] if pg else [])]
    print(f"soak: {seconds:.0f}s from seed {first_seed} on {', '.join(backends)}", flush=True)
    with ProcessPoolExecutor(
        cfg.processes, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for seed in itertools.count(first_seed):
            if seeds and time.monotonic() >= deadline:  # at least one seed
                break
            seeds += 1
            for backend in backends:
                with _database(backend, pg) as url:
                    report = simulate(seed, url, cfg, pool=pool, backend=backend)
                report.replay = f"{SEED_ENV}={seed} {SOAK_ENV}=0 make soak"
                print(report.line(), flush=True)
                if report.failures:
                    failed.append(report)
                    print(report.failure_text(limit=12), flush=True)
                totals["runs"] += 1
                totals["operations"] += report.operations
                totals["attempts"] += report.attempts
                totals["overruns"] += report.overruns
                totals["faults"] += sum(n for k, n in report.faults.items() if k != "none")
                totals["charges"] += int(report.vendor.get("charges", 0))
    print(
        f"soak summary: {seeds} seeds ({first_seed}..{first_seed + seeds - 1}), "
        f"{totals['runs']} simulations, {totals['operations']} operations, "
        f"{totals['attempts']} attempts, {totals['faults']} faults injected, "
        f"{totals['charges']} charges, {totals['overruns']} overruns; "
        f"{len(failed)} failed"
        + (": " + ", ".join(f"{r.seed}/{r.backend}" for r in failed) if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


@contextmanager
def _database(backend: str, pg: str | None) -> Iterator[str]:
    if backend == "postgresql":
        assert pg is not None
        with postgres_schema(pg) as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="paymaster-sim-") as tmp:
        yield f"sqlite:///{tmp}/ledger.db"


def main(argv: Sequence[str] = ()) -> int:
    import logging

    logging.getLogger("paymaster").setLevel(logging.ERROR)  # overruns are expected here
    seconds = float(os.environ.get(SOAK_ENV) or 600)
    first = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1, 10**6))
    return soak(seconds, first)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vendor_sim  # the functions worker processes are given live in this module's name

    raise SystemExit(vendor_sim.main(sys.argv[1:]))
