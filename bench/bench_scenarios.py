"""The benchmark's scenarios: what runs on which fresh database, and what counts as correct."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench_config import Config
from bench_env import X, busy_cpu_s, percentile, pg_schema
from bench_latency import Backend, LatencySamples, measure_postgres, measure_sqlite
from bench_load import (
    LedgerCheck,
    LoadRun,
    LoadSpec,
    NaiveCheck,
    check_ledger,
    check_naive,
    create_bare_table,
    create_naive_table,
    policies_for,
    run_load,
)
from rich.console import Console

from paymaster import Governor

HOT_AGENT = "refund-agent"
BACKENDS = (
    Backend("SQLite synchronous=FULL", "sqlite", "FULL"),
    Backend("SQLite synchronous=NORMAL", "sqlite", "NORMAL"),
    Backend("PostgreSQL", "postgresql"),
)


# -- 1. latency ----------------------------------------------------------------------------
def run_latency(config: Config, tmp: Path, progress: Console) -> list[LatencySamples]:
    """Each backend on a fresh SQLite file or PostgreSQL schema."""
    kwargs: dict[str, Any] = {
        "calls": config.latency_calls,
        "warmup": config.latency_warmup,
        "rounds": config.latency_rounds,
    }
    results = []
    for backend in BACKENDS:
        if backend.kind == "postgresql" and config.no_postgres:
            continue
        progress.print(f"[dim]latency: {backend.label} ...[/]")
        if backend.kind == "sqlite":
            results.append(measure_sqlite(backend, tmp, **kwargs))
        else:
            with pg_schema(config.pg_url) as schema:
                results.append(measure_postgres(backend, schema.url, schema.dsn, **kwargs))
    return results


def latency_ratio(samples: LatencySamples) -> float:
    """Governed p50 over floor p50."""
    return percentile(samples.governed, 50) / percentile(samples.floor, 50)


# -- 2. governed load ----------------------------------------------------------------------
@dataclass(frozen=True)
class GovernedScenario:
    """A governed load and what the database said afterwards."""

    run: LoadRun
    check: LedgerCheck
    #: Bare hot-row UPDATE transactions/s with as many processes, measured just before.
    ceiling: float | None = None

    @property
    def of_ceiling(self) -> float | None:
        """Governed calls/s as a fraction of the bare hot-row ceiling."""
        return None if not self.ceiling else self.calls_per_s / self.ceiling

    @property
    def warmup_allowed(self) -> int:
        """Warm-up calls (before the barrier) that count against the measured budgets."""
        return self.run.spec.warmup_calls_on_agents(self.run.processes)

    @property
    def expected(self) -> int:
        """Calls the database must show allowed: every attempt, up to floor(cap/x).

        Exact for one budget (the hot runs) and for budgets whose caps are out of reach
        (the spread run), which are the scenarios this benchmark builds.
        """
        per_agent = self.run.spec.cap // X
        return min(self.run.attempts + self.warmup_allowed, per_agent * len(self.run.spec.agents))

    @property
    def overshoot(self) -> int:
        return self.check.allowed - self.expected

    @property
    def calls_per_s(self) -> float:
        """Allowed calls per second, from the barrier to the last allowed call."""
        return self.run.total("allowed") / self.run.allowed_window_s

    @property
    def cpu_per_attempt_s(self) -> float | None:
        """CPU-seconds the whole machine was busy per attempt, barrier -> end: the worker
        processes, PostgreSQL's backends and anything else running."""
        busy = busy_cpu_s(self.run.cpu_before, self.run.cpu_after)
        return None if busy is None else busy / self.run.attempts

    @property
    def cpu_bound(self) -> float | None:
        """Attempts/s this machine's CPUs could run at the CPU each attempt took in this run:
        no change to the code's scheduling or waiting passes it, only doing less work."""
        per_attempt = self.cpu_per_attempt_s
        return None if not per_attempt else (os.cpu_count() or 1) / per_attempt

    @property
    def ok(self) -> bool:
        """Zero overshoot, and the ledger and audit log agree with what the workers saw."""
        c, r = self.check, self.run
        return (
            self.overshoot == 0
            and c.max_over_cap <= 0
            and c.committed_matches
            and c.unsettled == 0
            and c.audit_allowed == c.allowed == r.total("allowed") + self.warmup_allowed
            and c.audit_denied == r.total("denied")
            and r.total("errors") == 0
            and c.chain_ok
            and c.windows == len(r.spec.agents)
        )


