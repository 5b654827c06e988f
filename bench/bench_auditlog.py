"""Audit-log scale: what operators read, on a ledger of 10 M audit rows, against targets.

    .venv/bin/python bench/bench_auditlog.py            # 10 M rows (PostgreSQL), 1 M (SQLite)
    .venv/bin/python bench/bench_auditlog.py --quick    # 200 k / 100 k rows: a smoke run
    .venv/bin/python bench/bench_auditlog.py --help     # every count, and its env variable

Each backend gets two fresh ledgers, a small one (``--baseline-rows``, 100 k) and the big
one, bulk-loaded with the same shape (:class:`Shape`): 50 agent types, each with one hash
chain and one run in flight at a time (1,000 rows a run, so 10,000 runs at 10 M rows, 50
interleaved), four vendors, every outcome, 20,000 rows a day, a hold for every call that
reserved and the daily and run budgets they count against. PostgreSQL's big ledger is made
by the server (``INSERT ... SELECT`` over ``generate_series``, two connections, indexes
built after), with stand-in hashes; the small one, and SQLite's (``executemany`` in
transactions of 100 k rows), come from :class:`Fixture` in Python with hash chains that
verify. Then a signed checkpoint, and governed calls through paymaster on top of it.

Measured on each, p50 of ``--reps`` runs after one untimed: ``AuditLog.run_summary(run)``
(issue's target: <= 50 ms at 10 M rows), ``paymaster status`` (<= 200 ms) and its
``--json``, ``audit tail``, ``runs show RUN``, ``audit verify --checkpoint
--since-checkpoint`` (what was written since the checkpoint) and ``audit verify
--checkpoint`` (every row: only where the chains are valid, once on a big ledger), each
command in this process (Typer's CliRunner) and, on the big ledger, as fresh processes;
and the governed calls made after the load. A figure without a target of its own must be
flat: within ``FLAT_FACTOR`` of its p50 on the small ledger (+ ``FLAT_SLACK_S``).

``ledger_bench.py`` runs this as its section 8; on its own it takes these flags (each also
read from ``PAYMASTER_BENCH_AUDIT_<FLAG>``, e.g. ``PAYMASTER_BENCH_AUDIT_ROWS_PG``; 0 rows
skips that backend). PostgreSQL: ``--pg-url`` / ``PAYMASTER_BENCH_PG_URL`` /
``PAYMASTER_TEST_POSTGRES_URL``, default ``postgresql+psycopg://root@127.0.0.1:5432/test``,
skipped if unreachable; each ledger in a fresh ``bench_<random>`` schema, dropped
afterwards; SQLite files in a temporary directory, removed afterwards. The big PostgreSQL
ledger takes about 10 GB of disk and 5-10 minutes to load on 2 CPUs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from bench_env import (
    DEFAULT_PG_URL,
    background_busy,
    env_count,
    ms,
    parsed,
    percentile,
    pg_schema,
    sqlite_dir,
    standalone_parser,
)
from bench_report import met, new_table, notes, print_run_header, reachable_postgres
from rich.console import Console
from startup_bench import paymaster_script
from typer.testing import CliRunner

from paymaster import AuditLog, Governor, Money, Policy, RunPolicy, load_key
from paymaster._audit.chain import GENESIS, row_hash
from paymaster._db import connect, ensure_schema
from paymaster.cli.app import app

# -- the fixture's shape -------------------------------------------------------------------
VENDORS = ("stripe", "twilio", "resend", "openai")
#: (method, endpoint) per vendor; a Stripe call alternates between a refund and a look-up.
CALLS = {
    "stripe": (("POST", "/v1/refunds"), ("GET", "/v1/payment_intents")),
    "twilio": (("POST", "/2010-04-01/Accounts/AC0f3a/Messages.json"),),
    "resend": (("POST", "/emails"),),
    "openai": (("POST", "/v1/chat/completions"),),
}
VIOLATIONS = ("daily_cap_exceeded", "run_cap_exceeded", "endpoint_not_allowed", "max_calls")
DAY_US = 86_400_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: Connections that bulk-load PostgreSQL at once (the machine has 2 CPUs).
LOAD_CONNECTIONS = 2
#: A cap no bulk budget reaches, so the governed calls written after the checkpoint pass.
BIG_CAP = 10**13
AUDIT_COLUMNS = (
    "id at run agent vendor endpoint method customer outcome http_status vendor_request_id "
    "currency estimate actual policy_id policy_hash violation_code error hold_id duration_ms "
    "tool_call_id credential chain seq prev_hash hash write_token"
).split()
HOLD_COLUMNS = (
    "id idempotency_key agent run vendor endpoint method customer currency estimate actual "
    "daily_budget_id run_budget_id policy_id policy_hash state created_at resolved_at "
    "resolved_by resolution tool_call_id vendor_key attempts holders overrun "
    "overrun_acknowledged_at overrun_acknowledged_by overrun_acknowledgement"
).split()
BUDGET_COLUMNS = (
    "id kind agent vendor currency run window cap calls_cap committed calls created_at frozen"
).split()
ERRORS = {
    "failed": "card_error/card_declined: Your card was declined.",
    "errored": "RuntimeError: the tool raised before the vendor answered",
    "unknown": "TimeoutError: no answer from the vendor; outcome unknown",
}
HOLD_STATES = {"allowed": "settled", "overrun": "settled", "unknown": "unknown"}
HOLD_STATES.update(failed="released", errored="released")
#: One row in this many is also hashed by paymaster's own ``row_hash``: the fixture's
#: faster hash must give the same digest, or the load stops.
HASH_CROSS_CHECK = 4096


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def agent_name(a: int) -> str:
    return f"agent-{a:02d}"


def run_name(r: int) -> str:
    """Run ids look like the random ids frameworks hand out, so their index is too."""
    return "run-" + _md5(f"run{r}")[:16]


def policy_hash(a: int) -> str:
    return hashlib.sha256(f"policy{a}".encode()).hexdigest()


@dataclass(frozen=True)
class Shape:
    """What the bulk load writes: ``rows`` audit rows, oldest first, ending at ``end``.

    Row k (0-based) belongs to agent type ``k % agents`` and is seq ``k // agents + 1`` of
    that agent type's chain; each agent type runs one run at a time, ``rows_per_run`` rows
    long, so ``agents`` runs are in flight together and their rows interleave. Rows come
    ``rows_per_day`` a day, so a day's budgets and holds are as many at any size.
    """

    rows: int
    end: datetime
    agents: int = 50
    rows_per_run: int = 1000
    rows_per_day: int = 20_000

    @property
    def step_us(self) -> int:
        return DAY_US // self.rows_per_day

    @property
    def runs(self) -> int:
        return -(-self.rows // (self.agents * self.rows_per_run)) * self.agents

    def at_us(self, k: int) -> int:
        return _epoch_us(self.end) - (self.rows - 1 - k) * self.step_us

    def run_of(self, k: int) -> int:
        return (k // self.agents // self.rows_per_run) * self.agents + k % self.agents

    def last_full_day(self) -> str:
        """The newest UTC day the fixture covers whole (what ``status --day`` shows)."""
        return (self.end - timedelta(days=1)).date().isoformat()

    @property
    def first_day(self) -> int:
        """The first UTC day (days since 1970) a hold was made on; a day's budgets and
        their ids count from it."""
        return (self.at_us(0) - 1_000_000) // DAY_US  # a hold is made before its row

    @property
    def days(self) -> int:
        return self.at_us(self.rows - 1) // DAY_US - self.first_day + 1

    @property
    def run_budget_base(self) -> int:
        """Run budget ids follow the daily ones: run r's is ``run_budget_base + r + 1``."""
        return self.days * self.agents * len(VENDORS)

    def sample_runs(self, count: int) -> list[str]:
        """``count`` runs spread from the oldest to the newest finished one."""
        finished = self.runs - self.agents  # the newest runs may still be in flight
        picks = {round(i * (finished - 1) / max(count - 1, 1)) for i in range(count)}
        return [run_name(r) for r in sorted(picks)]


