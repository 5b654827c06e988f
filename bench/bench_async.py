"""Async under load: the event loop's lag while N concurrent ``aguard`` tasks run on it.

    .venv/bin/python bench/bench_async.py             # 1,000 tasks per backend: ~15 s on 2 CPUs
    .venv/bin/python bench/bench_async.py --quick     # a smoke run with small counts
    .venv/bin/python bench/bench_async.py --profile   # also: where the loop's time goes
    .venv/bin/python bench/bench_async.py --help      # every count, and its env variable

One event loop per run. A ticker task sleeps 1 ms in a loop and records how late each
wake-up is (lag = actual wake-up - requested one); it starts before the load and stops
after it. The load: ``tasks`` concurrent tasks, each

    async with gov.aguard(agent=..., vendor="stripe", endpoint="/v1/refunds",
                          estimate=Money(100, "USD")) as call:
        await asyncio.sleep(0)
        await call.settle()

on ONE budget whose cap the run reaches (floor(cap_fraction x tasks) calls fit), so the
rest are refused with ``PolicyViolation`` (caught and counted); on SQLite
synchronous=FULL, SQLite synchronous=NORMAL and PostgreSQL. Afterwards the ledger is read
back from the database: committed <= cap, no pending hold, one audit row per attempt,
``gov.audit.verify().ok``, and exactly floor(cap/x) calls allowed. Two baselines from the
same run: the ticker alone on an idle loop, and the ticker with ``tasks`` tasks that only
``await asyncio.sleep(0)`` (no paymaster), the loop's own floor on this machine.

``--profile`` re-runs each governed load with the loop instrumented: every callback the
loop runs is timed (wall and the loop thread's CPU) and every ``select()`` is timed
against the timeout the loop asked for; then once under cProfile (the loop thread only);
then with other GIL switch intervals and worker-thread counts.

``ledger_bench.py`` runs this as its section 7; on its own, it takes these flags (each
also read from ``PAYMASTER_BENCH_ASYNC_<FLAG>``). PostgreSQL: ``--pg-url`` /
``PAYMASTER_BENCH_PG_URL`` / ``PAYMASTER_TEST_POSTGRES_URL``, default
``postgresql+psycopg://root@127.0.0.1:5432/test``, skipped if unreachable; every run in a
fresh ``bench_<random>`` schema, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench_env import (
    DEFAULT_PG_URL,
    X,
    background_busy,
    env_count,
    ms,
    parsed,
    percentile,
    pg_schema,
    sqlite_dir,
    standalone_parser,
)
from bench_latency import Backend
from bench_report import (
    met,
    new_table,
    notes,
    print_run_header,
    rate,
    reachable_postgres,
    usd,
    verdict,
)
from bench_scenarios import BACKENDS
from rich.console import Console
from sqlalchemy import text

from paymaster import Governor, Money, Policy, PolicyViolation

ENV_PREFIX = "PAYMASTER_BENCH_ASYNC_"
AGENT, WARMUP_AGENT, VENDOR, ENDPOINT = "refund-agent", "bench-warmup", "stripe", "/v1/refunds"
TICK_S = 0.001  # the ticker's sleep
TARGET_P99_S = 0.005  # the issue: loop lag p99 <= 5 ms with 1,000 concurrent aguard tasks
MAX_THREADS = 16  # Governor's default worker threads (and connection pool size)


# -- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AsyncSettings:
    tasks: int = 1000
    warmup: int = 32
    idle_ticks: int = 1000
    cap_fraction: float = 0.75
    pg_url: str = DEFAULT_PG_URL
    no_postgres: bool = False
    tmpdir: str = ""
    profile: bool = False


QUICK = {"tasks": 200, "warmup": 16, "idle_ticks": 200}
HELP = {
    "tasks": "concurrent aguard tasks (and bare tasks) per run",
    "warmup": "concurrent warm-up calls on another agent before the ticker starts",
    "idle_ticks": "ticks of the idle-loop baseline",
    "cap_fraction": "cap as a fraction of the tasks' calls (so it is reached)",
}


def settings_for(config: Any) -> AsyncSettings:
    """The settings when ``ledger_bench.py`` runs this: its database choices, and counts
    from ``PAYMASTER_BENCH_ASYNC_*`` (or the quick ones under ``--quick``)."""
    counts = {
        k: env_count(
            ENV_PREFIX, k, QUICK[k] if config.quick and k in QUICK else getattr(AsyncSettings, k)
        )
        for k in HELP
    }
    return AsyncSettings(
        **counts, pg_url=config.pg_url, no_postgres=config.no_postgres, tmpdir=config.tmpdir
    )


def parse_args(argv: Sequence[str] | None = None) -> AsyncSettings:
    parser = standalone_parser(__doc__, AsyncSettings, HELP, ENV_PREFIX, "TASKS=5000")
    parser.add_argument("--profile", action="store_true", help="also: where the loop time goes")
    return AsyncSettings(**parsed(parser, argv, QUICK))


# -- the ticker ----------------------------------------------------------------------------
class Ticker:
    """Sleeps ``TICK_S`` in a loop; each wake-up's lateness goes to ``lags`` (seconds)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stopping:
            due = time.perf_counter() + TICK_S
            await asyncio.sleep(TICK_S)
            self.lags.append(time.perf_counter() - due)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # the ticker is asleep on its first tick when the load starts
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        assert self._task is not None
        await self._task


