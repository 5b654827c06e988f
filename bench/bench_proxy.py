"""The governing proxy's added latency against going to localstripe directly, and the
time from a revoke's commit to the first refused request.

    .venv/bin/python bench/bench_proxy.py            # ~1-2 min on 2 CPUs
    .venv/bin/python bench/bench_proxy.py --quick    # a smoke run with small counts
    .venv/bin/python bench/bench_proxy.py --help     # every count, and its env variable

One localstripe server and, per ledger backend (SQLite file, synchronous=FULL as
``paymaster proxy`` runs it; PostgreSQL in a fresh schema), a real ``paymaster proxy``
process in front of it (``paymaster.testing.proxy.run_proxy``). The stock stripe client
calls localstripe directly or through the proxy with a vault key:

* a free read, ``customers.retrieve``: one HTTP call; through the proxy, one governed call;
* a $0.01 refund, ``refunds.create``: through the proxy, a governed look-up GET of the
  PaymentIntent plus the governed POST; directly, the POST alone and the same GET + POST.

Latency variants run in alternating batches, as in ``bench_stripe.py``. Revoke to refusal:
a client thread loops free reads through the proxy; the bench process commits a revoke
(of the agent, or of the vault key) and times the first refused response from the moment
the revoke call returned; requests started after that moment must all be refused. With
two proxy processes on one ledger, one revoke is timed on both.

``ledger_bench.py`` runs this as its section 5; on its own it takes these flags (each also
read from ``PAYMASTER_BENCH_PROXY_<FLAG>``) and the PostgreSQL URL as bench_stripe does.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import stripe
import yaml
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
from bench_report import new_table, notes, reachable_postgres
from bench_stripe import (
    AGENT,
    INTENT_AMOUNT,
    POLICY,
    LedgerCheck,
    Variant,
    bare_refund_variant,
    check_ledger,
    machine_line,
    measure,
    read_variant,
    refund_variant,
)
from rich.console import Console

from paymaster import Governor
from paymaster._vault import VaultKeys
from paymaster.testing.localstripe import TEST_API_KEY, run_localstripe
from paymaster.testing.proxy import RunningProxy, run_proxy
from paymaster.vendors.stripe import governed_client

ENV_PREFIX = "PAYMASTER_BENCH_PROXY_"
IN_PROCESS = "governed in process (no proxy)"


@dataclass(frozen=True)
class ProxySettings:
    calls: int = 200
    warmup: int = 10
    rounds: int = 10
    revokes: int = 10
    pg_url: str = DEFAULT_PG_URL
    no_postgres: bool = False
    tmpdir: str = ""


QUICK = {"calls": 40, "warmup": 3, "rounds": 4, "revokes": 3}
HELP = {
    "calls": "measured calls per latency variant",
    "warmup": "warm-up calls per latency variant",
    "rounds": "alternating batches the measured calls are split into",
    "revokes": "revokes timed per kind and backend",
}


def settings_for(config: Any) -> ProxySettings:
    """The settings under ``ledger_bench.py``: its database choices, counts from
    ``PAYMASTER_BENCH_PROXY_*`` (or the quick ones under ``--quick``)."""
    counts = {
        k: env_count(ENV_PREFIX, k, QUICK[k] if config.quick else getattr(ProxySettings, k))
        for k in HELP
    }
    return ProxySettings(
        **counts, pg_url=config.pg_url, no_postgres=config.no_postgres, tmpdir=config.tmpdir
    )


def parse_args(argv: Sequence[str] | None = None) -> ProxySettings:
    parser = standalone_parser(__doc__, ProxySettings, HELP, ENV_PREFIX, "CALLS=500")
    return ProxySettings(**parsed(parser, argv, QUICK))


# -- revoke to refusal ---------------------------------------------------------------------
@dataclass
class RevokeTiming:
    """One revoke, as one looping client saw it."""

    to_refusal_ns: int  # from the revoke call's start to the first refused response
    revoke_call_ns: int  # the revoke call itself (its transaction and commit)
    in_flight_allowed: int  # requests started before that moment that were still allowed
    started_after_allowed: int  # requests started after it that were allowed: must be 0


@dataclass
class RevokeSeries:
    kind: str
    backend: str
    timings: list[RevokeTiming] = field(default_factory=list)


class Looper(threading.Thread):
    """Free reads through a proxy, back to back, until one is refused with ``code``."""

    def __init__(self, client: stripe.StripeClient, code: str) -> None:
        super().__init__(daemon=True)
        self.client, self.code = client, code
        self.warmed = threading.Event()
        self.log: list[tuple[int, int, bool]] = []  # (started, ended, refused)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                started = time.perf_counter_ns()
                refused = False
                try:
                    self.client.v1.customers.list(params={"limit": 1})
                except stripe.StripeError as exc:
                    if exc.error is None or exc.error.code != self.code:
                        raise
                    refused = True
                self.log.append((started, time.perf_counter_ns(), refused))
                if len(self.log) >= 3:
                    self.warmed.set()
                if refused:
                    return
        except BaseException as exc:  # reported by timing()
            self.error = exc
            self.warmed.set()

    def timing(self, issued_ns: int, returned_ns: int) -> RevokeTiming:
        """``issued_ns``: the revoke call started; ``returned_ns``: it returned, so its
        commit was done."""
        self.join(60)
        if self.error is not None or self.is_alive():
            raise RuntimeError(f"the looping client failed: {self.error!r}")
        first_refused = next(end for _, end, refused in self.log if refused)
        return RevokeTiming(
            to_refusal_ns=first_refused - issued_ns,
            revoke_call_ns=returned_ns - issued_ns,
            in_flight_allowed=sum(1 for s, e, r in self.log if not r and s < returned_ns <= e),
            started_after_allowed=sum(1 for s, _, r in self.log if not r and s >= returned_ns),
        )


def time_revokes(
    proxies: list[RunningProxy], gov: Governor, key_for: Callable[[], str], kind: str
) -> list[RevokeTiming]:
    """One revoke of ``kind`` ("agent" or "key"), timed on every proxy at once."""
    key = key_for()
    code = "paymaster_revoked" if kind == "agent" else "paymaster_vault_key_revoked"
    loopers = [Looper(p.client(key), code) for p in proxies]
    for looper in loopers:
        looper.start()
    for looper in loopers:
        looper.warmed.wait(60)
    issued = time.perf_counter_ns()
    if kind == "agent":
        gov.revoke(agent=AGENT, reason="bench", by="bench")
    else:
        VaultKeys(gov.engine).revoke(key, by="bench", reason="bench")
    returned = time.perf_counter_ns()
    try:
        return [looper.timing(issued, returned) for looper in loopers]
    finally:
        if kind == "agent":
            gov.restore(agent=AGENT, reason="bench", by="bench")


# -- the run -------------------------------------------------------------------------------
@dataclass
class ProxyResults:
    variants: list[Variant]
    checks: dict[str, LedgerCheck]
    revokes: list[RevokeSeries]
    settings: ProxySettings
    versions: str
    elapsed_s: float


def run_proxy_bench(settings: ProxySettings, tmp: Path, progress: Console) -> ProxyResults:
    started = time.perf_counter()
    policies = tmp / "proxy-policies.yaml"
    policies.write_text(yaml.safe_dump({"policies": [POLICY]}))
    backends = ["SQLite FULL"] + ([] if settings.no_postgres else ["PostgreSQL"])
    revokes: list[RevokeSeries] = []
    with run_localstripe() as ls, ExitStack() as stack:
        direct = ls.client()
        customer = direct.v1.customers.create(params={"email": "bench@example.com"}).id
        intent = direct.v1.payment_intents.create(
            params={
                "amount": INTENT_AMOUNT,
                "currency": "usd",
                "payment_method": "pm_card_visa",
                "confirm": True,
            }
        ).id
        reads = [read_variant(direct, customer, "direct", None)]
        refunds = [
            bare_refund_variant(direct, intent, with_lookup=False),
            bare_refund_variant(direct, intent, with_lookup=True),
        ]
        governors: dict[str, Governor] = {}
        proxies: dict[str, RunningProxy] = {}
        for backend in backends:
            if backend.startswith("SQLite"):
                url = f"sqlite:///{tmp}/bench-proxy.db"
            else:
                url = stack.enter_context(pg_schema(settings.pg_url)).url
            gov = stack.enter_context(Governor(url, policies=policies))
            governors[backend] = gov
            progress.print(f"[dim]proxy: starting paymaster proxy on {backend} ...[/]")
            proxy = stack.enter_context(run_proxy(url, policies, ls.url))
            proxies[backend] = proxy
            client = proxy.client(VaultKeys(gov.engine).create(AGENT, by="bench").secret)
            label = f"through the proxy, {backend}"
            reads.append(read_variant(client, customer, label, gov))
            refunds.append(refund_variant(client, intent, label, gov))
            # The same governance in this process, without the proxy: what the hop adds.
            here = governed_client(
                gov,
                TEST_API_KEY,
                agent=AGENT,
                run="bench-in-process",
                base_addresses={"api": ls.url},
            )
            label = f"{IN_PROCESS}, {backend}"
            reads.append(read_variant(here, customer, label, gov))
            refunds.append(refund_variant(here, intent, label, gov))
        for op, variants in (("read", reads), ("refund", refunds)):
            progress.print(f"[dim]proxy: {op}, {len(variants)} variants ...[/]")
            measure(variants, settings)
        variants = reads + refunds
        checks = {label: check_ledger(g, variants) for label, g in governors.items()}

        for backend, gov in governors.items():

            def new_key(g: Governor = gov) -> str:
                return VaultKeys(g.engine).create(AGENT, by="bench").secret

            for kind in ("agent", "key"):
                progress.print(f"[dim]proxy: {kind} revokes on {backend} ...[/]")
                series = RevokeSeries(f"{kind} revoke, one proxy", backend)
                for _ in range(settings.revokes):
                    series.timings += time_revokes([proxies[backend]], gov, new_key, kind)
                revokes.append(series)
        last = backends[-1]
        url = governors[last].engine.url.render_as_string(hide_password=False)
        second = stack.enter_context(run_proxy(url, policies, ls.url))
        series = RevokeSeries("agent revoke, two proxies (each proxy's first refusal)", last)
        progress.print(f"[dim]proxy: agent revokes seen by two proxies on {last} ...[/]")
        for _ in range(settings.revokes):
            series.timings += time_revokes(
                [proxies[last], second],
                governors[last],
                lambda g=governors[last]: VaultKeys(g.engine).create(AGENT, by="bench").secret,
                "agent",
            )
        revokes.append(series)
    versions = ", ".join(
        f"{p} {version(p)}" for p in ("stripe", "localstripe", "starlette", "uvicorn", "httpx")
    )
    return ProxyResults(
        variants, checks, revokes, settings, versions, time.perf_counter() - started
    )


# -- report --------------------------------------------------------------------------------
def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _added(v: Variant, base: Variant | None, q: float) -> str:
    if base is None or v.governor is None:
        return "-"
    return f"{(percentile(v.samples_ns, q) - percentile(base.samples_ns, q)) / 1e6:+.2f}"


def print_proxy(console: Console, results: ProxyResults, number: str = "5.") -> None:
    s = results.settings
    table = new_table(
        f"{number} The governing proxy vs calling localstripe directly, single client thread "
        "(times in ms)",
        "operation / path",
        "HTTP calls",
        "calls",
        "p50",
        "p99",
        "added p50",
        "added p99",
        "added p50 vs same HTTP work",
        "added p99 vs same HTTP work",
        "the proxy's own p50: above governed in process",
        "ledger check",
    )
    by_label = {(v.op, v.label): v for v in results.variants}
    for v in results.variants:
        base = by_label.get((v.op, "direct" if v.op == "read" else "bare POST"))
        same = by_label.get(
            (v.op, "direct" if v.op == "read" else "bare GET+POST (same HTTP work)")
        )
        check, backend = "-", v.label.rpartition(", ")[2]
        in_process = by_label.get((v.op, f"{IN_PROCESS}, {backend}"))
        own = "-"
        if v.label.startswith("through the proxy") and in_process is not None:
            own = _added(v, in_process, 50)
        if v.governor is not None:
            c = results.checks[backend]
            check = (
                f"{'[green]ok[/]' if c.ok else '[red]MISMATCH[/]'}: {c.calls} calls, "
                f"${c.settled.major:.2f} settled, ${c.pending.major:.2f} pending"
            )
        op = "customers.retrieve" if v.op == "read" else "refunds.create $0.01"
        label = v.label.replace("bare", "direct")
        table.add_row(
            f"{op}: {label}",
            str(v.http_calls),
            f"{len(v.samples_ns):,}",
            _ms(percentile(v.samples_ns, 50)),
            _ms(percentile(v.samples_ns, 99)),
            _added(v, base, 50),
            _added(v, base, 99),
            _added(v, same, 50),
            _added(v, same, 99),
            own,
            check,
        )
    console.print(table)
    notes(
        console,
        "Measured on this machine, in this run: localstripe, the paymaster proxy process(es), "
        "this client and the database share its CPUs. Direct: ls.client() (stripe's default "
        "HTTP client, requests, keep-alive). Through the proxy: the same client class with a "
        "vault key and base_addresses={'api': proxy_url}, to a `paymaster proxy` process "
        "(uvicorn, one worker) that governs and forwards to the same localstripe with httpx. "
        "Governed in process: governed_client() on the same ledger, calling localstripe "
        "directly; the proxy's own cost is its p50 above that one's.",
        "Through the proxy a refund is a governed look-up GET of the PaymentIntent plus the "
        "governed POST (2 HTTP calls upstream); 'same HTTP work' is the direct GET + POST. "
        "A proxied call pays, over a call governed in process: an extra HTTP hop, one hand-off "
        "to a worker thread and back, the vault key check (one SELECT), and for a POST with "
        "an idempotency key (stripe sends one on every POST) the replay look-up and the kept "
        "response (one SELECT, one INSERT).",
        f"Warm-up {s.warmup} calls per variant, then {s.calls} per variant in {s.rounds} "
        "alternating batches; p50/p99 nearest-rank. Ledger check: every governed refund "
        "(proxied and in process) settled at $0.01, one counted call per governed call, "
        "nothing pending.",
    )
    table = new_table(
        f"{number[:-1]}b Revoke to refusal: from the revoke call's start (its own "
        "transaction and commit included) to the first refused response (ms)",
        "revoke",
        "ledger",
        "revokes timed",
        "min",
        "p50",
        "max",
        "revoke call p50",
        "allowed, started after the commit",
        "allowed, in flight at the commit",
    )
    for series in results.revokes:
        times = [t.to_refusal_ns for t in series.timings]
        table.add_row(
            series.kind,
            series.backend,
            str(len(times)),
            _ms(min(times)),
            _ms(percentile(times, 50)),
            _ms(max(times)),
            _ms(percentile([t.revoke_call_ns for t in series.timings], 50)),
            str(sum(t.started_after_allowed for t in series.timings)),
            str(sum(t.in_flight_allowed for t in series.timings)),
        )
    console.print(table)
    notes(
        console,
        "A client thread per proxy loops customers.list(limit=1) through it back to back "
        "(each a governed free call); the bench process revokes (Governor.revoke of the agent "
        "type, or VaultKeys.revoke of the client's key) once the loop is warm. The time "
        "includes the revoke's own transaction, the rest of the request in flight at the "
        "commit (if it was allowed) and the whole refused request. 'After the commit' is "
        "after the revoke call returned. 'allowed, started after the commit' must be 0: the "
        "revocation is checked inside every reserve (agent) or on every request (key).",
        f"{machine_line()}; {results.versions}. Section wall time: {results.elapsed_s:.1f} s.",
    )


def proxy_section(config: Any, console: Console, progress: Console) -> ProxyResults:
    """Run and print this benchmark with ``ledger_bench.py``'s config (section 5)."""
    settings = settings_for(config)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        results = run_proxy_bench(settings, tmp, progress)
    print_proxy(console, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=210)
    progress = Console(stderr=True)
    idle_busy = background_busy()
    if not settings.no_postgres and reachable_postgres(settings.pg_url, progress) is None:
        settings = ProxySettings(**{**settings.__dict__, "no_postgres": True})
    busy = "unknown" if idle_busy is None else f"{idle_busy:.0f}%"
    console.print(f"CPU busy before the run (other processes): {busy}", highlight=False)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        results = run_proxy_bench(settings, tmp, progress)
    print_proxy(console, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
