"""``paymaster audit tail | export | verify | checkpoint``: read and check the audit log."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from .._errors import GovernanceUnavailable
from .._outcome import Outcome
from .output import audit_json, audit_line, audit_table, console, echo_json, plural
from .params import DEFAULT_DB, DbOption, JsonOption, parse_time
from .runtime import EXIT_PROBLEM, hooks, open_database

# The audit log's modules (SQLAlchemy) are imported inside the commands (start-up time).
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .._audit import AuditRecord, Checkpoint, VerifyResult
    from .._operations import AuditFilter

__all__ = ["app"]

app = typer.Typer(help="The audit log: tail, export, verify, checkpoint.", no_args_is_help=True)

#: Where export and checkpoint write: a file replaced only once complete, or stdout.
OutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Write here (replaced only once complete); default stdout."
    ),
]
TimeOption = Annotated[
    datetime | None,
    typer.Option(
        parser=parse_time,
        metavar="ISO|10m|2h",
        help="An ISO time (UTC unless it says otherwise) or a duration ago.",
    ),
]


class Format(str, Enum):
    """The formats of ``audit export``."""

    CSV = "csv"
    JSONL = "jsonl"


def _follow(
    engine: Engine,
    where: AuditFilter,
    limit: int,
    as_json: bool,
    interval: float,
    iterations: int | None,
) -> None:
    """Print the newest rows, then every new row as it appears, one per line."""
    from .._operations import AuditFollower

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
    from .._operations import AuditFilter, latest_audit

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
        console().print(audit_table(records, title=plural(len(records), "newest audit row")))


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
    output: OutputOption = None,
) -> None:
    """Stream the audit log as CSV or JSON Lines, with constant memory.

    Rows come in id order; amounts are integers in minor units with their currency. With
    --output the file is replaced only once the export is complete.
    """
    from .._audit import AuditLog
    from .._operations import export_audit

    if since is not None and until is not None and until <= since:
        raise typer.BadParameter("--until must be after --since", param_hint="'--until'")
    if output is not None and not output.parent.is_dir():
        raise typer.BadParameter(f"{output.parent} is not a directory", param_hint="'--output'")
    with open_database(db) as engine, _destination(output) as out:
        records = AuditLog(engine).iter_records(since=since, until=until)
        count = export_audit(records, fmt.value, out)
    if output is not None:
        typer.echo(f"exported {plural(count, 'audit row')} to {output}")


CheckpointFile = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        exists=True,
        dir_okay=False,
        help="A checkpoint from `paymaster audit checkpoint`: also check that no row up to "
        "it was removed or altered.",
    ),
]
KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        exists=True,
        dir_okay=False,
        help="The checkpoint key (HMAC-SHA256), kept away from the database: sign with it, "
        "or check the checkpoint's signature.",
    ),
]


def _key(key_file: Path | None) -> bytes | None:
    from .._audit import CheckpointError, load_key

    if key_file is None:
        return None
    try:
        return load_key(key_file)
    except CheckpointError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--key-file'") from exc


@app.command()
def checkpoint(
    db: DbOption = DEFAULT_DB,
    key_file: KeyFile = None,
    output: OutputOption = None,
) -> None:
    """Write every chain head (chain, seq, hash, time) as JSON, signed with --key-file.

    Keep the checkpoints outside the database (another host, write-once storage): later,
    `paymaster audit verify --checkpoint FILE` shows whether any row up to them was removed
    or rewritten, even with every hash recomputed. Run verify first: a checkpoint vouches
    for the log as it is.
    """
    from .._audit import AuditLog

    key = _key(key_file)
    if output is not None and not output.parent.is_dir():
        raise typer.BadParameter(f"{output.parent} is not a directory", param_hint="'--output'")
    with open_database(db) as engine:
        made = AuditLog(engine).checkpoint(key=key)
    with _destination(output) as out:
        out.write(made.to_json())
    if output is not None:
        signed = "signed" if key is not None else "unsigned"
        typer.echo(f"{signed} checkpoint of {plural(len(made.heads), 'chain')} written to {output}")


@app.command()
def verify(
    db: DbOption = DEFAULT_DB,
    checkpoint_file: CheckpointFile = None,
    key_file: KeyFile = None,
    since_checkpoint: Annotated[
        bool,
        typer.Option(
            "--since-checkpoint",
            help="Walk only the rows written since the --checkpoint (from its heads), so "
            "the check takes as long as they do, however long the log; rows up to it are "
            "not re-read, and holds only as those rows name them. Run a full verify now "
            "and then.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check the audit log's hash chains, and rows against holds; exit 1 naming the first
    bad row and listing every problem.

    With --checkpoint, also check the log against a checkpoint kept outside the database;
    with --key-file, the checkpoint's signature too; with --since-checkpoint, only what
    was written since it.
    """
    from .._audit import AuditLog

    key = _key(key_file)
    if key is not None and checkpoint_file is None:
        raise typer.BadParameter("--key-file checks a --checkpoint", param_hint="'--key-file'")
    if since_checkpoint and checkpoint_file is None:
        raise typer.BadParameter(
            "--since-checkpoint verifies from a --checkpoint", param_hint="'--since-checkpoint'"
        )
    saved = _read_checkpoint(checkpoint_file)
    with open_database(db) as engine:
        result = AuditLog(engine).verify(
            checkpoint=saved, key=key, since_checkpoint=since_checkpoint
        )
    unchecked = saved is not None and saved.signature is not None and key is None
    if as_json:
        echo_json(_verify_document(result, saved, key))
    elif result.ok:
        typer.echo(_verify_ok_line(result, saved, key))
    else:
        _echo_tampered(result)
    if unchecked and not as_json:
        typer.echo("Warning: the checkpoint's signature was not checked (no --key-file)", err=True)
    if not result.ok:
        raise typer.Exit(EXIT_PROBLEM)


