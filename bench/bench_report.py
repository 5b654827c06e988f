"""The benchmark's tables (rich), with the definitions of their columns under each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone

from bench_config import Config
from bench_env import X, busy_percent, machine_facts, ms, percentile, pg_facts
from bench_latency import LatencySamples
from bench_scenarios import GovernedScenario, NaiveScenario, latency_ratio
from rich.console import Console
from rich.table import Table

# The performance issue's targets.
SQLITE_TARGET_RATIO = 2.0  # SQLite FULL p50 within 2x its floor
SQLITE_NORMAL_TARGET_S = 150e-6  # SQLite NORMAL governed call p50
THROUGHPUT_TARGET = 1200.0  # governed calls/s on one hot budget with 4 processes
THROUGHPUT_TARGET_PROCESSES = 4
CEILING_TARGET = 0.30  # ... and at least this share of the bare hot-row ceiling
SPREAD_TARGET = 2000.0  # governed calls/s over 100 budgets with 8 processes

THROUGHPUT_COLUMNS = (
    "attempts",
    "allowed",
    "denied",
    "errors",
    "governed calls/s",
    "attempts/s",
    "wall s",
    "p50 ms",
    "p99 ms",
    "client CPU ms/attempt",
    "machine CPU busy %",
)
CHECK_COLUMNS = (
    "cap per budget",
    "floor(cap/x)",
    "allowed (db)",
    "overshoot",
    "max committed - cap",
    "committed = allowed*x",
    "unsettled holds",
    "audit allowed / denied",
    "audit chains",
    "verdict",
)


# -- formatting ----------------------------------------------------------------------------
def usd(minor: int) -> str:
    sign = "-" if minor < 0 else ""
    return f"{sign}${abs(minor) / 100:,.2f}"


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "n/a"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def verdict(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]FAIL[/]"


def met(ok: bool) -> str:
    return "[green]MET[/]" if ok else "[red]NOT MET[/]"


def new_table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def notes(console: Console, *lines: str) -> None:
    for line in lines:
        console.print(f"  [dim]{line}[/]", highlight=False)
    console.print()


# -- machine -------------------------------------------------------------------------------
def print_machine(console: Console, facts: list[tuple[str, str]], when: str) -> None:
    console.rule("paymaster ledger benchmark")
    console.print(
        f"All figures below were measured on this machine, in this run ({when}).",
        highlight=False,
    )
    table = new_table("Machine", "fact", "value")
    for label, value in facts:
        table.add_row(label, value)
    console.print(table)
    console.print()


# -- 1. latency ----------------------------------------------------------------------------
def print_latency(console: Console, results: list[LatencySamples], config: Config) -> None:
    table = new_table(
        "1. Overhead of one governed call, single thread (times in ms)",
        "backend",
        "calls",
        "p50",
        "p99",
        "reserve p50",
        "settle p50",
        "floor p50",
        "floor p99",
        "p50 / floor p50",
        "client CPU/call",
        "floor CPU/pair",
        "target",
    )
    for s in results:
        ratio = latency_ratio(s)
        target = "-"
        if s.backend.kind == "sqlite" and s.backend.synchronous == "FULL":
            target = f"<= {SQLITE_TARGET_RATIO:.0f}x: {met(ratio <= SQLITE_TARGET_RATIO)}"
        table.add_row(
            s.backend.label,
            f"{len(s.governed):,}",
            ms(percentile(s.governed, 50)),
            ms(percentile(s.governed, 99)),
            ms(percentile(s.reserve, 50)),
            ms(percentile(s.settle, 50)),
            ms(percentile(s.floor, 50)),
            ms(percentile(s.floor, 99)),
            f"{ratio:.2f}x",
            ms(s.governed_cpu_s / len(s.governed)),
            ms(s.floor_cpu_s / len(s.floor)),
            target,
        )
    console.print(table)
    notes(
        console,
        f"A governed call: Governor.guard(...) with estimate ${X / 100:.2f}, then "
        "call.settle() at the estimate: the reserve transaction, then the settle "
        "transaction, which appends the hash-chained audit row. Nothing runs in between.",
        "Floor: the two durable commits the protocol needs, as two minimal write "
        "transactions on the same database and settings. SQLite: the ledger's own file, "
        "WAL, the same synchronous, busy_timeout=30000, 'BEGIN IMMEDIATE; UPDATE "
        "bench_floor SET n=n+1 WHERE id=1; COMMIT' x2. PostgreSQL: psycopg in the "
        "ledger's schema, 'UPDATE bench_floor SET n=n+1 WHERE id=1; COMMIT' x2.",
        f"Warm-up: {config.latency_warmup} of each. Then {config.latency_calls} of each, "
        f"in {config.latency_rounds} alternating floor/governed batches. Percentiles are "
        "nearest-rank. CPU: this process's CPU time (time.process_time) per call / pair.",
    )


def print_sqlite_own(console: Console, results: list[LatencySamples]) -> None:
    """How much of a SQLite governed call is SQLite's own work, and how many pages it
    writes: what no change to paymaster's Python can remove."""
    rows = [s for s in results if s.sqlite_own]
    if not rows:
        return
    table = new_table(
        "1'. SQLite's own share of a governed call (times in ms)",
        "backend",
        "governed p50",
        "SQLite's own p50",
        "own p50 / floor p50",
        "governed - own (p50s)",
        "WAL pages/call",
    )
    for s in rows:
        own = percentile(s.sqlite_own, 50)
        table.add_row(
            s.backend.label,
            ms(percentile(s.governed, 50)),
            ms(own),
            f"{own / percentile(s.floor, 50):.2f}x",
            ms(percentile(s.governed, 50) - own),
            "n/a" if s.wal_pages is None else f"{s.wal_pages:.1f}",
        )
    console.print(table)
    notes(
        console,
        "SQLite's own: per governed call, the time spent inside the sqlite3 module's "
        "functions (execute, commit, fetchall, ...), each timed from entry to return with "
        "a profile hook, over a fifth as many calls again after each governed batch of "
        "section 1 (not in its figures): the work SQLite itself does for the call's "
        "statements and its two commits, whatever Python runs around "
        "them. No change to paymaster's Python goes below it; only fewer statements or "
        "fewer pages written (the hold's and the audit row's indexes) do.",
        "WAL pages/call: frames appended to the WAL by 20 governed calls, from an emptied "
        "WAL, per call. The floor writes one page per commit, two per pair.",
    )


