"""A fresh machine installs paymaster the ordinary way: wheels built by ``make dist``, plain
pip, a new virtual environment, nothing from this checkout on the path.

The wheels are built as ``make dist`` builds them (``uv build --all-packages``), installed
with the machine's ``python3 -m venv`` and its pip (dependencies from the configured
index), and then used as a user would: the ``paymaster`` command, one governed call that
leaves a verified audit row, and both adapters imported without ``stripe``, which only the
prebuilt Stripe tools need (``paymaster[stripe]``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]

ONE_CALL = """
from paymaster import Governor, Money, Policy

policy = Policy(id="refunds", agent="refund-agent", vendor="stripe", currency="USD",
                daily_cap="100.00", endpoints=["/v1/refunds"])
with Governor("sqlite:///ledger.db", policies=[policy]) as gov:
    with gov.guard(agent="refund-agent", vendor="stripe", endpoint="/v1/refunds",
                   estimate=Money.parse("25.00 USD")) as call:
        call.settle(Money.parse("20.00 USD"))
    assert gov.audit.verify().ok
    print(gov.ledger.budgets()[0].committed.format())
"""

ADAPTERS_WITHOUT_STRIPE = """
import importlib.util
import paymaster_langchain, paymaster_openai_agents
assert importlib.util.find_spec("stripe") is None, "stripe came with the adapters"
try:
    paymaster_openai_agents.stripe_tools
except ModuleNotFoundError as missing:
    assert "pip install 'paymaster-openai-agents[stripe]'" in str(missing), missing
else:
    raise AssertionError("stripe_tools imported without stripe")
print("adapters ok")
"""


def _uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if not Path(found).exists():
        message = "uv is needed to build the wheels (make dist installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str | Path, cwd: Path) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_wheels_install_with_plain_pip_into_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(_uv(), "build", "--quiet", "--all-packages", "-o", dist, cwd=ROOT)
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == [
        "paymaster",
        "paymaster_langchain",
        "paymaster_openai_agents",
    ]
    assert len(list(dist.glob("*.tar.gz"))) == 3

    venv = tmp_path / "venv"
    python3 = shutil.which("python3") or sys.executable
    _run(python3, "-m", "venv", venv, cwd=tmp_path)
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    _run(pip, "install", "--quiet", *(dist / w for w in wheels), cwd=tmp_path)

    assert "Usage: paymaster" in _run(venv / "bin" / "paymaster", "--help", cwd=tmp_path)
    assert _run(python, "-c", ONE_CALL, cwd=tmp_path).strip() == "$20.00"
    verified = _run(
        venv / "bin" / "paymaster", "audit", "verify", "--db", "sqlite:///ledger.db", cwd=tmp_path
    )
    assert verified.startswith("ok: 1 audit row checked in 1 chain"), verified
    assert _run(python, "-c", ADAPTERS_WITHOUT_STRIPE, cwd=tmp_path).strip() == "adapters ok"
    # Installed from the wheels, not from this checkout.
    where = _run(python, "-c", "import paymaster; print(paymaster.__file__)", cwd=tmp_path)
    assert str(venv) in where and str(ROOT) not in where
