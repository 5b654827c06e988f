"""docs/api.md and ``paymaster.__all__`` describe the same stable API.

The page's tables name each public name in their first column; a name exported and not
documented, or documented and not exported, fails here instead of drifting.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import paymaster

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _documented_names() -> set[str]:
    names: set[str] = set()
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", first_cell))
    return names


def test_every_exported_name_is_documented_and_every_documented_name_exported() -> None:
    exported = set(paymaster.__all__) - {"__version__"}
    documented = _documented_names()
    assert sorted(exported - documented) == [], "exported but not in docs/api.md"
    assert sorted(documented - exported) == [], "in docs/api.md but not exported"


def test_the_stripe_names_the_page_lists_are_exported_there() -> None:
    from paymaster.vendors import stripe

    text = PAGE.read_text(encoding="utf-8")
    line = next(x for x in text.splitlines() if x.startswith("- `paymaster.vendors.stripe`"))
    block = text[text.index(line) : text.index("- `paymaster.testing`")]
    for name in re.findall(r"`([A-Za-z_]+)`", block.split(":", 1)[1]):
        assert name in stripe.__all__, name


def test_implementation_modules_are_private() -> None:
    public = {
        info.name
        for info in pkgutil.iter_modules(paymaster.__path__)
        if not info.name.startswith("_")
    }
    # Applications and the packages the page names; the rest is private.
    assert public == {"cli", "integrations", "migrations", "proxy", "testing", "vendors"}
    for name in public - {"migrations"}:
        importlib.import_module(f"paymaster.{name}")
