"""The ``paymaster`` command (see :mod:`paymaster.cli.app`)."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``paymaster`` command."""
    from .app import app

    app()
