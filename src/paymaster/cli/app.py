"""The ``paymaster`` command: operate policies, budgets, the audit log and holds.

Every command reads the ledger database URL from ``--db`` or ``PAYMASTER_DATABASE_URL``
(default ``sqlite:///paymaster.db``), and policy files from ``--policies`` or
``PAYMASTER_POLICIES`` where it needs them. Exit codes: see :mod:`paymaster.cli.runtime`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import audit, db, holds, keys, policy, runs
from .init import init
from .proxy import proxy
from .revoke import restore, revoke
from .runtime import PaymasterGroup
from .status import status

__all__ = ["app"]

app = typer.Typer(
    cls=PaymasterGroup,
    help="Operate paymaster: policies, budgets, the audit log, holds, the kill switch, "
    "vault keys and the governing proxy.\n\n"
    "Exit codes: 0 ok, 1 a problem found (invalid policy, unknown or resolved hold, "
    "tampered audit log), 2 bad input, 3 database unreachable or unusable.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"paymaster {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Operate paymaster: policies, budgets, the audit log, holds and the kill switch."""


app.command()(init)
app.add_typer(policy.app, name="policy")
app.command()(status)
app.add_typer(audit.app, name="audit")
app.add_typer(runs.app, name="runs")
app.command()(revoke)
app.command()(restore)
app.add_typer(holds.app, name="holds")
app.add_typer(db.app, name="db")
app.add_typer(keys.app, name="keys")
app.command()(proxy)
