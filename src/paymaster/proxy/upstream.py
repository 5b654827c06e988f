"""The proxy's connection to the real Stripe API: adds the real key, and keeps it out of
everything that comes back.

It is the ``inner`` HTTP client of a :class:`~paymaster.vendors.stripe.GovernedHTTPClient`,
so every request it sends has been matched, priced and reserved first, and every response
settles or releases its hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NoReturn

import httpx
import stripe
from pydantic import SecretStr

from .._errors import PaymasterError

__all__ = ["RESPONSE_HEADERS", "UpstreamClient", "UpstreamNotReached", "scrub"]

#: The upstream response headers passed back to the client (others are dropped: hop-by-hop
#: headers, cookies, the upstream's framing).
RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "request-id",
        "idempotency-key",
        "idempotent-replayed",
        "original-request",
        "stripe-version",
        "stripe-should-retry",
        "stripe-account",
    }
)

# Stripe names the key it was given in some errors ("Invalid API Key provided: sk_test_
# ****abcd"); a secret or restricted key, masked or not, never leaves the proxy.
_KEY_TEXT = re.compile(rb"\b(?:sk|rk)_(?:test|live)_[A-Za-z0-9*]+")
_REDACTED = b"[the proxy's Stripe key]"


def scrub(body: bytes, key: SecretStr) -> bytes:
    """``body`` without the real key, masked or whole."""
    body = body.replace(key.get_secret_value().encode(), _REDACTED)
    return _KEY_TEXT.sub(_REDACTED, body)


class UpstreamNotReached(PaymasterError, httpx.TransportError):
    """No connection to the upstream: the request was not sent, so its hold is released.
    (httpx's ``ConnectTimeout`` and ``PoolTimeout`` would read as "outcome unknown".)"""


class UpstreamClient(stripe.HTTPClient):
    """Sends governed requests to the configured upstream with the real key.

    Synchronous: the proxy governs and forwards each request on one of its worker threads
    (:mod:`paymaster.proxy.app`), so the ledger's work before and after the call and the
    call itself need no hand-offs between threads. Keeps up to ``connections`` HTTP/1.1
    connections alive (one per worker thread). Redirects are not followed.
    """

    name = "paymaster-upstream"

    def __init__(
        self,
        upstream: str,
        key: SecretStr,
        *,
        timeout: float,
        connections: int,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__()
        self._origin = httpx.URL(upstream)
        self._key = key
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            follow_redirects=False,
            transport=transport,
            trust_env=False,  # HTTP(S)_PROXY in the environment must not reroute Stripe
        )

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:  # the body is bytes (as stripe's own clients')
        target = httpx.URL(url)
        if (target.scheme, target.host, target.port) != (
            self._origin.scheme,
            self._origin.host,
            self._origin.port,
        ):
            raise ValueError("refusing to forward outside the configured upstream")
        sent = {**(headers or {}), "Authorization": f"Bearer {self._key.get_secret_value()}"}
        try:
            response = self._client.request(method, target, headers=sent, content=post_data)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamNotReached(f"{type(exc).__name__}: {exc}") from exc
        body = response.content
        if response.status_code >= 400:
            body = scrub(body, self._key)
        kept = {k: v for k, v in response.headers.items() if k.lower() in RESPONSE_HEADERS}
        return body, response.status_code, kept

    async def request_async(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("the proxy's upstream client runs on its worker threads")

    def close(self) -> None:
        self._client.close()
