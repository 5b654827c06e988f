"""Multi-process load on PostgreSQL: governed calls, the naive enforcer they replace, and
the bare hot-row conditional UPDATE that bounds them (the ceiling).

Every scenario starts ``processes`` OS processes with the ``spawn`` method. Each builds
its own client (a :class:`~paymaster.Governor`, or a psycopg connection for the naive
enforcer), warms it up on rows the measurement does not touch, and waits at a
:class:`multiprocessing.Barrier` with the parent; the clock starts when the barrier opens.
Each process then makes a fixed number of attempts, and reports what happened.

The simulated vendor call between the check and the record takes ``call_ms`` (default 0),
the same for both enforcers.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, Literal

import psycopg
from bench_env import CpuTicks, X, cpu_ticks, libpq_url

from paymaster import AuditLog, Governor, Money, Policy, PolicyViolation
from paymaster._db import connect
from paymaster._errors import GovernanceUnavailable

VENDOR, ENDPOINT = "stripe", "/v1/refunds"
WARMUP_AGENT = "bench-warmup"
START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 900.0

NAIVE_TABLE = "naive_spend"
NAIVE_SPENT = f"SELECT COALESCE(SUM(amount), 0) FROM {NAIVE_TABLE}"
NAIVE_RECORD = f"INSERT INTO {NAIVE_TABLE} (worker, amount) VALUES (%s, %s)"

BARE_TABLE = "bare_budget"
#: A reserve's hot step and nothing else: the conditional UPDATE of one budget row.
BARE_TAKE = (
    f"UPDATE {BARE_TABLE} SET committed = committed + %s, calls = calls + 1 "
    "WHERE id = 1 AND committed <= cap - %s RETURNING committed"
)


@dataclass(frozen=True)
class LoadSpec:
    """What every process of one scenario does (picklable, sent to spawned children)."""

    kind: Literal["governed", "naive", "bare"]
    url: str  # SQLAlchemy URL selecting the scenario's schema
    agents: tuple[str, ...]  # each process cycles through these, from its own offset
    cap: int  # daily cap of each agent (minor units)
    attempts: int  # per process
    warmup: int  # calls per process before the barrier, cycling through warmup_agents
    call_ms: float = 0.0  # simulated vendor call
    warmup_agents: tuple[str, ...] = (WARMUP_AGENT,)  # may be ``agents``: counted then

    def warmup_calls_on_agents(self, processes: int) -> int:
        """Warm-up calls that landed on the measured agents' budgets (all or none)."""
        return self.warmup * processes if set(self.warmup_agents) & set(self.agents) else 0


@dataclass
class WorkerResult:
    """What one process did after the barrier (``monotonic`` timestamps are system-wide)."""

    index: int
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    first_error: str | None = None
    last_allowed: float | None = None
    finished: float = 0.0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # allowed calls, seconds


@dataclass(frozen=True)
class WorkerFailure:
    """A process that could not run its scenario."""

    index: int
    error: str


@dataclass(frozen=True)
class LoadRun:
    """The combined outcome of one scenario."""

    spec: LoadSpec
    processes: int
    started: float
    results: list[WorkerResult]
    cpu_before: CpuTicks | None
    cpu_after: CpuTicks | None

    def total(self, name: str) -> int:
        return sum(int(getattr(r, name)) for r in self.results)

    @property
    def attempts(self) -> int:
        return self.spec.attempts * self.processes

    @property
    def elapsed_s(self) -> float:
        """From the barrier to the last process's last attempt."""
        return max(r.finished for r in self.results) - self.started

    @property
    def allowed_window_s(self) -> float:
        """From the barrier to the last allowed call (when the cap was reached, if it was)."""
        ends = [r.last_allowed for r in self.results if r.last_allowed is not None]
        return (max(ends) - self.started) if ends else float("nan")

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r.latencies]

    @property
    def cpu_s(self) -> float:
        return sum(r.cpu_s for r in self.results)


def policies_for(spec: LoadSpec) -> list[Policy]:
    """One policy per agent with the scenario's cap, plus a warm-up agent far from its cap."""

    def policy(agent: str, cap: int) -> Policy:
        return Policy(
            agent=agent,
            vendor=VENDOR,
            currency="USD",
            daily_cap=Money(cap, "USD"),
            endpoints=[ENDPOINT],
        )

    warmup_cap = (spec.warmup + 1) * X * 1000
    return [policy(a, spec.cap) for a in spec.agents] + [policy(WARMUP_AGENT, warmup_cap)]


