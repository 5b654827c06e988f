"""The ``paymaster`` command: operate policies, budgets, the audit log and holds."""

from __future__ import annotations

import typer

app = typer.Typer(help="Operate paymaster: policies, budgets, the audit log, holds.")
