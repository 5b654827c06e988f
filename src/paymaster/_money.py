"""Exact money: integer minor units with an ISO 4217 currency code.

No float ever enters a money path. Amounts are held as ``int`` minor units
(cents, yen, fils) together with the currency whose exponent says how many
minor units make one major unit: 2 for USD, 0 for JPY (amount 500 is ¥500),
3 for KWD (amount 1500 is 1.500 KWD).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import (
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    Subnormal,
    Underflow,
)
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from ._errors import PaymasterError

__all__ = [
    "CURRENCY_EXPONENTS",
    "MAX_AMOUNT",
    "CurrencyMismatch",
    "Money",
    "currency_exponent",
    "is_currency",
    "major_units",
]

#: The largest amount in minor units (a cap, an estimate or an actual) that paymaster
#: counts: ten trillion in a two-decimal currency. A ledger's sums of many such amounts
#: stay far inside its 64-bit columns on every backend.
MAX_AMOUNT = 10**15

_ZERO_DECIMAL = ("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF").split()
_THREE_DECIMAL = "BHD IQD JOD KWD LYD OMR TND".split()
_FOUR_DECIMAL = "CLF UYW".split()
_TWO_DECIMAL = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN "
    "BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD EGP ERN "
    "ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HRK HTG HUF IDR ILS INR IRR JMD "
    "KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR "
    "MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB "
    "SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY "
    "TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG ZWL"
).split()

#: ISO 4217 currency code -> number of decimal places of its minor unit.
CURRENCY_EXPONENTS: dict[str, int] = {
    **{code: 2 for code in _TWO_DECIMAL},
    **{code: 0 for code in _ZERO_DECIMAL},
    **{code: 3 for code in _THREE_DECIMAL},
    **{code: 4 for code in _FOUR_DECIMAL},
}

_SYMBOLS: dict[str, str] = {
    "USD": "$",
    "EUR": "€",
    "GBP": "£",
    "JPY": "¥",
    "CNY": "CN¥",
    "KRW": "₩",
    "INR": "₹",
    "CAD": "CA$",
    "AUD": "A$",
    "NZD": "NZ$",
    "HKD": "HK$",
    "MXN": "MX$",
    "BRL": "R$",
    "ILS": "₪",
    "VND": "₫",
    "TWD": "NT$",
    "PHP": "₱",
    "NGN": "₦",
    "UAH": "₴",
}

# A currency is any word here, so that a wrong one ("5 US", "5 DOLLARS") is named as an
# unknown currency instead of the whole text being unreadable.
_PARSE_RE = re.compile(
    r"^\s*(?:(?P<cur1>[A-Za-z]+)\s+)?(?P<num>[+-]?[0-9][0-9_,]*(?:\.[0-9]+)?|[+-]?\.[0-9]+)"
    r"(?:\s+(?P<cur2>[A-Za-z]+))?\s*$"
)
# Commas are only thousands separators: "1,234.50" yes, "1,50" (a decimal comma) no.
_GROUPED_RE = re.compile(r"^[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?$")


def major_units(major: str | int | Decimal) -> Decimal:
    """An amount of major units in no particular currency (``"1,234.50"``, ``12``), read
    as :meth:`Money.of` reads it. Floats are refused."""
    if isinstance(major, (float, bool)):
        raise TypeError(
            f"refusing {type(major).__name__} {major!r} as money: pass a str or Decimal"
        )
    if isinstance(major, str) and "," in major and not _GROUPED_RE.match(major.strip()):
        raise ValueError(
            f"{major!r}: a comma may only group thousands, as in '1,234.50'; "
            "write decimals with a point"
        )
    try:
        value = (
            Decimal(str(major).replace("_", "").replace(",", ""))
            if isinstance(major, str)
            else Decimal(major)
        )
    except InvalidOperation:
        raise ValueError(f"{major!r} is not a decimal amount") from None
    if not value.is_finite():
        raise ValueError(f"{major!r} is not a finite amount")
    return value


class CurrencyMismatch(PaymasterError, ValueError):
    """Two amounts in different currencies were combined or compared."""


def is_currency(code: str) -> bool:
    """Whether ``code`` is an ISO 4217 currency code this package knows (upper case)."""
    return code in CURRENCY_EXPONENTS


def _normalise_currency(code: str) -> str:
    if not isinstance(code, str):
        raise TypeError(f"currency must be a str ISO 4217 code, got {type(code).__name__}")
    upper = code.strip().upper()
    if upper not in CURRENCY_EXPONENTS:
        raise ValueError(
            f"unknown currency {code!r}: use an ISO 4217 code such as 'USD', 'EUR' or 'JPY'"
        )
    return upper


def currency_exponent(code: str) -> int:
    """Decimal places of ``code``'s minor unit (USD 2, JPY 0, KWD 3)."""
    return CURRENCY_EXPONENTS[_normalise_currency(code)]


def _to_minor(major: Decimal, currency: str) -> int:
    exponent = CURRENCY_EXPONENTS[currency]
    # An exact context: wide enough never to round, trapping anything that would round,
    # overflow or underflow (the default 28-digit context silently rounded large amounts
    # and turned tiny ones into 0).
    exact = Context(
        prec=max(28, len(major.as_tuple().digits)),
        traps=[InvalidOperation, Inexact, Rounded, Overflow, Underflow, Subnormal],
    )
    try:
        scaled = major.scaleb(exponent, context=exact)
    except ArithmeticError:
        raise ValueError(f"{major} {currency} cannot be held exactly in minor units") from None
    if scaled != scaled.to_integral_value():
        raise ValueError(
            f"{major} {currency} has more decimal places than {currency} allows ({exponent})"
        )
    return int(scaled)


