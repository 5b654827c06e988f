"""The Stripe vendor-truth simulation (issue 14): paymaster's real Stripe paths, driven from
a seed, checked against the books of a fake Stripe upstream
(:mod:`paymaster.testing.stripe_upstream`).

Agents of three types (``payer`` makes PaymentIntents, ``refunder`` refunds charges and
PaymentIntents, ``biller`` invoices customers charged automatically) run through:

* the governed ``StripeClient`` (:func:`paymaster.vendors.stripe.governed_client`), in
  threads and in asyncio tasks (``create_async``), its HTTP client aimed at the fake;
* the prebuilt tools (:class:`paymaster.vendors.stripe._tools.StripeToolkit`): refunds, and
  invoice items added while an invoice is being finalized;
* two ``paymaster proxy`` processes on the same ledger, with the stock ``stripe`` client
  and a vault key per run.

They retry with the same Idempotency-Key, meet faults the fake injects per request (429
and 500 before acting, 500 after acting, the response lost after acting, slow answers
past the client's timeout, answered or dropped later), add invoice items while an invoice
is finalized (the fake holds the finalize until the item is added), retry a finalize
refused with a 429 after its invoice grew, refund what remains of payments other agents
refund too, send a proxy request with another run's key, and are revoked.

Afterwards, per budget (each agent type's day):

* ``cap``: what the fake Stripe moved (charges and refunds made by governed requests) is
  within the cap, unless the excess is covered by overruns; ``overrun_flagged``: each
  overrun has an ``overrun`` audit row; ``overrun_frozen``: its budget refuses reserves;
* ``no_unplanned_overrun``: this simulation never asks Stripe for more than paymaster
  priced, so any overrun is a pricing defect (reported with the call that caused it);
* ``ledger_covers_vendor``: ``committed`` (settled + pending + unknown) is at least what
  Stripe moved; ``ledger_consistent``; ``every_movement_counted``: the holds of the
  request that moved money count at least that money;
* ``audit_one_row_per_attempt`` (POST rows, per attempt for the in-process paths, per
  vault key for the proxy), ``audit_row_in_its_run`` (a row names a hold of its own
  run), ``no_hold_left_pending``, ``audit_verify``; and, as they happen,
  ``revoked_run_admitted``.

Replay a seed with ``PAYMASTER_SIM_SEED=<seed>``; ``python tests/stripe_sim.py`` runs seed
after seed for ``PAYMASTER_SOAK_SECONDS`` (default 600) on SQLite, and on PostgreSQL too
when ``PAYMASTER_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stripe
import yaml

from paymaster import Governor, HoldState, Money, Policy, PolicyViolation, ViolationCode
from paymaster._vault import VaultKeys
from paymaster.testing.proxy import RunningProxy, proxy_client, run_proxy
from paymaster.testing.stripe_upstream import Fault, Movement, StripeUpstream, client_key
from paymaster.vendors.stripe import bind, governed_client
from paymaster.vendors.stripe._tools import StripeToolkit, idempotency_key
from paymaster.vendors.stripe._transport import ledger_key_of

SEED_ENV = "PAYMASTER_SIM_SEED"
SOAK_ENV = "PAYMASTER_SOAK_SECONDS"
PG_ENV = "PAYMASTER_TEST_POSTGRES_URL"
DEFAULT_SEED = 20261214
GOVERNED_KEY = "sk_test_governed"  # what governed clients and the proxies send
SETUP_KEY = "sk_test_setup"  # the world's own payments: never an agent's
#: The in-process client's read timeout: a SLOW fault parks the request past it.
CLIENT_TIMEOUT = 0.6
#: A safety net against a stuck choreography, never a means of synchronisation.
STUCK_AFTER = 30.0
FORM = "application/x-www-form-urlencoded"


# -- the world ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgentType:
    name: str
    daily_cap: int
    per_call: int
    endpoints: tuple[str, ...]

    def policy_fields(self) -> dict[str, Any]:
        return {
            "id": f"{self.name}-policy",
            "agent": self.name,
            "vendor": "stripe",
            "currency": "USD",
            "daily_cap": f"{self.daily_cap / 100:.2f}",
            "per_call_cap": f"{self.per_call / 100:.2f}",
            "endpoints": list(self.endpoints),
        }


PAYER = AgentType("payer", 40_000, 6_000, ("/v1/payment_intents", "/v1/customers"))
REFUNDER = AgentType(
    "refunder", 30_000, 9_000, ("/v1/refunds", "/v1/payment_intents", "/v1/charges")
)
BILLER = AgentType("biller", 40_000, 15_000, ("/v1/invoices", "/v1/invoiceitems"))
AGENT_TYPES = (PAYER, REFUNDER, BILLER)
TYPES = {t.name: t for t in AGENT_TYPES}

FAULTS: dict[Fault, float] = {
    Fault.RATE_LIMITED: 0.08,
    Fault.ERROR_BEFORE: 0.06,
    Fault.ERROR_AFTER: 0.07,
    Fault.LOST_AFTER: 0.07,
    Fault.SLOW: 0.04,
    Fault.SLOW_DROPPED: 0.02,
}
OPS: dict[str, dict[str, float]] = {
    "payer": {"pay": 0.85, "revoke_check": 0.05, "cross_run": 0.10},
    "refunder": {"refund_pi": 0.45, "refund_charge": 0.45, "revoke_check": 0.10},
    "biller": {
        "invoice": 0.40,
        "finalize_race": 0.35,
        "finalize_retry": 0.20,
        "revoke_check": 0.05,
    },
}


@dataclass(frozen=True)
class SimConfig:
    runs_per_agent: int = 2
    ops_per_run: tuple[int, int] = (3, 5)
    proxies: int = 2
    setup_payments: int = 14


SHORT = SimConfig()
SHORT_SEEDS = 3
SOAK = SimConfig(runs_per_agent=3, ops_per_run=(4, 8))


@dataclass
class Attempt:
    """One request an agent sent (or tried to), and how many POST audit rows it may leave."""

    path: str  # client, async, tools, proxy
    agent: str
    run: str
    op: str
    key: str | None
    marker: str | None
    fault: str
    rows: tuple[int, int] = (1, 1)
    outcome: str = ""


@dataclass
class Record:
    attempts: list[Attempt] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    key_runs: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    """wire idempotency key -> the (agent, run)s that sent it."""
    proxy_runs: dict[str, int] = field(default_factory=dict)
    """a proxy run -> how many non-GET requests it sent."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, attempt: Attempt) -> Attempt:
        with self.lock:
            self.attempts.append(attempt)
            if attempt.key is not None:
                self.key_runs.setdefault(attempt.key, set()).add((attempt.agent, attempt.run))
        return attempt

    def fail(self, invariant: str, detail: str) -> None:
        with self.lock:
            self.failures.append((invariant, detail))

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n


