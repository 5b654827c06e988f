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
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
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
    #: SQLite only: per governed call, the seconds inside the sqlite3 module's functions.
    sqlite_own: list[float] = field(default_factory=list)
    #: SQLite only: pages written to the WAL per governed call.
    wal_pages: float | None = None


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
    backend: Backend,
    gov: Governor,
    floor: Floor,
    *,
    calls: int,
    warmup: int,
    rounds: int,
    sqlite_own: bool = False,
) -> LatencySamples:
    """Warm both up, then take ``calls`` samples of each in ``rounds`` alternating batches.

    ``sqlite_own``: after each governed batch, a fifth as many calls again whose time
    inside SQLite is taken (:func:`sqlite_own_times`), in the same conditions as the
    batches beside it; they are not in ``governed``."""
    for _ in range(warmup):
        governed_call(gov)
        floor.pair()
    samples = LatencySamples(backend)
    rounds = max(1, min(rounds, calls))
    for r in range(rounds):
        batch = calls // rounds + (1 if r < calls % rounds else 0)
        _floor_batch(floor, batch, samples)
        _governed_batch(gov, batch, samples)
        if sqlite_own:
            samples.sqlite_own.extend(sqlite_own_times(gov, max(10, batch // 5)))
    return samples


def measure_sqlite(
    backend: Backend, directory: Path, *, calls: int, warmup: int, rounds: int
) -> LatencySamples:
    """Governed calls and their floor on one fresh SQLite file (WAL)."""
    path = directory / f"latency-{backend.synchronous.lower()}.db"
    gov = governor_for(f"sqlite:///{path}", backend.synchronous, calls + warmup)
    floor = SqliteFloor(path, backend.synchronous)
    try:
        samples = measure(
            backend, gov, floor, calls=calls, warmup=warmup, rounds=rounds, sqlite_own=True
        )
        samples.wal_pages = wal_pages_per_call(gov, path)
        return samples
    finally:
        floor.close()
        gov.close()


def sqlite_own_times(gov: Governor, calls: int) -> list[float]:
    """Per governed call, the seconds spent inside the sqlite3 module's functions
    (``execute``, ``commit``, ``fetchall``, ...): the work SQLite itself does for the
    call's statements and commits, whatever Python runs around them. Timed from each such
    function's entry to its return with a profile hook (``sys.setprofile``), which slows
    the Python between them, not them."""
    spent = 0.0
    entered = 0.0

    def hook(_frame: FrameType, event: str, arg: object) -> None:
        nonlocal spent, entered
        if event == "c_call" and _is_sqlite(arg):
            entered = time.perf_counter()
        elif event in ("c_return", "c_exception") and _is_sqlite(arg):
            spent += time.perf_counter() - entered

    samples = []
    sys.setprofile(hook)
    try:
        for _ in range(calls):
            spent = 0.0
            governed_call(gov)
            samples.append(spent)
    finally:
        sys.setprofile(None)
    return samples


def _is_sqlite(function: object) -> bool:
    """Whether ``function`` is a method of a sqlite3 connection or cursor."""
    return type(getattr(function, "__self__", None)).__module__ == "sqlite3"


def wal_pages_per_call(gov: Governor, path: Path, calls: int = 20) -> float | None:
    """Pages the governed calls write to the WAL, per call: the WAL is emptied, ``calls``
    calls run (well under the 1,000-page auto-checkpoint), and its frames are counted.
    ``None`` if the WAL could not be emptied (a reader held it)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            return None
        for _ in range(calls):
            governed_call(gov)
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames) / calls


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
