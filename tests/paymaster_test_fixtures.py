"""The shared fixtures of paymaster's tests and of the adapters' tests (a pytest plugin).

``tests/conftest.py`` and each ``adapters/<name>/tests/conftest.py`` import the fixtures
from here (``tests`` is on ``sys.path``: the ``pythonpath`` of the root pytest config), so
the adapters' tests get the same ``make_governor`` (its audit log verified at teardown),
``db_url`` and ``clock`` as paymaster's own.

Every ledger test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``PAYMASTER_TEST_POSTGRES_URL`` (e.g.
``postgresql+psycopg://root@127.0.0.1:5432/test``). Without it the PostgreSQL cases skip
with that reason; with ``CI=true`` a missing or unreachable PostgreSQL fails instead.
Each test gets its own schema (PostgreSQL) or file (SQLite), so tests never share state.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from paymaster import Governor, Policy

# What every conftest re-exports (``from paymaster_test_fixtures import *``): the fixtures,
# and the helpers tests import with ``from conftest import ...``. Every conftest exports
# the same names because whichever conftest pytest imported last is ``conftest`` then.
__all__ = [
    "IN_CI",
    "PG_ENV",
    "Clock",
    "_pg_schema_url",
    "clock",
    "db_url",
    "make_governor",
    "pg_admin_url",
    "refund_policy",
]

PG_ENV = "PAYMASTER_TEST_POSTGRES_URL"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_base_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url:
        if IN_CI:
            pytest.fail(f"CI=true but {PG_ENV} is not set: PostgreSQL tests must run in CI")
        return None
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if "+" not in url else url


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    url = _pg_base_url()
    if url is None:
        pytest.skip(f"PostgreSQL tests skipped: set {PG_ENV} to a PostgreSQL URL to run them")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        message = f"PostgreSQL at {PG_ENV} is unreachable: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    finally:
        engine.dispose()
    return url


def _pg_schema_url(admin_url: str) -> tuple[str, Callable[[], None]]:
    schema = "t_" + uuid.uuid4().hex[:12]
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in admin_url else "?"
    url = f"{admin_url}{sep}options={quote(f'-csearch_path={schema}')}"

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()

    return url, drop


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    url, drop = _pg_schema_url(admin)
    try:
        yield url
    finally:
        drop()


class Clock:
    """An injectable clock: tests move time instead of sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refund_policy(**overrides: object) -> Policy:
    """The policy most tests use: refunds for refund-agent, $100 a day, $50 a call."""
    fields: dict[str, object] = {
        "id": "refunds",
        "agent": "refund-agent",
        "vendor": "stripe",
        "currency": "USD",
        "daily_cap": "100.00",
        "per_call_cap": "50.00",
        "endpoints": ["/v1/refunds"],
    }
    fields.update(overrides)
    return Policy.model_validate(fields)


@pytest.fixture
def make_governor(
    db_url: str, clock: Clock, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Governor]]:
    """Build governors on this test's database (several share it, like processes do).

    When the test ends, its audit log must verify: whatever a test did through the public
    API (the adapters, the Stripe client and tools, refusals, overruns, reconciliations),
    every row it left is one ``paymaster audit verify`` accepts. Tests that tamper with
    the log on purpose are marked ``tampers_with_audit``.
    """
    made: list[Governor] = []

    def make(*policies: Policy, **kwargs: object) -> Governor:
        kwargs.setdefault("clock", clock)
        gov = Governor(db_url, policies=list(policies) or [refund_policy()], **kwargs)  # type: ignore[arg-type]
        made.append(gov)
        return gov

    yield make
    try:
        if made and request.node.get_closest_marker("tampers_with_audit") is None:
            result = made[0].audit.verify()
            assert result.ok, f"the test left an audit log that does not verify: {result}"
    finally:
        for gov in made:
            gov.close()
