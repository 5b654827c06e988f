"""Governed :class:`stripe.StripeClient` instances.

::

    client = governed_client(governor, "sk_test_...", agent="refund-agent")
    client.v1.refunds.create({"payment_intent": "pi_123", "amount": 500})

The returned object is a real ``StripeClient``: the same services, types and errors. Only
its HTTP client differs: each request is governed before it is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import stripe

from ..._policy import RunPolicy
from ._catalogue import CATALOGUE, Catalogue
from ._transport import GovernedHTTPClient

if TYPE_CHECKING:
    from ..._governor import Governor

__all__ = ["default_agent", "govern", "governed_client", "is_governed"]


def governed_client(
    governor: Governor,
    api_key: str,
    *,
    agent: str | None = None,
    run: str | None = None,
    run_policy: RunPolicy | None = None,
    http_client: stripe.HTTPClient | None = None,
    catalogue: Catalogue = CATALOGUE,
    **client_options: Any,
) -> stripe.StripeClient:
    """A new ``StripeClient`` whose every request is governed.

    ``agent`` and ``run`` attribute its calls (or use :func:`bind` per block);
    ``http_client`` is the transport that actually sends (default: stripe's own);
    ``client_options`` go to ``StripeClient`` (``base_addresses``, ``stripe_version``,
    ``max_network_retries``, ``stripe_account``...).
    """
    transport = GovernedHTTPClient(
        governor,
        agent=agent,
        run=run,
        run_policy=run_policy,
        inner=http_client,
        catalogue=catalogue,
    )
    return stripe.StripeClient(api_key, http_client=transport, **client_options)


def govern(
    client: stripe.StripeClient,
    governor: Governor,
    *,
    agent: str | None = None,
    run: str | None = None,
    run_policy: RunPolicy | None = None,
    catalogue: Catalogue = CATALOGUE,
) -> stripe.StripeClient:
    """A governed copy of an existing ``StripeClient`` (same key, account, version, base
    addresses, retries and HTTP connection pool). ``client`` itself stays ungoverned:
    hand only the copy to the agent."""
    try:
        requestor = client._requestor
        options = requestor._options
        transport = requestor._client
        api_key = requestor.api_key
    except AttributeError as exc:  # pragma: no cover - depends on stripe's internals
        raise TypeError(
            f"cannot read this stripe {stripe.VERSION} client's settings ({exc}); build a "
            "governed client with governed_client(governor, api_key, ...) instead"
        ) from exc
    if isinstance(transport, GovernedHTTPClient):
        raise TypeError("this StripeClient is governed already")
    if transport is None:
        transport = stripe.default_http_client or stripe.new_default_http_client()
    governed = GovernedHTTPClient(
        governor,
        agent=agent,
        run=run,
        run_policy=run_policy,
        inner=transport,
        catalogue=catalogue,
    )
    return stripe.StripeClient(
        api_key,
        stripe_account=options.stripe_account,
        stripe_context=options.stripe_context,
        stripe_version=options.stripe_version,
        base_addresses=options.base_addresses,
        max_network_retries=options.max_network_retries,
        http_client=governed,
    )


def default_agent(client: stripe.StripeClient) -> str | None:
    """The agent type a governed ``client`` attributes its calls to by default (``None``:
    not governed, or none given)."""
    transport = getattr(getattr(client, "_requestor", None), "_client", None)
    return transport.default_agent if isinstance(transport, GovernedHTTPClient) else None


def is_governed(client: stripe.StripeClient) -> bool:
    """Whether ``client`` sends through a :class:`GovernedHTTPClient`."""
    requestor = getattr(client, "_requestor", None)
    return isinstance(getattr(requestor, "_client", None), GovernedHTTPClient)