@dataclass(frozen=True, slots=True, order=False)
class Money:
    """An exact amount: ``amount`` minor units of ``currency``.

    >>> Money.parse("500.00 USD").amount
    50000
    >>> Money.of("500", "JPY").amount
    500
    """

    amount: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise TypeError(
                f"Money.amount must be an int of minor units, got {type(self.amount).__name__}; "
                "use Money.of('12.34', 'USD') or Money.parse('12.34 USD') for major units"
            )
        object.__setattr__(self, "currency", _normalise_currency(self.currency))

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def of(cls, major: str | int | Decimal, currency: str) -> Money:
        """Money from a major-unit amount: ``Money.of("12.34", "USD")`` is 1234 cents.

        Floats are refused: they cannot hold most decimal amounts exactly.
        """
        code = _normalise_currency(currency)
        return cls(_to_minor(major_units(major), code), code)

    @classmethod
    def parse(cls, text: str, default_currency: str | None = None) -> Money:
        """Parse ``"500.00 USD"``, ``"USD 500"``, ``"1,234.50 EUR"`` or, with a default
        currency, a bare ``"500"``."""
        if isinstance(text, Money):
            return text
        if not isinstance(text, str):
            raise TypeError(f"Money.parse takes a str, got {type(text).__name__}")
        match = _PARSE_RE.match(text)
        if not match:
            raise ValueError(
                f"cannot read {text!r} as money: write an amount and an ISO code, "
                "such as '500.00 USD' or '500 JPY'"
            )
        cur1, cur2 = match.group("cur1"), match.group("cur2")
        if cur1 and cur2:
            raise ValueError(f"{text!r} names its currency twice")
        currency = cur1 or cur2 or default_currency
        if currency is None:
            raise ValueError(f"{text!r} has no currency: write it as '{text.strip()} USD'")
        if (
            default_currency
            and (cur1 or cur2)
            and (_normalise_currency(cur1 or cur2 or "") != _normalise_currency(default_currency))
        ):
            raise CurrencyMismatch(
                f"{text!r} is in {(cur1 or cur2 or '').upper()}, expected {default_currency}"
            )
        return cls.of(match.group("num"), currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    @classmethod
    def from_minor(cls, amount: int, currency: str) -> Money:
        """From an integer in minor units, as Stripe's ``amount`` fields are."""
        return cls(amount, currency)

    # -- views --------------------------------------------------------------------------
    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENTS[self.currency]

    @property
    def minor(self) -> int:
        """Integer minor units (Stripe's ``amount``)."""
        return self.amount

    @property
    def major(self) -> Decimal:
        """The exact major-unit amount as a Decimal (12.34 for 1234 USD cents)."""
        # Built from the digits, not with scaleb: exact for any size of int.
        sign, digits, _ = Decimal(self.amount).as_tuple()
        return Decimal((sign, digits, -self.exponent))

    def format(self) -> str:
        """For people: ``$1,234.50``, ``¥500``, ``1.500 KWD``, ``-€3.00``."""
        exponent = self.exponent
        number = f"{self.major.copy_abs():,.{exponent}f}"
        sign = "-" if self.amount < 0 else ""
        symbol = _SYMBOLS.get(self.currency)
        if symbol:
            return f"{sign}{symbol}{number}"
        return f"{sign}{number} {self.currency}"

    def __str__(self) -> str:
        """Round-trips through :meth:`parse`: ``"1234.50 USD"``."""
        exponent = self.exponent
        return f"{self.major:.{exponent}f} {self.currency}"

    def __repr__(self) -> str:
        return f"Money({self.amount}, {self.currency!r})"

    # -- arithmetic and comparison (same currency only) --------------------------------
    def _same(self, other: object, op: str) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot {op} Money and {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot {op} {self.currency} and {other.currency}")
        return other

    def __add__(self, other: Money) -> Money:
        return Money(self.amount + self._same(other, "add").amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        return Money(self.amount - self._same(other, "subtract").amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __mul__(self, factor: int) -> Money:
        if isinstance(factor, bool) or not isinstance(factor, int):
            raise TypeError("Money can only be multiplied by an int")
        return Money(self.amount * factor, self.currency)

    __rmul__ = __mul__

    def __lt__(self, other: Money) -> bool:
        return self.amount < self._same(other, "compare").amount

    def __le__(self, other: Money) -> bool:
        return self.amount <= self._same(other, "compare").amount

    def __gt__(self, other: Money) -> bool:
        return self.amount > self._same(other, "compare").amount

    def __ge__(self, other: Money) -> bool:
        return self.amount >= self._same(other, "compare").amount

    def __bool__(self) -> bool:
        return self.amount != 0

    # -- pydantic integration -----------------------------------------------------------
    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any) -> Money:
            if isinstance(value, Money):
                return value
            if isinstance(value, str):
                return cls.parse(value)
            if isinstance(value, dict) and set(value) == {"amount", "currency"}:
                try:
                    return cls(value["amount"], value["currency"])
                except TypeError as exc:  # pydantic reports only ValueErrors as invalid input
                    raise ValueError(str(exc)) from None
            raise ValueError(
                "expected money as a string such as '25.00 USD' "
                "or {'amount': <minor units>, 'currency': 'USD'}"
            )

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )
