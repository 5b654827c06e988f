"""Least privilege on PostgreSQL: the grants of a role that runs paymaster but owns nothing.

The role that owns the ledger's tables (the one that runs the migrations) can drop the
audit table's append-only trigger, or the table. The role the governors, the proxy and the
operators' commands connect as needs far less: :func:`grants_sql` prints the ``GRANT`` and
``REVOKE`` statements that give a role exactly what the call path uses (reserve, settle,
release, unknown outcomes, operators' resolutions, revoke/restore, alerts, vault keys and
the proxy's replays) and no more. On ``paymaster_audit`` it may ``INSERT`` and ``SELECT``,
never ``UPDATE``, ``DELETE`` or ``TRUNCATE``; it owns no table, so it cannot alter or drop
a table or a trigger; and it creates nothing in the schema.

Run the statements as the owner, after ``paymaster db upgrade``, and again after every
upgrade (a new revision may add a table). ``paymaster db grants --role NAME`` prints them.
"""

from __future__ import annotations

import unicodedata
from importlib.resources import files

from ._schema import (
    alert,
    audit,
    audit_chain,
    auth_failure,
    budget,
    hold,
    metadata,
    proxy_replay,
    revocation,
    vault_key,
)

__all__ = ["SEQUENCES", "TABLE_PRIVILEGES", "grants_sql"]

#: What the role may do on each table, and why (each is used by the call path or by an
#: operator's command; nothing is granted "just in case").
TABLE_PRIVILEGES: dict[str, tuple[tuple[str, ...], str]] = {
    "alembic_version": (
        ("SELECT",),
        "the schema revision, read at start (a Governor runs no DDL on a schema at head)",
    ),
    budget.name: (
        ("SELECT", "INSERT", "UPDATE"),
        "a budget row per day and run: made on first use, taken and given back",
    ),
    hold.name: (
        ("SELECT", "INSERT", "UPDATE"),
        "reserve, settle, release, unknown, operators' resolutions and acknowledgements",
    ),
    audit.name: (
        ("SELECT", "INSERT"),
        "append-only: rows are written and read (verify, queries), never changed",
    ),
    audit_chain.name: (
        ("SELECT", "INSERT", "UPDATE"),
        "each agent type's chain head: made on its first row, moved by every row",
    ),
    revocation.name: (
        ("SELECT", "INSERT", "UPDATE"),
        "the kill switch: revoke inserts, restore marks a revocation lifted",
    ),
    alert.name: (
        ("SELECT", "INSERT"),
        "a row per budget threshold crossed (INSERT ... ON CONFLICT DO NOTHING RETURNING)",
    ),
    vault_key.name: (
        ("SELECT", "INSERT", "UPDATE"),
        "the proxy reads keys; `paymaster keys create` inserts, `keys revoke` updates",
    ),
    proxy_replay.name: (
        ("SELECT", "INSERT", "DELETE"),
        "responses the proxy replays to retries, purged after the replay window",
    ),
    auth_failure.name: (
        ("SELECT", "INSERT", "UPDATE"),
        "the proxy's count of failed authentications",
    ),
}

#: The id sequences behind the tables' BIGSERIAL keys: ``USAGE`` lets an INSERT take the
#: next id (``nextval``); no ``UPDATE``, so the role cannot ``setval`` them.
SEQUENCES: tuple[str, ...] = tuple(
    f"{table.name}_{table.autoincrement_column.name}_seq"
    for table in metadata.sorted_tables
    if table.autoincrement_column is not None
)

_DO_TAG = "$paymaster_grants$"


