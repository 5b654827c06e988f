"""Alembic environment: paymaster always runs migrations on a connection it passes in."""

from __future__ import annotations

from alembic import context

from paymaster._schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by a bare `alembic` command
    raise RuntimeError("run paymaster migrations through paymaster.ensure_schema()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
