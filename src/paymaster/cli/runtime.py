"""What every command shares: the clock and sleep (replaceable in tests), opening the
database, and turning paymaster's exceptions into messages and exit codes.

Exit codes: 0 ok; 1 the command ran but found a problem (an invalid policy file, an
unknown or already resolved hold, an unknown vault key, a broken audit chain); 2 bad input
(usage errors, bad amounts or times); 3 the ledger database is unreachable or its schema
unusable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer.core import TyperGroup, TyperOption

from .._errors import (
    GovernanceUnavailable,
    HoldAlreadyResolved,
    HoldNotFound,
    PolicyError,
    SchemaVersionError,
)

# The ledger's modules (SQLAlchemy, alembic) are imported inside the functions that need
# them: `paymaster --help` and the policy commands never load them (start-up time).
if TYPE_CHECKING:
    from sqlalchemy import Engine

    from .._governor import Governor

__all__ = [
    "EXIT_PROBLEM",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "Hooks",
    "PaymasterGroup",
    "fail",
    "hooks",
    "open_database",
    "open_governor",
]

EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Hooks:
    """The clock and the sleep every command uses; tests replace them instead of sleeping."""

    now: Callable[[], datetime] = field(default=_utcnow)
    sleep: Callable[[float], None] = field(default=time.sleep)


hooks = Hooks()


def fail(message: str, code: int = EXIT_PROBLEM) -> NoReturn:
    """Print ``message`` on stderr and exit with ``code``."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


class PaymasterGroup(TyperGroup):
    """The root command: maps paymaster's exceptions raised by any subcommand to a message
    on stderr and an exit code (see the module docstring), and shows every command's
    boolean flags as flags in ``--help`` (:func:`_plain_flags`)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        _plain_flags(self)  # here, once Typer has added its completion options too
        return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (GovernanceUnavailable, SchemaVersionError) as exc:
            fail(str(exc), EXIT_UNAVAILABLE)
        except (PolicyError, HoldNotFound, HoldAlreadyResolved) as exc:
            fail(str(exc), EXIT_PROBLEM)
        except Exception as exc:
            if _is_vault_key_error(exc):
                fail(str(exc), EXIT_PROBLEM)
            if isinstance(exc, ValueError):  # bad amounts, currencies, reasons: to fix
                fail(str(exc), EXIT_USAGE)
            raise


def _plain_flags(command: Any) -> None:
    """Typer's Rich help gives a boolean flag its type, ``--json <bool>``, as if it took a
    value (``--json true`` is refused): an empty metavar shows it as the flag it is. For
    ``command``, its help option and every subcommand under it."""
    ctx = typer.Context(command, **command.context_settings)
    for param in command.get_params(ctx):  # with the help option, created and kept here
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)


def _is_vault_key_error(exc: Exception) -> bool:
    """Only a loaded :mod:`paymaster._vault` raises its errors: no need to import it."""
    vault = sys.modules.get("paymaster._vault")
    return vault is not None and isinstance(exc, vault.VaultKeyError)


def _engine(url: str) -> Engine:
    from sqlalchemy.exc import ArgumentError

    from .._db import connect, normalise_url

    try:
        return connect(normalise_url(url))
    except (ArgumentError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'--db'") from None
    except ModuleNotFoundError as exc:  # e.g. psycopg not installed
        raise typer.BadParameter(
            f"the driver for {url.split(':', 1)[0]} is not installed ({exc.name}); for "
            "PostgreSQL install paymaster[postgres]",
            param_hint="'--db'",
        ) from None


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from .._db import normalise_url

    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


@contextmanager
def open_database(url: str, *, create: bool = False, check_schema: bool = True) -> Iterator[Engine]:
    """An engine on the ledger at ``url``, disposed afterwards.

    Unless ``create``, the database must exist, and (with ``check_schema``) have this
    paymaster's schema: an operations command never creates a database by accident (a
    mistyped SQLite path) nor upgrades one behind the operator's back.
    """
    engine = _engine(url)  # a malformed URL is bad input (exit 2) before anything else
    try:
        file = _sqlite_file(url)
        if not create and file is not None and not file.exists():
            raise GovernanceUnavailable(
                f"no paymaster database at {file}: create it with `paymaster init` or "
                "`paymaster db upgrade`, or name another with --db / PAYMASTER_DATABASE_URL"
            )
        if not create and check_schema:
            _require_head(engine)
        yield engine
    finally:
        engine.dispose()


def _require_head(engine: Engine) -> None:
    from .._db import describe
    from .._operations import schema_state

    state = schema_state(engine)
    if state.is_head:
        return
    where = describe(engine)
    if state.current is None:
        raise SchemaVersionError(
            f"{where} has no paymaster schema: create it with `paymaster db upgrade`"
        )
    if not state.known:
        raise SchemaVersionError(
            f"{where} is at schema revision {state.current!r}, written by a newer paymaster "
            f"(this one knows up to {state.head!r}): upgrade paymaster"
        )
    raise SchemaVersionError(
        f"{where} is at schema revision {state.current!r}, this paymaster needs "
        f"{state.head!r}: run `paymaster db upgrade`"
    )


@contextmanager
def open_governor(url: str) -> Iterator[Governor]:
    """A :class:`Governor` for operations on the ledger at ``url`` (no policies are needed
    to revoke, restore or resolve holds)."""
    from .._governor import Governor

    with open_database(url) as engine:
        governor = Governor(engine, policies=[], clock=hooks.now, upgrade_schema=False)
        try:
            yield governor
        finally:
            governor.close()
