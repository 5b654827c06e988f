"""Reading and writing Stripe's wire format: headers, JSON bodies, and the idempotency
keys of a request (the ledger's, scoped to the exact request, and the one sent)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ... import _storable as storable
from ._binding import StripeBinding
from ._catalogue import InvalidStripeRequest, StripeRequest

__all__ = ["VENDOR", "Response", "accounts_of", "ledger_key_of"]

VENDOR = "stripe"
Response = tuple[Any, int, Mapping[str, str]]


def _error_text(body: Any) -> str:
    """``card_error/card_declined: Your card was declined.`` from Stripe's error body."""
    try:
        error = _json(body).get("error") or {}
    except ValueError:
        return "the error response is not JSON"
    kind, code, message = error.get("type"), error.get("code"), error.get("message")
    label = "/".join(str(part) for part in (kind, code) if part) or "stripe_error"
    return f"{label}: {message}" if message else label


def _json(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("a Stripe response is a JSON object")
    return value


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _header_name(name: str) -> str:
    """How servers may fold a header name: case, surrounding space, ``_`` for ``-``."""
    return name.strip().lower().replace("_", "-")


def _check_headers(headers: Mapping[Any, Any] | None) -> None:
    """Headers are str (a bytes name would slip past the checks and still be sent)."""
    for key, value in (headers or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidStripeRequest(f"header {key!r} must be a str name with a str value")


def _single_header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header that must not be sent twice under different spellings (``Idempotency-Key``
    and ``idempotency_key`` would leave the server to pick one)."""
    wanted = _header_name(name)
    found = [v for k, v in (headers or {}).items() if _header_name(k) == wanted]
    if len(found) > 1:
        raise InvalidStripeRequest(f"the {name} header is sent {len(found)} times")
    return found[0] if found else None


def _parse(
    method: str, url: str, headers: Mapping[str, str] | None, body: str | bytes | None
) -> StripeRequest:
    return StripeRequest.parse(
        method,
        url,
        body,
        content_type=_single_header(headers, "Content-Type"),
        account=_single_header(headers, "Stripe-Account"),
        context=_single_header(headers, "Stripe-Context"),
    )


def _idempotency_key(headers: Mapping[str, str] | None) -> str | None:
    key = _single_header(headers, "Idempotency-Key")
    if key is not None and (not key or key != key.strip() or len(key) > 255):
        raise InvalidStripeRequest(
            "an Idempotency-Key must be 1-255 characters without surrounding spaces"
        )
    # From here on the key is the text the ledger stores (NUL and lone surrogates escaped),
    # so every key and digest made of it is the ledger's, and none fails to encode.
    return storable.field("idempotency_key", key)


def _ledger_key(
    request: StripeRequest, wire_key: str | None, headers: Mapping[str, str] | None
) -> str | None:
    """The governed call's idempotency key: the client's key scoped to this exact request,
    so the same key on a different request is a different call (Stripe refuses it). A key
    too long to store is hashed under another separator, so no two keys share one.

    The scope includes the API key the request is made with (only its digest is kept):
    Stripe keeps idempotency keys per account, so the same key and body sent with another
    account's API key is another charge at Stripe, and must be another hold here. (The
    proxy adds its own API key after this, so for it the scope is the same for every
    request, as its single upstream account is.)"""
    if request.method != "POST" or wire_key is None:
        return None
    authorization = _single_header(headers, "Authorization") or ""
    scope = hashlib.sha256(f"{request.fingerprint}|{authorization}".encode()).hexdigest()[:24]
    if len(wire_key) <= 200:
        return f"{scope}:{wire_key}"
    return f"{scope}#{hashlib.sha256(wire_key.encode()).hexdigest()}"


def _vendor_key(binding: StripeBinding, wire_key: str) -> str:
    """The Idempotency-Key sent to Stripe for the client's ``wire_key``: scoped to the
    agent type and run, as the ledger's key is. Stripe replays a key's first answer to
    anyone on the account; scoped, another run presenting the same key and body makes its
    own call (governed and counted as its own) instead of being handed this run's object.
    The client's key stays readable at the front.

    It is made of the texts' storable forms, as the ledger's key is
    (:func:`paymaster._ledger.hold_key`): two keys the ledger stores as one (``"k\\x00"``
    with a NUL, and the literal ``"k\\\\x00"``) are one call there, so they must be one
    call at Stripe too, or the second would pay again under the first's hold."""
    key = storable.field("idempotency_key", wire_key)
    scope = [storable.field("agent", binding.agent), storable.field("run", binding.run), key]
    digest = hashlib.sha256(json.dumps(scope).encode())
    return f"{key[:180]}~{digest.hexdigest()[:32]}"


def accounts_of(
    method: str, url: str, headers: Mapping[str, str] | None, body: str | bytes | None
) -> frozenset[str]:
    """The connected accounts a request acts for or routes money to, as
    :class:`GovernedHTTPClient` checks them (empty for a request it would refuse as
    unreadable)."""
    try:
        return _parse(method, url, headers, body).accounts
    except InvalidStripeRequest:
        return frozenset()


def ledger_key_of(
    method: str, url: str, headers: Mapping[str, str] | None, body: str | bytes | None
) -> str | None:
    """The ledger's idempotency key for a request, as :class:`GovernedHTTPClient` would
    reserve it: ``None`` for a request without an ``Idempotency-Key``, one that is not a
    POST, or one that would be refused as unreadable."""
    try:
        wire_key = _idempotency_key(headers)
        if wire_key is None:
            return None
        request = _parse(method, url, headers, body)
    except InvalidStripeRequest:
        return None
    return _ledger_key(request, wire_key, headers)


def _join(url: str, path: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{path}"
