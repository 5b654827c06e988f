"""Overhead of the governed Stripe client over a bare stripe call, against localstripe.

    .venv/bin/python bench/bench_stripe.py            # ~45 s on 2 CPUs
    .venv/bin/python bench/bench_stripe.py --quick    # a smoke run with small counts
    .venv/bin/python bench/bench_stripe.py --help     # every count, and its env variable

One localstripe server (``paymaster.testing.localstripe``), one bare ``stripe.StripeClient``
and one governed client (``paymaster.vendors.stripe.governed_client``) per ledger backend:
SQLite synchronous=FULL, SQLite synchronous=NORMAL and PostgreSQL. Two operations:

* a free read, ``customers.retrieve``: one HTTP call; governed, one governed call;
* a $0.01 refund of a PaymentIntent, ``refunds.create``: bare, one HTTP POST; governed,
  a governed look-up GET of the PaymentIntent (to price the refund) and the governed
  POST, i.e. two HTTP calls and two governed calls. The bare GET + POST (the same HTTP
  work without the ledger) is measured as well.

Every variant is warmed up, then measured in alternating batches (rounds), so the drift
of localstripe, which slows down as its store grows (every write pickles the whole store;
every charge it returns scans it for refunds), affects all of them alike.

``ledger_bench.py`` runs this as its section 4; on its own, it takes these flags (each
also read from ``PAYMASTER_BENCH_STRIPE_<FLAG>``). PostgreSQL: ``--pg-url`` /
``PAYMASTER_BENCH_POSTGRES_URL`` / ``PAYMASTER_BENCH_PG_URL`` /
``PAYMASTER_TEST_POSTGRES_URL``, default ``postgresql+psycopg://root@127.0.0.1:5432/test``,
skipped if unreachable; the governed client's ledger lives in a fresh ``bench_<random>``
schema, dropped afterwards.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench_env import (
    DEFAULT_PG_URL,
    background_busy,
    env_count,
    parsed,
    percentile,
    pg_schema,
    sqlite_dir,
    standalone_parser,
)
from bench_latency import Backend
from bench_report import new_table, notes, print_run_header, reachable_postgres
from bench_scenarios import BACKENDS
from rich.console import Console

from paymaster import Governor, Money, Policy

ENV_PREFIX = "PAYMASTER_BENCH_STRIPE_"
AGENT = "bench-agent"
REFUND_MINOR = 1  # each refund: $0.01
LOOKUP_EXPAND = ["latest_charge"]
INTENT_AMOUNT = 100_000_000  # $1,000,000.00: localstripe never runs out of refundable amount
POLICY = {
    "id": "bench",
    "agent": AGENT,
    "vendor": "stripe",
    "currency": "USD",
    "daily_cap": "1000000.00",
    "per_call_cap": "1000.00",
    "endpoints": ["/v1/refunds", "/v1/payment_intents", "/v1/charges", "/v1/customers"],
}


# -- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StripeSettings:
    calls: int = 200
    warmup: int = 10
    rounds: int = 10
    pg_url: str = DEFAULT_PG_URL
    no_postgres: bool = False
    tmpdir: str = ""


QUICK = {"calls": 40, "warmup": 3, "rounds": 4}
HELP = {
    "calls": "measured calls per variant and operation",
    "warmup": "warm-up calls per variant and operation",
    "rounds": "alternating batches the measured calls are split into",
}


def _sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def settings_for(config: Any) -> StripeSettings:
    """The settings when ``ledger_bench.py`` runs this: its database choices, and counts
    from ``PAYMASTER_BENCH_STRIPE_*`` (or the quick ones under ``--quick``)."""
    counts = {
        k: env_count(ENV_PREFIX, k, QUICK[k] if config.quick else getattr(StripeSettings, k))
        for k in HELP
    }
    return StripeSettings(
        **counts, pg_url=config.pg_url, no_postgres=config.no_postgres, tmpdir=config.tmpdir
    )


def parse_args(argv: Sequence[str] | None = None) -> StripeSettings:
    parser = standalone_parser(__doc__, StripeSettings, HELP, ENV_PREFIX, "CALLS=500")
    return StripeSettings(**parsed(parser, argv, QUICK))


# -- measurement ---------------------------------------------------------------------------
@dataclass
class Variant:
    """One way of making one operation, and its samples."""

    op: str  # "read" | "refund"
    label: str
    http_calls: int
    governed_calls: int
    call: Callable[[], None]
    governor: Governor | None = None
    samples_ns: list[int] = field(default_factory=list)
    cpu_ns: int = 0
    made: int = 0  # calls made, warm-up included

    def run(self, n: int, *, measured: bool = True) -> None:
        cpu = time.process_time_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            self.call()
            elapsed = time.perf_counter_ns() - t0
            if measured:
                self.samples_ns.append(elapsed)
        if measured:
            self.cpu_ns += time.process_time_ns() - cpu
        self.made += n


@dataclass(frozen=True)
class LedgerCheck:
    """What the governed client's ledger recorded, beside what it should have."""

    settled: Money
    pending: Money
    calls: int
    expected_settled: Money
    expected_calls: int

    @property
    def ok(self) -> bool:
        return (
            self.settled == self.expected_settled
            and self.pending.amount == 0
            and self.calls == self.expected_calls
        )


