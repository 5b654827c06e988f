"""Optional dependencies: a missing one names the extra that installs it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from ._errors import PaymasterError

__all__ = ["EXTRAS", "MissingExtra", "requires"]

#: Each extra of ``pyproject.toml`` and the top-level modules it installs.
EXTRAS: dict[str, frozenset[str]] = {
    "postgres": frozenset({"psycopg", "psycopg_binary"}),
    "stripe": frozenset({"stripe"}),
    "proxy": frozenset({"stripe", "starlette", "uvicorn", "httptools", "uvloop", "httpx"}),
    "otel": frozenset({"opentelemetry"}),
    "testing": frozenset({"stripe", "localstripe"}),
}


class MissingExtra(PaymasterError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install.

    A :class:`ModuleNotFoundError` (``name`` is the missing module), so code that catches
    that still does."""


@contextmanager
def requires(extra: str, feature: str, *, package: str = "paymaster") -> Iterator[None]:
    """Import ``extra``'s modules inside this block: a missing one is re-raised as
    :class:`MissingExtra` saying ``pip install '<package>[<extra>]'`` (an adapter names
    itself as ``package``). A missing module the extra does not install is not this
    helper's to explain, and passes unchanged."""
    modules = EXTRAS[extra]
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or _named(str(exc))).split(".")[0]  # the package to install
        if isinstance(exc, MissingExtra) or top not in modules:
            raise
        raise MissingExtra(
            f"{feature} needs {top}, which is not installed: pip install '{package}[{extra}]'",
            name=top,
        ) from exc


def _named(message: str) -> str:
    """The module a ``No module named 'x'`` message names (an import hook may raise one
    without setting ``name``)."""
    match = re.search(r"No module named '([^']+)'", message)
    return match.group(1) if match else ""
