"""Plumbing shared by the ledger benchmark: databases, machine facts and statistics."""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

DEFAULT_PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
#: Where a standalone benchmark looks for its PostgreSQL URL, first set first.
PG_URL_VARIABLES = (
    "PAYMASTER_BENCH_POSTGRES_URL",
    "PAYMASTER_BENCH_PG_URL",
    "PAYMASTER_TEST_POSTGRES_URL",
)
X = 100  # minor units per governed call: $1.00


# -- PostgreSQL ----------------------------------------------------------------------------
def libpq_url(url: str) -> str:
    """The SQLAlchemy URL ``postgresql+psycopg://...`` as a libpq URL for psycopg."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def with_search_path(base_url: str, schema: str) -> str:
    """``base_url`` with ``options=-csearch_path=<schema>`` (URL-encoded) appended."""
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options={quote(f'-csearch_path={schema}')}"


@dataclass(frozen=True)
class PgSchema:
    """A scratch schema: ``url`` (SQLAlchemy) and ``dsn`` (psycopg) both select it."""

    name: str
    url: str

    @property
    def dsn(self) -> str:
        return libpq_url(self.url)


@contextmanager
def pg_schema(base_url: str) -> Iterator[PgSchema]:
    """Create ``bench_<random>``, yield it, and drop it (with everything in it) afterwards."""
    name = "bench_" + uuid.uuid4().hex[:12]
    ident = sql.Identifier(name)
    with psycopg.connect(libpq_url(base_url), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
    try:
        yield PgSchema(name, with_search_path(base_url, name))
    finally:
        with psycopg.connect(libpq_url(base_url), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))


def pg_facts(base_url: str) -> dict[str, str]:
    """Server version and the settings that decide what a durable commit costs."""
    names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "commit_delay")
    facts = {}
    with psycopg.connect(libpq_url(base_url), autocommit=True, connect_timeout=5) as conn:
        for name in names:
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            facts[name] = "?" if row is None else str(row[0])
    return facts


# -- SQLite --------------------------------------------------------------------------------
@contextmanager
def sqlite_dir(parent: str | None) -> Iterator[Path]:
    """A fresh temporary directory for SQLite ledger files, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="paymaster-bench-", dir=parent) as path:
        yield Path(path)


# -- machine -------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on (affinity), falling back to the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def source_state() -> str:
    """The commit of the paymaster checkout, and which files under src/ differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    changed = git("status", "--porcelain", "--", "src").splitlines()
    if not changed:
        return f"commit {commit}, src/ clean"
    return f"commit {commit} + uncommitted: " + ", ".join(line[3:] for line in changed)


def background_busy(seconds: float = 1.0) -> float | None:
    """Machine-wide CPU busy % over ``seconds`` before the benchmark starts any work."""
    before = cpu_ticks()
    time.sleep(seconds)
    return busy_percent(before, cpu_ticks())


def machine_facts(
    pg: dict[str, str] | None, tmp: str, idle_busy: float | None
) -> list[tuple[str, str]]:
    """Label/value rows describing the machine, interpreter, databases and source."""
    quiet = "n/a" if idle_busy is None else f"{idle_busy:.0f}% of all CPUs busy"
    if idle_busy is not None and idle_busy > 10:
        quiet += " - [yellow]something else is running: figures below are affected[/]"
    rows = [
        ("CPUs", f"{usable_cpus()} usable ({os.cpu_count()} online), {cpu_model()}"),
        ("load before start (1 s)", quiet),
        ("OS", platform.platform()),
        ("Python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("SQLite library", sqlite3.sqlite_version),
        (
            "packages",
            ", ".join(f"{p} {version(p)}" for p in ("paymaster", "sqlalchemy", "psycopg")),
        ),
        ("paymaster source", source_state()),
        ("SQLite files in", tmp),
    ]
    if pg is None:
        rows.append(("PostgreSQL", "not used (unreachable or --no-postgres)"))
    else:
        settings = ", ".join(f"{k}={v}" for k, v in pg.items() if k != "server_version")
        rows.append(("PostgreSQL server", f"{pg['server_version']} ({settings})"))
    return rows


@dataclass(frozen=True)
class CpuTicks:
    """Aggregate busy and total jiffies of all CPUs (from /proc/stat)."""

    busy: int
    total: int


def cpu_ticks() -> CpuTicks | None:
    """Snapshot of the machine-wide CPU counters, or None where /proc/stat is missing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return CpuTicks(total - idle, total)


def busy_cpu_s(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """CPU-seconds, summed over all CPUs, that were busy between two snapshots."""
    if before is None or after is None:
        return None
    return (after.busy - before.busy) / os.sysconf("SC_CLK_TCK")


def busy_percent(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Share of all CPUs' time that was busy between two snapshots, in percent."""
    if before is None or after is None or after.total == before.total:
        return None
    return 100.0 * (after.busy - before.busy) / (after.total - before.total)


# -- statistics ----------------------------------------------------------------------------
def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted ``samples``."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def ms(seconds: float) -> str:
    """Seconds formatted as milliseconds."""
    return f"{seconds * 1000:.2f}"


# -- the standalone benchmarks' command line ------------------------------------------------
def env_count(prefix: str, name: str, default: Any) -> Any:
    """``default``, or the environment's ``<prefix><NAME>`` read as the same type."""
    value = os.environ.get(prefix + name.upper())
    return default if value in (None, "") else type(default)(value)


def standalone_parser(
    doc: str | None, settings: type, counts: Mapping[str, str], prefix: str, example: str
) -> argparse.ArgumentParser:
    """A standalone benchmark's flags: one per count (``counts``: name -> help, defaults
    from ``settings`` or ``<prefix><NAME>``), then ``--pg-url``, ``--no-postgres``,
    ``--tmpdir`` and ``--quick``. Add its own flags, then call :func:`parsed`."""
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        epilog=f"Every count also reads {prefix}<FLAG>, e.g. {prefix}{example}.",
    )
    for name, help_text in counts.items():
        default = env_count(prefix, name, getattr(settings, name))
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{help_text} (default: {default:,})",
        )
    pg_default = next(
        (os.environ[v] for v in PG_URL_VARIABLES if os.environ.get(v)), DEFAULT_PG_URL
    )
    parser.add_argument("--pg-url", default=pg_default, help=f"PostgreSQL (default: {pg_default})")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--tmpdir", default="", help="directory for the SQLite files")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    return parser


def parsed(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: Mapping[str, Any]
) -> dict[str, Any]:
    """The settings' fields from ``argv``: ``quick``'s counts under ``--quick``, and the
    PostgreSQL URL in SQLAlchemy's psycopg 3 form."""
    args = vars(parser.parse_args(argv))
    if args.pop("quick"):
        args.update({k: v for k, v in quick.items() if v is not None})
    args["pg_url"] = args["pg_url"].replace("postgresql://", "postgresql+psycopg://", 1)
    return args
