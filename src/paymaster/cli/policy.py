"""``paymaster policy check``: validate a policy file and show what it allows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._errors import PolicyError
from .output import console, echo_json, fmt_money, fmt_time, money_json, plural, time_json
from .params import POLICIES_ENV, JsonOption
from .runtime import fail

# Imported inside the commands that need them (start-up time).
if TYPE_CHECKING:
    from rich.table import Table

    from .._money import Money
    from .._policy import EffectivePolicy, Policy, PolicySet, RunPolicy

__all__ = ["app"]

app = typer.Typer(help="Policy files.", no_args_is_help=True)


def _list(values: tuple[str, ...] | None) -> str:
    return "any" if values is None else ", ".join(values)


def _policy_json(policy: Policy) -> dict[str, Any]:
    return {
        "id": policy.id,
        "agent": policy.agent,
        "vendor": policy.vendor,
        "currency": policy.currency,
        "daily_cap": money_json(policy.daily_cap),
        "per_call_cap": money_json(policy.per_call_cap),
        "max_calls_per_day": policy.max_calls_per_day,
        "endpoints": list(policy.endpoints),
        "methods": None if policy.methods is None else list(policy.methods),
        "customers": None if policy.customers is None else list(policy.customers),
        "expires_at": time_json(policy.expires_at),
    }


def _effective_json(policy: EffectivePolicy) -> dict[str, Any]:
    return {
        "policy_id": policy.policy_id,
        "agent": policy.agent,
        "vendor": policy.vendor,
        "currency": policy.currency,
        "daily_cap": money_json(policy.daily_cap),
        "per_call_cap": money_json(policy.per_call_cap),
        "max_calls_per_day": policy.max_calls_per_day,
        "run_cap": money_json(policy.run_cap),
        "run_max_calls": policy.run_max_calls,
        "endpoint_allowlists": [list(a) for a in policy.endpoint_allowlists],
        "methods": None if policy.methods is None else list(policy.methods),
        "customer_allowlists": [list(a) for a in policy.customer_allowlists],
        "expires_at": time_json(policy.expires_at),
        "hash": policy.hash,
    }


def _policies_table(policies: PolicySet, title: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in (
        "id",
        "agent",
        "vendor",
        "currency",
        "daily cap",
        "per-call cap",
        "calls/day",
        "endpoints",
        "methods",
        "customers",
        "expiry",
    ):
        table.add_column(name, overflow="fold")
    for p in policies:
        table.add_row(
            p.id,
            p.agent,
            p.vendor,
            p.currency,
            fmt_money(p.daily_cap),
            fmt_money(p.per_call_cap),
            "any" if p.max_calls_per_day is None else str(p.max_calls_per_day),
            _list(p.endpoints),
            _list(p.methods),
            _list(p.customers),
            fmt_time(p.expires_at) if p.expires_at else "never",
        )
    return table


def _cap(money: Money | None, calls: int | None) -> str:
    parts = [money.format()] if money is not None else []
    if calls is not None:
        parts.append(plural(calls, "call"))
    return " / ".join(parts) or "none"


def _effective_table(effective: list[EffectivePolicy], title: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in (
        "policy",
        "agent",
        "vendor",
        "daily cap",
        "per-call cap",
        "run budget",
        "endpoints (all must allow)",
        "methods",
        "customers (all must allow)",
        "expiry",
        "hash",
    ):
        table.add_column(name, overflow="fold")
    for e in effective:
        table.add_row(
            e.policy_id,
            e.agent,
            e.vendor,
            _cap(e.daily_cap, e.max_calls_per_day),
            fmt_money(e.per_call_cap),
            _cap(e.run_cap, e.run_max_calls),
            " ∩ ".join(f"[{', '.join(a)}]" for a in e.endpoint_allowlists),
            _list(e.methods),
            " ∩ ".join(f"[{', '.join(a)}]" for a in e.customer_allowlists) or "any",
            fmt_time(e.expires_at) if e.expires_at else "never",
            e.hash[:12],
        )
    return table


def _matching(policies: PolicySet, run_policy: RunPolicy) -> list[Policy]:
    return [
        p
        for p in policies
        if (run_policy.vendor is None or run_policy.vendor == p.vendor)
        and (run_policy.currency is None or run_policy.currency == p.currency)
    ]


def _narrow(policy: Policy, run_policy: RunPolicy, run_file: Path) -> EffectivePolicy:
    from .._policy import effective_policy

    try:
        return effective_policy(policy, run_policy)
    except PolicyError as exc:
        raise PolicyError(f"{run_file}: against policy {policy.id!r}: {exc}") from None


@app.command()
def check(
    file: Annotated[
        Path, typer.Argument(envvar=POLICIES_ENV, help="The policy file (YAML, TOML or JSON).")
    ],
    run: Annotated[
        Path | None,
        typer.Option("--run", help="A run policy file: also show how it narrows each policy."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a policy file and print its policies.

    Exits 1 if the file is invalid, naming the file, the policy and the field. With --run,
    also shows the effective policy of that run policy against each policy it applies to.
    """
    from .._loading import load_policies, load_run_policy

    policies = load_policies(file)
    effective: list[EffectivePolicy] | None = None
    if run is not None:
        run_policy = load_run_policy(run)
        matching = _matching(policies, run_policy)
        if not matching:
            fail(
                f"{run}: the run policy matches no policy in {file} (vendor "
                f"{run_policy.vendor!r}, currency {run_policy.currency!r})"
            )
        effective = [_narrow(p, run_policy, run) for p in matching]
    if as_json:
        document: dict[str, Any] = {
            "file": str(file),
            "policies": [_policy_json(p) for p in policies],
        }
        if effective is not None:
            document["run_policy"] = str(run)
            document["effective"] = [_effective_json(e) for e in effective]
        echo_json(document)
        return
    out = console()
    valid = plural(len(policies), "valid policy", "valid policies")
    out.print(_policies_table(policies, f"{file}: {valid}"))
    if effective is not None:
        out.print(_effective_table(effective, f"effective with run policy {run}"))