@dataclass
class StripeResults:
    variants: list[Variant]
    checks: dict[str, LedgerCheck]
    settings: StripeSettings
    versions: str
    refunds_in_store: int
    elapsed_s: float


def bare_refund_variant(client: Any, intent: str, with_lookup: bool) -> Variant:
    def refund() -> None:
        if with_lookup:  # the governed client's look-up: the intent with its latest charge,
            # read as JSON (raw_request), not turned into StripeObjects, as the look-up is
            got = client.raw_request("get", f"/v1/payment_intents/{intent}", expand=LOOKUP_EXPAND)
            assert got.data["latest_charge"]["currency"] == "usd"
        done = client.v1.refunds.create(params={"payment_intent": intent, "amount": REFUND_MINOR})
        assert done.amount == REFUND_MINOR

    label = "bare GET+POST (same HTTP work)" if with_lookup else "bare POST"
    return Variant("refund", label, 2 if with_lookup else 1, 0, refund)


def refund_variant(client: Any, intent: str, label: str, gov: Governor) -> Variant:
    def refund() -> None:
        done = client.v1.refunds.create(params={"payment_intent": intent, "amount": REFUND_MINOR})
        assert done.amount == REFUND_MINOR

    return Variant("refund", label, 2, 2, refund, gov)


def read_variant(client: Any, customer: str, label: str, gov: Governor | None) -> Variant:
    def read() -> None:
        assert client.v1.customers.retrieve(customer).id == customer

    return Variant("read", label, 1, 0 if gov is None else 1, read, gov)


def open_governor(stack: ExitStack, backend: Backend, tmp: Path, pg_url: str) -> Governor:
    policy = Policy.model_validate(POLICY)
    if backend.kind == "sqlite":
        url = f"sqlite:///{tmp}/bench-stripe-{backend.synchronous.lower()}.db"
    else:
        url = stack.enter_context(pg_schema(pg_url)).url
    gov = Governor(url, policies=[policy], sqlite_synchronous=backend.synchronous)
    stack.callback(gov.close)
    return gov


def check_ledger(gov: Governor, variants: list[Variant]) -> LedgerCheck:
    """Every governed call of this governor is in its daily budget, nothing is pending."""
    mine = [v for v in variants if v.governor is gov]
    refunds = sum(v.made for v in mine if v.op == "refund")
    budgets = [b for b in gov.budgets() if b.agent == AGENT and b.kind == "daily"]
    zero = Money.zero("USD")
    return LedgerCheck(
        settled=sum((b.settled for b in budgets), zero),
        pending=sum((b.pending for b in budgets), zero),
        calls=sum(b.calls for b in budgets),
        expected_settled=Money(refunds * REFUND_MINOR, "USD"),
        expected_calls=sum(v.made * v.governed_calls for v in mine),
    )