# -- 2. governed load ----------------------------------------------------------------------
def throughput_row(s: GovernedScenario) -> list[str]:
    r = s.run
    return [
        str(r.processes),
        f"{r.attempts:,}",
        f"{r.total('allowed'):,}",
        f"{r.total('denied'):,}",
        f"{r.total('errors'):,}",
        rate(r.total("allowed"), r.allowed_window_s),
        rate(r.attempts, r.elapsed_s),
        f"{r.elapsed_s:.2f}",
        ms(percentile(r.latencies, 50)),
        ms(percentile(r.latencies, 99)),
        ms(r.cpu_s / r.attempts),
        pct(busy_percent(r.cpu_before, r.cpu_after)),
    ]


def cpu_cells(s: GovernedScenario) -> list[str]:
    """Machine CPU per attempt, the clients' part of it, and the rate the CPUs allow."""
    per_attempt, bound = s.cpu_per_attempt_s, s.cpu_bound
    return [
        "n/a" if per_attempt is None else ms(per_attempt),
        ms(s.run.cpu_s / s.run.attempts),
        "n/a" if bound is None else f"{bound:,.0f}",
    ]


def check_row(s: GovernedScenario) -> list[str]:
    c = s.check
    return [
        str(s.run.processes),
        usd(s.run.spec.cap),
        f"{s.expected:,}",
        f"{c.allowed:,}",
        f"{s.overshoot:+d}",
        usd(c.max_over_cap),
        "yes" if c.committed_matches else "NO",
        f"{c.unsettled}",
        f"{c.audit_allowed:,} / {c.audit_denied:,}",
        f"{'ok' if c.chain_ok else 'BROKEN'} ({c.chain_rows:,} rows)",
        verdict(s.ok),
    ]


