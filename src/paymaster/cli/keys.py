"""``paymaster keys create | list | revoke | failures``: vault keys for the governing proxy.

A key is printed once, when it is made; the ledger keeps only its id and a digest.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._errors import PolicyViolation
from .output import add_columns, console, echo_json, fmt_time, plural, time_json
from .params import DEFAULT_DB, POLICIES_ENV, DbOption, JsonOption, parse_duration, parse_time
from .runtime import fail, hooks, open_database

# Imported inside the commands that need them (start-up time).
if TYPE_CHECKING:
    from .._policy import RunPolicy
    from .._vault import AuthFailure, VaultKey

__all__ = ["app"]

app = typer.Typer(
    help="Vault keys: what agents hold instead of the real Stripe key (see `paymaster proxy`).",
    no_args_is_help=True,
)

ByOption = Annotated[str | None, typer.Option("--by", help="Who (default: the OS user).")]


def key_json(key: VaultKey) -> dict[str, Any]:
    from .._vault import KEY_PREFIX

    return {
        "id": f"{KEY_PREFIX}{key.id}",
        "agent": key.agent,
        "run": key.run,
        "run_policy": None
        if key.run_policy is None
        else key.run_policy.model_dump(mode="json", exclude_none=True),
        "label": key.label,
        "state": key.state(hooks.now()),
        "created_at": time_json(key.created_at),
        "created_by": key.created_by,
        "expires_at": time_json(key.expires_at),
        "revoked_at": time_json(key.revoked_at),
        "revoked_by": key.revoked_by,
        "revoke_reason": key.revoke_reason,
    }


def failure_json(failure: AuthFailure) -> dict[str, Any]:
    from .._vault import KEY_PREFIX, UNKNOWN_KEY

    return {
        "key": failure.key_id if failure.key_id == UNKNOWN_KEY else f"{KEY_PREFIX}{failure.key_id}",
        "reason": failure.reason,
        "count": failure.count,
        "first_at": time_json(failure.first_at),
        "last_at": time_json(failure.last_at),
    }


def _expiry(text: str) -> datetime:
    """``2h`` (from now) or an ISO time."""
    try:
        return hooks.now() + parse_duration(text)
    except typer.BadParameter:
        pass
    try:
        return parse_time(text)
    except typer.BadParameter:
        raise typer.BadParameter(
            f"{text!r} is neither a duration from now (30m, 2h, 7d) nor an ISO time "
            "(2026-12-01T00:00:00Z)"
        ) from None


def _check_against(policies: Path, agent: str, run_policy: RunPolicy | None) -> None:
    """The agent type must have a Stripe policy, and the run policy must narrow it: a key
    that every request would be refused with is refused now instead."""
    from .._loading import load_policies
    from .._policy import effective_policy

    try:
        policy = load_policies(policies).require(agent, "stripe")
    except PolicyViolation as violation:
        fail(f"no key made: {violation.message}")
    effective_policy(policy, run_policy)


AgentOption = Annotated[str, typer.Option("--agent", help="The agent type the key acts as.")]
RunOption = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="Attribute every call to this run (default: the key's own id, pmk_...).",
    ),
]
ExpiresOption = Annotated[
    datetime | None,
    typer.Option(
        "--expires",
        parser=_expiry,
        metavar="2h|ISO-TIME",
        help="When the key stops working (a duration from now, or a time).",
    ),
]
RunPolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--run-policy",
        help="A run policy file narrowing the agent's policy.",
    ),
]
LabelOption = Annotated[str | None, typer.Option("--label", help="A note for `keys list`.")]
PoliciesOption = Annotated[
    Path | None,
    typer.Option(
        "--policies",
        envvar=POLICIES_ENV,
        help="Check the key against this policy file before making it.",
    ),
]


@app.command()
def create(
    agent: AgentOption,
    run: RunOption = None,
    expires: ExpiresOption = None,
    run_policy: RunPolicyOption = None,
    label: LabelOption = None,
    policies: PoliciesOption = None,
    by: ByOption = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Make a vault key and print it, once. Only its digest is stored."""
    from .._governor.governor import _who
    from .._loading import load_run_policy
    from .._vault import KEY_PREFIX, VaultKeys

    if not agent.strip():
        raise typer.BadParameter("must not be empty", param_hint="'--agent'")
    if run is not None and not run.strip():
        raise typer.BadParameter("must not be empty", param_hint="'--run'")
    loaded = None if run_policy is None else load_run_policy(run_policy)
    if policies is not None:
        _check_against(policies, agent, loaded)
    with open_database(db) as engine:
        made = VaultKeys(engine, hooks.now).create(
            agent, by=by or _who(), run=run, run_policy=loaded, expires_at=expires, label=label
        )
    if as_json:
        echo_json({"key": made.secret, **key_json(made.record)})
        return
    record = made.record
    typer.echo(made.secret)
    typer.echo(
        f"vault key {KEY_PREFIX}{record.id} for agent {record.agent!r}"
        + (f", run {record.run!r}" if record.run else "")
        + (", with a run policy" if record.run_policy else "")
        + (f", expires {fmt_time(record.expires_at)}" if record.expires_at else ", no expiry"),
        err=True,
    )
    typer.echo("this is the only time the key is shown: store it now", err=True)