def _simulated_call(call_ms: float) -> None:
    if call_ms > 0:
        time.sleep(call_ms / 1000)


# -- governed ------------------------------------------------------------------------------
def _governed_once(gov: Governor, agent: str, call_ms: float) -> None:
    with gov.guard(
        agent=agent, vendor=VENDOR, endpoint=ENDPOINT, method="POST", estimate=Money(X, "USD")
    ) as call:
        _simulated_call(call_ms)
        call.settle()


def _attempt_loop(
    index: int, processes: int, spec: LoadSpec, attempt: Callable[[str], bool]
) -> WorkerResult:
    """Run ``spec.attempts`` attempts; ``attempt(agent)`` returns True if allowed."""
    result = WorkerResult(index)
    agents = spec.agents
    offset = index * len(agents) // processes
    cpu = time.process_time()
    for i in range(spec.attempts):
        t0 = time.perf_counter()
        try:
            allowed = attempt(agents[(offset + i) % len(agents)])
        except GovernanceUnavailable as exc:
            result.errors += 1
            result.first_error = result.first_error or str(exc)
            continue
        if allowed:
            result.allowed += 1
            result.latencies.append(time.perf_counter() - t0)
            result.last_allowed = time.monotonic()
        else:
            result.denied += 1
    result.finished = time.monotonic()
    result.cpu_s = time.process_time() - cpu
    return result


def governed_worker(index: int, processes: int, spec: LoadSpec, barrier: Barrier) -> WorkerResult:
    """Build a Governor, warm it up on the warm-up agent, wait at the barrier, run."""
    gov = Governor(spec.url, policies=policies_for(spec))
    try:
        warm = spec.warmup_agents
        offset = index * len(warm) // processes
        for i in range(spec.warmup):
            _governed_once(gov, warm[(offset + i) % len(warm)], 0)

        def attempt(agent: str) -> bool:
            try:
                _governed_once(gov, agent, spec.call_ms)
            except PolicyViolation:
                return False
            return True

        barrier.wait(START_TIMEOUT_S)
        return _attempt_loop(index, processes, spec, attempt)
    finally:
        gov.close()


# -- naive ---------------------------------------------------------------------------------
def create_naive_table(dsn: str) -> None:
    """The naive enforcer's record of calls made."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {NAIVE_TABLE} (id bigserial PRIMARY KEY, worker int NOT NULL, "
            "amount bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())"
        )


def naive_worker(index: int, processes: int, spec: LoadSpec, barrier: Barrier) -> WorkerResult:
    """Check-then-record without a lock: SELECT the spent total; if spent + x <= cap, make
    the call, then INSERT its record. Each statement is its own (autocommit) transaction."""
    with psycopg.connect(libpq_url(spec.url), autocommit=True) as conn:
        for _ in range(spec.warmup):
            conn.execute(NAIVE_SPENT).fetchone()

        def attempt(_agent: str) -> bool:
            row = conn.execute(NAIVE_SPENT).fetchone()
            assert row is not None
            if int(row[0]) + X > spec.cap:
                return False
            _simulated_call(spec.call_ms)
            conn.execute(NAIVE_RECORD, (index, X))
            return True

        barrier.wait(START_TIMEOUT_S)
        return _attempt_loop(index, processes, spec, attempt)


# -- the ceiling ---------------------------------------------------------------------------
def create_bare_table(dsn: str, cap: int) -> None:
    """One budget row with room for every attempt."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {BARE_TABLE} (id int PRIMARY KEY, committed bigint NOT NULL, "
            "calls bigint NOT NULL, cap bigint NOT NULL)"
        )
        conn.execute(f"INSERT INTO {BARE_TABLE} VALUES (1, 0, 0, %s)", (cap,))


def bare_worker(index: int, processes: int, spec: LoadSpec, barrier: Barrier) -> WorkerResult:
    """The ceiling of any enforcer that takes one hot row: each attempt is one transaction
    of the conditional UPDATE (BEGIN and the UPDATE in one round trip, COMMIT in the
    next), on a plain psycopg connection."""
    with psycopg.connect(libpq_url(spec.url)) as conn:
        for _ in range(spec.warmup):
            conn.execute("SELECT 1").fetchone()
            conn.commit()

        def attempt(_agent: str) -> bool:
            row = conn.execute(BARE_TAKE, (X, X)).fetchone()
            conn.commit()
            return row is not None

        barrier.wait(START_TIMEOUT_S)
        return _attempt_loop(index, processes, spec, attempt)


