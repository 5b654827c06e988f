"""``paymaster db upgrade | current | grants``: the ledger's schema (Alembic migrations
shipped in the package) and the grants of a least-privilege PostgreSQL role."""

from __future__ import annotations

from typing import Annotated

import typer

from .output import echo_json
from .params import DEFAULT_DB, DbOption, JsonOption
from .runtime import open_database

__all__ = ["app"]

app = typer.Typer(help="The ledger database's schema.", no_args_is_help=True)


@app.command()
def upgrade(db: DbOption = DEFAULT_DB, as_json: JsonOption = False) -> None:
    """Create the schema, or upgrade it to this paymaster's head."""
    from .._db import describe
    from .._operations import upgrade_schema

    with open_database(db, create=True) as engine:
        before, head = upgrade_schema(engine)
        where = describe(engine)
    if as_json:
        echo_json({"database": where, "before": before, "current": head, "head": head})
    elif before == head:
        typer.echo(f"{where} is already at the head revision {head}")
    else:
        typer.echo(f"{where} upgraded from {before or 'an empty database'} to {head}")


@app.command()
def current(db: DbOption = DEFAULT_DB, as_json: JsonOption = False) -> None:
    """Print the database's schema revision and whether it is this paymaster's head."""
    from .._db import describe
    from .._operations import schema_state

    with open_database(db, check_schema=False) as engine:
        state = schema_state(engine)
        where = describe(engine)
    if as_json:
        echo_json(
            {
                "database": where,
                "current": state.current,
                "head": state.head,
                "is_head": state.is_head,
                "known": state.known,
            }
        )
        return
    if state.is_head:
        typer.echo(f"{where}: {state.current} (head)")
    elif state.current is None:
        typer.echo(
            f"{where}: no paymaster schema; `paymaster db upgrade` creates it (head {state.head})"
        )
    elif not state.known:
        typer.echo(
            f"{where}: {state.current}, unknown to this paymaster (head {state.head}): "
            "written by a newer paymaster"
        )
    else:
        typer.echo(
            f"{where}: {state.current}, not the head {state.head}: run `paymaster db upgrade`"
        )


@app.command()
def grants(
    role: Annotated[
        str,
        typer.Option(
            "--role",
            help="The PostgreSQL role the governors and the proxy connect as (exactly as "
            "stored: quoted, case matters). It must exist and own nothing.",
        ),
    ],
    schema: Annotated[
        str, typer.Option("--schema", help="The schema that holds the paymaster tables.")
    ] = "public",
) -> None:
    """Print the SQL (GRANT/REVOKE) for a PostgreSQL role that runs paymaster but cannot
    change or delete audit rows, nor alter or drop tables and triggers. Run it as the
    tables' owner (the role that runs `paymaster db upgrade`), e.g. piped to psql."""
    from .._grants import grants_sql

    typer.echo(grants_sql(role, schema=schema), nl=False)