@dataclass
class World:
    """What the setup made: each agent type's customers, the payments to refund, a price."""

    customers: dict[str, list[str]]
    intents: list[tuple[str, str]]  # (pi, ch) on refunder customers
    price: str


def _weighted(rng: random.Random, weights: dict[Any, float]) -> Any:
    r, acc = rng.random() * sum(weights.values()), 0.0
    for item, weight in weights.items():
        acc += weight
        if r < acc:
            return item
    return next(iter(weights))


def make_world(upstream: StripeUpstream, rng: random.Random, cfg: SimConfig) -> World:
    setup = stripe.StripeClient(SETUP_KEY, base_addresses={"api": upstream.url})
    customers = {
        t.name: [
            setup.v1.customers.create(
                params={"name": f"{t.name}-{i}", "metadata": {"label": t.name}}
            ).id
            for i in range(3)
        ]
        for t in AGENT_TYPES
    }
    intents = []
    for _ in range(cfg.setup_payments):
        pi = setup.v1.payment_intents.create(
            params={
                "amount": rng.randrange(2_000, 9_000, 100),
                "currency": "usd",
                "customer": rng.choice(customers["refunder"]),
                "confirm": True,
            }
        )
        intents.append((str(pi.id), str(pi.latest_charge)))
    price = setup.v1.prices.create(
        params={"product": "prod_sim", "unit_amount": 1_500, "currency": "usd"}
    )
    return World(customers, intents, str(price.id))