def governed_scenario(
    config: Config,
    agents: tuple[str, ...],
    cap: int,
    attempts: int,
    processes: int,
    warm_agents: bool = False,
) -> GovernedScenario:
    """One governed load on a fresh schema, checked from the database before it is dropped.

    ``warm_agents``: warm up on the measured agents themselves (one call on each, per
    process, so every process has looked up every budget before the clock starts)
    instead of on a separate warm-up agent.
    """
    with pg_schema(config.pg_url) as schema:
        spec = LoadSpec(
            kind="governed",
            url=schema.url,
            agents=agents,
            cap=cap,
            attempts=attempts,
            warmup=len(agents) if warm_agents else config.load_warmup,
            call_ms=config.call_ms,
        )
        if warm_agents:
            spec = replace(spec, warmup_agents=agents)
        # Migrate once here, so the workers' Governors find the schema at head.
        Governor(spec.url, policies=policies_for(spec)).close()
        run = run_load(spec, processes)
        return GovernedScenario(run, check_ledger(spec))


def hot_cap(config: Config, processes: int) -> int:
    """floor(cap_fraction * all attempts) calls plus half a call, in minor units."""
    calls = int(config.cap_fraction * config.per_process * processes)
    return calls * X + X // 2


def run_hot(config: Config, progress: Console) -> list[GovernedScenario]:
    """ONE budget, each process count in turn, with a cap the run reaches; each beside the
    bare hot-row ceiling with as many processes, measured just before it."""
    scenarios = []
    for processes in config.processes:
        progress.print(f"[dim]hot budget: {processes} process(es), bare ceiling ...[/]")
        ceiling = run_ceiling(config, processes)
        progress.print(f"[dim]hot budget: {processes} process(es), governed ...[/]")
        cap = hot_cap(config, processes)
        scenario = governed_scenario(config, (HOT_AGENT,), cap, config.per_process, processes)
        scenarios.append(replace(scenario, ceiling=ceiling))
    return scenarios


def run_ceiling(config: Config, processes: int) -> float:
    """Transactions/s of the bare conditional UPDATE on one row (:func:`bare_worker`), as
    many attempts per process as the governed run makes."""
    with pg_schema(config.pg_url) as schema:
        cap = (config.per_process * processes + 1) * X * 10
        create_bare_table(schema.dsn, cap)
        spec = LoadSpec(
            kind="bare",
            url=schema.url,
            agents=("bare",),
            cap=cap,
            attempts=config.per_process,
            warmup=config.load_warmup,
        )
        run = run_load(spec, processes)
        if run.total("allowed") != run.attempts or run.total("errors"):
            raise RuntimeError(f"the bare ceiling run failed: {run.results}")
        return run.total("allowed") / run.allowed_window_s


def run_spread(config: Config, progress: Console) -> GovernedScenario:
    """The same kind of load over many agent types' budgets, caps out of reach."""
    progress.print(f"[dim]spread: {config.spread_processes} processes ...[/]")
    agents = tuple(f"agent-{i}" for i in range(config.spread_agents))
    cap = (config.spread_per_process * config.spread_processes + 1) * X * 10
    return governed_scenario(
        config, agents, cap, config.spread_per_process, config.spread_processes, warm_agents=True
    )


# -- 3. the naive enforcer -----------------------------------------------------------------
@dataclass(frozen=True)
class NaiveScenario:
    """A naive-enforcer load and what its table said afterwards."""

    run: LoadRun
    check: NaiveCheck

    @property
    def expected(self) -> int:
        return self.run.spec.cap // X

    @property
    def overshoot(self) -> int:
        return self.check.allowed - self.expected


def run_naive(config: Config, progress: Console) -> list[NaiveScenario]:
    """The hot-budget load (same processes, attempts and cap) on the naive enforcer."""
    scenarios = []
    for processes in config.naive_processes:
        progress.print(f"[dim]naive enforcer: {processes} processes ...[/]")
        with pg_schema(config.pg_url) as schema:
            spec = LoadSpec(
                kind="naive",
                url=schema.url,
                agents=(HOT_AGENT,),
                cap=hot_cap(config, processes),
                attempts=config.per_process,
                warmup=config.load_warmup,
                call_ms=config.call_ms,
            )
            create_naive_table(schema.dsn)
            run = run_load(spec, processes)
            scenarios.append(NaiveScenario(run, check_naive(spec)))
    return scenarios
