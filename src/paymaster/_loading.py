"""Load policies and run policies from YAML, TOML or JSON files.

A file holds either a list of policies or a mapping with a ``policies`` list::

    policies:
      - id: refunds
        agent: refund-agent
        vendor: stripe
        currency: USD
        daily_cap: "500.00"
        per_call_cap: "50.00"
        endpoints: [/v1/refunds]

Errors name the file, the policy (its position and id) and the field.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ._errors import PolicyError
from ._policy import Policy, PolicySet, RunPolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["load_policies", "load_run_policy", "read_policy_file"]


def read_policy_file(path: str | Path) -> Any:
    """Parse a YAML, TOML or JSON file by its extension, with errors that name the file."""
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read the policy file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{file}: the policy file is not UTF-8 text: {exc}") from None
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{file}: not valid {suffix[1:].upper()}: {exc}") from exc
    raise PolicyError(f"{file}: unknown policy file type {suffix!r}; use .yaml, .toml or .json")


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(policy)"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"field '{loc}': {message}"


def _validate(model: type[BaseModel], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(_describe(e) for e in exc.errors())  # type: ignore[arg-type]
        raise PolicyError(f"{where}: {details}") from None


def load_policies(*paths: str | Path) -> PolicySet:
    """Load one or more policy files into a :class:`PolicySet`."""
    policies: list[Policy] = []
    for path in paths:
        policies.extend(_policies_in(Path(path)))
    try:
        return PolicySet(policies)
    except PolicyError as exc:
        names = ", ".join(str(p) for p in paths)
        raise PolicyError(f"{names}: {exc}") from None


def _policies_in(file: Path) -> Iterable[Policy]:
    data = read_policy_file(file)
    if isinstance(data, dict) and "policies" in data:
        extra = sorted(set(data) - {"policies", "version"})
        if extra:
            raise PolicyError(f"{file}: unknown top-level key(s) {extra}; expected 'policies'")
        data = data["policies"]
    if not isinstance(data, list):
        raise PolicyError(f"{file}: expected a list of policies (or a 'policies' list)")
    for index, raw in enumerate(data, start=1):
        label = raw.get("id") if isinstance(raw, dict) else None
        where = f"{file}: policy #{index}" + (f" ({label})" if label else "")
        yield _validate(Policy, raw, where)


def load_run_policy(path: str | Path) -> RunPolicy:
    """Load one run policy (a mapping of fields) from a YAML, TOML or JSON file."""
    file = Path(path)
    policy: RunPolicy = _validate(RunPolicy, read_policy_file(file), f"{file}: run policy")
    return policy