def print_hot(console: Console, hot: list[GovernedScenario], config: Config) -> None:
    table = new_table(
        "2a. Throughput of governed calls on ONE hot budget, PostgreSQL",
        "processes",
        *THROUGHPUT_COLUMNS,
    )
    for s in hot:
        table.add_row(*throughput_row(s))
    console.print(table)
    ceiling = new_table(
        "2a'. The bare hot-row ceiling beside the governed runs of 2a, PostgreSQL",
        "processes",
        "bare UPDATE tx/s",
        "governed calls/s",
        "governed / ceiling",
        "machine CPU ms/attempt",
        "of which clients",
        "attempts/s the CPUs allow",
    )
    for s in hot:
        ratio = s.of_ceiling
        ceiling.add_row(
            str(s.run.processes),
            "-" if s.ceiling is None else f"{s.ceiling:,.0f}",
            f"{s.calls_per_s:,.0f}",
            "-" if ratio is None else f"{ratio:.0%}",
            *cpu_cells(s),
        )
    console.print(ceiling)
    notes(
        console,
        "bare UPDATE tx/s: the same processes, each on a plain psycopg connection, run "
        "transactions of one conditional UPDATE of one budget row (committed + x where "
        "committed <= cap - x) and COMMIT, as many as the governed run attempts, measured "
        "just before it: what any enforcer that takes one hot row could reach here.",
        "machine CPU ms/attempt: CPU time all CPUs were busy (/proc/stat), barrier -> "
        "end, per attempt: the clients, PostgreSQL's backends and anything else. Of which "
        "clients: the worker processes' own CPU time per attempt. attempts/s the CPUs "
        f"allow: this machine's {os.cpu_count()} CPUs / machine CPU per attempt, an upper "
        "bound that only less work per call raises, not less waiting.",
    )
    notes(
        console,
        "Each process (multiprocessing, spawn) builds its own Governor, makes "
        f"{config.load_warmup} warm-up calls on another agent, waits at a barrier with the "
        f"parent, then makes {config.per_process} attempts on agent 'refund-agent' "
        f"(x = ${X / 100:.2f} each; simulated vendor call: {config.call_ms:g} ms).",
        "governed calls/s = allowed calls / (barrier -> last allowed call, i.e. until the "
        "cap was reached, with every process still running). attempts/s = all attempts, "
        "denials included (each writes an audit row) / (barrier -> last attempt).",
        "p50/p99: latency of the allowed calls under this load. client CPU: the worker "
        "processes' CPU time per attempt. machine CPU busy: all CPUs (/proc/stat), "
        "clients and PostgreSQL together, barrier -> end.",
    )
    table = new_table(
        "2b. Cap check of the hot-budget runs, read back from PostgreSQL",
        "processes",
        *CHECK_COLUMNS,
    )
    for s in hot:
        table.add_row(*check_row(s))
    console.print(table)
    notes(
        console,
        f"cap = floor({config.cap_fraction:g} x attempts) x ${X / 100:.2f} + $0.50, so "
        "the attempts exceed it and the run reaches it. allowed (db) = settled holds of "
        "the budget; overshoot = allowed (db) - floor(cap/x), must be +0.",
        "Every call settles at its estimate, so committed only grows: a final committed "
        "<= cap means it never exceeded the cap. PASS also needs committed = allowed*x, "
        "no pending hold, one audit row per attempt (allowed and denied as the workers "
        "saw them), no errors, and AuditLog.verify() ok on every hash chain.",
    )


