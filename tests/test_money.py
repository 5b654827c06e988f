"""Money: integer minor units plus an ISO 4217 code, never floats."""

from __future__ import annotations

import pickle
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from paymaster._money import CURRENCY_EXPONENTS, CurrencyMismatch, Money, currency_exponent

# -- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500.00 USD", Money(50000, "USD")),
        ("USD 500", Money(50000, "USD")),
        ("1,234.50 EUR", Money(123450, "EUR")),
        ("1,234,567.89 USD", Money(123456789, "USD")),
        ("  12.3 GBP  ", Money(1230, "GBP")),
        ("-12.34 USD", Money(-1234, "USD")),
        ("+5 USD", Money(500, "USD")),
        (".5 USD", Money(50, "USD")),
        ("500 JPY", Money(500, "JPY")),
        ("1.500 KWD", Money(1500, "KWD")),
        ("500.00 usd", Money(50000, "USD")),
        ("usd 1", Money(100, "USD")),
    ],
)
def test_parse_reads_amount_and_code(text: str, expected: Money) -> None:
    assert Money.parse(text) == expected


def test_parse_uses_default_currency_for_a_bare_number() -> None:
    assert Money.parse("25", default_currency="EUR") == Money(2500, "EUR")


def test_parse_without_any_currency_is_rejected() -> None:
    with pytest.raises(ValueError, match="no currency"):
        Money.parse("25.00")


def test_parse_rejects_a_currency_that_differs_from_the_default() -> None:
    with pytest.raises(CurrencyMismatch, match="EUR"):
        Money.parse("25.00 EUR", default_currency="USD")


def test_parse_rejects_currency_named_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        Money.parse("USD 5 USD")


@pytest.mark.parametrize(
    "text", ["", "USD", "five USD", "$5", "5USD", "5 US", "5 USDX", "1.2.3 USD", "NaN USD"]
)
def test_parse_rejects_text_that_is_not_money(text: str) -> None:
    with pytest.raises(ValueError):
        Money.parse(text)


@pytest.mark.parametrize("text", ["1,50 EUR", "12,34 USD", "1,2345 USD", "1,,000 USD"])
def test_parse_rejects_commas_that_are_not_thousands_separators(text: str) -> None:
    # "1,50 EUR" in decimal-comma notation is €1.50; reading it as €150 would be 100x off.
    with pytest.raises(ValueError, match="comma"):
        Money.parse(text)


def test_parse_refuses_non_str() -> None:
    with pytest.raises(TypeError):
        Money.parse(500)  # type: ignore[arg-type]


def test_parse_returns_money_unchanged() -> None:
    m = Money(1, "USD")
    assert Money.parse(m) is m  # type: ignore[arg-type]


# -- Money.of and currency exponents --------------------------------------------------


def test_of_usd_has_two_decimals() -> None:
    assert Money.of("12.34", "USD").amount == 1234


def test_of_jpy_is_zero_decimal() -> None:
    # 500 is ¥500, not ¥5.
    assert Money.of("500", "JPY").amount == 500


def test_of_jpy_accepts_trailing_zero_decimals() -> None:
    assert Money.of("500.00", "JPY").amount == 500


def test_of_jpy_rejects_fractional_yen() -> None:
    with pytest.raises(ValueError, match="decimal places"):
        Money.of("500.5", "JPY")


@pytest.mark.parametrize("code", ["KWD", "BHD", "JOD"])
def test_of_three_decimal_currencies(code: str) -> None:
    assert Money.of("1.5", code).amount == 1500
    assert Money.of("1.234", code).amount == 1234


def test_of_rejects_more_decimals_than_kwd_allows() -> None:
    with pytest.raises(ValueError, match="decimal places"):
        Money.parse("1.2345 KWD")


def test_of_rejects_a_fraction_of_a_cent() -> None:
    with pytest.raises(ValueError, match="decimal places"):
        Money.of("0.001", "USD")


def test_of_accepts_int_and_decimal() -> None:
    assert Money.of(5, "USD") == Money(500, "USD")
    assert Money.of(Decimal("0.10"), "USD") == Money(10, "USD")


def test_of_accepts_underscore_and_thousands_comma_in_strings() -> None:
    assert Money.of("1_000", "USD") == Money(100000, "USD")
    assert Money.of("1,000.25", "USD") == Money(100025, "USD")


@pytest.mark.parametrize("bad", ["abc", "", "NaN", "Infinity", "-inf"])
def test_of_rejects_non_finite_or_non_numeric(bad: str) -> None:
    with pytest.raises(ValueError):
        Money.of(bad, "USD")


def test_of_is_exact_beyond_decimal_context_precision() -> None:
    # 31 significant digits: more than the default 28-digit Decimal context holds.
    text = "12345678901234567890123456789.01"
    assert Money.of(text, "USD").amount == 1234567890123456789012345678901


