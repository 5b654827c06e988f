"""Rendering: Rich tables for people, one JSON document for machines.

In JSON, an amount is ``{"amount": <minor units>, "currency": "USD", "formatted": "$1.00"}``
and a time is ISO 8601 UTC.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

# Rich and the ledger's modules are imported by the functions that use them (start-up time).
if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .._audit import AuditRecord
    from .._money import Money

__all__ = [
    "audit_json",
    "audit_line",
    "audit_table",
    "console",
    "echo_json",
    "fmt_age",
    "fmt_money",
    "fmt_time",
    "money_json",
    "plural",
    "time_json",
]


#: The width of tables written to a pipe or file (a terminal's own width is used otherwise).
PIPE_WIDTH = 200


def console() -> Console:
    """A console on the current stdout (so that test runners capturing it see the output),
    with markup and emoji codes off: cells hold user data such as "[/v1/refunds]".

    Written to a pipe or a file, tables are laid out :data:`PIPE_WIDTH` wide (or ``COLUMNS``)
    rather than squeezed into 80 columns.
    """
    from rich.console import Console

    out = Console(file=sys.stdout, highlight=False, markup=False, emoji=False, soft_wrap=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = PIPE_WIDTH
    return out


def plural(count: int, singular: str, plural: str | None = None) -> str:
    """``count`` and the noun that agrees with it: ``1 audit row``, ``2 audit rows``,
    ``1 valid policy`` (``plural`` when adding an "s" is wrong: "valid policies")."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def echo_json(document: Any) -> None:
    """Print ``document`` as one JSON document."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def money_json(money: Money | None) -> dict[str, Any] | None:
    if money is None:
        return None
    return {"amount": money.amount, "currency": money.currency, "formatted": money.format()}


def time_json(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(timezone.utc).isoformat()


def fmt_money(money: Money | None) -> str:
    return "-" if money is None else money.format()


def fmt_time(at: datetime | None) -> str:
    if at is None:
        return "-"
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_age(age: timedelta) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    seconds = max(int(age.total_seconds()), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours == 0:
        return f"{minutes}m"
    if days == 0:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{days}d{hours % 24:02d}h"


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def audit_json(record: AuditRecord) -> dict[str, Any]:
    """One audit row for JSON output, with its amounts as money objects."""
    from .._money import Money

    data = record.to_dict()
    data["at"] = time_json(record.at)
    currency = record.currency
    data["estimate"] = money_json(Money(record.estimate, currency)) if currency else None
    data["actual"] = money_json(Money(record.actual, currency)) if currency else None
    return data


AUDIT_COLUMNS = (
    "time",
    "run",
    "agent",
    "endpoint",
    "method",
    "outcome",
    "cost",
    "code",
    "tool call id",
    "error",
)


def _audit_cells(record: AuditRecord) -> list[str]:
    return [
        fmt_time(record.at),
        _text(record.run),
        record.agent,
        record.endpoint,
        record.method,
        record.outcome,
        fmt_money(record.cost),
        _text(record.violation_code),
        _text(record.tool_call_id),
        _text(record.error),
    ]


def add_columns(
    table: Table, names: tuple[str, ...], *, ids: tuple[str, ...] = (), right: tuple[str, ...] = ()
) -> None:
    """Add ``names`` to ``table``: long cells fold onto more lines, except the ``ids``
    (a hold or key id is copied into the next command whole, however narrow the
    terminal); the ``right`` columns (amounts) are right-aligned."""
    for name in names:
        if name in ids:
            table.add_column(name, no_wrap=True, min_width=len(name))
        else:
            table.add_column(name, overflow="fold", justify="right" if name in right else "left")


def audit_table(records: list[AuditRecord], title: str | None = None) -> Table:
    """Audit rows as a table, in the order given."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    add_columns(table, AUDIT_COLUMNS, right=("cost",))
    for record in records:
        table.add_row(*_audit_cells(record))
    return table


def audit_line(record: AuditRecord) -> str:
    """One audit row on one line (``audit tail --follow``)."""
    return "  ".join(_audit_cells(record))
