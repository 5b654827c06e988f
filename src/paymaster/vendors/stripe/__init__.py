"""Governed Stripe: the operation catalogue and its cost model, Stripe's currency rules,
and a governed ``stripe.StripeClient`` (needs ``paymaster[stripe]``).

The catalogue and currency rules import nothing beyond the core; the client imports
``stripe`` when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._catalogue import (
    CATALOGUE,
    STRIPE_VERSION,
    Catalogue,
    Cost,
    InvalidStripeRequest,
    Operation,
    Quote,
    StripeRequest,
    actual_cost,
)
from ._currency import (
    STRIPE_THREE_DECIMAL,
    STRIPE_ZERO_DECIMAL,
    StripeAmountError,
    check_charge_amount,
    from_stripe,
    stripe_exponent,
    to_stripe,
)

if TYPE_CHECKING:
    from ._client import govern, governed_client
    from ._transport import GovernedHTTPClient, StripeBinding, bind, current_binding

__all__ = [
    "CATALOGUE",
    "STRIPE_THREE_DECIMAL",
    "STRIPE_VERSION",
    "STRIPE_ZERO_DECIMAL",
    "Catalogue",
    "Cost",
    "GovernedHTTPClient",
    "InvalidStripeRequest",
    "Operation",
    "Quote",
    "StripeAmountError",
    "StripeBinding",
    "StripeRequest",
    "actual_cost",
    "bind",
    "check_charge_amount",
    "current_binding",
    "from_stripe",
    "govern",
    "governed_client",
    "stripe_exponent",
    "to_stripe",
]

_LAZY = {
    "govern": "_client",
    "governed_client": "_client",
    "GovernedHTTPClient": "_transport",
    "StripeBinding": "_transport",
    "bind": "_transport",
    "current_binding": "_transport",
}


def __getattr__(name: str) -> Any:
    """Import the ``stripe``-dependent parts on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    from ..._extras import requires

    with requires("stripe", f"paymaster.vendors.stripe.{name}"):
        return getattr(import_module(f"{__name__}.{module}"), name)
