"""The benchmark's settings: one flag and one ``PAYMASTER_BENCH_<NAME>`` variable each.

The defaults take about 90 s on a quiet 2-CPU machine (limit: 4 minutes); ``--quick`` shrinks
every count for a smoke run. A flag beats its environment variable, which beats the
default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from bench_env import DEFAULT_PG_URL

ENV_PREFIX = "PAYMASTER_BENCH_"


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    latency_calls: int = _opt(2000, "measured governed calls (and floor pairs) per backend")
    latency_warmup: int = _opt(200, "warm-up governed calls (and floor pairs) per backend")
    latency_rounds: int = _opt(10, "alternating floor/governed batches per backend")
    processes: tuple[int, ...] = _opt((1, 2, 4, 8), "process counts on the hot budget")
    per_process: int = _opt(300, "attempts per process (hot budget and naive enforcer)")
    cap_fraction: float = _opt(0.75, "hot cap as a fraction of all attempts (so it is reached)")
    load_warmup: int = _opt(20, "warm-up calls per process before the barrier (hot, naive)")
    spread_agents: int = _opt(100, "agent types (policies, budgets) in the spread run")
    spread_processes: int = _opt(8, "processes in the spread run (0: skip it)")
    spread_per_process: int = _opt(300, "attempts per process in the spread run")
    naive_processes: tuple[int, ...] = _opt((4, 8), "process counts for the naive enforcer")
    call_ms: float = _opt(0.0, "simulated vendor call between check and record, both enforcers")
    pg_url: str = _opt(
        os.environ.get("PAYMASTER_TEST_POSTGRES_URL", DEFAULT_PG_URL), "PostgreSQL (SQLAlchemy URL)"
    )
    no_postgres: bool = _opt(False, "SQLite latency only")
    tmpdir: str = _opt("", "directory for the SQLite files (default: the system temp dir)")
    quick: bool = _opt(False, "small counts: a smoke run (~1 minute)")


QUICK: dict[str, Any] = {
    "latency_calls": 200,
    "latency_warmup": 20,
    "per_process": 60,
    "load_warmup": 5,
    "spread_per_process": 60,
}

_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "tuple[int, ...]": _int_list,
}


def _env_default(name: str, default: Any, parse: Callable[[str], Any]) -> Any:
    value = os.environ.get(ENV_PREFIX + name.upper())
    if value in (None, ""):
        return default
    if parse is bool:
        return value.lower() in ("1", "true", "yes")
    return parse(value)


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> Config:
    """Build the parser from :class:`Config`'s fields and read the command line."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"Every flag also reads {ENV_PREFIX}<FLAG>, e.g. {ENV_PREFIX}LATENCY_CALLS=5000.",
    )
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type == "bool":
            default = _env_default(f.name, f.default, bool)
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
            continue
        parse = _PARSERS[str(f.type)]
        default = _env_default(f.name, f.default, parse)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        if shown:
            help_text += f" (default: {shown})"
        parser.add_argument(flag, type=parse, default=default, help=help_text)
    config = Config(**vars(parser.parse_args(argv)))
    config = replace(config, pg_url=config.pg_url.replace("postgresql://", "postgresql+psycopg://"))
    return replace(config, **QUICK) if config.quick else config
