"""Single-thread latency of a governed call next to the floor of its durable commits.

The floor is what the protocol cannot avoid: two minimal durable write transactions per
call (reserve and settle each commit once), on the same database file / schema, with the
same connection settings as the ledger's (SQLite: WAL, the same ``synchronous``, the same
busy timeout and ``BEGIN IMMEDIATE``; PostgreSQL: psycopg, READ COMMITTED, one
``UPDATE ...; COMMIT`` per transaction). Floor and governed samples are taken in
alternating batches so drift in the machine's I/O affects both alike.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import psycopg
from bench_env import X

from paymaster import Governor, Money, Policy
from paymaster._db import SQLiteSync

AGENT, VENDOR, ENDPOINT = "refund-agent", "stripe", "/v1/refunds"
BUSY_TIMEOUT_MS = 30_000  # paymaster.connect's default
FLOOR_TABLE = "bench_floor"


@dataclass(frozen=True)
class Backend:
    """One database configuration to measure."""

    label: str
    kind: Literal["sqlite", "postgresql"]
    synchronous: SQLiteSync = "FULL"  # SQLite only


@dataclass
class LatencySamples:
    """Per-call durations in seconds, and the client CPU the governed calls used."""

    backend: Backend
    governed: list[float] = field(default_factory=list)
    reserve: list[float] = field(default_factory=list)
    settle: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    governed_cpu_s: float = 0.0
    floor_cpu_s: float = 0.0


class Floor(Protocol):
    """Two minimal durable write transactions, i.e. the commits of one governed call."""

    def pair(self) -> None: ...

    def close(self) -> None: ...


class SqliteFloor:
    """``BEGIN IMMEDIATE; UPDATE bench_floor SET n = n + 1 WHERE id = 1; COMMIT``, twice."""

    def __init__(self, path: Path, synchronous: SQLiteSync) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        for pragma in (
            "journal_mode=WAL",
            f"synchronous={synchronous}",
            f"busy_timeout={BUSY_TIMEOUT_MS}",
        ):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.execute(f"CREATE TABLE {FLOOR_TABLE} (id INTEGER PRIMARY KEY, n INTEGER)")
        self._conn.execute(f"INSERT INTO {FLOOR_TABLE} VALUES (1, 0)")

    def pair(self) -> None:
        for _ in range(2):
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(f"UPDATE {FLOOR_TABLE} SET n = n + 1 WHERE id = 1")
            self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


class PgFloor:
    """``UPDATE bench_floor SET n = n + 1 WHERE id = 1; COMMIT``, twice, via psycopg."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn)
        self._conn.execute(f"CREATE TABLE {FLOOR_TABLE} (id int PRIMARY KEY, n bigint)")
        self._conn.execute(f"INSERT INTO {FLOOR_TABLE} VALUES (1, 0)")
        self._conn.commit()

    def pair(self) -> None:
        for _ in range(2):
            self._conn.execute(f"UPDATE {FLOOR_TABLE} SET n = n + 1 WHERE id = 1")
            self._conn.commit()

    def close(self) -> None:
        self._conn.close()


def governor_for(url: str, synchronous: SQLiteSync, calls: int) -> Governor:
    """A Governor whose one policy's daily cap cannot be reached by ``calls`` calls."""
    policy = Policy(
        agent=AGENT,
        vendor=VENDOR,
        currency="USD",
        daily_cap=Money(10 * (calls + 1) * X, "USD"),
        endpoints=[ENDPOINT],
    )
    return Governor(url, policies=[policy], sqlite_synchronous=synchronous)


def governed_call(gov: Governor) -> tuple[float, float]:
    """One governed call settled at its estimate; returns (reserve, settle) seconds."""
    t0 = time.perf_counter()
    with gov.guard(
        agent=AGENT, vendor=VENDOR, endpoint=ENDPOINT, method="POST", estimate=Money(X, "USD")
    ) as call:
        t1 = time.perf_counter()
        call.settle()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _floor_batch(floor: Floor, n: int, out: LatencySamples) -> None:
    cpu = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        floor.pair()
        out.floor.append(time.perf_counter() - t0)
    out.floor_cpu_s += time.process_time() - cpu


def _governed_batch(gov: Governor, n: int, out: LatencySamples) -> None:
    cpu = time.process_time()
    for _ in range(n):
        reserve, settle = governed_call(gov)
        out.reserve.append(reserve)
        out.settle.append(settle)
        out.governed.append(reserve + settle)
    out.governed_cpu_s += time.process_time() - cpu


def measure(
    backend: Backend, gov: Governor, floor: Floor, *, calls: int, warmup: int, rounds: int
) -> LatencySamples:
    """Warm both up, then take ``calls`` samples of each in ``rounds`` alternating batches."""
    for _ in range(warmup):
        governed_call(gov)
        floor.pair()
    samples = LatencySamples(backend)
    rounds = max(1, min(rounds, calls))
    for r in range(rounds):
        batch = calls // rounds + (1 if r < calls % rounds else 0)
        _floor_batch(floor, batch, samples)
        _governed_batch(gov, batch, samples)
    return samples


def measure_sqlite(
    backend: Backend, directory: Path, *, calls: int, warmup: int, rounds: int
) -> LatencySamples:
    """Governed calls and their floor on one fresh SQLite file (WAL)."""
    path = directory / f"latency-{backend.synchronous.lower()}.db"
    gov = governor_for(f"sqlite:///{path}", backend.synchronous, calls + warmup)
    floor = SqliteFloor(path, backend.synchronous)
    try:
        return measure(backend, gov, floor, calls=calls, warmup=warmup, rounds=rounds)
    finally:
        floor.close()
        gov.close()


def measure_postgres(
    backend: Backend, url: str, dsn: str, *, calls: int, warmup: int, rounds: int
) -> LatencySamples:
    """Governed calls and their floor in one fresh PostgreSQL schema."""
    gov = governor_for(url, "FULL", calls + warmup)
    floor = PgFloor(dsn)
    try:
        return measure(backend, gov, floor, calls=calls, warmup=warmup, rounds=rounds)
    finally:
        floor.close()
        gov.close()
