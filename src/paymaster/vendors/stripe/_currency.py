"""Stripe's currency rules, mapped onto the core's ISO 4217 :class:`~paymaster.Money`.

Stripe amounts are integers in the currency's smallest unit, as ISO 4217 defines it,
with exceptions (https://docs.stripe.com/currencies):

* zero-decimal in the Stripe API although ISO gives them two decimals: ``MGA`` (and the
  rest of Stripe's zero-decimal list agrees with ISO);
* ``ISK`` is zero-decimal in ISO but stays two-decimal in the Stripe API: ``100`` is one
  krona, and charged amounts must be multiples of 100;
* the three-decimal currencies (``BHD JOD KWD OMR TND``) must end in ``0``.

``HUF`` and ``TWD`` are two-decimal for charges and refunds (whole units only for
payouts), so they follow ISO here.
"""

from __future__ import annotations

from ..._errors import PaymasterError
from ..._money import Money, currency_exponent

__all__ = [
    "STRIPE_THREE_DECIMAL",
    "STRIPE_ZERO_DECIMAL",
    "StripeAmountError",
    "check_charge_amount",
    "from_stripe",
    "stripe_exponent",
    "to_stripe",
]

#: Stripe's zero-decimal currencies: ``amount=500`` in JPY is ¥500.
STRIPE_ZERO_DECIMAL = frozenset(
    "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF".split()
)
#: Three-decimal currencies, whose amounts Stripe requires to end in 0.
STRIPE_THREE_DECIMAL = frozenset("BHD JOD KWD OMR TND".split())
#: Stripe represents these with more decimals than ISO 4217 does (``amount=100`` is 1 ISK).
_STRIPE_WIDER = {"ISK": 2}


class StripeAmountError(PaymasterError, ValueError):
    """An amount Stripe cannot represent or would refuse (checked before any reserve)."""


def stripe_exponent(currency: str) -> int:
    """How many decimals an ``amount`` in ``currency`` has in the Stripe API."""
    code = currency.upper()
    if code in STRIPE_ZERO_DECIMAL:
        return 0
    if code in _STRIPE_WIDER:
        return _STRIPE_WIDER[code]
    return currency_exponent(code)


def from_stripe(amount: int, currency: str) -> Money:
    """A Stripe ``amount`` and ``currency`` (any case) as exact :class:`Money`.

    Raises :class:`StripeAmountError` when the amount is not an integer, is negative, or
    has a fraction the currency cannot hold (``ISK 150`` is 1.5 krona).
    """
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise StripeAmountError(
            f"a Stripe amount must be an integer of minor units, got {amount!r}"
        )
    if amount < 0:
        raise StripeAmountError(f"a Stripe amount cannot be negative, got {amount}")
    code = currency.upper()
    try:
        iso = currency_exponent(code)
    except ValueError as exc:
        raise StripeAmountError(str(exc)) from exc
    shift = stripe_exponent(code) - iso
    if shift >= 0:
        quotient, remainder = divmod(amount, 10**shift)
        if remainder:
            raise StripeAmountError(
                f"{amount} is not a whole number of {code} minor units: Stripe expects "
                f"{code} amounts in multiples of {10**shift}"
            )
        return Money(quotient, code)
    factor: int = 10**-shift
    return Money(amount * factor, code)


def to_stripe(money: Money) -> int:
    """The Stripe ``amount`` of ``money`` (``Money.of(5, "ISK")`` is ``500``)."""
    shift = stripe_exponent(money.currency) - money.exponent
    factor: int = 10 ** abs(shift)
    if shift >= 0:
        return money.amount * factor
    quotient, remainder = divmod(money.amount, factor)
    if remainder:
        raise StripeAmountError(
            f"{money} has a fraction Stripe cannot charge in {money.currency} "
            f"(zero-decimal in the Stripe API)"
        )
    return quotient


def check_charge_amount(amount: int, currency: str) -> Money:
    """Validate an ``amount`` to charge or refund as Stripe would, before anything is
    reserved, and return it as :class:`Money`."""
    money = from_stripe(amount, currency)
    code = currency.upper()
    if code in STRIPE_THREE_DECIMAL and amount % 10:
        raise StripeAmountError(
            f"Stripe requires {code} amounts to end in 0 (got {amount}); round to the nearest ten"
        )
    return money