def print_spread(console: Console, spread: GovernedScenario, config: Config) -> None:
    table = new_table(
        f"2c. Throughput spread over {config.spread_agents} agent types' budgets, PostgreSQL",
        "processes",
        *THROUGHPUT_COLUMNS,
    )
    table.add_row(*throughput_row(spread))
    console.print(table)
    bound = new_table(
        "2c'. The CPU the spread run took, PostgreSQL",
        "processes",
        "machine CPU ms/attempt",
        "of which clients",
        "attempts/s the CPUs allow",
    )
    bound.add_row(str(spread.run.processes), *cpu_cells(spread))
    console.print(bound)
    check = new_table("2d. Check of the spread run", "processes", *CHECK_COLUMNS)
    check.add_row(*check_row(spread))
    console.print(check)
    notes(
        console,
        f"{config.spread_agents} policies, agent-0..agent-{config.spread_agents - 1}, each "
        "with its own daily budget row and audit hash chain. Process i starts at agent "
        f"i*{config.spread_agents}/{config.spread_processes} and cycles through all of "
        f"them, {config.spread_per_process} attempts. Before the barrier each process makes "
        "one warm-up call on every agent (counted in the database columns, not timed), so "
        "no budget or chain row is created or first looked up while the clock runs. Caps "
        "are out of reach here: floor(cap/x) column = attempts + warm-up calls.",
    )


# -- 3. the naive enforcer -----------------------------------------------------------------
def print_naive(
    console: Console, naive: list[NaiveScenario], hot: list[GovernedScenario], config: Config
) -> None:
    governed = {s.run.processes: s for s in hot}
    table = new_table(
        "3. The naive check-then-record enforcer under the same load, PostgreSQL",
        "processes",
        "attempts",
        "cap",
        "floor(cap/x)",
        "allowed (db)",
        "overshoot",
        "spent - cap",
        "attempts/s",
        "governed overshoot, same load",
    )
    for s in naive:
        g = governed.get(s.run.processes)
        table.add_row(
            str(s.run.processes),
            f"{s.run.attempts:,}",
            usd(s.run.spec.cap),
            f"{s.expected:,}",
            f"{s.check.allowed:,}",
            f"[red]{s.overshoot:+d}[/]" if s.overshoot else "+0",
            usd(s.check.spent - s.run.spec.cap),
            rate(s.run.attempts, s.run.elapsed_s),
            "not run" if g is None else f"{g.overshoot:+d}",
        )
    console.print(table)
    notes(
        console,
        "The naive enforcer, per attempt, on one psycopg connection per process in "
        "autocommit mode (every statement its own transaction; no lock, no FOR UPDATE): "
        "'SELECT COALESCE(SUM(amount), 0) FROM naive_spend'; if spent + x <= cap it makes "
        f"the call (simulated: {config.call_ms:g} ms), then 'INSERT INTO naive_spend "
        "(worker, amount) VALUES (w, x)'; otherwise it refuses.",
        "Same processes, attempts per process, cap and x as 2a/2b, with spawn and a "
        "barrier the same way. overshoot = rows inserted - floor(cap/x): calls made past "
        "the cap because processes read the same total before one of them recorded. Its "
        "attempts/s is not comparable with a governed call's (no hold, no audit, raw SQL).",
    )