def measure(variants: list[Variant], settings: StripeSettings) -> None:
    """Warm every variant up, then ``calls`` of each in ``rounds`` alternating batches,
    the order rotated every round."""
    for v in variants:
        v.run(settings.warmup, measured=False)
    rounds = max(1, min(settings.rounds, settings.calls))
    for r in range(rounds):
        batch = settings.calls // rounds + (1 if r < settings.calls % rounds else 0)
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.run(batch)


def run_stripe(settings: StripeSettings, tmp: Path, progress: Console) -> StripeResults:
    """Start localstripe, build the clients, measure reads then refunds."""
    from paymaster.testing.localstripe import run_localstripe
    from paymaster.vendors.stripe import governed_client

    started = time.perf_counter()
    backends = [b for b in BACKENDS if b.kind == "sqlite" or not settings.no_postgres]
    with run_localstripe() as ls, ExitStack() as stack:
        bare = ls.client()
        customer = bare.v1.customers.create(params={"email": "bench@example.com"}).id
        intent = bare.v1.payment_intents.create(
            params={
                "amount": INTENT_AMOUNT,
                "currency": "usd",
                "payment_method": "pm_card_visa",
                "confirm": True,
            }
        ).id
        reads = [read_variant(bare, customer, "bare", None)]
        refunds = [
            bare_refund_variant(bare, intent, with_lookup=False),
            bare_refund_variant(bare, intent, with_lookup=True),
        ]
        governors: dict[str, Governor] = {}
        for backend in backends:
            gov = open_governor(stack, backend, tmp, settings.pg_url)
            governors[backend.label] = gov
            client = governed_client(
                gov,
                "sk_test_x",
                agent=AGENT,
                run=f"bench-{uuid.uuid4().hex[:8]}",
                base_addresses={"api": ls.url},
            )
            label = f"governed, {backend.label}"
            reads.append(read_variant(client, customer, label, gov))
            refunds.append(refund_variant(client, intent, label, gov))
        for op, variants in (("read", reads), ("refund", refunds)):
            progress.print(f"[dim]stripe: {op}, {len(variants)} variants ...[/]")
            measure(variants, settings)
        variants = reads + refunds
        checks = {label: check_ledger(g, variants) for label, g in governors.items()}
        made = sum(v.made for v in refunds)
    versions = ", ".join(f"{p} {version(p)}" for p in ("stripe", "localstripe", "requests"))
    return StripeResults(variants, checks, settings, versions, made, time.perf_counter() - started)


# -- report --------------------------------------------------------------------------------
def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _added(governed: Variant, base: Variant | None) -> str:
    if base is None or governed.governor is None:
        return "-"
    diff = percentile(governed.samples_ns, 50) - percentile(base.samples_ns, 50)
    return f"{diff / 1e6:+.2f}"


def machine_line() -> str:
    return (
        f"Machine: {os.cpu_count()} CPUs (os.cpu_count()), Python {sys.version.split()[0]}, "
        f"{platform.platform()}"
    )