# -- one agent ------------------------------------------------------------------------------
class Refused(Exception):
    """The call was refused by paymaster (in process or by a proxy)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Agent:
    """One agent of one type on one path; its runs and ops are drawn from its own seed."""

    def __init__(self, sim: Sim, kind: AgentType, path: str, seed: str) -> None:
        self.sim, self.kind, self.path = sim, kind, path
        self.name = f"{kind.name}-{path}"
        self.rng = random.Random(seed)
        self.rec = sim.rec
        self.run = ""
        self.client: stripe.StripeClient | None = None
        self.vault_key: str | None = None
        self.proxy: RunningProxy | None = None
        self.loop = asyncio.new_event_loop() if path == "async" else None
        self._n = itertools.count()

    # -- the paths --------------------------------------------------------------------
    def new_run(self, index: int) -> None:
        self.run = f"{self.name}-r{index}-{uuid.uuid4().hex[:6]}"
        if self.path == "proxy":
            self.vault_key = (
                VaultKeys(self.sim.gov.engine).create(self.kind.name, by="sim", run=self.run).secret
            )
            self.proxy = self.sim.proxies[index % len(self.sim.proxies)]
            self.client = proxy_client(
                self.proxy.url, self.vault_key, http_client=stripe.RequestsClient(timeout=30)
            )
            self.rec.proxy_runs.setdefault(self.run, 0)
        elif self.client is None:
            self.client = governed_client(
                self.sim.gov,
                GOVERNED_KEY,
                agent=self.kind.name,
                base_addresses={"api": self.sim.upstream.url},
                max_network_retries=0,
                http_client=stripe.RequestsClient(
                    timeout=CLIENT_TIMEOUT,
                    async_fallback_client=stripe.HTTPXClient(timeout=CLIENT_TIMEOUT),
                ),
            )

    def key(self) -> str:
        return f"{self.name}-{next(self._n)}-{uuid.uuid4().hex[:8]}"

    def send(
        self,
        op: str,
        service: str,
        method: str,
        params: dict[str, Any],
        *,
        key: str | None = None,
        object_id: str | None = None,
        fault: Fault | None = None,
        retries: int = 2,
    ) -> Any:
        """One governed POST, retried with the same key after a failure that may have
        moved money. Returns the Stripe object, or raises :class:`Refused` or the last
        Stripe error."""
        key = key or self.key()
        for attempt_no in itertools.count():
            drawn = fault if fault is not None and attempt_no == 0 else self.fault()
            self.sim.upstream.script(key, drawn)
            marker = f"{self.name}:{next(self._n)}"
            attempt = self.rec.add(
                Attempt(self.path, self.kind.name, self.run, op, key, marker, drawn.value)
            )
            try:
                result = self._call(service, method, params, key, marker, object_id)
                attempt.outcome = "ok"
                return result
            except Refused as refused:
                attempt.outcome = f"refused:{refused.code}"
                raise
            except stripe.StripeError as exc:
                attempt.outcome = f"{type(exc).__name__}:{exc.http_status}"
                if isinstance(exc, stripe.APIConnectionError) and drawn is Fault.NONE:
                    attempt.rows = (0, 1)  # a look-up may have timed out under load
                if drawn in (Fault.SLOW, Fault.SLOW_DROPPED) and self.rng.random() < 0.6:
                    self.sim.upstream.release(key)  # it answers (or drops) before the retry
                retryable = exc.http_status in (None, 409, 429, 500, 502) or isinstance(
                    exc, stripe.APIConnectionError
                )
                if not retryable or attempt_no >= retries:
                    raise
                self.rec.count("retries")
        raise AssertionError("unreachable")

    def fault(self) -> Fault:
        weights = dict(FAULTS)
        if self.path == "proxy":  # a slow answer costs the proxy's 1 s upstream timeout
            weights[Fault.SLOW] /= 2
            weights[Fault.SLOW_DROPPED] /= 2
        if self.rng.random() < sum(weights.values()):
            return _weighted(self.rng, weights)  # type: ignore[no-any-return]
        return Fault.NONE

    def _call(
        self,
        service: str,
        method: str,
        params: dict[str, Any],
        key: str,
        marker: str,
        object_id: str | None,
    ) -> Any:
        assert self.client is not None
        if self.path == "proxy":
            with self.rec.lock:
                self.rec.proxy_runs[self.run] += 1
        fn = getattr(getattr(self.client.v1, service), method)
        args = [object_id] if object_id else []
        options = {"idempotency_key": key}
        try:
            if self.path == "proxy":
                return fn(*args, params=params, options=options)
            with bind(agent=self.kind.name, run=self.run, tool_call_id=marker):
                if self.path == "async":
                    afn = getattr(getattr(self.client.v1, service), f"{method}_async")
                    assert self.loop is not None
                    return self.loop.run_until_complete(afn(*args, params=params, options=options))
                return fn(*args, params=params, options=options)
        except PolicyViolation as violation:
            raise Refused(violation.code.value) from violation
        except stripe.StripeError as exc:
            code = exc.error.code if exc.error is not None else None
            if code and str(code).startswith("paymaster_") and exc.http_status in (400, 403):
                raise Refused(str(code)[len("paymaster_") :]) from exc
            raise

    # -- the ops ------------------------------------------------------------------------
    def main(self, runs: int, ops: tuple[int, int]) -> None:
        try:
            self._main(runs, ops)
        finally:
            if self.loop is not None:
                self.loop.close()

    def _main(self, runs: int, ops: tuple[int, int]) -> None:
        for index in range(runs):
            self.new_run(index)
            for _ in range(self.rng.randint(*ops)):
                op = _weighted(self.rng, OPS[self.kind.name])
                self.rec.count(f"op:{op}")
                self.rec.count(f"path:{self.path}")
                try:
                    getattr(self, f"op_{op}")()
                except (Refused, stripe.StripeError) as exc:
                    self.rec.count(f"ended:{type(exc).__name__}")

    def customer(self) -> str:
        return self.rng.choice(self.sim.world.customers[self.kind.name])

    def op_pay(self) -> None:
        amount = self.rng.randrange(500, 6_500, 100)
        params = {"amount": amount, "currency": "usd", "customer": self.customer(), "confirm": True}
        key = self.key()
        self.send("pay", "payment_intents", "create", params, key=key)
        if self.path == "proxy":
            self.sim.remember(self.kind.name, key, params)

    def op_cross_run(self) -> None:
        """Send, in this run, a request another run already sent with the same key: a
        key belongs to its run, so this is another call, governed in this run."""
        if self.path != "proxy":
            return self.op_pay()
        earlier = self.sim.recall(self.kind.name, self.rng)
        if earlier is None:
            return self.op_pay()
        key, params = earlier
        self.rec.count("cross_run_sent")
        self.send(
            "cross_run", "payment_intents", "create", params, key=key, fault=Fault.NONE, retries=0
        )
        return None

    def op_refund_pi(self) -> None:
        pi, _ = self.rng.choice(self.sim.world.intents)
        params: dict[str, Any] = {"payment_intent": pi}
        if self.rng.random() < 0.6:
            params["amount"] = self.rng.randrange(500, 4_000, 100)
        self.send("refund_pi", "refunds", "create", params)

    def op_refund_charge(self) -> None:
        _, ch = self.rng.choice(self.sim.world.intents)
        params: dict[str, Any] = {"charge": ch}
        if self.rng.random() < 0.6:
            params["amount"] = self.rng.randrange(500, 4_000, 100)
        self.send("refund_charge", "refunds", "create", params)

    def draft(self) -> tuple[str, str]:
        """A draft invoice charged automatically (auto_advance off, as paymaster asks)
        with one or two items."""
        customer = self.customer()
        invoice = self.send(
            "invoice",
            "invoices",
            "create",
            {
                "customer": customer,
                "collection_method": "charge_automatically",
                "auto_advance": False,
            },
        )
        for _ in range(self.rng.randint(1, 2)):
            self.add_item(customer, str(invoice.id))
        return customer, str(invoice.id)

    def add_item(self, customer: str, invoice: str) -> None:
        params = {
            "customer": customer,
            "amount": self.rng.randrange(500, 4_000, 100),
            "currency": "usd",
            "invoice": invoice,
        }
        self.send("invoice_item", "invoice_items", "create", params)

    def finalize(self, invoice: str, key: str | None = None, fault: Fault | None = None) -> Any:
        return self.send(
            "finalize",
            "invoices",
            "finalize_invoice",
            {"auto_advance": True},
            key=key,
            object_id=invoice,
            fault=fault,
        )

    def op_invoice(self) -> None:
        _, invoice = self.draft()
        self.finalize(invoice)

    def op_finalize_race(self) -> None:
        """Finalize while another caller adds an item: the fake holds the finalize, once it
        has arrived (paymaster priced it), until the item is added (or refused)."""
        customer, invoice = self.draft()
        arrived, proceed = self.sim.upstream.gate_finalize(invoice)
        adder = self.sim.tools_adder if self.rng.random() < 0.5 else None

        def add() -> None:
            try:
                arrived.wait(STUCK_AFTER)
                if adder is not None:
                    adder(customer, invoice)
                else:
                    self.add_item(customer, invoice)
            except (Refused, stripe.StripeError) as exc:
                self.rec.count(f"race_add_ended:{type(exc).__name__}")
            except Exception:
                self.rec.fail("unexpected_error", f"{self.name} race add: {traceback.format_exc()}")
            finally:
                proceed.set()

        helper = threading.Thread(target=add, name=f"{self.name}-adder")
        helper.start()
        try:
            self.finalize(invoice, fault=Fault.NONE)
        finally:
            arrived.set()  # refused before reaching Stripe: the adder goes on regardless
            helper.join()
            self.rec.count("finalize_races")

    def op_finalize_retry(self) -> None:
        """A finalize refused with a 429 (released: nothing moved), the invoice grows, and
        the finalize is retried with its key: it must be priced at what Stripe charges."""
        customer, invoice = self.draft()
        key = self.key()
        try:
            self.send(
                "finalize",
                "invoices",
                "finalize_invoice",
                {"auto_advance": True},
                key=key,
                object_id=invoice,
                fault=Fault.RATE_LIMITED,
                retries=0,
            )
            return  # paymaster refused it before Stripe saw it, or a bug let it pass
        except (Refused, stripe.StripeError):
            pass
        self.add_item(customer, invoice)
        self.rec.count("finalize_retries")
        self.send(
            "finalize",
            "invoices",
            "finalize_invoice",
            {"auto_advance": True},
            key=key,
            object_id=invoice,
            fault=Fault.NONE,
        )

    def op_revoke_check(self) -> None:
        """Revoke this run: its next call must be refused, and is audited."""
        gov = self.sim.gov
        gov.revoke(run=self.run, reason="sim: revoke check", by="sim")
        try:
            {"payer": self.op_pay, "refunder": self.op_refund_pi, "biller": self.op_invoice}[
                self.kind.name
            ]()
            self.rec.fail(
                "revoked_run_admitted",
                f"{self.name} run {self.run}: a call was admitted after a revoke",
            )
        except Refused as refused:
            if refused.code != ViolationCode.REVOKED.value:
                self.rec.count(f"revoke_check_refused:{refused.code}")
        except stripe.StripeError as exc:
            self.rec.fail(
                "revoked_run_admitted", f"{self.name} run {self.run}: sent after a revoke ({exc!r})"
            )
        finally:
            gov.restore(run=self.run, reason="sim: revoke check done", by="sim")
        if self.path == "proxy" and self.rng.random() < 0.5:
            self.bad_method()

    def bad_method(self) -> None:
        """A PUT with a valid vault key: refused (405) and, as the README says, audited
        under the key's agent."""
        assert self.proxy is not None and self.vault_key is not None
        host, port = self.proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(
                "PUT",
                "/v1/customers",
                body=b"",
                headers={"Authorization": f"Bearer {self.vault_key}"},
            )
            status = conn.getresponse().status
        finally:
            conn.close()
        self.rec.add(
            Attempt(
                self.path,
                self.kind.name,
                self.run,
                "bad_method",
                None,
                None,
                "none",
                outcome=str(status),
            )
        )
        with self.rec.lock:
            self.rec.proxy_runs[self.run] += 1


