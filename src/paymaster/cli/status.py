"""``paymaster status``: today's budgets, what is spent and pending, and active revocations."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._errors import GovernanceUnavailable
from .output import console, echo_json, fmt_money, fmt_time, money_json, time_json
from .params import DEFAULT_DB, POLICIES_ENV, DbOption, JsonOption, parse_day
from .runtime import hooks, open_governor

# Imported inside the commands that need them (start-up time).
if TYPE_CHECKING:
    from rich.console import RenderableType

    from .._governor import Governor
    from .._ledger import BudgetStatus, Revocation
    from .._policy import PolicySet

__all__ = ["Snapshot", "render_status", "status", "take_snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """What ``status`` shows: one UTC day's budgets and the revocations in force."""

    day: date
    at: datetime
    budgets: list[BudgetStatus]
    revocations: list[Revocation]


def _unused(
    policies: PolicySet | None, budgets: list[BudgetStatus], day: date
) -> list[BudgetStatus]:
    """Budgets of policies nothing has spent against yet that day (no ledger row)."""
    from .._ledger import BudgetStatus
    from .._money import Money

    if policies is None:
        return []
    seen = {(b.agent, b.vendor, b.committed.currency) for b in budgets if b.kind == "daily"}
    return [
        BudgetStatus(
            id=0,
            kind="daily",
            agent=p.agent,
            vendor=p.vendor,
            run="",
            window=day.isoformat(),
            cap=p.daily_cap,
            committed=Money.zero(p.currency),
            settled=Money.zero(p.currency),
            pending=Money.zero(p.currency),
            calls=0,
            calls_cap=p.max_calls_per_day,
        )
        for p in policies
        if (p.agent, p.vendor, p.currency) not in seen
    ]


def take_snapshot(gov: Governor, day: date | None, policies: PolicySet | None = None) -> Snapshot:
    """Read the budgets of ``day`` (default today, UTC) and the active revocations."""
    now = hooks.now().astimezone(timezone.utc)
    when = day or now.date()
    budgets = gov.budgets(day=when)
    budgets = budgets + _unused(policies, budgets, when)
    return Snapshot(when, now, budgets, gov.revocations())


def _label(b: BudgetStatus) -> str:
    if b.kind == "run":
        return f"run {b.run} ({b.agent} → {b.vendor})"
    return f"{b.agent} → {b.vendor}"


def _usage(b: BudgetStatus) -> tuple[int, int] | None:
    """(used, cap) by money, or by calls when the budget has only a call cap."""
    if b.cap is not None:
        return b.committed.amount, b.cap.amount
    if b.calls_cap is not None:
        return b.calls, b.calls_cap
    return None


def _bar(b: BudgetStatus) -> tuple[RenderableType, RenderableType]:
    """The budget's bar and its share used. Two cells of the table rather than one
    nested grid: a nested table per row is measured and drawn again for every row, which
    made drawing 125 budgets take most of ``status``'s time."""
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    usage = _usage(b)
    if usage is None:
        return Text("no cap"), Text("")
    used, cap = usage
    share = used / cap if cap else 1.0
    style = "red" if share >= 0.9 else "yellow" if share >= 0.75 else "green"
    bar = ProgressBar(
        total=max(cap, 1),
        completed=min(used, cap),
        width=20,
        complete_style=style,
        finished_style="red",
    )
    return bar, Text(f"{share:4.0%}", style=style)


def render_status(snapshot: Snapshot) -> RenderableType:
    """The budgets table (a bar per budget) and the active revocations."""
    from rich.console import Group
    from rich.table import Table

    table = Table(
        title=f"budgets for {snapshot.day.isoformat()} (UTC), as of {fmt_time(snapshot.at)}",
        title_justify="left",
    )
    table.add_column("budget", overflow="fold")
    for name in ("cap", "settled", "pending", "remaining"):
        table.add_column(name, justify="right")
    table.add_column("calls", justify="right")
    table.add_column("used", no_wrap=True)
    table.add_column("", justify="right", no_wrap=True)
    for b in snapshot.budgets:
        calls = str(b.calls) if b.calls_cap is None else f"{b.calls}/{b.calls_cap}"
        label = _label(b) + (" [FROZEN: overrun, see holds list --overruns]" if b.frozen else "")
        table.add_row(
            label,
            fmt_money(b.cap),
            fmt_money(b.settled),
            fmt_money(b.pending),
            fmt_money(b.remaining),
            calls,
            *_bar(b),
        )
    if not snapshot.budgets:
        table.add_row("(nothing spent or reserved this day)", "", "", "", "", "", "", "")
    parts: list[RenderableType] = [table]
    if snapshot.revocations:
        revoked = Table(title="revoked (the next call in scope is refused)", title_justify="left")
        for name in ("scope", "reason", "by", "since"):
            revoked.add_column(name, overflow="fold")
        for r in snapshot.revocations:
            scope = "everything" if r.scope.value == "all" else f"{r.scope.value} {r.target}"
            revoked.add_row(scope, r.reason, r.revoked_by, fmt_time(r.revoked_at))
        parts.append(revoked)
    return Group(*parts)