_WORKERS = {"governed": governed_worker, "naive": naive_worker, "bare": bare_worker}


def worker_main(
    index: int, processes: int, spec: LoadSpec, barrier: Barrier, out: Queue[Any]
) -> None:
    """Entry point of a spawned process: run the scenario, put the result on ``out``."""
    try:
        out.put(_WORKERS[spec.kind](index, processes, spec, barrier))
    except BaseException:
        barrier.abort()
        out.put(WorkerFailure(index, traceback.format_exc()))


# -- the parent's side ---------------------------------------------------------------------
def run_load(spec: LoadSpec, processes: int) -> LoadRun:
    """Spawn ``processes`` workers, open the barrier, collect their results."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    out: Queue[Any] = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(i, processes, spec, barrier, out), daemon=True)
        for i in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(START_TIMEOUT_S)
    except Exception:
        started = None
    else:
        started = time.monotonic()
    before = cpu_ticks()
    results = [out.get(timeout=RUN_TIMEOUT_S) for _ in procs]
    after = cpu_ticks()
    for proc in procs:
        proc.join(timeout=60)
    failures = [r for r in results if isinstance(r, WorkerFailure)]
    if failures or started is None:
        details = "\n".join(f"worker {f.index}:\n{f.error}" for f in failures)
        raise RuntimeError(f"{spec.kind} load with {processes} processes failed\n{details}")
    ordered = sorted(results, key=lambda r: r.index)
    return LoadRun(spec, processes, started, ordered, before, after)


# -- checks against the database -----------------------------------------------------------
@dataclass(frozen=True)
class LedgerCheck:
    """What the database says a governed scenario did, for its measured agents."""

    allowed: int  # settled holds
    unsettled: int  # holds in any other state
    committed: int  # sum of the budgets' committed
    max_over_cap: int  # max over budgets of committed - cap (<= 0 means never above)
    committed_matches: bool  # committed == settled holds * x for every budget
    windows: int  # budget rows (one per agent per UTC day)
    audit_allowed: int
    audit_denied: int
    chain_ok: bool
    chain_rows: int


_BUDGETS = """
SELECT b.cap, b.committed,
       (SELECT count(*) FROM paymaster_hold h
         WHERE h.daily_budget_id = b.id AND h.state = 'settled') AS settled,
       (SELECT count(*) FROM paymaster_hold h
         WHERE h.daily_budget_id = b.id AND h.state <> 'settled') AS unsettled
FROM paymaster_budget b
WHERE b.kind = 'daily' AND b.agent = ANY(%s)
"""
_AUDIT = "SELECT outcome, count(*) FROM paymaster_audit WHERE agent = ANY(%s) GROUP BY outcome"


def check_ledger(spec: LoadSpec) -> LedgerCheck:
    """Read the budgets, holds and audit rows back, and verify every audit hash chain."""
    agents = list(spec.agents)
    with psycopg.connect(libpq_url(spec.url)) as conn:
        budgets = conn.execute(_BUDGETS, (agents,)).fetchall()
        outcomes: dict[str, int] = dict(conn.execute(_AUDIT, (agents,)).fetchall())
    engine = connect(spec.url)
    try:
        verified = AuditLog(engine).verify()
    finally:
        engine.dispose()
    return LedgerCheck(
        allowed=sum(int(b[2]) for b in budgets),
        unsettled=sum(int(b[3]) for b in budgets),
        committed=sum(int(b[1]) for b in budgets),
        max_over_cap=max((int(b[1]) - int(b[0]) for b in budgets), default=0),
        committed_matches=all(int(b[1]) == int(b[2]) * X for b in budgets),
        windows=len(budgets),
        audit_allowed=int(outcomes.get("allowed", 0)),
        audit_denied=int(outcomes.get("denied", 0)),
        chain_ok=verified.ok,
        chain_rows=verified.rows_checked,
    )


@dataclass(frozen=True)
class NaiveCheck:
    """What the naive enforcer's table says it allowed."""

    allowed: int
    spent: int


def check_naive(spec: LoadSpec) -> NaiveCheck:
    with psycopg.connect(libpq_url(spec.url)) as conn:
        row = conn.execute(f"SELECT count(*), COALESCE(SUM(amount), 0) FROM {NAIVE_TABLE}")
        count, spent = row.fetchone() or (0, 0)
    return NaiveCheck(int(count), int(spent))