# -- one simulation -------------------------------------------------------------------------
@dataclass
class SimReport:
    seed: int
    backend: str
    seconds: float = 0.0
    operations: int = 0
    attempts: int = 0
    overruns: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    moved: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    replay: str = ""

    def line(self) -> str:
        faults = ", ".join(
            f"{k}={v}" for k, v in sorted(self.stats.get("faults", {}).items()) if k != "none"
        )
        status = "ok" if not self.failures else f"FAILED ({len(self.kinds())} kinds)"
        return (
            f"stripe seed {self.seed} [{self.backend}] {status}: {self.operations} operations, "
            f"{self.attempts} attempts, {self.stats.get('charges', 0)} charges, "
            f"{self.stats.get('refunds', 0)} refunds, {self.overruns} overruns, moved "
            f"{self.moved}, faults: {faults} ({self.seconds:.1f}s)"
        )

    def kinds(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.failures)

    def failure_text(self, limit: int = 6) -> str:
        lines = [
            f"Stripe vendor-truth simulation failed: seed {self.seed} on {self.backend}",
            f"replay: {self.replay or self.pytest_replay()}",
            "invariants broken: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kinds().items())),
        ]
        seen: Counter[str] = Counter()
        for kind, detail in self.failures:
            seen[kind] += 1
            if seen[kind] <= limit:
                lines.append(f"  [{kind}] {detail}")
        lines.append(
            "  what happened: " + ", ".join(f"{k}={n}" for k, n in sorted(self.counts.items()))
        )
        return "\n".join(lines)

    def pytest_replay(self) -> str:
        return (
            f"{SEED_ENV}={self.seed} .venv/bin/python -m pytest -q -p no:cacheprovider "
            f"tests/test_stripe_vendor_truth.py -k 'simulation and {self.backend}'"
        )


