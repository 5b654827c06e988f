"""``paymaster revoke`` / ``paymaster restore``: the kill switch, for every process on the
ledger at once (the revocation is checked inside every reserve transaction)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from .output import echo_json, fmt_time, plural
from .params import DEFAULT_DB, DbOption, JsonOption
from .runtime import open_governor
from .status import revocation_json

# Imported inside the commands that need them (start-up time).
if TYPE_CHECKING:
    from .._ledger import Revocation

__all__ = ["restore", "revoke"]

AgentOption = Annotated[str | None, typer.Option("--agent", help="An agent type.")]
RunOption = Annotated[str | None, typer.Option("--run", help="One run.")]
AllOption = Annotated[bool, typer.Option("--all", help="Every agent and run.")]
ByOption = Annotated[str | None, typer.Option("--by", help="Who (default: the OS user).")]


def _scope(agent: str | None, run: str | None, everything: bool) -> str:
    """The scope's description; a usage error unless exactly one is named."""
    named = sum((agent is not None, run is not None, everything))
    if named != 1:
        raise typer.BadParameter(
            "name exactly one scope: --agent NAME, --run ID or --all",
            param_hint="'--agent' / '--run' / '--all'",
        )
    for value, option in ((agent, "--agent"), (run, "--run")):
        if value is not None and not value.strip():
            raise typer.BadParameter("must not be empty", param_hint=f"'{option}'")
    if everything:
        return "everything"
    return f"agent {agent!r}" if agent is not None else f"run {run!r}"


def _describe(r: Revocation) -> str:
    scope = "everything" if r.scope.value == "all" else f"{r.scope.value} {r.target!r}"
    return f"{scope} (revocation {r.id}, by {r.revoked_by} at {fmt_time(r.revoked_at)}): {r.reason}"


def revoke(
    reason: Annotated[str, typer.Option("--reason", help="Why (shown to refused calls).")],
    agent: AgentOption = None,
    run: RunOption = None,
    everything: AllOption = False,
    by: ByOption = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Kill switch: refuse the next call in scope, in every process on this ledger.

    Lasts until `paymaster restore`; calls already in flight finish and are audited.
    """
    what = _scope(agent, run, everything)
    if not reason.strip():
        raise typer.BadParameter("must say why", param_hint="'--reason'")
    with open_governor(db) as gov:
        rid = gov.revoke(agent=agent, run=run, everything=everything, reason=reason, by=by)
        active = gov.revocations()
    made = next((r for r in active if r.id == rid), None)
    if as_json:
        echo_json(
            {
                "revoked": None if made is None else revocation_json(made),
                "active": [revocation_json(r) for r in active],
            }
        )
        return
    typer.echo(f"revoked {_describe(made) if made else what}")
    typer.echo("the next call in scope of every process on this ledger is refused")


def restore(
    agent: AgentOption = None,
    run: RunOption = None,
    everything: AllOption = False,
    reason: Annotated[str, typer.Option("--reason", help="Why it is lifted.")] = "restored",
    by: ByOption = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Lift the active revocations of exactly this scope.

    Restoring an agent does not lift a revocation of everything (--all), nor of its runs.
    """
    what = _scope(agent, run, everything)
    with open_governor(db) as gov:
        lifted = gov.restore(agent=agent, run=run, everything=everything, reason=reason, by=by)
        active = gov.revocations()
    if as_json:
        echo_json({"scope": what, "lifted": lifted, "active": [revocation_json(r) for r in active]})
        return
    if lifted:
        typer.echo(f"restored {what}: lifted {plural(lifted, 'revocation')}")
    else:
        typer.echo(f"nothing to restore: no active revocation of {what}")
    for r in active:
        typer.echo(f"still revoked: {_describe(r)}")