def print_stripe(console: Console, results: StripeResults, number: str = "4.") -> None:
    s = results.settings
    table = new_table(
        f"{number + ' ' if number else ''}Governed Stripe client vs a bare stripe call, "
        "localstripe, single thread (times in ms)",
        "operation / client",
        "HTTP calls",
        "governed calls",
        "calls",
        "p50",
        "p99",
        "added p50 vs bare",
        "added p50 vs same HTTP work",
        "calls/s",
        "client CPU/call",
        "ledger check",
    )
    by_label = {(v.op, v.label): v for v in results.variants}
    for v in results.variants:
        bare = by_label.get((v.op, "bare" if v.op == "read" else "bare POST"))
        same = by_label.get((v.op, "bare" if v.op == "read" else "bare GET+POST (same HTTP work)"))
        check = "-"
        if v.governor is not None:
            c = results.checks[v.label.removeprefix("governed, ")]
            check = (
                f"{'[green]ok[/]' if c.ok else '[red]MISMATCH[/]'}: {c.calls} calls, "
                f"${c.settled.major:.2f} settled, ${c.pending.major:.2f} pending"
            )
        op = "customers.retrieve" if v.op == "read" else "refunds.create $0.01"
        total_s = sum(v.samples_ns) / 1e9
        table.add_row(
            f"{op}: {v.label}",
            str(v.http_calls),
            str(v.governed_calls),
            f"{len(v.samples_ns):,}",
            _ms(percentile(v.samples_ns, 50)),
            _ms(percentile(v.samples_ns, 99)),
            _added(v, bare),
            _added(v, same),
            f"{len(v.samples_ns) / total_s:,.0f}" if total_s > 0 else "n/a",
            _ms(v.cpu_ns / max(1, len(v.samples_ns))),
            check,
        )
    console.print(table)
    notes(
        console,
        "One localstripe server (a separate Python process on this machine, so it shares the "
        "CPUs with the client and the database). Bare: ls.client(), a stripe.StripeClient. "
        "Governed: governed_client(governor, 'sk_test_x', agent='bench-agent', run=..., "
        "base_addresses=...), one per backend, each with its own Governor (SQLite: a fresh "
        "file in the temp dir; PostgreSQL: a fresh schema). Both send with stripe's default "
        "HTTP client (requests, keep-alive).",
        "customers.retrieve: a free read, one HTTP GET; governed, one governed call (reserve "
        "and settle, no money). refunds.create of $0.01 on a $1,000,000 PaymentIntent: bare, "
        "one HTTP POST; governed, a governed look-up GET of the PaymentIntent with its latest "
        "charge (to price the refund) plus the governed POST: 2 HTTP calls and 2 governed "
        "calls. 'bare GET+POST' makes the same two HTTP calls without the ledger, the fair "
        "baseline: 'added p50 vs same HTTP work' is governed p50 - its p50. Its GET is "
        "client.raw_request('get', '/v1/payment_intents/<id>', expand=['latest_charge']): "
        "JSON parsed but not turned into StripeObjects, like the governed look-up (a typed "
        "payment_intents.retrieve costs this client several ms more CPU).",
        f"Warm-up: {s.warmup} calls per variant. Then {s.calls} calls per variant in "
        f"{s.rounds} alternating batches (order rotated each round), single thread, "
        "time.perf_counter_ns around each call. p50/p99 nearest-rank; calls/s = calls / sum "
        "of their latencies; client CPU: this process's CPU time (process_time) per call.",
        "localstripe slows down as its store grows (each write pickles the whole store, each "
        f"charge it returns scans it): {results.refunds_in_store:,} refunds were made in this "
        "run; the alternating batches spread that drift over all variants alike. Ledger "
        "check: the governor's daily budget shows every refund settled at $0.01, one counted "
        "call per governed call (warm-up included), nothing pending.",
        f"{machine_line()}; {results.versions}. Section wall time: {results.elapsed_s:.1f} s.",
    )


def stripe_section(config: Any, console: Console, progress: Console) -> StripeResults:
    """Run and print this benchmark with ``ledger_bench.py``'s config (section 4)."""
    settings = settings_for(config)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        results = run_stripe(settings, tmp, progress)
    print_stripe(console, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=210)
    progress = Console(stderr=True)
    idle_busy = background_busy()
    pg = None if settings.no_postgres else reachable_postgres(settings.pg_url, progress)
    settings = StripeSettings(**{**settings.__dict__, "no_postgres": pg is None})
    with sqlite_dir(settings.tmpdir or None) as tmp:
        title = "paymaster: governed Stripe client benchmark"
        print_run_header(console, title, pg, str(tmp), idle_busy)
        results = run_stripe(settings, tmp, progress)
    print_stripe(console, results, number="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
