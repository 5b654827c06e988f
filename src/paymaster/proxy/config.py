"""What a governing proxy is configured with: where it forwards, with which real key."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic import ValidationError as _ValidationError

__all__ = ["STRIPE_KEY_ENV", "ProxyConfig", "read_stripe_key"]

#: The environment variable the proxy reads the real Stripe key from.
STRIPE_KEY_ENV = "PAYMASTER_STRIPE_KEY"


class ProxyConfig(BaseModel):
    """A proxy's fixed settings. The upstream is set here and nowhere else: a request can
    never choose where it is forwarded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upstream: str = "https://api.stripe.com"
    """Scheme and host (and port) of the Stripe API to forward to; no path."""
    stripe_key: SecretStr
    """The real key the proxy forwards with. Agents never see it."""
    max_body_bytes: int = Field(default=256 * 1024, gt=0)
    """A larger request body is refused (413) before anything is reserved."""
    upstream_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for the upstream: under stripe-python's own 80, so that a client
    hears the proxy's answer (and the idempotency key to retry with) before it gives up."""
    workers: int = Field(default=32, gt=0, le=1024)
    """Requests governed and forwarded at once, each on a worker thread of its own with
    one kept-alive upstream connection; later requests wait for a free worker. The ledger's
    connection pool is only held during its short transactions, not during the upstream
    call."""
    replay_window: timedelta = timedelta(hours=24)
    """How long a settled POST's response is replayed to a retry with its idempotency key
    (Stripe keeps keys 24 hours)."""

    @field_validator("upstream")
    @classmethod
    def _origin_only(cls, value: str) -> str:
        import httpx

        try:
            url = httpx.URL(value.strip())
        except httpx.InvalidURL as exc:
            raise ValueError(f"{value!r} is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} must be an http(s) URL such as https://api.stripe.com")
        if url.path not in ("", "/") or url.query or url.fragment or url.userinfo:
            raise ValueError(
                f"{value!r} must name only a scheme, host and port (no path, query or user)"
            )
        return str(url.copy_with(path="/")).rstrip("/")

    @field_validator("stripe_key")
    @classmethod
    def _plausible_key(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value()
        if not key or key != key.strip() or any(ch.isspace() for ch in key):
            raise ValueError("the Stripe key is empty or contains whitespace")
        if key.startswith("pmk_"):
            raise ValueError("that is a paymaster vault key; the proxy needs the real Stripe key")
        return value


def read_stripe_key(file: Path | None = None, environ: dict[str, str] | None = None) -> SecretStr:
    """The real Stripe key: from ``file`` (a secrets file holding the key alone) if given,
    else from :data:`STRIPE_KEY_ENV`. It is never taken from the command line (other users
    could read it in the process list) nor from the database."""
    env = os.environ if environ is None else environ
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the Stripe key file {file}: {exc.strerror}") from None
        if not text:
            raise ValueError(f"the Stripe key file {file} is empty")
        return SecretStr(text)
    key = env.get(STRIPE_KEY_ENV, "").strip()
    if not key:
        raise ValueError(
            f"no Stripe key: set {STRIPE_KEY_ENV} in the proxy's environment or pass "
            "--stripe-key-file with a file that holds the key"
        )
    return SecretStr(key)


def describe_error(error: _ValidationError) -> str:
    """One line per invalid setting, naming it."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
    )