class Sim:
    """The shared pieces of one simulation."""

    def __init__(self, seed: int, gov: Governor, upstream: StripeUpstream, rec: Record) -> None:
        self.seed, self.gov, self.upstream, self.rec = seed, gov, upstream, rec
        self.proxies: list[RunningProxy] = []
        self.world: World
        self.toolkit = StripeToolkit(
            gov,
            stripe.StripeClient(
                GOVERNED_KEY,
                base_addresses={"api": upstream.url},
                max_network_retries=0,
                http_client=stripe.RequestsClient(timeout=CLIENT_TIMEOUT),
            ),
            agent=BILLER.name,
            only=["create_invoice_item", "create_refund"],
        )
        self.tool_run = f"tools-{uuid.uuid4().hex[:6]}"
        self._tool_calls = itertools.count()
        self._sent: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def remember(self, agent: str, key: str, params: dict[str, Any]) -> None:
        with self._lock:
            self._sent.setdefault(agent, []).append((key, params))

    def recall(self, agent: str, rng: random.Random) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            sent = list(self._sent.get(agent, []))
        return rng.choice(sent) if sent else None

    def tools_adder(self, customer: str, invoice: str) -> None:
        """Add the world's price to a draft invoice with the prebuilt tool (retried with
        the same tool call id after a failure that may have moved nothing)."""
        cid = f"tool-{next(self._tool_calls)}"
        args = {"customer": customer, "price": self.world.price, "invoice": invoice}
        tool = self.toolkit._tool("create_invoice_item")
        key = idempotency_key(tool.name, self.tool_run, cid, tool.arguments(args))
        assert key is not None
        for attempt_no in range(3):
            attempt = self.rec.add(
                Attempt("tools", BILLER.name, self.tool_run, "tool_item", key, cid, "none")
            )
            try:
                self.toolkit.invoke(
                    "create_invoice_item", args, run=self.tool_run, tool_call_id=cid
                )
                attempt.outcome = "ok"
                return
            except PolicyViolation as violation:
                attempt.outcome = f"refused:{violation.code.value}"
                raise Refused(violation.code.value) from violation
            except stripe.StripeError as exc:
                attempt.outcome = f"{type(exc).__name__}:{exc.http_status}"
                if isinstance(exc, stripe.APIConnectionError):
                    attempt.rows = (0, 1)
                if attempt_no == 2 or not isinstance(exc, stripe.APIConnectionError):
                    raise

    def tools_refunder(self, rng: random.Random, ops: int) -> None:
        """The refund tool, its calls retried under their tool call id after faults."""
        for _ in range(ops):
            self.rec.count("op:tool_refund")
            pi, _ = rng.choice(self.world.intents)
            args: dict[str, Any] = {"payment_intent": pi}
            if rng.random() < 0.6:
                args["amount"] = rng.randrange(500, 4_000, 100)
            cid = f"refund-tool-{next(self._tool_calls)}"
            tool = self.toolkit._tool("create_refund")
            key = idempotency_key(tool.name, self.tool_run, cid, tool.arguments(args))
            assert key is not None
            for attempt_no in range(3):
                fault = Fault.NONE
                if rng.random() < 0.3:
                    fault = _weighted(rng, FAULTS)
                self.upstream.script(key, fault)
                attempt = self.rec.add(
                    Attempt(
                        "tools", BILLER.name, self.tool_run, "tool_refund", key, cid, fault.value
                    )
                )
                try:
                    self.toolkit.invoke("create_refund", args, run=self.tool_run, tool_call_id=cid)
                    attempt.outcome = "ok"
                    break
                except PolicyViolation as violation:
                    attempt.outcome = f"refused:{violation.code.value}"
                    break
                except stripe.StripeError as exc:
                    attempt.outcome = f"{type(exc).__name__}:{exc.http_status}"
                    if isinstance(exc, stripe.APIConnectionError) and fault is Fault.NONE:
                        attempt.rows = (0, 1)
                    if fault in (Fault.SLOW, Fault.SLOW_DROPPED):
                        self.upstream.release(key)
                    if attempt_no == 2 or exc.http_status not in (None, 409, 429, 500):
                        break


