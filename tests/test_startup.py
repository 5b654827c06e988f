"""Start-up stays light: what ``import paymaster`` and ``paymaster --help`` load (no timing
here; ``bench/startup_bench.py`` measures the seconds)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import paymaster

HEAVY = ("sqlalchemy", "alembic", "pydantic", "yaml", "rich")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split("\n")[-2]
    return set(out.split())


def test_import_paymaster_loads_no_heavy_dependency() -> None:
    assert _loaded_after("import paymaster") & set(HEAVY) == set()


def test_help_loads_neither_the_database_layer_nor_migrations() -> None:
    code = (
        "import contextlib, io, sys\n"
        "sys.argv = ['paymaster', '--help']\n"
        "from paymaster.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main()\n"
    )
    assert _loaded_after(code) & {"sqlalchemy", "alembic", "pydantic"} == set()


def test_every_public_name_still_resolves_to_its_module_object() -> None:
    for name in paymaster.__all__:
        value = getattr(paymaster, name)
        assert value is not None
        module = getattr(value, "__module__", None)
        if isinstance(value, type) and module and module.startswith("paymaster."):
            assert getattr(importlib.import_module(module), name) is value
    assert paymaster.Governor is importlib.import_module("paymaster._governor.governor").Governor
    assert paymaster.Outcome is importlib.import_module("paymaster._audit").Outcome
    assert paymaster._db is importlib.import_module("paymaster._db")
    assert set(paymaster.__all__) <= set(dir(paymaster))
