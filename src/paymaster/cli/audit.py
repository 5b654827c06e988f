"""``paymaster audit tail | export | verify``: read and check the audit log."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, TextIO

import typer
from sqlalchemy import Engine

from ..audit import AuditLog, AuditRecord, Outcome
from ..errors import GovernanceUnavailable
from ..operations import AuditFilter, AuditFollower, export_audit, latest_audit
from .output import audit_json, audit_line, audit_table, console, echo_json
from .params import DEFAULT_DB, DbOption, JsonOption, parse_time
from .runtime import EXIT_PROBLEM, hooks, open_database

__all__ = ["app"]

app = typer.Typer(help="The audit log: tail, export, verify.", no_args_is_help=True)

TimeOption = Annotated[
    datetime | None,
    typer.Option(parser=parse_time, metavar="ISO|10m|2h",
                 help="An ISO time (UTC unless it says otherwise) or a duration ago."),
]  # fmt: skip


class Format(str, Enum):
    """The formats of ``audit export``."""

    CSV = "csv"
    JSONL = "jsonl"


def _follow(engine: Engine, where: AuditFilter, limit: int, as_json: bool, interval: float,
            iterations: int | None) -> None:  # fmt: skip
    """Print the newest rows, then every new row as it appears, one per line."""

    def emit(records: list[AuditRecord]) -> None:
        for r in records:
            typer.echo(json.dumps(audit_json(r), ensure_ascii=False) if as_json else audit_line(r))

    follower = AuditFollower(engine, where)
    emit(follower.tail(limit))
    polls, failing = 0, False
    try:
        while iterations is None or polls < iterations:
            hooks.sleep(interval)
            polls += 1
            try:
                emit(follower.poll())
                failing = False
            except GovernanceUnavailable as exc:  # keep following through an outage
                if not failing:
                    typer.echo(f"Warning: {exc}; retrying", err=True)
                failing = True
    except KeyboardInterrupt:
        pass


@app.command()
def tail(
    db: DbOption = DEFAULT_DB,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new rows (one per line).")
    ] = False,
    run: Annotated[str | None, typer.Option(help="Only this run.")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent type.")] = None,
    vendor: Annotated[str | None, typer.Option(help="Only this vendor.")] = None,
    outcome: Annotated[Outcome | None, typer.Option(help="Only this outcome.")] = None,
    since: TimeOption = None,
    limit: Annotated[int, typer.Option(min=1, help="How many of the newest rows.")] = 20,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between polls with --follow.")
    ] = 1.0,
    iterations: Annotated[int | None, typer.Option(hidden=True, min=0)] = None,  # tests
    as_json: JsonOption = False,
) -> None:
    """Show the newest audit rows, oldest first.

    With --json, one JSON document; with --follow, every new row as it appears (one JSON
    object per line with --json).
    """
    chosen = None if outcome is None else outcome.value
    where = AuditFilter(run=run, agent=agent, vendor=vendor, outcome=chosen, since=since)
    with open_database(db) as engine:
        if follow:
            _follow(engine, where, limit, as_json, interval, iterations)
            return
        records = latest_audit(engine, where, limit)
    if as_json:
        echo_json([audit_json(r) for r in records])
    else:
        console().print(audit_table(records, title=f"{len(records)} newest audit rows"))


@contextmanager
def _destination(output: Path | None) -> Iterator[TextIO]:
    """stdout, or a temporary file renamed over ``output`` only once complete."""
    if output is None:
        yield sys.stdout
        return
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as file:
            yield file
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


@app.command()
def export(
    db: DbOption = DEFAULT_DB,
    fmt: Annotated[Format, typer.Option("--format", help="csv or jsonl.")] = Format.CSV,
    since: TimeOption = None,
    until: TimeOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write here (replaced only once complete); default stdout."
        ),
    ] = None,
) -> None:
    """Stream the audit log as CSV or JSON Lines, with constant memory.

    Rows come in id order; amounts are integers in minor units with their currency. With
    --output the file is replaced only once the export is complete.
    """
    if since is not None and until is not None and until <= since:
        raise typer.BadParameter("--until must be after --since", param_hint="'--until'")
    if output is not None and not output.parent.is_dir():
        raise typer.BadParameter(f"{output.parent} is not a directory", param_hint="'--output'")
    with open_database(db) as engine, _destination(output) as out:
        records = AuditLog(engine).iter_records(since=since, until=until)
        count = export_audit(records, fmt.value, out)
    if output is not None:
        typer.echo(f"exported {count} audit rows to {output}")


@app.command()
def verify(db: DbOption = DEFAULT_DB, as_json: JsonOption = False) -> None:
    """Check the audit log's hash chains; exit 1 naming the first bad row."""
    with open_database(db) as engine:
        result = AuditLog(engine).verify()
    if as_json:
        echo_json({"ok": result.ok, "rows_checked": result.rows_checked, "chains": result.chains,
                   "first_bad_id": result.first_bad_id, "reason": result.reason})  # fmt: skip
    elif result.ok:
        typer.echo(f"ok: {result.rows_checked} audit rows checked in {result.chains} chains")
    else:
        typer.echo(
            f"TAMPERED: audit row {result.first_bad_id} is the first bad row: {result.reason} "
            f"({result.rows_checked} rows checked)"
        )
    if not result.ok:
        raise typer.Exit(EXIT_PROBLEM)
