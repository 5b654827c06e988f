"""Benchmark of paymaster's ledger; every figure is measured on this machine, in one run.

    .venv/bin/python bench/ledger_bench.py            # everything: ~4 minutes on 2 CPUs,
                                                      # and section 8's ledgers: ~20 more
    .venv/bin/python bench/ledger_bench.py --quick    # a smoke run with small counts
    .venv/bin/python bench/ledger_bench.py --help     # every count, and its env variable

1. Single-thread overhead of a governed call (reserve + settle + audit row), p50 and p99,
   on SQLite synchronous=FULL, SQLite synchronous=NORMAL and PostgreSQL, each beside its
   floor: the two bare durable commits the protocol needs, measured alongside; and, on
   SQLite, how much of the call is SQLite's own work and how many WAL pages it writes.
2. Governed calls on ONE hot budget with 1, 2, 4 and 8 processes on PostgreSQL, with a cap
   the run reaches, checked from the database afterwards (overshoot must be 0); and the
   same kind of load spread over 100 agent types' budgets.
3. The naive check-then-record enforcer under the same load, and its overshoot.
4. The governed Stripe client against localstripe beside a bare stripe call (bench_stripe.py;
   its counts: ``PAYMASTER_BENCH_STRIPE_CALLS``, ``_WARMUP``, ``_ROUNDS``).
5. The governing proxy's added latency against calling localstripe directly, and the time
   from a revoke to the first refused request (bench_proxy.py; its counts:
   ``PAYMASTER_BENCH_PROXY_CALLS``, ``_WARMUP``, ``_ROUNDS``, ``_REVOKES``).
6. Start-up time: the median of 7 fresh processes of ``python -c "import paymaster"`` and
   of ``paymaster --help``, against the issue's targets (startup_bench.py; also with
   ``--quick``).
7. Async under load: loop lag p50/p99/max of one event loop (a 1 ms ticker task) while
   1,000 concurrent ``aguard`` tasks run on ONE budget whose cap they reach, on SQLite
   FULL, SQLite NORMAL and PostgreSQL, against the issue's p99 <= 5 ms, beside the idle
   loop and 1,000 bare ``sleep(0)`` tasks; invariants checked from the database
   (bench_async.py, which also has ``--profile``; its counts: ``PAYMASTER_BENCH_ASYNC_TASKS``,
   ``_WARMUP``, ``_IDLE_TICKS``, ``_CAP_FRACTION``).
8. Audit-log scale: ``AuditLog.run_summary(run)``, ``paymaster status`` (and ``--json``),
   ``audit tail``, ``runs show RUN``, ``audit verify --checkpoint`` (every row, and
   ``--since-checkpoint``) and a governed call, on a ledger bulk-loaded with 10 M audit
   rows on PostgreSQL and 1 M on SQLite (holds, budgets, 10,000 runs, 50 agent types),
   each beside the same on a 100 k-row ledger, against the issue's targets
   (run_summary <= 50 ms, status <= 200 ms) or flatness (bench_auditlog.py; its counts:
   ``PAYMASTER_BENCH_AUDIT_ROWS_PG``, ``_ROWS_SQLITE`` (0 skips that backend),
   ``_BASELINE_ROWS``, ``_REPS``, ...; ``--quick``: 200 k and 100 k rows).

PostgreSQL: ``--pg-url`` / ``PAYMASTER_BENCH_PG_URL`` / ``PAYMASTER_TEST_POSTGRES_URL``,
default ``postgresql+psycopg://root@127.0.0.1:5432/test``; every scenario runs in a
fresh ``bench_<random>`` schema, dropped afterwards. SQLite: fresh files in a temporary
directory, removed afterwards.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone

from bench_async import async_section, target_rows
from bench_auditlog import auditlog_section
from bench_auditlog import target_rows as auditlog_target_rows
from bench_config import Config, parse_args
from bench_env import background_busy, machine_facts, pg_facts, sqlite_dir
from bench_proxy import proxy_section
from bench_report import (
    print_hot,
    print_latency,
    print_machine,
    print_naive,
    print_spread,
    print_sqlite_own,
    print_targets,
)
from bench_scenarios import (
    GovernedScenario,
    NaiveScenario,
    run_hot,
    run_latency,
    run_naive,
    run_spread,
)
from bench_stripe import stripe_section
from rich.console import Console
from startup_bench import startup_section


def postgres_facts(config: Config, progress: Console) -> dict[str, str] | None:
    """The server's facts, or None (and a warning) if PostgreSQL is off or unreachable."""
    if config.no_postgres:
        return None
    try:
        return pg_facts(config.pg_url)
    except Exception as exc:  # any connection failure: run the SQLite part only
        progress.print(f"[yellow]PostgreSQL at {config.pg_url} unreachable, skipped: {exc}[/]")
        return None


def make_console() -> Console:
    """Wide enough for the tables when the output goes to a file or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=210)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    config = parse_args(argv, description=(__doc__ or "").split("\n\n")[0])
    console, progress = make_console(), Console(stderr=True)
    idle_busy = background_busy()  # before anything of ours runs
    pg = postgres_facts(config, progress)
    config = replace(config, no_postgres=pg is None)
    with sqlite_dir(config.tmpdir or None) as tmp:
        when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        print_machine(console, machine_facts(pg, str(tmp), idle_busy), when)
        latency = run_latency(config, tmp, progress)
    print_latency(console, latency, config)
    print_sqlite_own(console, latency)
    hot: list[GovernedScenario] = []
    spread: GovernedScenario | None = None
    naive: list[NaiveScenario] = []
    if pg is not None:
        hot = run_hot(config, progress)
        print_hot(console, hot, config)
        if config.spread_processes > 0 and config.spread_agents > 0:
            spread = run_spread(config, progress)
            print_spread(console, spread, config)
        naive = run_naive(config, progress)
        if naive:
            print_naive(console, naive, hot, config)
    stripe_section(config, console, progress)
    proxy_section(config, console, progress)
    startup_section(console, progress)
    async_results = async_section(config, console, progress)
    audit_results = auditlog_section(config, console, progress)
    targets = [*target_rows(async_results), *auditlog_target_rows(audit_results)]
    print_targets(console, latency, hot, spread, naive, targets)
    console.print(f"\nTotal wall time: {time.perf_counter() - started:.1f} s", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
