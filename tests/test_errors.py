"""Every exception paymaster raises to its callers derives from PaymasterError, and the tree
at the top of ``paymaster/_errors.py`` names each of them.

Found by walking the package (the fake vendors of ``paymaster.testing`` raise a vendor's
own errors, and underscored classes are internal control flow, so both are left out).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import paymaster
from paymaster import _errors as errors
from paymaster._errors import PaymasterError


def _public_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(paymaster.__path__, "paymaster."):
        name = module_info.name
        if ".migrations" in name or name.endswith("__main__") or ".testing" in name:
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                found[attr] = value
    return found


def test_every_public_exception_derives_from_paymaster_error() -> None:
    found = _public_exceptions()
    assert len(found) >= 15
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, PaymasterError))
    assert outside == []


def test_the_tree_in_errors_names_every_exception() -> None:
    assert errors.__doc__ is not None
    missing = sorted(name for name in _public_exceptions() if name not in errors.__doc__)
    assert missing == []


def test_value_errors_stay_value_errors() -> None:
    """Callers that caught ValueError before keep catching these."""
    from paymaster._audit import CheckpointError
    from paymaster._endpoints import InvalidPath
    from paymaster._money import CurrencyMismatch
    from paymaster.vendors.stripe._currency import StripeAmountError

    for cls in (CheckpointError, InvalidPath, CurrencyMismatch, StripeAmountError):
        assert issubclass(cls, ValueError) and issubclass(cls, PaymasterError)
