"""Run the ledger's prepared statements on the database driver's own cursor.

A governed call runs about eight statements. Through ``Connection.execute`` each one
costs some 60-90 µs of SQLAlchemy machinery (parameter construction, events, result
set-up) on top of the driver's own work, more than SQLite spends running it. The
statements in :mod:`paymaster._statements` are fixed, so this module compiles each one
once per dialect with SQLAlchemy's compiler (the SQL is still written in SQLAlchemy
Core, with its types' bind and result processing) and then runs it directly on the DBAPI
cursor of the caller's SQLAlchemy connection, inside the caller's transaction.

What SQLAlchemy would have done on an error is kept: a driver error is raised as the
same :class:`sqlalchemy.exc.DBAPIError` subclass (``IntegrityError``, ``OperationalError``,
...), and an error the dialect reads as a lost connection invalidates it first
(``connection_invalidated``), so the ledger's retry on a fresh connection is unchanged.
Not kept: engine-level ``before_cursor_execute`` events and ``echo`` logging do not see
these statements (the transaction's BEGIN and COMMIT still go through SQLAlchemy).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["BEGIN_OWED", "Rows", "run"]

#: In ``Connection.info``: the transaction has not sent its BEGIN yet (PostgreSQL engines
#: made by :func:`paymaster.connect`, whose driver connections are in autocommit mode).
BEGIN_OWED = "paymaster_begin_owed"

_Processor = Callable[[Any], Any]


class Rows:
    """What a statement returned: rows with attribute access (and ``_mapping``, as
    SQLAlchemy's rows have), and the count of rows it changed."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        """The first row, or ``None``."""
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        """The only row; a ``LookupError`` if there is none or more than one."""
        if len(self._rows) != 1:
            raise LookupError(f"expected exactly one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        """The first column of the first row, or ``None``."""
        return self._rows[0][0] if self._rows else None

    def all(self) -> list[Any]:
        """Every row."""
        return list(self._rows)


def _row_type(names: Sequence[str]) -> type[Any]:
    """A tuple type with a field per column and SQLAlchemy's ``_mapping``."""
    base = namedtuple("Row", names)  # type: ignore[misc]

    class Row(base):
        __slots__ = ()

        @property
        def _mapping(self) -> dict[str, Any]:
            return dict(zip(names, self, strict=True))

    return Row


@dataclass(frozen=True)
class _Bind:
    """One bind parameter: where its value comes from, and how the dialect stores it."""

    name: str  # in the SQL
    key: str  # in the caller's parameters
    value: Any  # a literal's value (when the caller gives none)
    required: bool
    process: _Processor | None

    def bound(self, params: Mapping[str, Any]) -> Any:
        if self.key in params:
            value = params[self.key]
        elif self.required:
            raise ValueError(f"a value is required for bind parameter {self.key!r}")
        else:
            value = self.value
        return value if self.process is None else self.process(value)


@dataclass(frozen=True)
class _Prepared:
    """One statement compiled for one dialect (and, for an INSERT, one set of columns)."""

    statement: ClauseElement  # kept alive: the cache is keyed by its id
    sql: str
    binds: tuple[_Bind, ...]
    #: Bind names in the order the driver takes them (``qmark``), or ``None`` (named).
    positions: tuple[str, ...] | None
    row: type[Any] | None
    result_processors: tuple[_Processor | None, ...]

    def parameters(self, params: Mapping[str, Any]) -> Any:
        """The driver's parameters: what SQLAlchemy's ``construct_params`` and its bind
        processors would have made of ``params``."""
        values = {bind.name: bind.bound(params) for bind in self.binds}
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)

    def rows(self, raw: list[Any]) -> list[Any]:
        assert self.row is not None
        processors = self.result_processors
        if not any(processors):
            return [self.row(*values) for values in raw]
        return [
            self.row(*(v if p is None else p(v) for p, v in zip(processors, values, strict=True)))
            for values in raw
        ]


#: By statement, dialect, driver and (for an INSERT) the columns given.
_PREPARED: dict[tuple[int, str, str, tuple[str, ...]], _Prepared] = {}


def _prepare(statement: ClauseElement, dialect: Dialect, keys: tuple[str, ...]) -> _Prepared:
    insert = isinstance(statement, Insert)
    if isinstance(statement, Insert):
        missing = [c.name for c in statement.table.c if c.default is not None and c.key not in keys]
        if missing:  # SQLAlchemy would fill these in; here they must be given
            raise ValueError(f"an INSERT run on the driver must give {missing}")
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) if insert else None)
    assert isinstance(compiled, SQLCompiler)
    if any(bind.expanding or bind.callable for bind in compiled.bind_names):
        raise ValueError("a statement run on the driver has plain binds only")
    binds = {  # a bind named twice in the SQL (``p_cap``) is one parameter
        name: _Bind(
            name,
            bind.key,
            bind.value,
            bind.required,
            bind.type.dialect_impl(dialect).bind_processor(dialect),
        )
        for bind, name in compiled.bind_names.items()
    }
    columns = list(getattr(statement, "exported_columns", ()))
    if columns:
        names = [column.key for column in columns]
        row: type[Any] | None = _row_type(names)
        result_processors = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        )
    else:
        row, result_processors = None, ()
    positions = tuple(compiled.positiontup or ()) if compiled.positional else None
    return _Prepared(
        statement, compiled.string, tuple(binds.values()), positions, row, result_processors
    )


