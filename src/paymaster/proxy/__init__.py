"""A Stripe-compatible governing proxy with vault keys (extra ``paymaster[proxy]``).

Run it with ``paymaster proxy``; make keys with ``paymaster keys create``. Agents point a
Stripe client at the proxy with a vault key: every request passes the same ledger,
policies, kill switch and audit log as the in-process guards, and the real key stays in
the proxy.
"""

from .._extras import requires

with requires("proxy", "the paymaster proxy"):
    from .app import FORWARDED_HEADERS, create_app
    from .config import STRIPE_KEY_ENV, ProxyConfig, read_stripe_key
    from .server import serve

__all__ = [
    "FORWARDED_HEADERS",
    "STRIPE_KEY_ENV",
    "ProxyConfig",
    "create_app",
    "read_stripe_key",
    "serve",
]