def policies_yaml(path: Path) -> list[Policy]:
    fields = [t.policy_fields() for t in AGENT_TYPES]
    # The tools' refunds count against the biller's budget (the toolkit's agent): let it.
    fields[2]["endpoints"] = [*BILLER.endpoints, *REFUNDER.endpoints]
    path.write_text(yaml.safe_dump({"policies": fields}))
    return [Policy.model_validate(f) for f in fields]


def simulate(
    seed: int, db_url: str, cfg: SimConfig = SHORT, *, backend: str | None = None
) -> SimReport:
    """Run one seeded simulation on a fresh ledger database; check the invariants."""
    backend = backend or ("postgresql" if db_url.startswith("postgresql") else "sqlite")
    report = SimReport(seed, backend)
    started = time.monotonic()
    rec = Record()
    with tempfile.TemporaryDirectory(prefix="stripe-sim-") as tmp, ExitStack() as stack:
        policies_path = Path(tmp) / "policies.yaml"
        policies = policies_yaml(policies_path)
        gov = stack.enter_context(Governor(db_url, policies=policies))
        upstream = stack.enter_context(StripeUpstream())
        sim = Sim(seed, gov, upstream, rec)
        sim.world = make_world(upstream, random.Random(f"{seed}:world"), cfg)
        sim.proxies = [
            stack.enter_context(
                run_proxy(
                    db_url,
                    policies_path,
                    upstream.url,
                    stripe_key=GOVERNED_KEY,
                    args=("--upstream-timeout", "1"),
                )
            )
            for _ in range(cfg.proxies)
        ]
        agents = [
            Agent(sim, kind, path, f"{seed}:{kind.name}:{path}")
            for kind, path in [
                (PAYER, "client"),
                (REFUNDER, "client"),
                (BILLER, "client"),
                (PAYER, "async"),
                (REFUNDER, "async"),
                (PAYER, "proxy"),
                (REFUNDER, "proxy"),
                (BILLER, "proxy"),
            ]
        ]
        threads = [
            threading.Thread(
                target=_guarded(rec, a.name, a.main),
                args=(cfg.runs_per_agent, cfg.ops_per_run),
                name=a.name,
            )
            for a in agents
        ]
        threads.append(
            threading.Thread(
                target=_guarded(rec, "tools", sim.tools_refunder),
                args=(random.Random(f"{seed}:tools"), cfg.runs_per_agent * 3),
                name="tools",
            )
        )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        upstream.release()  # parked requests that nobody released act now, before the books
        report.stats = upstream.stats()
        movements = upstream.movements()
        gov.close()
        with Governor(db_url, policies=policies) as fresh:
            report.overruns = check(report, rec, fresh, movements)
    report.failures = rec.failures
    report.attempts = len(rec.attempts)
    report.counts = rec.counts
    report.operations = sum(n for k, n in rec.counts.items() if k.startswith("op:"))
    report.seconds = time.monotonic() - started
    return report


def _guarded(rec: Record, name: str, fn: Callable[..., Any]) -> Callable[..., None]:
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            rec.fail("unexpected_error", f"{name}: {traceback.format_exc()}{exc!r}")

    return run