def _budget_json(b: BudgetStatus) -> dict[str, Any]:
    return {
        "kind": b.kind,
        "agent": b.agent,
        "vendor": b.vendor,
        "run": b.run or None,
        "window": b.window or None,
        "cap": money_json(b.cap),
        "committed": money_json(b.committed),
        "settled": money_json(b.settled),
        "pending": money_json(b.pending),
        "remaining": money_json(b.remaining),
        "calls": b.calls,
        "calls_cap": b.calls_cap,
        "frozen": b.frozen,
    }


def revocation_json(r: Revocation) -> dict[str, Any]:
    return {
        "id": r.id,
        "scope": r.scope.value,
        "target": r.target or None,
        "reason": r.reason,
        "by": r.revoked_by,
        "at": time_json(r.revoked_at),
        "lifted_at": time_json(r.lifted_at),
    }


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "day": snapshot.day.isoformat(),
        "at": time_json(snapshot.at),
        "budgets": [_budget_json(b) for b in snapshot.budgets],
        "revocations": [revocation_json(r) for r in snapshot.revocations],
    }


def _watch(
    gov: Governor,
    day: date | None,
    policies: PolicySet | None,
    interval: float,
    iterations: int | None,
) -> None:
    """Refresh in place on a terminal. Elsewhere (a pipe, a file, a log), where a Rich Live
    would print nothing until it stops, print each refresh after the last."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    out = console()
    last = render_status(take_snapshot(gov, day, policies))
    live = Live(last, console=out, auto_refresh=False) if out.is_terminal else None

    def show(warning: str | None = None) -> None:
        if live is not None:
            shown = last if warning is None else Group(Text(warning, style="bold red"), last)
            live.update(shown, refresh=True)
        elif warning is not None:
            typer.echo(f"Warning: {warning}", err=True)
        else:
            out.print()
            out.print(last)

    if live is None:
        out.print(last)
    done = 0
    with ExitStack() as stack:
        if live is not None:
            stack.enter_context(live)
        try:
            while iterations is None or done < iterations:
                hooks.sleep(interval)
                done += 1
                try:
                    last = render_status(take_snapshot(gov, day, policies))
                    show()
                except GovernanceUnavailable as exc:  # keep watching through an outage
                    show(f"database unavailable, retrying: {exc}")
        except KeyboardInterrupt:
            pass


def status(
    db: DbOption = DEFAULT_DB,
    day: Annotated[
        date | None,
        typer.Option(
            "--day",
            parser=parse_day,
            metavar="YYYY-MM-DD",
            help="The UTC day to show (default today).",
        ),
    ] = None,
    policies: Annotated[
        Path | None,
        typer.Option(
            "--policies",
            envvar=POLICIES_ENV,
            help="Also list policies with nothing spent yet that day.",
        ),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Refresh in place until Ctrl-C (not on a terminal: print each refresh).",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")
    ] = 2.0,
    iterations: Annotated[
        int | None, typer.Option("--iterations", hidden=True, min=0)
    ] = None,  # stop --watch after this many refreshes (tests)
    as_json: JsonOption = False,
) -> None:
    """Show one UTC day's budgets: cap, settled, pending, remaining, calls, a bar each."""
    from .._loading import load_policies

    if watch and as_json:
        raise typer.BadParameter(
            "--json prints one document; it cannot --watch", param_hint="'--json'"
        )
    policy_set = None if policies is None else load_policies(policies)
    with open_governor(db) as gov:
        if watch:
            _watch(gov, day, policy_set, interval, iterations)
            return
        snapshot = take_snapshot(gov, day, policy_set)
    if as_json:
        echo_json(snapshot_json(snapshot))
    else:
        console().print(render_status(snapshot))
