"""Engines for the ledger: SQLite (embedded default) and PostgreSQL (psycopg 3).

SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write transaction, so that
writers serialise at BEGIN instead of failing at COMMIT. Read-only work opts out with
:func:`read_only`. PostgreSQL: READ COMMITTED; the cap's correctness comes from the row
lock of the conditional UPDATE, nothing else.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from . import _driver
from ._errors import GovernanceUnavailable, SchemaVersionError
from ._extras import requires

if TYPE_CHECKING:  # alembic is imported by the functions that need it (start-up time)
    from alembic.config import Config

__all__ = [
    "SQLiteSync",
    "connect",
    "ensure_schema",
    "is_configured",
    "read_only",
    "unavailable_on_error",
]

log = logging.getLogger("paymaster.db")

SQLiteSync = Literal["FULL", "NORMAL", "EXTRA"]
_READ_ONLY = "paymaster_read_only"
_MIGRATION_LOCK_KEY = 0x7061796D  # "paym": serialises concurrent first-use migrations (DDL only)

#: SQLite's BEGINs, run on the driver's cursor (:mod:`._driver`): one per transaction.
_BEGIN_DEFERRED = text("BEGIN")
_BEGIN_IMMEDIATE = text("BEGIN IMMEDIATE")

_CONFIGURED: weakref.WeakSet[Engine] = weakref.WeakSet()


def normalise_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` use psycopg 3; anything else is left as given."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def connect(
    url: str,
    *,
    sqlite_synchronous: SQLiteSync = "FULL",
    busy_timeout_ms: int = 30_000,
    pool_size: int = 10,
    connect_timeout_s: int = 5,
) -> Engine:
    """Create an engine configured for the ledger's transactions."""
    url = normalise_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"{url!r} is not a database URL: for a SQLite file write "
            f"'sqlite:///{url}', for PostgreSQL 'postgresql+psycopg://user@host/db'"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError(
                "the ledger needs a SQLite file that other processes can share, e.g. "
                "'sqlite:///paymaster.db'; an in-memory database is not durable"
            )
        engine = create_engine(
            parsed,
            connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size * 2,
        )
        _configure_sqlite(engine, sqlite_synchronous, busy_timeout_ms)
        _CONFIGURED.add(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        with requires("postgres", "a PostgreSQL ledger"):
            engine = create_engine(
                parsed,
                pool_size=pool_size,
                max_overflow=pool_size * 2,
                # No pre-ping (a round trip per transaction): a transaction that meets a
                # dead pooled connection fails before anything is written, the pool is
                # invalidated, and the ledger retries it once on a fresh connection.
                connect_args={"connect_timeout": connect_timeout_s},
            )
        _configure_postgres(engine)
        return engine
    raise ValueError(
        f"unsupported ledger database {parsed.get_backend_name()!r}: "
        "use 'sqlite:///path.db' or 'postgresql+psycopg://user@host/db'"
    )


def _configure_postgres(engine: Engine) -> None:
    """BEGIN goes with the transaction's first statement instead of in a round trip of
    its own (psycopg sends it alone, and waits): two round trips fewer per governed call.

    The driver connection is put in autocommit mode, and every transaction SQLAlchemy
    begins owes a BEGIN (:data:`paymaster._driver.BEGIN_OWED`): the ledger's statements
    send it in one pipeline with themselves (:func:`paymaster._driver.run`), any other
    statement sends it just before itself. COMMIT and ROLLBACK are unchanged: psycopg
    sends them whenever a transaction is open, and nothing when none was begun. (A flag
    left by a transaction that ran no statement is harmless: every transaction's begin
    sets it again before its first statement.)"""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.autocommit = True

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.info[_driver.BEGIN_OWED] = True

    @event.listens_for(engine, "before_cursor_execute")
    def _before_execute(conn: Connection, cursor: Any, *_: Any) -> None:
        if conn.info.pop(_driver.BEGIN_OWED, False):
            cursor.execute("BEGIN")


def _configure_sqlite(engine: Engine, synchronous: SQLiteSync, busy_timeout_ms: int) -> None:
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError("sqlite_synchronous must be FULL, NORMAL or EXTRA")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read = conn.get_execution_options().get(_READ_ONLY)
        _driver.run(conn, _BEGIN_DEFERRED if read else _BEGIN_IMMEDIATE)


@contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """A connection for queries: on SQLite it does not take the write lock."""
    with unavailable_on_error(engine, "reading", "so nothing was read"), engine.connect() as conn:
        conn = conn.execution_options(**{_READ_ONLY: True})
        with conn.begin():
            yield conn


def describe(engine: Engine) -> str:
    """The database URL without its password, for error messages."""
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def unavailable_on_error(
    engine: Engine, action: str, consequence: str = "so the call was not made"
) -> Iterator[None]:
    """Re-raise database failures (not integrity errors) as :class:`GovernanceUnavailable`,
    saying what was being done and what that means for the call."""
    try:
        yield
    except IntegrityError:
        raise
    except (DBAPIError, PoolTimeout) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise GovernanceUnavailable(
            f"paymaster ledger {describe(engine)} is unavailable while {action}, "
            f"{consequence}: {reason}"
        ) from exc


def is_configured(engine: Engine) -> bool:
    """Whether ``engine`` can carry the ledger: made by :func:`connect`, or PostgreSQL."""
    return engine in _CONFIGURED or engine.dialect.name == "postgresql"


def _alembic_config(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("paymaster") / "migrations"))
    config.attributes["connection"] = conn
    return config


def ensure_schema(engine: Engine, *, upgrade: bool = True) -> str:
    """Create or upgrade the schema to this version's head; return the revision.

    Concurrent first use by many processes is serialised (``BEGIN IMMEDIATE`` on SQLite,
    a transaction-scoped advisory lock on PostgreSQL, for the DDL only). A database at a
    revision this version does not know (written by a newer paymaster) is refused.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    consequence = "so nothing can be governed"
    with unavailable_on_error(engine, "checking the schema", consequence), engine.connect() as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            config = _alembic_config(conn)
            script = ScriptDirectory.from_config(config)
            head = script.get_current_head()
            assert head is not None
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return head
            known = {rev.revision for rev in script.walk_revisions()}
            if current is not None and current not in known:
                raise SchemaVersionError(
                    f"database {describe(engine)} is at schema revision {current!r}, which this "
                    f"paymaster does not know (it knows up to {head!r}): upgrade paymaster"
                )
            if not upgrade:
                raise SchemaVersionError(
                    f"database {describe(engine)} is at schema revision {current!r}, this "
                    f"paymaster needs {head!r}: upgrade it with Governor(..., upgrade_schema=True) "
                    "or paymaster.ensure_schema(engine)"
                )
            log.info("upgrading %s from %s to %s", describe(engine), current, head)
            command.upgrade(config, "head")
        return head
