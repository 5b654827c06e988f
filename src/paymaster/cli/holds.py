"""``paymaster holds list | resolve``: unresolved holds and their reconciliation."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from ..ledger import Hold
from ..money import Money
from .output import console, echo_json, fmt_age, fmt_money, fmt_time, money_json, time_json
from .params import DEFAULT_DB, DbOption, JsonOption, parse_duration
from .runtime import hooks, open_governor

__all__ = ["app", "hold_json", "holds_table"]

app = typer.Typer(help="Holds: reserved calls still counted against their budgets.",
                  no_args_is_help=True)  # fmt: skip


def hold_json(h: Hold) -> dict[str, Any]:
    return {
        "id": h.id, "state": h.state.value, "agent": h.agent, "run": h.run,
        "vendor": h.vendor, "endpoint": h.endpoint, "method": h.method,
        "customer": h.customer, "estimate": money_json(h.estimate),
        "actual": money_json(h.actual), "policy_id": h.policy_id,
        "idempotency_key": h.idempotency_key, "tool_call_id": h.tool_call_id,
        "created_at": time_json(h.created_at), "resolved_at": time_json(h.resolved_at),
        "resolved_by": h.resolved_by, "resolution": h.resolution,
    }  # fmt: skip


def holds_table(holds: list[Hold], title: str) -> Table:
    now = hooks.now()
    table = Table(title=title, title_justify="left")
    for name in ("hold", "state", "agent", "run", "call", "customer", "estimate", "created",
                 "age"):  # fmt: skip
        table.add_column(name, overflow="fold", justify="right" if name == "estimate" else "left")
    for h in holds:
        table.add_row(
            h.id, h.state.value, h.agent, h.run or "-", f"{h.vendor} {h.method} {h.endpoint}",
            h.customer or "-", fmt_money(h.estimate), fmt_time(h.created_at),
            fmt_age(now - h.created_at),
        )  # fmt: skip
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
    as_json: JsonOption = False,
) -> None:
    """List pending and unknown holds, oldest first.

    Each still counts against its budgets until it is settled or released with
    `paymaster holds resolve`.
    """
    with open_governor(db) as gov:
        holds = gov.holds(older_than=older_than)
    if as_json:
        echo_json([hold_json(h) for h in holds])
        return
    console().print(holds_table(holds, f"{len(holds)} unresolved holds"))


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
                raise typer.BadParameter("a call cannot cost a negative amount",
                                         param_hint="'--settle'")  # fmt: skip
        resolved = gov.resolve_hold(hold_id, settle=amount, release=release, reason=reason, by=by)
    if as_json:
        echo_json(hold_json(resolved))
        return
    what = f"settled at {fmt_money(resolved.actual)}" if amount is not None else "released"
    typer.echo(
        f"hold {resolved.id} {what} (estimate {resolved.estimate.format()}, was "
        f"{found.state.value}) by {resolved.resolved_by}: {resolved.resolution}"
    )
