"""The governed call's hot path at two revisions, measured side by side in one run.

    .venv/bin/python bench/compare_revisions.py BASE_REV           # BASE_REV against the tree
    .venv/bin/python bench/compare_revisions.py BASE_REV --calls 400 --rounds 6

The base revision is checked out in a temporary git worktree. Each round runs one worker
process per revision, alternating which goes first, on a fresh SQLite file (FULL and
NORMAL) and, if reachable, a fresh PostgreSQL schema; each worker makes ``--calls``
governed calls (reserve, settle at the estimate, audit row) on one thread after a warm-up
and reports each call's duration. The figures are p50 and p99 over all rounds. Only the
``paymaster`` package differs between the two: the same interpreter and dependencies run
both, so the base revision must be importable with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "PAYMASTER_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)

WORKER = r"""
import json, sys, time
from paymaster import Governor, Money, Policy
url, sync, calls, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
policy = Policy(id="bench", agent="bench-agent", vendor="stripe", currency="USD",
                daily_cap="1000000000.00", endpoints=["/v1/refunds"])
gov = Governor(url, policies=[policy], sqlite_synchronous=sync)
samples = []
for n in range(warmup + calls):
    started = time.perf_counter()
    with gov.guard(agent="bench-agent", vendor="stripe", endpoint="/v1/refunds",
                   estimate=Money(100, "USD")) as call:
        call.settle()
    if n >= warmup:
        samples.append(time.perf_counter() - started)
gov.close()
print(json.dumps(samples))
"""


def run_worker(src: Path, url: str, sync: str, calls: int, warmup: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, url, sync, str(calls), str(warmup)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    samples: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return samples


def pg_schema_url() -> tuple[str, str] | None:
    try:
        import psycopg
    except ImportError:
        return None
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.Error:
        return None
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}", schema


def drop_schema(schema: str) -> None:
    import psycopg

    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the git revision to compare the working tree with")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.base],
            check=True,
        )
        try:
            sources = {args.base: base / "src", "working tree": ROOT / "src"}
            results: dict[tuple[str, str], list[float]] = {}
            for label, sync in (("SQLite FULL", "FULL"), ("SQLite NORMAL", "NORMAL")):
                for rnd in range(args.rounds):
                    order = list(sources.items())[:: 1 if rnd % 2 == 0 else -1]
                    for name, src in order:
                        url = f"sqlite:///{tmp}/{uuid.uuid4().hex}.db"
                        samples = run_worker(src, url, sync, args.calls, args.warmup)
                        results.setdefault((label, name), []).extend(samples)
            for rnd in range(args.rounds):
                order = list(sources.items())[:: 1 if rnd % 2 == 0 else -1]
                for name, src in order:
                    made = pg_schema_url()
                    if made is None:
                        break
                    url, schema = made
                    try:
                        samples = run_worker(src, url, "FULL", args.calls, args.warmup)
                    finally:
                        drop_schema(schema)
                    results.setdefault(("PostgreSQL", name), []).extend(samples)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True
            )
    print(f"governed call (reserve + settle + audit row), one thread, {os.cpu_count()} CPUs")
    print(f"{'backend':<15} {'revision':<14} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for (label, name), samples in results.items():
        print(
            f"{label:<15} {name[:14]:<14} {len(samples):>6} "
            f"{ms(samples, 50):>8.3f} {ms(samples, 99):>8.3f}"
        )


if __name__ == "__main__":
    main()