def _epoch_us(at: datetime) -> int:
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _outcome_class(p: int, a: int) -> str:
    """The outcome of the call at chain position ``p`` before reconciliation: 80% allowed,
    8% denied, 6% failed, 3.5% errored, 1% overrun, 0.5% unknown (each reconciled by the
    chain's next row, as an operator resolving it would write)."""
    u = (p * 7919 + a * 104_729) % 1000
    if u < 800:
        return "allowed"
    if u < 880:
        return "denied"
    if u < 940:
        return "failed"
    if u < 975:
        return "errored"
    if u < 985:
        return "overrun"
    return "unknown" if u < 995 and p % 2 == 0 else "allowed"


@dataclass
class Fixture:
    """Generates the rows of :class:`Shape`: audit rows (hash chains valid), the hold of
    every call that reserved, and the budgets those holds count against."""

    shape: Shape
    sqlite_times: bool = False
    """Times as the SQLite ledger stores them (naive UTC text), else aware datetimes."""
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    budgets: dict[int, list[Any]] = field(default_factory=dict)

    def _time(self, us: int) -> Any:
        at = EPOCH + timedelta(microseconds=us)
        if self.sqlite_times:
            iso = at.isoformat(timespec="microseconds")
            return f"{iso[:10]} {iso[11:26]}"
        return at

    def _call(self, k: int) -> tuple[int, str, str, str, str | None, str, int]:
        """What the call of row ``k`` asked for: vendor index, vendor, method, endpoint,
        customer, currency, estimate."""
        s = self.shape
        a, p = k % s.agents, k // s.agents
        primary = s.run_of(k) % len(VENDORS)
        v = primary if p % 10 != 9 else (primary + 1) % len(VENDORS)
        vendor = VENDORS[v]
        choices = CALLS[vendor]
        method, endpoint = choices[p % len(choices)]
        customer = f"cus_{k % 5000:05d}" if vendor == "stripe" else None
        currency = "EUR" if a % 10 == 9 else "USD"
        return v, vendor, method, endpoint, customer, currency, 100 + (k * 37) % 9900

    def generate(self) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...] | None]]:
        """(audit row, its hold or ``None``) in id order; :attr:`heads` and
        :attr:`budgets` are complete once it is exhausted."""
        s = self.shape
        n, agents = s.rows, s.agents
        names = [agent_name(a) for a in range(agents)]
        hashes = [policy_hash(a) for a in range(agents)]
        credentials = ["pmk_" + _md5(f"key{a}")[:12] if a % 5 == 0 else None for a in range(agents)]
        runs: dict[int, str] = {}
        prev = [GENESIS] * agents
        for k in range(n):
            a, p = k % agents, k // agents
            agent, r = names[a], s.run_of(k)
            run = runs.get(r)
            if run is None:
                run = runs[r] = run_name(r)
            at_us = s.at_us(k)
            at = EPOCH + timedelta(microseconds=at_us)
            outcome = _outcome_class(p, a)
            source = k
            if p % 2 == 1 and _outcome_class(p - 1, a) == "unknown":
                outcome, source = "reconciled", k - agents
            v, vendor, method, endpoint, customer, currency, estimate = self._call(source)
            hold_id = None if outcome == "denied" else _md5(f"hold{source}")
            actual = 0
            if outcome in ("allowed", "reconciled"):
                actual = estimate
            elif outcome == "overrun":
                actual = estimate + estimate // 4
            allowed = outcome in ("allowed", "overrun")
            violation = VIOLATIONS[p % len(VIOLATIONS)] if outcome == "denied" else None
            error = ERRORS.get(outcome)
            if violation is not None:
                error = f"refused by policy-{a:02d}: {violation}"
            http = 200 if allowed else 402 if outcome == "failed" else None
            request_id = "req_" + _md5(f"req{k}")[:14] if allowed or outcome == "failed" else None
            tool_call_id = "call_" + _md5(f"call{k}")[:24] if k % 3 == 0 else None
            credential = credentials[a]
            duration = 0 if outcome in ("denied", "reconciled") else 50 + k % 950
            # What row_hash hashes, as json.dumps writes it: every text here is ASCII
            # without quotes, backslashes or control characters.
            payload = (
                f'["{agent}",{p + 1},"{prev[a]}","{at.isoformat(timespec="microseconds")}",'
                f'"{run}","{agent}","{vendor}","{endpoint}","{method}",{_q(customer)},'
                f'"{outcome}",{_q(http)},{_q(request_id)},"{currency}",{estimate},{actual},'
                f'"policy-{a:02d}","{hashes[a]}",{_q(violation)},{_q(error)},{_q(hold_id)},'
                f"{duration}"
            )
            if tool_call_id is not None:
                payload += f',"{tool_call_id}"'
            if credential is not None:
                payload += f',{{"credential":"{credential}"}}'
            digest = hashlib.sha256((payload + "]").encode()).hexdigest()
            row = (
                k + 1,
                self._time(at_us) if self.sqlite_times else at,
                run,
                agent,
                vendor,
                endpoint,
                method,
                customer,
                outcome,
                http,
                request_id,
                currency,
                estimate,
                actual,
                f"policy-{a:02d}",
                hashes[a],
                violation,
                error,
                hold_id,
                duration,
                tool_call_id,
                credential,
                agent,
                p + 1,
                prev[a],
                digest,
                _md5(f"token{k}"),
            )
            if k % HASH_CROSS_CHECK == 0:
                _cross_check(row, at)
            prev[a] = digest
            hold_row = None
            if hold_id is not None and outcome != "reconciled":
                hold_row = self._hold(k, row, at_us, v, r, estimate, actual)
            yield row, hold_row
        self.heads = {names[a]: ((n - a - 1) // agents + 1, prev[a]) for a in range(min(n, agents))}

    def _hold(
        self,
        k: int,
        row: tuple[Any, ...],
        at_us: int,
        v: int,
        r: int,
        estimate: int,
        actual: int,
    ) -> tuple[Any, ...]:
        """The hold of row ``k``'s call, and what it counts against its budgets."""
        s = self.shape
        a, outcome = k % s.agents, row[8]
        created_us = at_us - 1000 * int(row[19])
        resolved_us = at_us
        state = HOLD_STATES[outcome]
        resolved_by = resolution = None
        if outcome == "unknown" and k + s.agents < s.rows:  # reconciled by the next row
            state, actual = "settled", estimate
            resolved_us = s.at_us(k + s.agents)
            resolved_by, resolution = "ops@example.com", "found at the vendor: it went through"
        counted = actual if state == "settled" else estimate if state == "unknown" else 0
        day = created_us // DAY_US - s.first_day
        created = self._time(created_us)
        daily_id = (day * s.agents + a) * len(VENDORS) + v + 1
        self._count(daily_id, "daily", row, "", created_us, counted)
        run_id = None
        if r % 2 == 0 and v == r % len(VENDORS):  # half the runs have a run budget
            run_id = s.run_budget_base + r + 1
            self._count(run_id, "run", row, row[2], created_us, counted)
        stripe = row[4] == "stripe"
        overrun = actual - estimate if outcome == "overrun" else None
        resolved = self._time(resolved_us)
        return (
            row[18],
            "k1:" + hashlib.sha256(f"idem{k}".encode()).hexdigest() if stripe else None,
            row[3],
            row[2],
            row[4],
            row[5],
            row[6],
            row[7],
            row[11],
            estimate,
            actual if state == "settled" else None,
            daily_id,
            run_id,
            row[14],
            row[15],
            state,
            created,
            resolved,
            resolved_by,
            resolution,
            row[20],
            f"idem-{k}" if stripe else None,
            1,
            0,
            overrun,
            resolved if overrun is not None else None,
            "ops@example.com" if overrun is not None else None,
            "checked with the vendor" if overrun is not None else None,
        )

    def _count(
        self, key: int, kind: str, row: tuple[Any, ...], run: str, created_us: int, counted: int
    ) -> None:
        """Count a hold against its budget row, made on the budget's first hold."""
        budget = self.budgets.get(key)
        if budget is None:
            window = "" if kind == "run" else _day(created_us)
            created = self._time(created_us)
            budget = [key, kind, row[3], row[4], row[11], run, window, BIG_CAP, None, 0, 0]
            budget += [created, 0]
            self.budgets[key] = budget
        budget[9] += counted
        budget[10] += 1


def _day(us: int) -> str:
    return (EPOCH + timedelta(microseconds=us)).date().isoformat()


def _q(value: str | int | None) -> str:
    """``value`` as ``json.dumps`` writes it (the fixture's texts need no escaping)."""
    if value is None:
        return "null"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _cross_check(row: tuple[Any, ...], at: datetime) -> None:
    """The fixture's hash of ``row`` must be paymaster's own."""
    values = dict(zip(AUDIT_COLUMNS, row, strict=True))
    values["at"] = at
    if row_hash(values) != values["hash"]:
        raise AssertionError(f"the fixture's hash of audit row {row[0]} is not row_hash's")


# -- the bulk load on PostgreSQL: the same rows, made by the server ------------------------
#: Row k of :class:`Shape` as ``Fixture.generate`` makes it, but with a stand-in hash (two
#: md5s): the server makes ten million rows in a few minutes, where hashing the chains in
#: Python would take many more. Each row still names the previous row's stand-in hash.
#: Each ``OFFSET 0`` keeps its subquery from being merged into the one above, which would
#: compute every expression once per reference (the outcome's CASE some fifteen times).
PG_AUDIT = """
INSERT INTO paymaster_audit (id, at, run, agent, vendor, endpoint, method, customer, outcome,
  http_status, vendor_request_id, currency, estimate, actual, policy_id, policy_hash,
  violation_code, error, hold_id, duration_ms, tool_call_id, credential, chain, seq,
  prev_hash, hash, write_token)
SELECT k + 1,
  to_timestamp((%(base_us)s + k * %(step_us)s::bigint) / 1000000)
    + ((%(base_us)s + k * %(step_us)s::bigint) %% 1000000) * interval '1 microsecond',
  'run-' || substr(md5('run' || r), 1, 16), agent, vendor,
  CASE WHEN vendor = 'stripe' AND ps %% 2 = 1 THEN '/v1/payment_intents'
       WHEN vendor = 'stripe' THEN '/v1/refunds'
       WHEN vendor = 'twilio' THEN '/2010-04-01/Accounts/AC0f3a/Messages.json'
       WHEN vendor = 'resend' THEN '/emails' ELSE '/v1/chat/completions' END,
  CASE WHEN vendor = 'stripe' AND ps %% 2 = 1 THEN 'GET' ELSE 'POST' END,
  CASE WHEN vendor = 'stripe' THEN 'cus_' || lpad((s %% 5000)::text, 5, '0') END,
  outcome,
  CASE WHEN outcome IN ('allowed', 'overrun') THEN 200 WHEN outcome = 'failed' THEN 402 END,
  CASE WHEN outcome IN ('allowed', 'overrun', 'failed')
       THEN 'req_' || substr(md5('req' || k), 1, 14) END,
  currency, estimate,
  CASE WHEN outcome IN ('allowed', 'reconciled') THEN estimate
       WHEN outcome = 'overrun' THEN estimate + estimate / 4 ELSE 0 END,
  'policy-' || nn, encode(sha256(('policy' || a)::bytea), 'hex'),
  violation,
  CASE WHEN outcome = 'denied' THEN 'refused by policy-' || nn || ': '
         || violation
       WHEN outcome = 'failed' THEN 'card_error/card_declined: Your card was declined.'
       WHEN outcome = 'errored' THEN 'RuntimeError: the tool raised before the vendor answered'
       WHEN outcome = 'unknown' THEN 'TimeoutError: no answer from the vendor; outcome unknown'
  END,
  CASE WHEN outcome <> 'denied' THEN md5('hold' || s) END,
  CASE WHEN outcome IN ('denied', 'reconciled') THEN 0 ELSE 50 + k %% 950 END,
  CASE WHEN k %% 3 = 0 THEN 'call_' || substr(md5('call' || k), 1, 24) END,
  CASE WHEN a %% 5 = 0 THEN 'pmk_' || substr(md5('key' || a), 1, 12) END,
  agent, p + 1,
  CASE WHEN p = 0 THEN repeat('0', 64)
       ELSE md5('h' || (k - %(agents)s)) || md5('g' || (k - %(agents)s)) END,
  md5('h' || k) || md5('g' || k), md5('token' || k)
FROM (
  SELECT *, 'agent-' || nn AS agent,
    CASE WHEN a %% 10 = 9 THEN 'EUR' ELSE 'USD' END AS currency,
    100 + (s * 37) %% 9900 AS estimate,
    (ARRAY['stripe', 'twilio', 'resend', 'openai'])[
      CASE WHEN ps %% 10 <> 9 THEN rs %% 4 ELSE (rs + 1) %% 4 END + 1] AS vendor,
    CASE WHEN outcome = 'denied' THEN (ARRAY['daily_cap_exceeded', 'run_cap_exceeded',
      'endpoint_not_allowed', 'max_calls'])[p %% 4 + 1] END AS violation
  FROM (
    SELECT *, s / %(agents)s AS ps,
      (s / %(agents)s / %(per_run)s) * %(agents)s + s %% %(agents)s AS rs
    FROM (
      SELECT *, CASE WHEN outcome = 'reconciled' THEN k - %(agents)s ELSE k END AS s
      FROM (
        SELECT k, a, p, nn, r,
          CASE WHEN p %% 2 = 1 AND u_prev >= 985 AND u_prev < 995 THEN 'reconciled'
               WHEN u < 800 THEN 'allowed' WHEN u < 880 THEN 'denied'
               WHEN u < 940 THEN 'failed' WHEN u < 975 THEN 'errored'
               WHEN u < 985 THEN 'overrun'
               WHEN u < 995 AND p %% 2 = 0 THEN 'unknown' ELSE 'allowed' END AS outcome
        FROM (
          SELECT k, a, p, nn, (p / %(per_run)s) * %(agents)s + a AS r,
            (p * 7919 + a * 104729) %% 1000 AS u,
            ((p - 1) * 7919 + a * 104729) %% 1000 AS u_prev
          FROM (
            SELECT k, k %% %(agents)s AS a, k / %(agents)s AS p,
              CASE WHEN k %% %(agents)s < 10 THEN '0' ELSE '' END || k %% %(agents)s AS nn
            FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS k
          OFFSET 0) AS ids
        OFFSET 0) AS mixed
      OFFSET 0) AS classed
    OFFSET 0) AS sourced
  OFFSET 0) AS called
) AS rows
"""

#: The holds of the rows ``PG_AUDIT`` inserts (``new_rows``), as ``Fixture._hold`` makes
#: them: one statement with it (:data:`PG_ROWS_AND_HOLDS`), so they are not read back.
PG_HOLDS = """
INSERT INTO paymaster_hold (id, idempotency_key, agent, run, vendor, endpoint, method, customer,
  currency, estimate, actual, daily_budget_id, run_budget_id, policy_id, policy_hash, state,
  created_at, resolved_at, resolved_by, resolution, tool_call_id, vendor_key, attempts,
  holders, overrun, overrun_acknowledged_at, overrun_acknowledged_by, overrun_acknowledgement)
SELECT hold_id,
  CASE WHEN vendor = 'stripe' THEN 'k1:' || encode(sha256(('idem' || k)::bytea), 'hex') END,
  agent, run, vendor, endpoint, method, customer, currency, estimate,
  CASE WHEN state = 'settled' AND reconciled THEN estimate WHEN state = 'settled' THEN actual END,
  (floor(extract(epoch FROM created_at) / 86400)::bigint - %(first_day)s) * %(agents)s * 4
    + a * 4 + v + 1,
  CASE WHEN r %% 2 = 0 AND v = r %% 4 THEN %(run_base)s + r + 1 END,
  policy_id, policy_hash, state, created_at,
  CASE WHEN reconciled THEN at + %(agents)s * %(step_us)s::bigint * interval '1 microsecond'
       ELSE at END,
  CASE WHEN reconciled THEN 'ops@example.com' END,
  CASE WHEN reconciled THEN 'found at the vendor: it went through' END,
  tool_call_id, CASE WHEN vendor = 'stripe' THEN 'idem-' || k END, 1, 0,
  CASE WHEN outcome = 'overrun' THEN actual - estimate END,
  CASE WHEN outcome = 'overrun' THEN at END,
  CASE WHEN outcome = 'overrun' THEN 'ops@example.com' END,
  CASE WHEN outcome = 'overrun' THEN 'checked with the vendor' END
FROM (
  SELECT *, CASE WHEN outcome IN ('allowed', 'overrun') OR reconciled THEN 'settled'
                 WHEN outcome = 'unknown' THEN 'unknown' ELSE 'released' END AS state
  FROM (
    SELECT new_rows.*, id - 1 AS k, (id - 1) %% %(agents)s AS a,
      ((id - 1) / %(agents)s / %(per_run)s) * %(agents)s + (id - 1) %% %(agents)s AS r,
      array_position(ARRAY['stripe', 'twilio', 'resend', 'openai'], vendor) - 1 AS v,
      at - duration_ms * interval '1 millisecond' AS created_at,
      outcome = 'unknown' AND id - 1 + %(agents)s < %(rows)s AS reconciled
    FROM new_rows WHERE hold_id IS NOT NULL AND outcome <> 'reconciled'
  ) AS held
) AS stated
"""
PG_ROWS_AND_HOLDS = f"WITH new_rows AS ({PG_AUDIT} RETURNING *) {PG_HOLDS}"

#: Every budget the holds count against: one per agent type, vendor and day, and one per
#: run with a run budget.
PG_BUDGETS = """
INSERT INTO paymaster_budget (id, kind, agent, vendor, currency, run, "window", cap, calls_cap,
  committed, calls, created_at, frozen)
SELECT daily_budget_id, 'daily', agent, vendor, currency, '',
  to_char(min(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD'), %(cap)s, NULL::bigint,
  sum(CASE state WHEN 'settled' THEN actual WHEN 'unknown' THEN estimate ELSE 0 END),
  count(*), min(created_at), 0
FROM paymaster_hold GROUP BY daily_budget_id, agent, vendor, currency
UNION ALL
SELECT run_budget_id, 'run', agent, vendor, currency, run, '', %(cap)s, NULL::bigint,
  sum(CASE state WHEN 'settled' THEN actual WHEN 'unknown' THEN estimate ELSE 0 END),
  count(*), min(created_at), 0
FROM paymaster_hold WHERE run_budget_id IS NOT NULL
GROUP BY run_budget_id, agent, vendor, currency, run
"""


@dataclass(frozen=True)
class Loaded:
    """What a bulk load wrote, and how long it took."""

    backend: str
    rows: int
    holds: int
    budgets: int
    seconds: float
    valid_chains: bool
    size: str


def _stand_in_hash(k: int) -> str:
    return _md5(f"h{k}") + _md5(f"g{k}")


def _pg_params(shape: Shape) -> dict[str, Any]:
    return {
        "base_us": shape.at_us(0),
        "step_us": shape.step_us,
        "agents": shape.agents,
        "per_run": shape.rows_per_run,
        "rows": shape.rows,
        "first_day": shape.first_day,
        "run_base": shape.run_budget_base,
        "cap": BIG_CAP,
    }


def load_postgres(
    dsn: str, shape: Shape, progress: Console, *, valid: bool, chunk: int = 500_000
) -> Loaded:
    """Bulk-load :class:`Shape` into the (migrated, empty) schema ``dsn`` selects: with
    ``valid``, the rows of ``Fixture`` by COPY (hash chains that verify); otherwise made by
    the server in chunks (stand-in hashes), which is what ten million rows need."""
    started = time.perf_counter()
    params = _pg_params(shape)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The chain heads are written at their final seq, which the guard of revision 0008
        # refuses (a head starts at 0 and moves one row at a time); bulk writes skip it.
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET jit = off")  # compiling the load's expressions took longer than them
        conn.execute("SET maintenance_work_mem = '512MB'")
        with _indexes_rebuilt(conn, ("paymaster_audit", "paymaster_hold"), progress):
            if valid:
                heads = _copy_fixture(conn, dsn, shape)
            else:
                heads = _generate_on_server(dsn, shape, params, progress, chunk)
        if not valid:  # the fixture's budgets were copied with its rows
            conn.execute(PG_BUDGETS, params)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO paymaster_audit_chain (chain, seq, head) VALUES (%s, %s, %s)",
                [(chain, seq, head) for chain, (seq, head) in heads.items()],
            )
        for table in ("paymaster_audit", "paymaster_budget"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        # A table this size has been vacuumed and analysed by autovacuum long since. Only
        # the fixture's tables: a bare VACUUM would go through every schema in the database.
        conn.execute(
            "VACUUM ANALYZE paymaster_audit, paymaster_hold, paymaster_budget, "
            "paymaster_audit_chain"
        )
        holds = _count(conn, "paymaster_hold")
        budgets = _count(conn, "paymaster_budget")
        size = conn.execute(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        ).fetchone()
    return Loaded(
        "PostgreSQL",
        shape.rows,
        holds,
        budgets,
        time.perf_counter() - started,
        valid,
        str(size[0] if size else "?"),
    )


def _generate_on_server(
    dsn: str, shape: Shape, params: dict[str, Any], progress: Console, chunk: int
) -> dict[str, tuple[int, str]]:
    """Rows and holds made by the server (:data:`PG_ROWS_AND_HOLDS`), ``chunk`` rows per
    statement on two connections at once; returns the chain heads."""

    def load(first: int) -> int:
        last = min(first + chunk, shape.rows) - 1
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET jit = off")
            conn.execute(PG_ROWS_AND_HOLDS, {**params, "first": first, "last": last})
        return last + 1

    done = 0
    with ThreadPoolExecutor(max_workers=LOAD_CONNECTIONS) as pool:
        for rows in pool.map(load, range(0, shape.rows, chunk)):
            done = max(done, rows)
            progress.print(f"[dim]  {done:,} / {shape.rows:,} rows[/]")
    heads = {}
    for a in range(min(shape.agents, shape.rows)):
        last_k = (shape.rows - 1 - a) // shape.agents * shape.agents + a
        heads[agent_name(a)] = (last_k // shape.agents + 1, _stand_in_hash(last_k))
    return heads


@contextmanager
def _indexes_rebuilt(
    conn: psycopg.Connection[Any], tables: tuple[str, ...], progress: Console
) -> Iterator[None]:
    """Drop the tables' keys and indexes, and make them again afterwards, as they were:
    building an index once over ten million rows is far quicker than ten million random
    inserts into it (the hold ids and run ids are random)."""
    constraints = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = ANY(%s::regclass[]) AND contype IN ('p', 'u') ORDER BY conrelid, conname",
        [list(tables)],
    ).fetchall()
    indexes = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
        "AND tablename = ANY(%s) AND indexname NOT IN "
        "(SELECT conname FROM pg_constraint WHERE conrelid = ANY(%s::regclass[])) "
        "ORDER BY indexname",
        [list(tables), list(tables)],
    ).fetchall()
    for table, name, _ in constraints:
        conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    yield
    started = time.perf_counter()
    for table, name, definition in constraints:
        conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    for _, definition in indexes:
        conn.execute(definition)
    took = time.perf_counter() - started
    progress.print(
        f"[dim]  {len(constraints) + len(indexes)} keys and indexes built: {took:.0f} s[/]"
    )


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _copy_fixture(
    conn: psycopg.Connection[Any], dsn: str, shape: Shape
) -> dict[str, tuple[int, str]]:
    """COPY the rows of ``Fixture`` (audit rows on ``conn``, holds on a second connection,
    both streaming), then its budgets; returns its chain heads."""
    fixture = Fixture(shape)
    audit_copy = f"COPY paymaster_audit ({', '.join(AUDIT_COLUMNS)}) FROM STDIN"
    hold_copy = f"COPY paymaster_hold ({', '.join(HOLD_COLUMNS)}) FROM STDIN"
    with psycopg.connect(dsn, autocommit=True) as holds_conn:
        with (
            conn.cursor().copy(audit_copy) as rows,
            holds_conn.cursor().copy(hold_copy) as holds,
        ):
            for row, held in fixture.generate():
                rows.write_row(row)
                if held is not None:
                    holds.write_row(held)
    quoted = ", ".join(f'"{c}"' for c in BUDGET_COLUMNS)  # "window" is a keyword
    with conn.cursor().copy(f"COPY paymaster_budget ({quoted}) FROM STDIN") as budgets:
        for budget in fixture.budgets.values():
            budgets.write_row(budget)
    return fixture.heads


def load_sqlite(path: Path, shape: Shape, progress: Console, *, batch: int = 100_000) -> Loaded:
    """Bulk-load :class:`Shape` into the (migrated, empty) SQLite ledger at ``path``:
    ``executemany`` in transactions of ``batch`` rows, hash chains valid."""
    started = time.perf_counter()
    fixture = Fixture(shape, sqlite_times=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # a crash mid-load loses only the fixture
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: the indexes stay in memory
        audit_sql = _sqlite_insert("paymaster_audit", AUDIT_COLUMNS)
        hold_sql = _sqlite_insert("paymaster_hold", HOLD_COLUMNS)
        rows: list[tuple[Any, ...]] = []
        holds: list[tuple[Any, ...]] = []
        done = 0

        def flush() -> None:
            conn.execute("BEGIN")
            conn.executemany(audit_sql, rows)
            conn.executemany(hold_sql, holds)
            conn.execute("COMMIT")
            rows.clear()
            holds.clear()

        for row, held in fixture.generate():
            rows.append(row)
            if held is not None:
                holds.append(held)
            if len(rows) == batch:
                flush()
                done += batch
                if done % (10 * batch) == 0:
                    progress.print(f"[dim]  {done:,} / {shape.rows:,} rows[/]")
        flush()
        conn.execute("BEGIN")
        conn.executemany(
            _sqlite_insert("paymaster_budget", BUDGET_COLUMNS), list(fixture.budgets.values())
        )
        conn.executemany(
            "INSERT INTO paymaster_audit_chain (chain, seq, head) VALUES (?, ?, ?)",
            [(chain, seq, head) for chain, (seq, head) in fixture.heads.items()],
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        holds_n = conn.execute("SELECT count(*) FROM paymaster_hold").fetchone()[0]
        budgets_n = conn.execute("SELECT count(*) FROM paymaster_budget").fetchone()[0]
    finally:
        conn.close()
    size = f"{path.stat().st_size / 2**20:,.0f} MB"
    took = time.perf_counter() - started
    return Loaded("SQLite", shape.rows, holds_n, budgets_n, took, True, size)


def _sqlite_insert(table: str, columns: list[str]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"


# -- measuring -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditSettings:
    rows_pg: int = 10_000_000
    rows_sqlite: int = 1_000_000
    baseline_rows: int = 100_000
    agents: int = 50
    rows_per_run: int = 1000
    rows_per_day: int = 20_000
    segment: int = 500
    reps: int = 7
    process_reps: int = 3
    valid_chains: bool = False
    pg_url: str = DEFAULT_PG_URL
    no_postgres: bool = False
    tmpdir: str = ""


QUICK: dict[str, Any] = {
    "rows_pg": 200_000,
    "rows_sqlite": 100_000,
    "baseline_rows": 20_000,
    "segment": 100,
    "reps": 3,
    "process_reps": 1,
}
HELP = {
    "rows_pg": "audit rows of the PostgreSQL ledger",
    "rows_sqlite": "audit rows of the SQLite ledger",
    "baseline_rows": "audit rows of the small ledger each figure is compared with",
    "agents": "agent types (one hash chain each; as many runs in flight)",
    "rows_per_run": "audit rows per run",
    "rows_per_day": "audit rows per day (what one day's budgets and holds cover)",
    "segment": "governed calls made after the checkpoint (what --since-checkpoint walks)",
    "reps": "timed repetitions of each figure, after one untimed",
    "process_reps": "fresh `paymaster` processes timed per command",
}
#: The issue's targets, at 10 M audit rows on PostgreSQL (applied to SQLite's ledger too).
RUN_SUMMARY_TARGET_S = 0.050
STATUS_TARGET_S = 0.200
#: A figure without a target of its own must be flat: at most this many times its p50 on
#: the small ledger, plus ``FLAT_SLACK_S`` (timer noise of a few ms on a busy machine).
FLAT_FACTOR = 2.0
FLAT_SLACK_S = 0.010


@dataclass
class Figure:
    """One measured operation on one ledger: durations in seconds."""

    backend: str
    name: str
    command: str
    rows: int
    samples: list[float]
    target_s: float | None = None
    baseline_rows: int | None = None
    baseline: list[float] = field(default_factory=list)
    process: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def flat_limit(self) -> float | None:
        if not self.baseline:
            return None
        return FLAT_FACTOR * percentile(self.baseline, 50) + FLAT_SLACK_S

    @property
    def met(self) -> bool | None:
        if not self.samples:
            return None
        if self.target_s is not None:
            return self.p50 <= self.target_s
        limit = self.flat_limit
        return None if limit is None else self.p50 <= limit


@dataclass
class Ledger:
    """A loaded ledger to measure."""

    backend: str
    url: str
    shape: Shape
    loaded: Loaded
    checkpoint: Path
    key: Path
    governed: list[float] = field(default_factory=list)


def _policies(shape: Shape) -> list[Policy]:
    """A policy per agent type and vendor, with room for the calls made after the load."""
    return [
        Policy(
            id=f"policy-{a:02d}-{vendor}",
            agent=agent_name(a),
            vendor=vendor,
            currency="EUR" if a % 10 == 9 else "USD",
            daily_cap="100000000.00",
            endpoints=[endpoint for _, endpoint in CALLS[vendor]],
        )
        for a in range(shape.agents)
        for vendor in VENDORS
    ]


def write_segment(ledger: Ledger, calls: int) -> None:
    """Take a signed checkpoint, then make ``calls`` governed calls through paymaster (one
    per agent type in turn, each settled): the rows a later ``verify --checkpoint`` checks.
    Each call's duration goes to ``ledger.governed``: a governed call's cost at this size."""
    engine = connect(ledger.url)
    try:
        key = load_key(ledger.key)
        ledger.checkpoint.write_text(AuditLog(engine).checkpoint(key=key).to_json())
    finally:
        engine.dispose()
    gov = Governor(ledger.url, policies=_policies(ledger.shape), upgrade_schema=False)
    try:
        for i in range(calls):
            a = i % ledger.shape.agents
            vendor = VENDORS[(i // ledger.shape.agents) % len(VENDORS)]
            method, endpoint = CALLS[vendor][0]
            currency = "EUR" if a % 10 == 9 else "USD"
            started = time.perf_counter()
            # Half the runs have a run policy, as in the bulk rows: their holds have a
            # run budget (and an entry in ix_hold_run_budget).
            run_policy = RunPolicy(cap=Money(10**9, currency)) if a % 2 == 0 else None
            with gov.guard(
                agent=agent_name(a),
                vendor=vendor,
                endpoint=endpoint,
                method=method,
                estimate=Money(100, currency),
                run=f"after-checkpoint-{a:02d}",
                run_policy=run_policy,
            ) as call:
                call.settle()
            ledger.governed.append(time.perf_counter() - started)
    finally:
        gov.close()


@contextmanager
def loaded_ledger(
    backend: str, rows: int, settings: AuditSettings, tmp: Path, progress: Console
) -> Iterator[Ledger]:
    """A fresh ledger (PostgreSQL schema or SQLite file) with ``rows`` bulk-loaded audit
    rows and a checkpoint followed by ``settings.segment`` governed calls; dropped after."""
    shape = Shape(
        rows=rows,
        end=datetime.now(timezone.utc),
        agents=settings.agents,
        rows_per_run=settings.rows_per_run,
        rows_per_day=settings.rows_per_day,
    )
    key = tmp / "checkpoint.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    checkpoint = tmp / f"checkpoint-{backend.lower()}-{rows}.json"
    progress.print(f"[dim]audit log: loading {rows:,} rows into {backend} ...[/]")
    if backend == "PostgreSQL":
        with pg_schema(settings.pg_url) as schema:
            _migrate(schema.url)
            valid = settings.valid_chains or rows <= settings.baseline_rows
            loaded = load_postgres(schema.dsn, shape, progress, valid=valid)
            ledger = Ledger(backend, schema.url, shape, loaded, checkpoint, key)
            write_segment(ledger, settings.segment)
            yield ledger
    else:
        path = tmp / f"audit-{rows}.db"
        url = f"sqlite:///{path}"
        _migrate(url)
        try:
            loaded = load_sqlite(path, shape, progress)
            ledger = Ledger(backend, url, shape, loaded, checkpoint, key)
            write_segment(ledger, settings.segment)
            yield ledger
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    progress.print(f"[dim]audit log: {backend}, {rows:,} rows loaded in {loaded.seconds:.0f} s[/]")


def _migrate(url: str) -> None:
    engine = connect(url)
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()


def timed(call: Callable[[], object], reps: int) -> list[float]:
    """``reps`` durations of ``call``, after one untimed run (connections, caches)."""
    call()
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def cli(*args: str, expect: int = 0) -> Callable[[], object]:
    """The ``paymaster`` command, run in this process (Typer's CliRunner)."""
    runner = CliRunner()

    def run() -> object:
        result = runner.invoke(app, list(args))
        if result.exit_code != expect:
            raise RuntimeError(
                f"paymaster {' '.join(args)} exited {result.exit_code}: {result.output}"
            )
        return result

    return run


def process_times(args: list[str], reps: int, expect: int = 0) -> list[float]:
    """Wall time of ``reps`` fresh ``paymaster`` processes (start-up included), after an
    untimed one. PYTHON* variables are cleared, as startup_bench.py does: with
    PYTHONDONTWRITEBYTECODE set, each process would compile every module it imports."""
    command = [*paymaster_script(), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    samples = []
    for n in range(reps + 1):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if n:
            samples.append(time.perf_counter() - started)
        if done.returncode != expect:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr}")
    return samples


SAMPLE_RUNS = 5  # runs whose summary is timed, spread from the oldest to the newest


def measure(ledger: Ledger, settings: AuditSettings, *, processes: bool) -> list[Figure]:
    """Every figure on one ledger (``processes``: also time fresh ``paymaster`` processes)."""
    shape, url, rows = ledger.shape, ledger.url, ledger.loaded.rows
    reps, backend = settings.reps, ledger.backend
    runs = shape.sample_runs(SAMPLE_RUNS)
    one_run = runs[len(runs) // 2]
    day = shape.last_full_day()
    figures: list[Figure] = []

    def add(name: str, args: list[str], target: float | None = None, **kw: Any) -> None:
        samples = timed(cli(*args, **kw), reps)
        wall = process_times(args, settings.process_reps, **kw) if processes else []
        shown = " ".join(a if a != url else "$URL" for a in args)
        figures.append(
            Figure(backend, name, f"paymaster {shown}", rows, samples, target, process=wall)
        )

    engine = connect(url)
    try:
        log = AuditLog(engine)
        samples = [s for run in runs for s in timed(lambda run=run: log.run_summary(run), reps)]
    finally:
        engine.dispose()
    figures.append(
        Figure(
            backend,
            "AuditLog.run_summary(run)",
            f"gov.audit.run_summary(RUN) for {len(runs)} runs, oldest to newest",
            rows,
            samples,
            RUN_SUMMARY_TARGET_S,
        )
    )
    add("paymaster status", ["status", "--db", url, "--day", day], STATUS_TARGET_S)
    # The same reads without the table: what the ledger costs, apart from the rendering.
    add("paymaster status --json", ["status", "--db", url, "--day", day, "--json"])
    add("paymaster audit tail", ["audit", "tail", "--db", url])
    add("paymaster runs show RUN", ["runs", "show", one_run, "--db", url])
    verify = ["audit", "verify", "--db", url, "--checkpoint", str(ledger.checkpoint)]
    verify += ["--key-file", str(ledger.key)]
    add("paymaster audit verify --since-checkpoint", [*verify, "--since-checkpoint"])
    full = "paymaster audit verify --checkpoint (every row)"
    shown = "paymaster " + " ".join(a if a != url else "$URL" for a in verify)
    if ledger.loaded.valid_chains:
        # It walks every chain from its first row: one timed run on a big ledger.
        big = rows > settings.baseline_rows
        samples = timed(cli(*verify), 1 if big else reps)
        figures.append(Figure(backend, full, shown, rows, samples))
    else:
        note = "not measured: the bulk rows' hashes are stand-ins (--valid-chains)"
        figures.append(Figure(backend, full, shown, rows, [], note=note))
    if not ledger.governed:
        return figures
    figures.append(
        Figure(
            backend,
            "governed call (reserve, settle, audit row)",
            f"{len(ledger.governed)} gov.guard(...) + settle() after the load",
            rows,
            ledger.governed,
        )
    )
    return figures


def run_auditlog(settings: AuditSettings, tmp: Path, progress: Console) -> AuditResults:
    """Each backend: the small ledger, then the big one; each figure beside its small one."""
    results = AuditResults(settings)
    backends = [("SQLite", settings.rows_sqlite)]
    if not settings.no_postgres:
        backends.insert(0, ("PostgreSQL", settings.rows_pg))
    for backend, rows in backends:
        if rows <= 0:  # that backend's ledgers are skipped
            continue
        with loaded_ledger(backend, settings.baseline_rows, settings, tmp, progress) as small:
            baseline = {f.name: f for f in measure(small, settings, processes=False)}
            results.loads.append(small.loaded)
        with loaded_ledger(backend, rows, settings, tmp, progress) as big:
            progress.print(f"[dim]audit log: measuring {backend} at {rows:,} rows ...[/]")
            figures = measure(big, settings, processes=True)
            results.loads.append(big.loaded)
        for figure in figures:
            small_figure = baseline.get(figure.name)
            if small_figure is not None:
                figure.baseline_rows = small_figure.rows
                figure.baseline = small_figure.samples
        results.figures += figures
    return results


@dataclass
class AuditResults:
    settings: AuditSettings
    figures: list[Figure] = field(default_factory=list)
    loads: list[Loaded] = field(default_factory=list)


# -- the report ----------------------------------------------------------------------------
def _status(figure: Figure) -> str:
    if figure.met is None:
        return "-"
    return met(figure.met)


def _target(figure: Figure) -> str:
    if figure.target_s is not None:
        return f"<= {figure.target_s * 1000:.0f} ms"
    limit = figure.flat_limit
    if limit is None:
        return "flat (no small ledger to compare)"
    return f"flat: <= {limit * 1000:.1f} ms"


def print_auditlog(console: Console, results: AuditResults, number: str = "8.") -> None:
    settings = results.settings
    table = new_table(
        f"{number} Audit-log scale: operators' reads on a big ledger (times in ms)".strip(),
        "backend",
        "figure",
        "rows",
        "p50",
        "max",
        "p50, small ledger",
        "process p50",
        "target",
        "status",
    )
    for f in results.figures:
        small = "-"
        if f.baseline:
            small = f"{ms(percentile(f.baseline, 50))} ({f.baseline_rows:,} rows)"
        if not f.samples:
            table.add_row(f.backend, f.name, f"{f.rows:,}", "-", "-", small, "-", f.note, "-")
            continue
        table.add_row(
            f.backend,
            f.name,
            f"{f.rows:,}",
            ms(f.p50),
            ms(max(f.samples)),
            small,
            ms(percentile(f.process, 50)) if f.process else "-",
            _target(f),
            _status(f),
        )
    console.print(table)
    loads = new_table(
        "   The ledgers measured",
        "backend",
        "audit rows",
        "holds",
        "budgets",
        "load s",
        "size",
        "hash chains",
    )
    for loaded in results.loads:
        loads.add_row(
            loaded.backend,
            f"{loaded.rows:,}",
            f"{loaded.holds:,}",
            f"{loaded.budgets:,}",
            f"{loaded.seconds:.0f}",
            loaded.size,
            "valid" if loaded.valid_chains else "stand-in hashes (server-made)",
        )
    console.print(loads)
    commands = sorted({(f.name, f.command) for f in results.figures})
    notes(
        console,
        f"Each ledger: {settings.agents} agent types (one hash chain each), a run of "
        f"{settings.rows_per_run:,} rows per agent type at a time ({settings.agents} in flight, "
        f"interleaved), {len(VENDORS)} vendors, every outcome (80% allowed, 8% denied, 6% "
        f"failed, 3.5% errored, 1% overrun, 0.5% unknown then reconciled), "
        f"{settings.rows_per_day:,} rows a day, a hold per call that reserved, daily and "
        "run budgets. PostgreSQL: VACUUM ANALYZE after the load (autovacuum's work on a "
        "real ledger). SQLite: no ANALYZE (paymaster never runs it).",
        f"Then a signed checkpoint, then {settings.segment} governed calls through "
        "paymaster (the governed-call row: their durations). Each figure: one untimed run, "
        f"then {settings.reps} timed (run_summary: that for each of {SAMPLE_RUNS} runs); "
        "p50 is nearest-rank. CLI figures run the command in this process (Typer's "
        "CliRunner): opening the database, the schema check, the queries and the rendering. "
        f"process p50: {settings.process_reps} fresh `paymaster` processes after an untimed "
        "one, start-up included, PYTHON* variables cleared.",
        "verify --checkpoint walks every chain from its first row (so it is measured only "
        "where the chains are valid, and once on a big ledger); --since-checkpoint walks "
        "what was written since the checkpoint. status --json: the same reads as status, "
        "without rendering the table.",
        *(f"{name}: {command}" for name, command in commands),
    )


def target_rows(results: AuditResults) -> list[tuple[str, str, bool]]:
    """The figures with a target of the issue, for ``ledger_bench.py``'s summary."""
    rows = []
    for f in results.figures:
        if f.target_s is not None:
            rows.append(
                (
                    f"{f.name} <= {f.target_s * 1000:.0f} ms at {f.rows:,} audit rows, {f.backend}",
                    f"{ms(f.p50)} ms",
                    bool(f.met),
                )
            )
    return rows


# -- settings and entry points -------------------------------------------------------------
ENV_PREFIX = "PAYMASTER_BENCH_AUDIT_"


def settings_for(config: Any) -> AuditSettings:
    """The settings when ``ledger_bench.py`` runs this: its database choices, and counts
    from ``PAYMASTER_BENCH_AUDIT_*`` (or the quick ones under ``--quick``)."""
    counts = {
        k: env_count(
            ENV_PREFIX, k, QUICK[k] if config.quick and k in QUICK else getattr(AuditSettings, k)
        )
        for k in HELP
    }
    return AuditSettings(
        **counts,
        valid_chains=env_count(ENV_PREFIX, "valid_chains", 0) == 1,
        pg_url=config.pg_url,
        no_postgres=config.no_postgres,
        tmpdir=config.tmpdir,
    )


def parse_args(argv: Sequence[str] | None = None) -> AuditSettings:
    parser = standalone_parser(__doc__, AuditSettings, HELP, ENV_PREFIX, "ROWS_PG=1000000")
    parser.add_argument(
        "--valid-chains",
        action="store_true",
        help="PostgreSQL: hash every chain in Python (slow), so verify --checkpoint is "
        "measured on the big ledger too",
    )
    return AuditSettings(**parsed(parser, argv, QUICK))


def check_disk(settings: AuditSettings, tmp: Path, progress: Console) -> None:
    """Refuse to start a load the disk cannot take (about 1.1 GB per million rows on
    PostgreSQL, 0.6 GB on SQLite, twice over while indexes build)."""
    need = 0.0 if settings.no_postgres else settings.rows_pg / 1e6 * 2.2e9
    need = max(need, settings.rows_sqlite / 1e6 * 1.2e9)
    free = shutil.disk_usage(tmp).free
    progress.print(
        f"[dim]audit log: {free / 1e9:,.0f} GB free, the loads need ~{need / 1e9:,.0f} GB[/]"
    )
    if free < need:
        raise SystemExit(f"not enough free disk for the audit-log ledgers ({need / 1e9:.0f} GB)")


def auditlog_section(config: Any, console: Console, progress: Console) -> AuditResults:
    """Run and print this benchmark with ``ledger_bench.py``'s config (section 8)."""
    settings = settings_for(config)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        check_disk(settings, tmp, progress)
        results = run_auditlog(settings, tmp, progress)
    print_auditlog(console, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=210)
    progress = Console(stderr=True)
    idle_busy = background_busy()
    pg = None if settings.no_postgres else reachable_postgres(settings.pg_url, progress)
    settings = replace(settings, no_postgres=pg is None)
    with sqlite_dir(settings.tmpdir or None) as tmp:
        print_run_header(console, "paymaster: audit-log scale", pg, str(tmp), idle_busy)
        check_disk(settings, tmp, progress)
        results = run_auditlog(settings, tmp, progress)
        print_auditlog(console, results, number="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