# -- the invariants ---------------------------------------------------------------------------
def check(report: SimReport, rec: Record, gov: Governor, movements: Sequence[Movement]) -> int:
    """Check every invariant against the fake Stripe's books; returns the overruns seen."""
    fail = rec.fail
    governed = [m for m in movements if m.api_key == GOVERNED_KEY]
    holds = gov.ledger.holds(states=list(HoldState))
    by_key: dict[tuple[str | None, str, str | None], list[Any]] = {}
    for h in holds:  # a hold keeps the key its caller gave (the wire key, scoped)
        by_key.setdefault((h.idempotency_key, h.agent, h.run), []).append(h)
    by_id = {h.id: h for h in holds}
    rows = list(gov.audit.iter_records())
    # The toolkit's calls count against the biller (the toolkit's agent type).
    tool_keys = {a.key for a in rec.attempts if a.path == "tools"}

    def label_of(m: Movement) -> str:
        return BILLER.name if client_key(m.idempotency_key or "") in tool_keys else str(m.label)

    moved: Counter[str] = Counter()
    for m in governed:
        moved[label_of(m)] += m.amount
    report.moved = dict(moved)

    # Each movement is counted by the holds of the request that made it.
    caused: dict[str, Movement] = {}
    for m in governed:
        key = client_key(m.idempotency_key or "")
        # The ledger's key is scoped to the API key the governed request carried: a
        # client's own (stripe-python's "Bearer ..."), or none for the proxy, whose
        # upstream adds its key after governing.
        ledger_keys = set()
        for authorization in (f"Bearer {m.api_key}", None):
            headers = {"Idempotency-Key": key, "Content-Type": FORM}
            if authorization is not None:
                headers["Authorization"] = authorization
            ledger_keys.add(ledger_key_of(m.method, m.path, headers, m.body))
        found: list[Any] = []
        for agent, run in sorted(rec.key_runs.get(key, set())):
            for ledger_key in sorted(k for k in ledger_keys if k is not None):
                found += by_key.get((ledger_key, agent, run), [])
        for h in found:
            caused.setdefault(h.id, m)
        if sum(_counted(h) for h in found) < m.amount:
            fail(
                "every_movement_counted",
                f"{m.kind} {m.id} of {m.amount} ({m.path}, key {m.idempotency_key}, label "
                f"{m.label}): holds {[_describe(h) for h in found]}; attempts "
                f"{_attempts(rec, client_key(m.idempotency_key or ''))}",
            )

    # Overruns: this simulation never asks Stripe for more than paymaster priced.
    overruns = [h for h in holds if h.overrun is not None]
    overrun_rows = {r.hold_id for r in rows if r.outcome == "overrun"}
    for h in overruns:
        cause = caused.get(h.id)
        key_attempts = [a for a in rec.attempts if cause and a.key == cause.idempotency_key]
        fail(
            "no_unplanned_overrun",
            f"{h.agent} {h.method} {h.endpoint} run {h.run}: reserved {h.estimate}, settled "
            f"{h.actual} (overrun {h.overrun}); attempts "
            f"{[(a.path, a.op, a.fault, a.outcome) for a in key_attempts] or '?'}",
        )
        if h.id not in overrun_rows:
            fail(
                "overrun_flagged",
                f"hold {h.id} moved {h.overrun} above its reservation, with no 'overrun' audit row",
            )

    day = gov.ledger.now().date()
    daily = {b.agent: b for b in gov.budgets(day=day) if b.kind == "daily"}
    for kind in AGENT_TYPES:
        status = daily.get(kind.name)
        total = moved[kind.name]
        committed = status.committed.amount if status is not None else 0
        covered = sum(
            int(h.overrun.amount)
            for h in overruns
            if h.agent == kind.name and h.overrun is not None
        )
        if total - covered > kind.daily_cap:
            fail(
                "cap",
                f"day:{kind.name}: Stripe moved {Money(total, 'USD')} against a cap of "
                f"{Money(kind.daily_cap, 'USD')}, of which overruns cover "
                f"{Money(covered, 'USD')}",
            )
        if committed < total:
            fail(
                "ledger_covers_vendor",
                f"day:{kind.name}: committed {Money(committed, 'USD')}, "
                f"Stripe moved {Money(total, 'USD')}",
            )
        if status is not None and status.committed != status.settled + status.pending:
            fail(
                "ledger_consistent",
                f"day:{kind.name}: committed {status.committed} != "
                f"settled {status.settled} + pending {status.pending}",
            )
        unacknowledged = [
            h for h in overruns if h.agent == kind.name and h.overrun_acknowledged_at is None
        ]
        if unacknowledged:
            _probe_frozen(gov, kind, fail)

    # One audit row per attempt: its POST's, or its refused look-up's.
    # (A refused pricing look-up is the attempt's row: the POST it prices was never made.)
    posts = [
        r
        for r in rows
        if (r.method != "GET" or r.outcome == "denied") and r.outcome != "reconciled"
    ]
    by_marker = Counter(r.tool_call_id for r in posts if r.tool_call_id)
    per_marker: dict[str, list[int]] = {}
    for a in rec.attempts:
        if a.path in ("client", "async", "tools") and a.marker:
            bounds = per_marker.setdefault(a.marker, [0, 0])
            bounds[0] += a.rows[0]
            bounds[1] += a.rows[1]
    for marker, (low, high) in sorted(per_marker.items()):
        if not low <= by_marker[marker] <= high:
            tried = [(a.op, a.fault, a.outcome) for a in rec.attempts if a.marker == marker]
            fail(
                "audit_one_row_per_attempt",
                f"{marker} {tried}: {by_marker[marker]} POST rows for {low}..{high} "
                f"({[(r.endpoint, r.outcome) for r in posts if r.tool_call_id == marker]})",
            )
    for marker in sorted(set(by_marker) - set(per_marker)):
        fail("audit_one_row_per_attempt", f"rows for no attempt: tool_call_id {marker}")
    by_run = Counter(r.run for r in posts)
    for run, sent in sorted(rec.proxy_runs.items()):
        if by_run[run] != sent:
            ops = Counter((a.op, a.outcome) for a in rec.attempts if a.run == run)
            fail(
                "audit_one_row_per_attempt",
                f"proxy run {run}: {sent} non-GET requests, {by_run[run]} non-GET audit rows "
                f"({dict(Counter((r.method, r.outcome) for r in posts if r.run == run))}; "
                f"ops {dict(ops)})",
            )

    # A row that names a hold names one of its own run.
    for r in rows:
        h = by_id.get(r.hold_id) if r.hold_id else None
        if h is not None and (h.run != r.run or h.agent != r.agent):
            fail(
                "audit_row_in_its_run",
                f"row {r.id} ({r.agent}, run {r.run}, {r.method} {r.endpoint}, "
                f"{r.outcome}) names hold {h.id[:8]} of run {h.run}",
            )

    for h in gov.ledger.holds(states=[HoldState.PENDING]):
        fail("no_hold_left_pending", f"{_describe(h)} run {h.run}")
    verified = gov.audit.verify()
    if not verified.ok:
        fail("audit_verify", f"row {verified.first_bad_id}: {verified.reason}")
    return len(overruns)


