"""Shared options and the parsers of their values (durations, times, days).

A value that cannot be read raises :class:`typer.BadParameter`: Typer prints what to fix
and exits 2.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer

from .runtime import hooks

__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "POLICIES_ENV",
    "DbOption",
    "JsonOption",
    "parse_day",
    "parse_duration",
    "parse_time",
]

DB_ENV = "PAYMASTER_DATABASE_URL"
POLICIES_ENV = "PAYMASTER_POLICIES"
DEFAULT_DB = "sqlite:///paymaster.db"
DEFAULT_POLICIES = "policies.yaml"

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    """``30s``, ``10m``, ``2h``, ``1d`` or ``1w``."""
    match = _DURATION.match(text)
    if not match:
        raise typer.BadParameter(
            f"{text!r} is not a duration: write a number and a unit, e.g. 30s, 10m, 2h, 1d"
        )
    return timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})


def parse_time(text: str) -> datetime:
    """An ISO 8601 time or date (UTC unless it says otherwise) or a duration ago (``10m``)."""
    if _DURATION.match(text):
        return hooks.now().astimezone(timezone.utc) - parse_duration(text)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither an ISO time (2026-11-24T12:00:00Z, 2026-11-24) nor a "
            "duration ago (10m, 2h, 1d)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_day(text: str) -> date:
    """A UTC day, ``YYYY-MM-DD``."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a day: write it as YYYY-MM-DD") from None


DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar=DB_ENV,
        help="Ledger database URL (sqlite:///file.db or postgresql+psycopg://user@host/db).",
        show_default=True,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead of a table.")
]
PoliciesFile = Annotated[
    Path,
    typer.Option("--policies", envvar=POLICIES_ENV, help="The policy file (YAML, TOML or JSON)."),
]