def test_of_rejects_a_tiny_amount_instead_of_rounding_it_to_zero() -> None:
    with pytest.raises(ValueError):
        Money.of("1e-9999999", "USD")


def test_of_rejects_an_absurdly_large_exponent_with_value_error() -> None:
    with pytest.raises(ValueError):
        Money.of("1e999999", "USD")


def test_currency_exponents() -> None:
    assert currency_exponent("usd") == 2
    assert currency_exponent("JPY") == 0
    assert currency_exponent("KWD") == 3
    assert currency_exponent("CLF") == 4


def test_every_known_currency_is_an_upper_case_three_letter_code() -> None:
    assert all(len(c) == 3 and c.isalpha() and c.isupper() for c in CURRENCY_EXPONENTS)
    assert set(CURRENCY_EXPONENTS.values()) == {0, 2, 3, 4}


# -- floats refused -------------------------------------------------------------------


def test_of_refuses_float() -> None:
    with pytest.raises(TypeError, match="float"):
        Money.of(0.1, "USD")  # type: ignore[arg-type]


def test_of_refuses_bool() -> None:
    with pytest.raises(TypeError):
        Money.of(True, "USD")  # type: ignore[arg-type]


def test_constructor_refuses_float() -> None:
    with pytest.raises(TypeError, match="int of minor units"):
        Money(12.5, "USD")  # type: ignore[arg-type]


def test_constructor_refuses_float_even_when_integral() -> None:
    with pytest.raises(TypeError):
        Money(500.0, "USD")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, Decimal("5"), "500", None])
def test_constructor_refuses_non_int_amounts(bad: object) -> None:
    with pytest.raises(TypeError):
        Money(bad, "USD")  # type: ignore[arg-type]


# -- currencies -----------------------------------------------------------------------


def test_unknown_currency_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"unknown currency 'XYZ'.*ISO 4217"):
        Money(100, "XYZ")


def test_unknown_currency_rejected_by_parse_and_of() -> None:
    with pytest.raises(ValueError, match="unknown currency"):
        Money.parse("5.00 XYZ")
    with pytest.raises(ValueError, match="unknown currency"):
        Money.of("5", "XYZ")


def test_lower_case_currency_is_normalised() -> None:
    m = Money(100, "usd")
    assert m.currency == "USD"
    assert m == Money(100, "USD")
    assert Money.of("1", " eur ").currency == "EUR"


def test_non_str_currency_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Money(100, 840)  # type: ignore[arg-type]


# -- arithmetic and comparison --------------------------------------------------------


def test_same_currency_add_and_subtract() -> None:
    assert Money(150, "USD") + Money(50, "USD") == Money(200, "USD")
    assert Money(150, "USD") - Money(200, "USD") == Money(-50, "USD")


def test_negation_and_int_multiplication() -> None:
    assert -Money(5, "EUR") == Money(-5, "EUR")
    assert Money(5, "EUR") * 3 == Money(15, "EUR")
    assert 3 * Money(5, "EUR") == Money(15, "EUR")


@pytest.mark.parametrize("factor", [1.5, Decimal("2"), True])
def test_multiplication_only_by_int(factor: object) -> None:
    with pytest.raises(TypeError):
        Money(5, "EUR") * factor  # type: ignore[operator]


def test_same_currency_comparison() -> None:
    small, big = Money(100, "USD"), Money(200, "USD")
    assert small < big
    assert small <= big
    assert big > small
    assert big >= small
    assert small <= Money(100, "USD")
    assert small >= Money(100, "USD")
    assert not small > Money(100, "USD")


def test_truthiness_is_nonzero_amount() -> None:
    assert not Money.zero("USD")
    assert Money(1, "USD")


@pytest.mark.parametrize(
    "operation",
    [
        lambda a, b: a + b,
        lambda a, b: a - b,
        lambda a, b: a < b,
        lambda a, b: a <= b,
        lambda a, b: a > b,
        lambda a, b: a >= b,
    ],
    ids=["add", "sub", "lt", "le", "gt", "ge"],
)
def test_cross_currency_operations_raise_currency_mismatch(operation: object) -> None:
    with pytest.raises(CurrencyMismatch, match="USD and EUR"):
        operation(Money(100, "USD"), Money(100, "EUR"))  # type: ignore[operator]


def test_currency_mismatch_is_a_value_error() -> None:
    assert issubclass(CurrencyMismatch, ValueError)


def test_adding_a_plain_int_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Money(100, "USD") + 1  # type: ignore[operator]


def test_equality_needs_the_same_currency() -> None:
    assert Money(100, "USD") != Money(100, "EUR")
    assert Money(0, "USD") != Money(0, "JPY")