@app.command("list")
def list_keys(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """List vault keys, newest first (never their secrets)."""
    from rich.table import Table

    from .._vault import KEY_PREFIX, VaultKeys

    with open_database(db) as engine:
        keys = VaultKeys(engine, hooks.now).list(include_revoked=include_revoked)
    if as_json:
        echo_json([key_json(k) for k in keys])
        return
    now = hooks.now()
    table = Table(title=plural(len(keys), "vault key"), title_justify="left")
    names = ("key", "state", "agent", "run", "run policy", "expires", "created", "label")
    add_columns(table, names, ids=("key",))
    for k in keys:
        table.add_row(
            f"{KEY_PREFIX}{k.id}",
            k.state(now),
            k.agent,
            k.run or "-",
            "yes" if k.run_policy else "-",
            fmt_time(k.expires_at) if k.expires_at else "never",
            f"{fmt_time(k.created_at)} by {k.created_by}",
            k.label or "-",
        )
    console().print(table)


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(metavar="KEY", help="The key's id (pmk_...).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (shown to refused requests).")],
    by: ByOption = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Revoke a vault key for good: every proxy refuses its next request."""
    from .._governor.governor import _who
    from .._vault import KEY_PREFIX, VaultKeys

    if not reason.strip():
        raise typer.BadParameter("must say why", param_hint="'--reason'")
    with open_database(db) as engine:
        revoked = VaultKeys(engine, hooks.now).revoke(key_id, by=by or _who(), reason=reason)
    if as_json:
        echo_json(key_json(revoked))
        return
    typer.echo(
        f"revoked vault key {KEY_PREFIX}{revoked.id} ({revoked.agent}) by {revoked.revoked_by} "
        f"at {fmt_time(revoked.revoked_at)}: {revoked.revoke_reason}"
    )
    typer.echo("every proxy on this ledger refuses its next request")


@app.command()
def failures(
    key_id: Annotated[
        str | None,
        typer.Argument(metavar="[KEY]", help="Only this key's (pmk_...), or 'unknown'."),
    ] = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Failed authentications at the proxy, counted per key and reason, latest first.

    Reasons: missing (no key sent), malformed, unknown (no such key), bad_secret (a known
    key's id with a wrong secret), expired, revoked. Keys that do not exist are counted
    together as 'unknown'.
    """
    from rich.table import Table

    from .._vault import VaultKeys

    with open_database(db) as engine:
        counted = VaultKeys(engine, hooks.now).failures(key_id)
    if as_json:
        echo_json([failure_json(f) for f in counted])
        return
    total = sum(f.count for f in counted)
    table = Table(title=plural(total, "failed authentication"), title_justify="left")
    add_columns(table, ("key", "reason", "count", "first", "last"), ids=("key",))
    for f in counted:
        row = failure_json(f)
        table.add_row(
            row["key"],
            f.reason,
            str(f.count),
            fmt_time(f.first_at),
            fmt_time(f.last_at),
        )
    console().print(table)
