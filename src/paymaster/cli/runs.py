"""``paymaster runs show``: one run's summary, its unresolved holds and its calls."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .holds import hold_json, holds_table
from .output import audit_json, audit_table, console, echo_json, fmt_time, money_json, time_json
from .params import DEFAULT_DB, DbOption, JsonOption
from .runtime import fail, open_governor

__all__ = ["app"]

app = typer.Typer(help="Agent runs.", no_args_is_help=True)


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="The run id.")],
    db: DbOption = DEFAULT_DB,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many of its calls.")] = 200,
    as_json: JsonOption = False,
) -> None:
    """Show a run: calls per outcome, spend per currency, unresolved holds, its calls."""
    from rich.table import Table

    from .._audit import AuditLog
    from .._operations import AuditFilter, latest_audit

    with open_governor(db) as gov:
        summary = gov.audit.run_summary(run)
        if not summary.outcomes:
            fail(f"no audit rows for run {run!r}")
        total = AuditLog(gov.engine).count(run=run)
        calls = latest_audit(gov.engine, AuditFilter(run=run), limit)
        holds = gov.ledger.holds(run=run)
    if as_json:
        document: dict[str, Any] = {
            "run": run,
            "calls": summary.calls,
            "outcomes": summary.outcomes,
            "spend": {c: money_json(m) for c, m in summary.spend.items()},
            "agents": summary.agents,
            "vendors": summary.vendors,
            "first_at": time_json(summary.first_at),
            "last_at": time_json(summary.last_at),
            "unresolved_holds": [hold_json(h) for h in holds],
            "rows": total,
            "rows_shown": [audit_json(r) for r in calls],
        }
        echo_json(document)
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_row("run", run)
    grid.add_row("agents", ", ".join(summary.agents))
    grid.add_row("vendors", ", ".join(summary.vendors))
    grid.add_row("calls", str(summary.calls))
    grid.add_row("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())))
    grid.add_row("spent", ", ".join(m.format() for m in summary.spend.values()) or "nothing")
    grid.add_row("first / last", f"{fmt_time(summary.first_at)} / {fmt_time(summary.last_at)}")
    out = console()
    out.print(grid)
    if holds:
        out.print(holds_table(holds, "unresolved holds (counted against the budget)"))
    shown = f"last {len(calls)} of {total}" if total > len(calls) else f"{total}"
    out.print(audit_table(calls, title=f"audit rows ({shown})"))