def _ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (taken exactly as written, case included)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_name(what: str, name: str) -> None:
    if not name or not name.strip():
        raise ValueError(f"the {what} name is empty")
    # A control or invisible character has no place in a name, and a line break would end
    # the comment the name is echoed in, turning the rest of it into SQL run as the owner.
    odd = [ch for ch in name if unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029"]
    if odd or _DO_TAG in name:
        shown = repr(odd[0]) if odd else repr(_DO_TAG)
        raise ValueError(
            f"the {what} name {name!r} contains {shown}, which a {what} name cannot contain; "
            "use a plain name"
        )
    if len(name.encode()) > 63:
        raise ValueError(f"the {what} name {name!r} is longer than PostgreSQL's 63 bytes")


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(files("paymaster") / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def _guard(role: str, schema: str) -> str:
    """A DO block that refuses a role for which grants and revokes would change nothing."""
    tables = ",\n            ".join(_literal(name) for name in TABLE_PRIVILEGES)
    who = _literal(role)
    return f"""\
DO {_DO_TAG}
DECLARE
    app CONSTANT name := {who};
    ledger CONSTANT name := {_literal(schema)};
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = app) THEN
        RAISE EXCEPTION 'role % does not exist: CREATE ROLE % LOGIN first', app, app;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = ledger) THEN
        RAISE EXCEPTION 'schema % does not exist: run paymaster db upgrade as the owner', ledger;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = app AND rolsuper) THEN
        RAISE EXCEPTION 'role % is a superuser: no grant restricts it', app;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = app AND rolcreaterole) THEN
        RAISE EXCEPTION 'role % has CREATEROLE: it could take the owner''s role', app;
    END IF;
    IF EXISTS (
        SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ledger AND c.relname IN (
            {tables}
        ) AND pg_has_role(app, c.relowner, 'MEMBER')
    ) THEN
        RAISE EXCEPTION 'role % owns the paymaster tables (or is a member of their owner): '
            'it could drop the audit trigger; run the grants for a role that owns nothing', app;
    END IF;
    IF EXISTS (
        SELECT FROM pg_namespace WHERE nspname = ledger AND pg_has_role(app, nspowner, 'MEMBER')
    ) THEN
        RAISE EXCEPTION 'role % owns schema % (or is a member of its owner): '
            'it could drop the paymaster tables', app, ledger;
    END IF;
    IF EXISTS (
        SELECT FROM pg_database
        WHERE datname = current_database() AND pg_has_role(app, datdba, 'MEMBER')
    ) THEN
        RAISE EXCEPTION 'role % owns this database (or is a member of its owner): '
            'it could drop it', app;
    END IF;
END
{_DO_TAG};"""


def grants_sql(role: str, *, schema: str = "public") -> str:
    """The SQL that makes ``role`` able to run paymaster on the tables in ``schema`` and
    unable to change or remove audit rows, tables or triggers.

    ``role`` and ``schema`` are taken exactly as PostgreSQL stores them (quoted, so case
    matters). Run the result as the tables' owner, in one transaction (it has its own
    ``BEGIN``/``COMMIT``): it first refuses a role that is a superuser, has CREATEROLE, or
    owns (or is a member of the owner of) the tables, the schema or the database.
    """
    _check_name("role", role)
    _check_name("schema", schema)
    if role.lower() == "public":
        raise ValueError("grant the ledger to one role, not to PUBLIC (every role)")
    app = _ident(role)
    ns = _ident(schema)

    def qualified(name: str) -> str:
        return f"{ns}.{_ident(name)}"

    tables = ",\n    ".join(qualified(name) for name in TABLE_PRIVILEGES)
    sequences = ",\n    ".join(qualified(name) for name in SEQUENCES)
    lines = [
        f"-- paymaster {_head()}: least-privilege grants for role {app} on schema {ns}.",
        "--",
        "-- Run as the owner of the paymaster tables, the role that runs the migrations:",
        '--   paymaster db grants --role NAME | psql "$OWNER_URL" -v ON_ERROR_STOP=1',
        "-- Migrations are not this role's: the owner runs `paymaster db upgrade` (with its",
        "-- own URL), then runs these grants again, since a new revision may add tables.",
        "-- Connected as this role, a Governor finds the schema at its head and runs no DDL;",
        "-- pass upgrade_schema=False so that it refuses an older schema instead of trying",
        "-- (and failing) to migrate it.",
        "--",
        "-- The role runs the whole call path: reserve, settle, release, unknown outcomes,",
        "-- resolve_hold, acknowledge_overrun, revoke/restore, alerts, vault keys and the",
        "-- proxy's replays, and appends audit rows. It cannot UPDATE, DELETE or TRUNCATE",
        "-- paymaster_audit, owns nothing (so cannot ALTER or DROP a table or its triggers),",
        "-- and creates nothing in the schema. It needs CONNECT on the database (PUBLIC has",
        "-- it by default). On PostgreSQL 14 and older every role may CREATE in schema",
        "-- public: REVOKE CREATE ON SCHEMA public FROM PUBLIC to take that away too.",
        "BEGIN;",
        _guard(role, schema),
        f"REVOKE ALL ON SCHEMA {ns} FROM {app};",
        f"GRANT USAGE ON SCHEMA {ns} TO {app};",
        "-- Start from nothing on every paymaster table and sequence, then grant.",
        f"REVOKE ALL ON TABLE\n    {tables}\nFROM {app};",
        f"REVOKE ALL ON SEQUENCE\n    {sequences}\nFROM {app};",
    ]
    for table, (privileges, why) in TABLE_PRIVILEGES.items():
        lines.append(f"-- {table}: {why}")
        lines.append(f"GRANT {', '.join(privileges)} ON TABLE {qualified(table)} TO {app};")
    lines.append("-- The id sequences: nextval only (no setval).")
    lines.extend(f"GRANT USAGE ON SEQUENCE {qualified(s)} TO {app};" for s in SEQUENCES)
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"
