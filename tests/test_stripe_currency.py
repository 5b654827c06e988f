"""Stripe's currency rules (paymaster.vendors.stripe._currency): pure, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymaster import Money
from paymaster.vendors.stripe._currency import (
    STRIPE_THREE_DECIMAL,
    STRIPE_ZERO_DECIMAL,
    StripeAmountError,
    check_charge_amount,
    from_stripe,
    stripe_exponent,
    to_stripe,
)


def test_usd_cents_are_iso_cents() -> None:
    assert from_stripe(1050, "USD") == Money(1050, "USD")
    assert from_stripe(1050, "USD") == Money.of("10.50", "USD")
    assert to_stripe(Money.of("10.50", "USD")) == 1050


def test_jpy_is_zero_decimal_in_both() -> None:
    assert from_stripe(500, "JPY") == Money(500, "JPY")
    assert from_stripe(500, "JPY") == Money.of(500, "JPY")  # ¥500, not ¥5
    assert to_stripe(Money(500, "JPY")) == 500


def test_isk_is_two_decimal_in_stripe_but_zero_decimal_in_iso() -> None:
    assert stripe_exponent("ISK") == 2
    assert from_stripe(500, "ISK") == Money(5, "ISK")  # 5 krona
    assert to_stripe(Money(5, "ISK")) == 500
    with pytest.raises(StripeAmountError, match="multiples of 100"):
        from_stripe(150, "ISK")  # 1.5 krona
    with pytest.raises(StripeAmountError):
        check_charge_amount(150, "isk")
    assert check_charge_amount(0, "ISK") == Money(0, "ISK")


def test_mga_is_zero_decimal_in_stripe_but_two_decimal_in_iso() -> None:
    assert "MGA" in STRIPE_ZERO_DECIMAL
    assert stripe_exponent("mga") == 0
    assert from_stripe(500, "mga") == Money.of(500, "MGA")
    assert from_stripe(500, "mga") == Money(50000, "MGA")
    assert to_stripe(Money.of(500, "MGA")) == 500
    with pytest.raises(StripeAmountError, match="zero-decimal"):
        to_stripe(Money.of("500.50", "MGA"))  # a fraction Stripe cannot charge


def test_kwd_three_decimal_amounts_must_end_in_zero() -> None:
    assert "KWD" in STRIPE_THREE_DECIMAL
    assert stripe_exponent("KWD") == 3
    with pytest.raises(StripeAmountError, match="end in 0"):
        check_charge_amount(1235, "kwd")
    assert check_charge_amount(1230, "kwd") == Money(1230, "KWD")
    # Reading an amount back (a response) is not a charge: any fils amount converts.
    assert from_stripe(1235, "kwd") == Money(1235, "KWD")


def test_other_rules_follow_iso() -> None:
    assert stripe_exponent("HUF") == 2
    assert stripe_exponent("TWD") == 2
    assert stripe_exponent("eur") == 2
    assert check_charge_amount(1999, "huf") == Money(1999, "HUF")


@pytest.mark.parametrize("amount", [-1, -500, 10.5, 100.0, True, False, "500", None])
def test_non_integer_or_negative_amounts_are_refused(amount: object) -> None:
    with pytest.raises(StripeAmountError):
        from_stripe(amount, "usd")  # type: ignore[arg-type]
    with pytest.raises(StripeAmountError):
        check_charge_amount(amount, "usd")  # type: ignore[arg-type]


def test_unknown_currency_is_a_stripe_amount_error() -> None:
    with pytest.raises(StripeAmountError, match="unknown currency"):
        from_stripe(100, "xxx")


@pytest.mark.parametrize("currency", ["usd", "Usd", "jpy", "isk", "mga", "kwd"])
def test_lowercase_and_mixed_case_currencies_are_accepted(currency: str) -> None:
    amount = 1000
    money = check_charge_amount(amount, currency)
    assert money.currency == currency.upper()
    assert from_stripe(amount, currency) == from_stripe(amount, currency.upper())
    assert to_stripe(money) == amount


_CURRENCIES = ["usd", "EUR", "jpy", "KRW", "mga", "kwd", "bhd", "huf", "twd", "clp"]


@given(
    currency=st.sampled_from(_CURRENCIES),
    amount=st.integers(min_value=0, max_value=10**15),
)
def test_round_trip_through_money(currency: str, amount: int) -> None:
    assert to_stripe(from_stripe(amount, currency)) == amount


@given(krona=st.integers(min_value=0, max_value=10**13))
def test_round_trip_isk_in_whole_krona(krona: int) -> None:
    amount = krona * 100  # the only valid Stripe ISK amounts
    money = from_stripe(amount, "isk")
    assert money == Money(krona, "ISK")
    assert to_stripe(money) == amount


@given(amount=st.integers(min_value=0, max_value=10**12).filter(lambda n: n % 100 != 0))
def test_isk_fractions_of_a_krona_are_always_refused(amount: int) -> None:
    with pytest.raises(StripeAmountError):
        from_stripe(amount, "ISK")