# -- summary -------------------------------------------------------------------------------
def print_targets(
    console: Console,
    latency: list[LatencySamples],
    hot: list[GovernedScenario],
    spread: GovernedScenario | None,
    naive: list[NaiveScenario],
    extra: Sequence[tuple[str, str, bool]] = (),
) -> None:
    """``extra``: (target, measured, met) rows of other sections (async under load).

    Beside each target of sections 1 and 2, what stands in its way, measured in this run:
    the part of the figure no change to paymaster's Python can remove."""
    table = new_table("Targets from the issue", "target", "measured", "status", "in the way")
    for samples in latency:
        own = percentile(samples.sqlite_own, 50) if samples.sqlite_own else None
        pages = "" if samples.wal_pages is None else f", {samples.wal_pages:.0f} WAL pages"
        if samples.backend.kind == "sqlite" and samples.backend.synchronous == "FULL":
            ratio = latency_ratio(samples)
            floor = percentile(samples.floor, 50)
            table.add_row(
                "SQLite FULL: governed p50 <= 2x its floor p50",
                f"{ratio:.2f}x",
                met(ratio <= SQLITE_TARGET_RATIO),
                "-" if own is None else f"SQLite's own work alone: {own / floor:.2f}x{pages}",
            )
        if samples.backend.kind == "sqlite" and samples.backend.synchronous == "NORMAL":
            p50 = percentile(samples.governed, 50)
            table.add_row(
                "SQLite NORMAL: governed p50 <= 150 us",
                f"{p50 * 1e6:,.0f} us",
                met(p50 <= SQLITE_NORMAL_TARGET_S),
                "-" if own is None else f"SQLite's own work alone: {own * 1e6:,.0f} us{pages}",
            )
    for s in hot:
        if s.run.processes == THROUGHPUT_TARGET_PROCESSES:
            share = s.of_ceiling
            table.add_row(
                ">= 1,200 governed calls/s on one hot budget, 4 processes, PostgreSQL, "
                "and >= 30% of the bare hot-row ceiling in the same run",
                f"{s.calls_per_s:,.0f} calls/s"
                + ("" if share is None else f", {share:.0%} of {s.ceiling:,.0f} tx/s"),
                met(
                    s.calls_per_s >= THROUGHPUT_TARGET
                    and share is not None
                    and share >= CEILING_TARGET
                ),
                cpu_limit(s),
            )
    if spread is not None:
        table.add_row(
            f">= 2,000 governed calls/s over {len(spread.run.spec.agents)} budgets, "
            f"{spread.run.processes} processes, PostgreSQL",
            f"{spread.calls_per_s:,.0f} calls/s",
            met(spread.calls_per_s >= SPREAD_TARGET),
            cpu_limit(spread),
        )
    checked = [*hot, *([spread] if spread else [])]
    if checked:
        passed = sum(s.ok for s in checked)
        table.add_row(
            "zero overshoot in every governed run (checked from the database)",
            f"max overshoot {max(s.overshoot for s in checked):+d}; "
            f"{passed}/{len(checked)} runs pass every check",
            met(passed == len(checked)),
            "-",
        )
    for n in naive:
        table.add_row(
            f"(reference) naive enforcer, {n.run.processes} processes",
            f"overshoot {n.overshoot:+d} ({usd(n.check.spent - n.run.spec.cap)} over the cap)",
            "-",
            "-",
        )
    for target, measured, ok in extra:
        table.add_row(target, measured, met(ok), "-")
    console.print(table)


def cpu_limit(s: GovernedScenario) -> str:
    """The CPU bound on a load run's rate, as the targets table says it."""
    per_attempt, bound = s.cpu_per_attempt_s, s.cpu_bound
    if per_attempt is None or bound is None:
        return "-"
    return (
        f"{ms(per_attempt)} ms of machine CPU per attempt "
        f"({ms(s.run.cpu_s / s.run.attempts)} in the clients): "
        f"{os.cpu_count()} CPUs allow <= {bound:,.0f}/s"
    )


def reachable_postgres(url: str, progress: Console) -> dict[str, str] | None:
    """The PostgreSQL server's facts, or ``None`` (said on ``progress``) if it cannot be
    reached: a standalone benchmark then measures the SQLite backends only."""
    try:
        return pg_facts(url)
    except Exception as exc:  # any connection failure
        progress.print(f"[yellow]PostgreSQL at {url} unreachable, skipped: {exc}[/]")
        return None


def print_run_header(
    console: Console, title: str, pg: dict[str, str] | None, tmp: str, idle_busy: float | None
) -> None:
    """The opening of a standalone benchmark's output: its title, when it ran, and the
    machine it measured."""
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    console.rule(title)
    console.print(
        f"All figures below were measured on this machine, in this run ({when}).",
        highlight=False,
    )
    facts = new_table("Machine", "fact", "value")
    for label, value in machine_facts(pg, tmp, idle_busy):
        facts.add_row(label, value)
    console.print(facts)