def _wrapped(conn: Connection, exc: Exception, sql: str, params: Any, cursor: Any) -> Exception:
    """``exc`` as SQLAlchemy would have raised it, the connection invalidated if lost."""
    dialect = conn.dialect
    dbapi = dialect.loaded_dbapi
    if not isinstance(exc, dbapi.Error):
        return exc
    fairy = conn.connection
    lost = dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
    if lost and not conn.invalidated:
        # As SQLAlchemy's own error handling does (Connection._handle_dbapi_exception): a
        # lost connection means the server may have restarted, so every pooled connection
        # older than this error is replaced at its next checkout, not only this one;
        # otherwise the ledger's one retry would likely meet another dead connection.
        conn.engine.pool._invalidate(fairy, exc)
        conn.invalidate(exc)
    return DBAPIError.instance(
        sql, params, exc, dbapi.Error, connection_invalidated=lost, dialect=dialect
    )


def run(
    conn: Connection,
    statement: ClauseElement,
    params: Mapping[str, Any] | None = None,
    *,
    last: bool = False,
) -> Rows:
    """Run ``statement`` with ``params`` in ``conn``'s transaction, on its driver cursor.

    ``last``: the transaction's last statement. On PostgreSQL (psycopg 3) its COMMIT then
    goes in the same round trip (psycopg's pipeline mode), so that the row locks the
    transaction holds are released one round trip sooner; the caller's ``engine.begin()``
    still ends the transaction (psycopg's ``commit()`` with nothing open sends nothing). A
    failure of either raises here, as a failed COMMIT would have raised there. A BEGIN the
    transaction still owes (:data:`BEGIN_OWED`) goes in the same round trip too.
    """
    params = params or {}
    keys = tuple(params) if isinstance(statement, Insert) else ()
    dialect = conn.dialect
    key = (id(statement), dialect.name, dialect.driver, keys)
    prepared = _PREPARED.get(key)
    if prepared is None:
        prepared = _PREPARED[key] = _prepare(statement, dialect, keys)
    bound = prepared.parameters(params)
    driver = conn.connection.dbapi_connection
    assert driver is not None
    begin = conn.info.pop(BEGIN_OWED, False)
    cursor = None
    try:
        cursor = driver.cursor()
        if begin or (last and dialect.driver == "psycopg"):
            # One round trip: the pipeline's single sync waits for every statement in it.
            with driver.pipeline():
                if begin:
                    driver.execute("BEGIN")
                cursor.execute(prepared.sql, bound)
                if last:
                    driver.execute("COMMIT")
        else:
            cursor.execute(prepared.sql, bound)
        raw = list(cursor.fetchall()) if prepared.row is not None else []
        rowcount = cursor.rowcount
    except Exception as exc:
        wrapped = _wrapped(conn, exc, prepared.sql, bound, cursor)
        if wrapped is exc:
            raise
        raise wrapped from exc
    finally:
        if cursor is not None:
            cursor.close()
    rows = prepared.rows(raw) if raw else []
    return Rows(rows, rowcount)