def _attempts(rec: Record, key: str | None) -> list[tuple[str, str, str, str, str]]:
    return [(a.path, a.run, a.op, a.fault, a.outcome) for a in rec.attempts if a.key == key]


def _counted(h: Any) -> int:
    if h.state is HoldState.SETTLED:
        return int(h.actual.amount) if h.actual is not None else 0
    return 0 if h.state is HoldState.RELEASED else int(h.estimate.amount)


def _describe(h: Any) -> str:
    actual = h.actual.amount if h.actual is not None else None
    return f"hold {h.id[:8]} {h.state.value} estimate {h.estimate.amount} actual {actual}"


def _probe_frozen(gov: Governor, kind: AgentType, fail: Callable[[str, str], None]) -> None:
    try:
        with gov.guard(
            agent=kind.name,
            vendor="stripe",
            endpoint=kind.endpoints[0],
            estimate=Money(1, "USD"),
            run="final-probe",
        ) as call:
            call.fail(error="sim: final probe, not sent")
        fail(
            "overrun_frozen",
            f"day:{kind.name}: an unacknowledged overrun, yet a reserve was admitted at the end",
        )
    except PolicyViolation as violation:
        if violation.code not in (ViolationCode.BUDGET_FROZEN, ViolationCode.CAP_EXCEEDED):
            fail(
                "overrun_frozen",
                f"day:{kind.name}: refused with {violation.code.value}, not budget_frozen",
            )


# -- databases and the soak ------------------------------------------------------------------
@contextmanager
def database(backend: str) -> Iterator[str]:
    """A fresh ledger database on ``backend``: a SQLite file, or a PostgreSQL schema."""
    if backend == "postgresql":
        from vendor_sim import postgres_schema

        with postgres_schema(os.environ[PG_ENV]) as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="paymaster-stripe-sim-") as tmp:
        yield f"sqlite:///{tmp}/ledger.db"


def soak(seconds: float, first_seed: int, cfg: SimConfig = SOAK) -> int:
    """Seed after seed on every backend until ``seconds`` have passed; 1 if any failed."""
    backends = ["sqlite", *(["postgresql"] if os.environ.get(PG_ENV) else [])]
    deadline = time.monotonic() + seconds
    failed: list[SimReport] = []
    totals: Counter[str] = Counter()
    seeds = 0
    for seed in itertools.count(first_seed):
        if seeds and time.monotonic() >= deadline:
            break
        seeds += 1
        for backend in backends:
            with database(backend) as url:
                report = simulate(seed, url, cfg, backend=backend)
            report.replay = f"{SEED_ENV}={seed} {SOAK_ENV}=0 .venv/bin/python tests/stripe_sim.py"
            print(report.line(), flush=True)
            if report.failures:
                failed.append(report)
                print(report.failure_text(limit=4), flush=True)
            totals["operations"] += report.operations
            totals["attempts"] += report.attempts
            totals["charges"] += int(report.stats.get("charges", 0))
            totals["refunds"] += int(report.stats.get("refunds", 0))
            totals["faults"] += sum(
                n for k, n in report.stats.get("faults", {}).items() if k != "none"
            )
    print(
        f"stripe soak: {seeds} seeds from {first_seed}, {totals['operations']} operations, "
        f"{totals['attempts']} attempts, {totals['faults']} faults, {totals['charges']} "
        f"charges, {totals['refunds']} refunds; {len(failed)} failed"
        + (": " + ", ".join(f"{r.seed}/{r.backend}" for r in failed) if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


def main(argv: Sequence[str] = ()) -> int:
    import logging

    logging.getLogger("paymaster").setLevel(logging.CRITICAL)  # overruns are findings here
    seconds = float(os.environ.get(SOAK_ENV) or 600)
    first = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1, 10**6))
    return soak(seconds, first)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main(sys.argv[1:]))