def test_money_is_hashable_and_immutable() -> None:
    assert len({Money(1, "USD"), Money(1, "usd"), Money(1, "EUR")}) == 2
    with pytest.raises(AttributeError):
        Money(1, "USD").amount = 2  # type: ignore[misc]


def test_money_pickles() -> None:
    m = Money(1234, "KWD")
    assert pickle.loads(pickle.dumps(m)) == m


# -- views and formatting -------------------------------------------------------------


def test_major_is_an_exact_decimal() -> None:
    assert Money(1234, "USD").major == Decimal("12.34")
    assert Money(1500, "KWD").major == Decimal("1.500")
    assert Money(500, "JPY").major == Decimal("500")
    assert Money(1234, "USD").minor == 1234


def test_major_is_exact_for_huge_amounts() -> None:
    assert Money(10**40 + 1, "USD").major == Decimal("1" + "0" * 38 + ".01")


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (Money(123450, "USD"), "$1,234.50"),
        (Money(500, "JPY"), "¥500"),
        (Money(1500, "KWD"), "1.500 KWD"),
        (Money(-300, "EUR"), "-€3.00"),
        (Money(-123450, "USD"), "-$1,234.50"),
        (Money(-1, "KWD"), "-0.001 KWD"),
        (Money(0, "USD"), "$0.00"),
        (Money(5, "USD"), "$0.05"),
        (Money(100000000, "JPY"), "¥100,000,000"),
        (Money(1234567, "CHF"), "12,345.67 CHF"),
    ],
)
def test_format_for_people(money: Money, text: str) -> None:
    assert money.format() == text


def test_format_is_exact_for_huge_amounts() -> None:
    assert Money(10**30 + 1, "USD").format() == "$10,000,000,000,000,000,000,000,000,000.01"


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (Money(123450, "USD"), "1234.50 USD"),
        (Money(500, "JPY"), "500 JPY"),
        (Money(1500, "KWD"), "1.500 KWD"),
        (Money(-5, "USD"), "-0.05 USD"),
        (Money(0, "USD"), "0.00 USD"),
    ],
)
def test_str_is_plain_and_round_trips(money: Money, text: str) -> None:
    assert str(money) == text
    assert Money.parse(str(money)) == money


def test_repr_shows_minor_units() -> None:
    assert repr(Money(1234, "USD")) == "Money(1234, 'USD')"


_CODES_BY_EXPONENT = ["USD", "EUR", "JPY", "KRW", "KWD", "BHD", "JOD", "CLF"]


@given(
    amount=st.integers(min_value=-(10**40), max_value=10**40),
    currency=st.sampled_from(_CODES_BY_EXPONENT),
)
def test_str_round_trips_through_parse(amount: int, currency: str) -> None:
    m = Money(amount, currency)
    assert Money.parse(str(m)) == m


@given(
    amount=st.integers(min_value=-(10**40), max_value=10**40),
    currency=st.sampled_from(_CODES_BY_EXPONENT),
)
def test_of_major_round_trips(amount: int, currency: str) -> None:
    m = Money(amount, currency)
    assert Money.of(m.major, currency) == m


# -- pydantic -------------------------------------------------------------------------


class _Invoice(BaseModel):
    total: Money
    tip: Money | None = None


def test_pydantic_field_validates_from_string() -> None:
    assert _Invoice.model_validate({"total": "25.00 USD"}).total == Money(2500, "USD")


def test_pydantic_field_accepts_money_and_minor_unit_mapping() -> None:
    assert _Invoice(total=Money(1, "EUR")).total == Money(1, "EUR")
    invoice = _Invoice.model_validate({"total": {"amount": 2500, "currency": "JPY"}})
    assert invoice.total == Money(2500, "JPY")


def test_pydantic_field_serialises_to_str() -> None:
    invoice = _Invoice(total=Money(2500, "USD"), tip=Money(500, "JPY"))
    assert invoice.model_dump(mode="json") == {"total": "25.00 USD", "tip": "500 JPY"}
    assert invoice.model_dump_json() == '{"total":"25.00 USD","tip":"500 JPY"}'


def test_pydantic_json_round_trip() -> None:
    invoice = _Invoice(total=Money(1500, "KWD"))
    assert _Invoice.model_validate_json(invoice.model_dump_json()) == invoice


@pytest.mark.parametrize(
    "bad",
    [
        "25.00",
        "25.00 XYZ",
        25,
        2.5,
        {"amount": 25},
        {"amount": 2.5, "currency": "USD"},
        {"amount": 25, "currency": 840},
    ],
)
def test_pydantic_field_rejects_bad_input_as_validation_error(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        _Invoice.model_validate({"total": bad})
    assert info.value.errors()[0]["loc"] == ("total",)