def _read_checkpoint(checkpoint_file: Path | None) -> Checkpoint | None:
    """The checkpoint in ``--checkpoint``, if given; a bad one is a usage error."""
    from .._audit import Checkpoint, CheckpointError

    saved: Checkpoint | None = None
    if checkpoint_file is not None:
        try:
            saved = Checkpoint.from_json(checkpoint_file.read_bytes())
        except (CheckpointError, OSError) as exc:
            raise typer.BadParameter(str(exc), param_hint="'--checkpoint'") from exc
    return saved


def _verify_document(
    result: VerifyResult, saved: Checkpoint | None, key: bytes | None
) -> dict[str, object]:
    """What ``audit verify --json`` prints."""
    return {
        "ok": result.ok,
        "rows_checked": result.rows_checked,
        "chains": result.chains,
        "first_bad_id": result.first_bad_id,
        "reason": result.reason,
        "problems": [{"row_id": p.row_id, "reason": p.reason} for p in result.problems],
        "checkpoint_heads": result.checkpoint_heads,
        "signature_checked": saved is not None and key is not None,
        "since_checkpoint": result.since_checkpoint,
    }


def _verify_ok_line(result: VerifyResult, saved: Checkpoint | None, key: bytes | None) -> str:
    """The line a clean log gets, naming the checkpoint it holds against."""
    against = since = ""
    if saved is not None:
        signed = " (signed)" if key is not None else ""
        against = (
            f"; the checkpoint{signed} of {saved.created_at.isoformat()} holds for its "
            f"{plural(len(saved.heads), 'chain')}"
        )
    if result.since_checkpoint:
        since = " written since the checkpoint"
    return (
        f"ok: {plural(result.rows_checked, 'audit row')}{since} checked in "
        f"{plural(result.chains, 'chain')}{against}"
    )


def _echo_tampered(result: VerifyResult) -> None:
    """The first bad row, then every other problem found."""
    where = (
        f"audit row {result.first_bad_id} is the first bad row: "
        if result.first_bad_id is not None
        else ""
    )
    checked = plural(result.rows_checked, "row")
    typer.echo(f"TAMPERED: {where}{result.reason} ({checked} checked)")
    for problem in result.problems[1:]:
        row = f" (audit row {problem.row_id})" if problem.row_id is not None else ""
        typer.echo(f"  also: {problem.reason}{row}")
