"""Reading a policy file's money amounts: ``"25.00 USD"``, ``"25.00"`` or an int, never a
float, in the policy's currency; and the bounds every cap must keep."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .._money import CURRENCY_EXPONENTS, MAX_AMOUNT, Money, is_currency, major_units

#: No cap may exceed what the ledger counts (:data:`paymaster._money.MAX_AMOUNT`).
MAX_MINOR_UNITS = MAX_AMOUNT


def _positive_cap(value: Money | None) -> Money | None:
    if value is not None:
        if value.amount <= 0:
            raise ValueError("must be positive")
        if value.amount > MAX_MINOR_UNITS:
            raise ValueError(f"must be at most {MAX_MINOR_UNITS} minor units")
    return value


@dataclass(frozen=True)
class _AmountInUnknownCurrency:
    """A bare amount of a policy whose ``currency`` is no ISO 4217 code (only while it is
    validated): its error names that code instead of claiming the amount has none."""

    value: Any
    currency: Any

    def __repr__(self) -> str:
        return repr(self.value)


def _mark_unknown_currency(data: Any, fields: Collection[str]) -> Any:
    """Wrap the bare amounts of ``fields`` in :class:`_AmountInUnknownCurrency` when the raw
    ``currency`` is given but unknown (the currency field reports its own error)."""
    if not isinstance(data, dict) or data.get("currency") is None:
        return data
    currency = data["currency"]
    if is_currency(str(currency).strip().upper()):
        return data
    marked = dict(data)
    for field in fields:
        value = marked.get(field)
        bare = isinstance(value, str) and not any(c.isalpha() for c in value)
        if bare or (isinstance(value, (int, Decimal)) and not isinstance(value, bool)):
            marked[field] = _AmountInUnknownCurrency(value, currency)
    return marked


def _money_field(value: Any, currency: str | None, field: str) -> Any:
    """Read a money value from a policy file: ``"25.00 USD"``, ``"25.00"`` or an int.

    Bare amounts are major units of the policy's currency (``100`` is $100 in a USD
    policy). A float is refused: YAML, JSON and TOML read an unquoted ``100.00`` as one,
    and a float keeps only about 16 digits of what was typed.
    """
    if value is None or isinstance(value, Money):
        return value
    if isinstance(value, dict):
        return value
    if isinstance(value, _AmountInUnknownCurrency):
        raise ValueError(
            f"unknown currency {value.currency!r}: {field} {value.value!r} is in the "
            "policy's currency, which must be an ISO 4217 code such as 'USD', 'EUR' or 'JPY'"
        )
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an amount such as '25.00 USD'")
    if isinstance(value, float):
        raise ValueError(
            f"{field} is the number {value!r}, read as a binary float: money must not be "
            f'a float; quote it, as in {field}: "{_typed(value, currency)}"'
        )
    if isinstance(value, (int, Decimal)):
        if currency is None:
            raise ValueError(f"{field} needs a currency: write it as '{value} USD'")
        return Money.of(value, currency)
    if isinstance(value, str):
        return Money.parse(value, default_currency=currency)
    raise ValueError(f"{field} must be an amount such as '25.00 USD'")


def _typed(value: float, currency: str | None) -> str:
    """``value`` as the text to quote: ``100.0`` in USD is ``100.00``."""
    text = repr(value)
    if currency is None or not is_currency(currency) or not text.replace(".", "").isdigit():
        return text  # no currency to format for, or nan, inf, 1e+20, a sign
    exponent = CURRENCY_EXPONENTS[currency]
    decimal = Decimal(text)
    if decimal != round(decimal, exponent):
        return text  # more decimals than the currency has: its own error says so
    return f"{decimal:.{exponent}f}"


def _is_bare(value: Any) -> bool:
    """An amount written without a currency (``"10.00"``, ``10``, ``Decimal("10")``)."""
    if isinstance(value, str):
        return not any(c.isalpha() for c in value)
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


def _bare_amount(value: str | int | Decimal, field: str) -> Decimal:
    """A run policy's amount without a currency, as a ``Decimal`` of major units."""
    try:
        return major_units(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: {exc}") from None
