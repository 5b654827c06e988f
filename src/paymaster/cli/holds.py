"""``paymaster holds list | resolve | acknowledge``: unresolved holds, their
reconciliation, and overruns awaiting acknowledgement."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._errors import HoldAlreadyResolved
from .output import (
    add_columns,
    console,
    echo_json,
    fmt_age,
    fmt_money,
    fmt_time,
    money_json,
    plural,
    time_json,
)
from .params import DEFAULT_DB, DbOption, JsonOption, parse_duration
from .runtime import hooks, open_governor

# Imported inside the commands that need them (start-up time).
if TYPE_CHECKING:
    from rich.table import Table

    from .._ledger import Hold

__all__ = ["app", "hold_json", "holds_table"]

app = typer.Typer(
    help="Holds: reserved calls still counted against their budgets.", no_args_is_help=True
)


def hold_json(h: Hold) -> dict[str, Any]:
    return {
        "id": h.id,
        "state": h.state.value,
        "agent": h.agent,
        "run": h.run,
        "vendor": h.vendor,
        "endpoint": h.endpoint,
        "method": h.method,
        "customer": h.customer,
        "estimate": money_json(h.estimate),
        "actual": money_json(h.actual),
        "policy_id": h.policy_id,
        "idempotency_key": h.idempotency_key,
        "tool_call_id": h.tool_call_id,
        "created_at": time_json(h.created_at),
        "resolved_at": time_json(h.resolved_at),
        "resolved_by": h.resolved_by,
        "resolution": h.resolution,
        "attempts": h.attempts,
        "overrun": money_json(h.overrun),
        "overrun_acknowledged_at": time_json(h.overrun_acknowledged_at),
        "overrun_acknowledged_by": h.overrun_acknowledged_by,
    }


def holds_table(holds: list[Hold], title: str) -> Table:
    from rich.table import Table

    now = hooks.now()
    table = Table(title=title, title_justify="left")
    names = ("hold", "state", "agent", "run", "call", "customer", "estimate", "created", "age")
    add_columns(table, names, ids=("hold",), right=("estimate",))
    for h in holds:
        table.add_row(
            h.id,
            h.state.value,
            h.agent,
            h.run or "-",
            f"{h.vendor} {h.method} {h.endpoint}",
            h.customer or "-",
            fmt_money(h.estimate),
            fmt_time(h.created_at),
            fmt_age(now - h.created_at),
        )
    return table


@app.command("list")
def list_holds(
    db: DbOption = DEFAULT_DB,
    older_than: Annotated[
        timedelta | None,
        typer.Option(
            "--older-than",
            parser=parse_duration,
            metavar="10m|2h|1d",
            help="Only holds created at least this long ago.",
        ),
    ] = None,
    overruns: Annotated[
        bool,
        typer.Option(
            "--overruns",
            help="Instead: holds settled above their reservation whose overrun still "
            "freezes their budgets (acknowledge each with `paymaster holds acknowledge`).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List pending and unknown holds, oldest first.

    Each still counts against its budgets until it is settled or released with
    `paymaster holds resolve`.
    """
    with open_governor(db) as gov:
        holds = gov.overruns() if overruns else gov.holds(older_than=older_than)
    if as_json:
        echo_json([hold_json(h) for h in holds])
        return
    if overruns:
        console().print(overruns_table(holds))
        return
    console().print(holds_table(holds, plural(len(holds), "unresolved hold")))


def overruns_table(holds: list[Hold]) -> Table:
    from rich.table import Table

    title = f"{plural(len(holds), 'overrun')} awaiting acknowledgement"
    table = Table(title=title, title_justify="left")
    names = ("hold", "agent", "run", "call", "estimate", "actual", "over", "settled")
    add_columns(table, names, ids=("hold",))
    for h in holds:
        table.add_row(
            h.id,
            h.agent,
            h.run or "-",
            f"{h.vendor} {h.method} {h.endpoint}",
            fmt_money(h.estimate),
            fmt_money(h.actual),
            fmt_money(h.overrun),
            fmt_time(h.resolved_at),
        )
    return table


@app.command()
def acknowledge(
    hold_id: Annotated[str, typer.Argument(metavar="HOLD", help="The overrun's hold id.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why the overrun is understood (audited).")
    ],
    by: Annotated[
        str | None, typer.Option("--by", help="Who acknowledges it (default: OS user).")
    ] = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Acknowledge a call that settled above its reservation, unfreezing its budgets.

    The money it spent stays counted. Exits 1 if the hold has no overrun awaiting
    acknowledgement.
    """
    if not reason.strip():
        raise typer.BadParameter("must say why", param_hint="'--reason'")
    with open_governor(db) as gov:
        found = gov.ledger.get_hold(hold_id)
        if found.overrun is None or found.overrun_acknowledged_at is not None:
            raise HoldAlreadyResolved(
                f"hold {hold_id} has no overrun awaiting acknowledgement"
                + ("" if found.overrun is None else f" (by {found.overrun_acknowledged_by})")
            )
        acknowledged = gov.acknowledge_overrun(hold_id, reason=reason, by=by)
    if as_json:
        echo_json(hold_json(acknowledged))
        return
    typer.echo(
        f"overrun of hold {acknowledged.id} ({fmt_money(acknowledged.overrun)} above its "
        f"{acknowledged.estimate.format()} reservation) acknowledged by "
        f"{acknowledged.overrun_acknowledged_by}: its budgets take calls again"
    )


@app.command()
def resolve(
    hold_id: Annotated[str, typer.Argument(metavar="HOLD", help="The hold id.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (recorded on the hold and in the audit log).")
    ],
    settle: Annotated[
        str | None,
        typer.Option(
            "--settle",
            metavar="AMOUNT",
            help="The call went through and cost AMOUNT ('12.50 USD', or '12.50' "
            "in the hold's currency).",
        ),
    ] = None,
    release: Annotated[
        bool, typer.Option("--release", help="The call did not happen: free its estimate.")
    ] = False,
    by: Annotated[
        str | None, typer.Option("--by", help="Who resolves it (default: OS user).")
    ] = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Settle or release a pending or unknown hold, once. A second resolve exits 1."""
    from .._money import Money

    if (settle is None) == (not release):
        raise typer.BadParameter(
            "give exactly one of --settle AMOUNT or --release",
            param_hint="'--settle' / '--release'",
        )
    if not reason.strip():
        raise typer.BadParameter("must say why", param_hint="'--reason'")
    with open_governor(db) as gov:
        found = gov.ledger.get_hold(hold_id)
        amount: Money | None = None
        if settle is not None:
            try:
                amount = Money.parse(settle, default_currency=found.estimate.currency)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="'--settle'") from None
            if amount.amount < 0:
                raise typer.BadParameter(
                    "a call cannot cost a negative amount", param_hint="'--settle'"
                )
        resolved = gov.resolve_hold(hold_id, settle=amount, release=release, reason=reason, by=by)
    if as_json:
        echo_json(hold_json(resolved))
        return
    what = f"settled at {fmt_money(resolved.actual)}" if amount is not None else "released"
    typer.echo(
        f"hold {resolved.id} {what} (estimate {resolved.estimate.format()}, was "
        f"{found.state.value}) by {resolved.resolved_by}: {resolved.resolution}"
    )