# -- runs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerCheck:
    """The budget, holds and audit rows of the measured agent, read back afterwards."""

    cap: int
    committed: int
    settled: int
    pending: int
    other_holds: int  # released / unknown: none expected
    audit_allowed: int
    audit_denied: int
    audit_other: int
    chain_ok: bool
    chain_rows: int


@dataclass
class LoopRun:
    """One run on one event loop: the ticker's lags and what the tasks saw."""

    label: str
    kind: str  # "idle" | "bare" | "governed"
    tasks: int
    lags: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    allowed: int = 0
    denied: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # allowed calls, enter to exit
    check: LedgerCheck | None = None
    expected: int = 0  # floor(cap / x)

    @property
    def p99(self) -> float:
        return percentile(self.lags, 99)

    @property
    def ok(self) -> bool:
        c = self.check
        return (
            c is not None
            and not self.errors
            and c.committed <= c.cap
            and c.committed == c.settled * X
            and c.pending == 0
            and c.other_holds == 0
            and c.audit_allowed == c.settled == self.allowed == self.expected
            and c.audit_denied == self.denied
            and c.audit_allowed + c.audit_denied + c.audit_other == self.tasks
            and c.chain_ok
        )


async def _timed(run: LoopRun, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` with the ticker around it; its wall time and CPU go to ``run``."""
    async with Ticker() as ticker:
        cpu, t0 = time.process_time(), time.perf_counter()
        await body()
        run.wall_s, run.cpu_s = time.perf_counter() - t0, time.process_time() - cpu
    run.lags = ticker.lags


def run_idle(ticks: int) -> LoopRun:
    """The ticker alone on an idle loop: the timer's own granularity."""
    run = LoopRun("idle loop (ticker only)", "idle", 0)

    async def body() -> None:
        await asyncio.sleep(ticks * TICK_S)

    asyncio.run(_timed(run, body))
    return run


def run_bare(tasks: int) -> LoopRun:
    """``tasks`` tasks that only ``await asyncio.sleep(0)``: no paymaster."""
    run = LoopRun(f"{tasks:,} bare tasks (sleep(0), no paymaster)", "bare", tasks)

    async def one() -> None:
        await asyncio.sleep(0)

    async def body() -> None:
        await asyncio.gather(*(one() for _ in range(tasks)))

    asyncio.run(_timed(run, body))
    return run


async def governed_attempt(gov: Governor, agent: str, run: LoopRun | None) -> None:
    """One aguard call settled at its estimate; a refusal is caught and counted."""
    t0 = time.perf_counter()
    try:
        async with gov.aguard(
            agent=agent, vendor=VENDOR, endpoint=ENDPOINT, estimate=Money(X, "USD")
        ) as call:
            await asyncio.sleep(0)
            await call.settle()
    except PolicyViolation:
        if run is not None:
            run.denied += 1
    except Exception as exc:  # counted and shown; the run FAILs
        if run is None:
            raise
        run.errors.append(f"{type(exc).__name__}: {exc}")
    else:
        if run is not None:
            run.allowed += 1
            run.latencies.append(time.perf_counter() - t0)


def cap_for(settings: AsyncSettings) -> int:
    """floor(cap_fraction x tasks) calls plus half a call, in minor units."""
    return int(settings.cap_fraction * settings.tasks) * X + X // 2


def check_ledger(gov: Governor) -> LedgerCheck:
    with gov.engine.connect() as conn:
        budget = conn.execute(
            text(
                "SELECT b.cap, b.committed,"
                " (SELECT count(*) FROM paymaster_hold h"
                "   WHERE h.daily_budget_id = b.id AND h.state = 'settled'),"
                " (SELECT count(*) FROM paymaster_hold h"
                "   WHERE h.daily_budget_id = b.id AND h.state = 'pending'),"
                " (SELECT count(*) FROM paymaster_hold h WHERE h.daily_budget_id = b.id"
                "   AND h.state NOT IN ('settled', 'pending'))"
                " FROM paymaster_budget b WHERE b.kind = 'daily' AND b.agent = :agent"
            ),
            {"agent": AGENT},
        ).one()
        outcomes = {
            str(o): int(n)
            for o, n in conn.execute(
                text(
                    "SELECT outcome, count(*) FROM paymaster_audit WHERE agent = :agent"
                    " GROUP BY outcome"
                ),
                {"agent": AGENT},
            )
        }
    verified = gov.audit.verify()
    allowed, denied = outcomes.pop("allowed", 0), outcomes.pop("denied", 0)
    return LedgerCheck(
        cap=int(budget[0]),
        committed=int(budget[1]),
        settled=int(budget[2]),
        pending=int(budget[3]),
        other_holds=int(budget[4]),
        audit_allowed=allowed,
        audit_denied=denied,
        audit_other=sum(outcomes.values()),
        chain_ok=verified.ok,
        chain_rows=verified.rows_checked,
    )


@contextmanager
def open_governor(
    backend: Backend, settings: AsyncSettings, tmp: Path, max_threads: int = MAX_THREADS
) -> Iterator[Governor]:
    """A Governor on a fresh SQLite file or PostgreSQL schema, with the measured agent's
    reachable cap and a warm-up agent far from its own."""
    policies = [
        Policy(
            agent=agent,
            vendor=VENDOR,
            currency="USD",
            daily_cap=Money(cap, "USD"),
            endpoints=[ENDPOINT],
        )
        for agent, cap in (
            (AGENT, cap_for(settings)),
            (WARMUP_AGENT, (settings.warmup + 1) * X * 1000),
        )
    ]
    with ExitStack() as stack:
        if backend.kind == "sqlite":
            path = tmp / f"async-{backend.synchronous.lower()}-{time.monotonic_ns()}.db"
            url = f"sqlite:///{path}"
        else:
            url = stack.enter_context(pg_schema(settings.pg_url)).url
        gov = Governor(
            url, policies=policies, sqlite_synchronous=backend.synchronous, max_threads=max_threads
        )
        stack.callback(gov.close)
        yield gov


async def governed_load(
    gov: Governor, settings: AsyncSettings, run: LoopRun, around: Any = None
) -> None:
    """Warm up (threads, connections, budget rows), then the measured load."""
    await asyncio.gather(
        *(governed_attempt(gov, WARMUP_AGENT, None) for _ in range(settings.warmup))
    )
    await governed_attempt(gov, WARMUP_AGENT, None)

    async def body() -> None:
        await asyncio.gather(*(governed_attempt(gov, AGENT, run) for _ in range(settings.tasks)))

    if around is None:
        await _timed(run, body)
    else:
        with around():
            await _timed(run, body)


def run_governed(
    backend: Backend,
    settings: AsyncSettings,
    tmp: Path,
    *,
    max_threads: int = MAX_THREADS,
    around: Any = None,
    label: str | None = None,
) -> LoopRun:
    run = LoopRun(label or backend.label, "governed", settings.tasks)
    run.expected = cap_for(settings) // X
    with open_governor(backend, settings, tmp, max_threads) as gov:
        asyncio.run(governed_load(gov, settings, run, around))
        run.check = check_ledger(gov)
    return run


def backends_for(settings: AsyncSettings) -> list[Backend]:
    return [b for b in BACKENDS if b.kind == "sqlite" or not settings.no_postgres]


@dataclass
class AsyncResults:
    settings: AsyncSettings
    baselines: list[LoopRun]
    governed: list[LoopRun]
    elapsed_s: float


def run_async(settings: AsyncSettings, tmp: Path, progress: Console) -> AsyncResults:
    started = time.perf_counter()
    progress.print("[dim]async: baselines ...[/]")
    baselines = [run_idle(settings.idle_ticks), run_bare(settings.tasks)]
    governed = []
    for backend in backends_for(settings):
        progress.print(f"[dim]async: {settings.tasks} aguard tasks, {backend.label} ...[/]")
        governed.append(run_governed(backend, settings, tmp))
    return AsyncResults(settings, baselines, governed, time.perf_counter() - started)


# -- profile -------------------------------------------------------------------------------
@dataclass
class LoopProfile:
    """Where one instrumented run's loop time went."""

    label: str
    run: LoopRun
    wall_s: float = 0.0
    thread_cpu_s: float = 0.0
    selects: int = 0
    select_wall_s: float = 0.0
    select_asked_s: float = 0.0  # the timeouts the loop asked select() for (when > 0)
    select_late: list[float] = field(default_factory=list)  # return - asked, per timed select
    callbacks: int = 0
    callback_wall_s: float = 0.0
    callback_cpu_s: float = 0.0
    slow: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    by_kind: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))


def _callback_kind(callback: Any) -> str:
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return f"task step: {owner.get_coro().__qualname__}"  # type: ignore[union-attr]
    return getattr(callback, "__qualname__", type(callback).__name__)


@contextmanager
def instrumented(profile: LoopProfile) -> Iterator[None]:
    """Time every callback the running loop runs and every select() it makes."""
    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    original_select, original_run = selector.select, asyncio.Handle._run

    def select(timeout: float | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            return original_select(timeout)
        finally:
            took = time.perf_counter() - t0
            profile.selects += 1
            profile.select_wall_s += took
            if timeout is not None and timeout > 0:
                profile.select_asked_s += timeout
                profile.select_late.append(took - timeout)

    def handle_run(handle: asyncio.Handle) -> None:
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            original_run(handle)
        finally:
            took, cpu = time.perf_counter() - t0, time.thread_time() - c0
            profile.callbacks += 1
            profile.callback_wall_s += took
            profile.callback_cpu_s += cpu
            kind = _callback_kind(handle._callback)  # type: ignore[attr-defined]
            entry = profile.by_kind[kind]
            entry[0] += 1
            entry[1] += took
            if took > TARGET_P99_S:
                profile.slow[kind].append(took)

    selector.select = select
    setattr(asyncio.Handle, "_run", handle_run)  # noqa: B010 (mypy: a method replaced)
    c0, t0 = time.thread_time(), time.perf_counter()
    try:
        yield
    finally:
        profile.wall_s, profile.thread_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        selector.select = original_select
        setattr(asyncio.Handle, "_run", original_run)  # noqa: B010


@contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def profile_backend(
    backend: Backend, settings: AsyncSettings, tmp: Path, progress: Console
) -> tuple[LoopProfile, pstats.Stats, list[LoopRun]]:
    progress.print(f"[dim]async profile: {backend.label} ...[/]")
    profile = LoopProfile(backend.label, LoopRun(backend.label, "governed", settings.tasks))
    profile.run = run_governed(backend, settings, tmp, around=lambda: instrumented(profile))
    profiler = cProfile.Profile()

    @contextmanager
    def profiled() -> Iterator[None]:
        profiler.enable()  # this thread only: the loop's
        try:
            yield
        finally:
            profiler.disable()

    run_governed(backend, settings, tmp, around=profiled)
    variants = []
    for interval in (0.005, 0.001, 0.0002):
        with switch_interval(interval):
            variants.append(
                run_governed(
                    backend, settings, tmp, label=f"switch interval {interval * 1000:g} ms"
                )
            )
    for threads in (2, 4):
        variants.append(
            run_governed(
                backend, settings, tmp, max_threads=threads, label=f"max_threads={threads}"
            )
        )
    return profile, pstats.Stats(profiler), variants


def print_profile(
    console: Console,
    backend: str,
    profile: LoopProfile,
    stats: pstats.Stats,
    variants: list[LoopRun],
    top: int = 12,
) -> None:
    p, run = profile, profile.run
    late = p.select_late
    waited = p.callback_wall_s - p.callback_cpu_s
    table = new_table(
        f"7p. Where the loop time goes: {backend}, {run.tasks:,} aguard tasks (times in ms)",
        "measure",
        "value",
    )
    rows = [
        ("loop lag p50 / p99 / max (instrumented run)", _lags(run)),
        ("loop thread wall (ticker start -> stop)", ms(p.wall_s)),
        ("loop thread CPU (thread_time)", f"{ms(p.thread_cpu_s)} ({_share(p.thread_cpu_s, p)})"),
        ("callbacks run / wall in them", f"{p.callbacks:,} / {ms(p.callback_wall_s)}"),
        ("  of which loop thread CPU", ms(p.callback_cpu_s)),
        ("  of which waiting (wall - CPU: GIL, preemption)", ms(waited)),
        ("select() calls / wall in them", f"{p.selects:,} / {ms(p.select_wall_s)}"),
        ("  timed selects: asked / late beyond asked", f"{ms(p.select_asked_s)} / {ms(sum(late))}"),
        (
            "  lateness of a timed select p50 / p99 / max",
            " / ".join(ms(percentile(late, q)) for q in (50, 99, 100)),
        ),
        ("callbacks longer than 5 ms", f"{sum(len(v) for v in p.slow.values()):,}"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    kinds = new_table(
        f"7p. Loop callbacks by kind, {backend} (sorted by total wall)",
        "callback",
        "count",
        "total wall ms",
        "mean ms",
        "> 5 ms",
        "max ms",
    )
    ordered = sorted(p.by_kind.items(), key=lambda kv: -kv[1][1])
    for kind, (count, wall) in ordered[:8]:
        slow = p.slow.get(kind, [])
        kinds.add_row(
            kind[:90],
            f"{count:,}",
            ms(wall),
            ms(wall / count),
            f"{len(slow):,}",
            ms(max(slow)) if slow else "-",
        )
    console.print(kinds)
    cprof = new_table(
        f"7p. cProfile of the loop thread, {backend}: top {top} by own time",
        "function",
        "calls",
        "own ms",
        "cumulative ms",
    )
    entries = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in sorted(
        entries.items(), key=lambda kv: -kv[1][2]
    )[:top]:
        where = f"{Path(filename).name}:{line}" if line else filename
        cprof.add_row(f"{name} ({where})"[:100], f"{nc:,}", ms(tt), ms(ct))
    console.print(cprof)
    exp = new_table(
        f"7p. The same load with other GIL switch intervals / worker threads, {backend}",
        "variant",
        "lag p50",
        "lag p99",
        "lag max",
        "p99 target",
        "wall s",
        "calls/s",
        "invariants",
    )
    for v in variants:
        exp.add_row(
            v.label,
            ms(percentile(v.lags, 50)),
            ms(v.p99),
            ms(max(v.lags, default=float("nan"))),
            met(v.p99 <= TARGET_P99_S),
            f"{v.wall_s:.2f}",
            rate(v.allowed, v.wall_s),
            verdict(v.ok),
        )
    console.print(exp)
    notes(
        console,
        "Instrumented run: asyncio.Handle._run wrapped to time every callback (wall, and "
        "time.thread_time of the loop thread), the selector's select() wrapped to time each "
        "wait against the timeout the loop asked for; 'late' = returned - asked (the wake-up "
        "itself plus re-acquiring the GIL). cProfile: a separate run, profiler enabled in the "
        "loop thread only (the worker threads are not profiled; its overhead inflates the "
        "loop's times). Variants: sys.setswitchinterval (default 5 ms) and "
        "Governor(max_threads=...) (default 16); each a separate run, fresh database.",
    )


def _share(seconds: float, p: LoopProfile) -> str:
    return f"{100 * seconds / p.wall_s:.0f}% of wall" if p.wall_s else "n/a"


def _lags(run: LoopRun) -> str:
    return " / ".join(ms(percentile(run.lags, q)) for q in (50, 99, 100))


# -- report --------------------------------------------------------------------------------
def print_async(console: Console, results: AsyncResults, number: str = "7.") -> None:
    s = results.settings
    prefix = f"{number} " if number else ""
    table = new_table(
        f"{prefix}Async under load: one event loop, {s.tasks:,} concurrent aguard tasks "
        "(times in ms)",
        "run",
        "tasks",
        "ticks",
        "lag p50",
        "lag p99",
        "lag max",
        "p99 target",
        "wall s",
        "governed calls/s",
        "attempts/s",
        "allowed / denied / errors",
        "call p50",
        "call p99",
        "CPU s",
    )
    for run in results.baselines + results.governed:
        governed = run.kind == "governed"
        table.add_row(
            run.label,
            f"{run.tasks:,}" if run.tasks else "-",
            f"{len(run.lags):,}",
            ms(percentile(run.lags, 50)),
            ms(run.p99),
            ms(max(run.lags, default=float("nan"))),
            f"<= {TARGET_P99_S * 1000:.0f}: {met(run.p99 <= TARGET_P99_S)}" if governed else "-",
            f"{run.wall_s:.3f}",
            rate(run.allowed, run.wall_s) if governed else "-",
            rate(run.tasks, run.wall_s) if run.tasks else "-",
            f"{run.allowed:,} / {run.denied:,} / {len(run.errors)}" if governed else "-",
            ms(percentile(run.latencies, 50)) if governed else "-",
            ms(percentile(run.latencies, 99)) if governed else "-",
            f"{run.cpu_s:.2f}",
        )
    console.print(table)
    check = new_table(
        f"{prefix}Invariants of the async runs, read back from the database",
        "backend",
        "cap",
        "floor(cap/x)",
        "allowed (db)",
        "committed <= cap",
        "committed = allowed*x",
        "pending holds",
        "audit allowed + denied = tasks",
        "audit chains",
        "verdict",
    )
    for run in results.governed:
        c = run.check
        assert c is not None
        audited = c.audit_allowed + c.audit_denied
        check.add_row(
            run.label,
            usd(c.cap),
            f"{run.expected:,}",
            f"{c.settled:,}",
            f"{'yes' if c.committed <= c.cap else 'NO'} ({usd(c.committed)})",
            "yes" if c.committed == c.settled * X else "NO",
            f"{c.pending}" + (f" (+{c.other_holds} other)" if c.other_holds else ""),
            f"{c.audit_allowed:,} + {c.audit_denied:,} = {audited:,}"
            + ("" if audited == run.tasks else f" [red]!= {run.tasks:,}[/]"),
            f"{'ok' if c.chain_ok else 'BROKEN'} ({c.chain_rows:,} rows)",
            verdict(run.ok),
        )
    console.print(check)
    for run in results.governed:
        for error in sorted(set(run.errors))[:3]:
            console.print(f"  [red]{run.label}: {error}[/]", highlight=False)
    notes(
        console,
        f"One event loop per run (asyncio.run). The ticker: 'await asyncio.sleep({TICK_S:g})' "
        "in a loop; lag = perf_counter() after the wake-up - (perf_counter() before the sleep "
        f"+ {TICK_S * 1000:g} ms). Started before the tasks, stopped after the last finished. "
        "Percentiles nearest-rank over all its ticks.",
        f"Each governed task: 'async with gov.aguard(agent='{AGENT}', vendor='{VENDOR}', "
        f"endpoint='{ENDPOINT}', estimate=Money({X}, 'USD')) as call: await asyncio.sleep(0); "
        "await call.settle()', PolicyViolation caught and counted; all created at once "
        f"(asyncio.gather). Governor defaults: {MAX_THREADS} worker threads, pool of "
        f"{MAX_THREADS} connections; SQLite: a fresh file (WAL); PostgreSQL: a fresh schema. "
        f"Before the ticker starts, {s.warmup} concurrent warm-up calls on another agent "
        "(threads, connections and budget rows exist before the clock runs).",
        f"cap = floor({s.cap_fraction:g} x tasks) x ${X / 100:.2f} + $0.50: the run reaches "
        "it. wall s: first task created -> last finished. governed calls/s = allowed calls / "
        "wall; attempts/s = tasks / wall (refusals each write an audit row too). call p50/p99: "
        "enter -> exit of the allowed calls' blocks, queueing for a worker thread included. "
        "CPU s: this process's CPU time (all its threads) during the run.",
        "Every call settles at its estimate, so committed only grows: a final committed <= "
        "cap means settled + pending never exceeded it. PASS: that, committed = allowed*x, no "
        "pending or other hold, audit allowed = allowed (db) = the tasks' count = floor(cap/x) "
        "(no false refusal), audit denied = refusals seen, one audit row per task, no errors, "
        f"and gov.audit.verify().ok. Section wall time: {results.elapsed_s:.1f} s.",
    )


def target_rows(results: AsyncResults) -> list[tuple[str, str, bool]]:
    """Rows for ``ledger_bench.py``'s summary of targets."""
    return [
        (
            f"async: {run.tasks:,} concurrent aguard tasks, {run.label}: loop lag p99 <= "
            f"{TARGET_P99_S * 1000:.0f} ms, invariants held",
            f"p99 {ms(run.p99)} ms; invariants {'held' if run.ok else 'BROKEN'}",
            run.p99 <= TARGET_P99_S and run.ok,
        )
        for run in results.governed
    ]


def profile_section(
    results: AsyncResults, tmp: Path, console: Console, progress: Console, *, all_: bool
) -> None:
    """Profile every backend (``all_``) or those that missed the p99 target."""
    settings = results.settings
    by_label = {b.label: b for b in backends_for(settings)}
    for run in results.governed:
        if all_ or run.p99 > TARGET_P99_S:
            profile, stats, variants = profile_backend(by_label[run.label], settings, tmp, progress)
            print_profile(console, run.label, profile, stats, variants)


def async_section(config: Any, console: Console, progress: Console) -> AsyncResults:
    """Run and print this benchmark with ``ledger_bench.py``'s config (section 7)."""
    settings = settings_for(config)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        results = run_async(settings, tmp, progress)
    print_async(console, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=210)
    progress = Console(stderr=True)
    idle_busy = background_busy()
    pg = None if settings.no_postgres else reachable_postgres(settings.pg_url, progress)
    settings = replace(settings, no_postgres=pg is None)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        print_run_header(console, "paymaster: async under load", pg, str(tmp), idle_busy)
        results = run_async(settings, tmp, progress)
        print_async(console, results, number="")
        if settings.profile:
            profile_section(results, tmp, console, progress, all_=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
