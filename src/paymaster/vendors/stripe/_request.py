"""One HTTP request to the Stripe API read exactly as Stripe would read it (method,
canonical path, parameters, connected accounts), or refused as one paymaster cannot price."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, urlsplit

from ..._endpoints import normalise_path
from ..._errors import PolicyViolation, ViolationCode

#: Parameters whose value prices the call or names who it is for: sent twice, Stripe would
#: pick one and paymaster might price the other, so such a request is refused.
_PRICED_PARAMS = frozenset(
    {"amount", "currency", "customer", "charge", "payment_intent", "invoice"}
)
#: Parameters that name who pays in a way paymaster does not read: refused.
_UNGOVERNED_PARAMS = frozenset({"customer_account"})
#: Every Stripe object id is ``prefix_rest``; a path segment without ``_`` is a literal
#: such as ``search``, never an id.
_ID = r"[A-Za-z0-9]+_[A-Za-z0-9_]+"
#: The parameter names Stripe's form encoding produces: ``amount``, ``metadata[k]``,
#: ``expand[0]``, ``items[0][price]``. Anything else could be read differently by Stripe's
#: parser than by paymaster's, so it is refused.
_KEY = re.compile(r"[A-Za-z0-9_]+(\[[^\[\]]*\])*")
_FORM = "application/x-www-form-urlencoded"

#: A connected account's id. Any parameter carrying one (``transfer_data[destination]``,
#: ``on_behalf_of``, the legacy ``destination[account]``, an account debit's ``source``,
#: ``issuer[account]``, ...) makes the call one that involves that account.
_ACCOUNT_ID = re.compile(r"acct_[A-Za-z0-9]+")
_FEES = frozenset({"application_fee", "application_fee_amount", "application_fee_percent"})


class InvalidStripeRequest(PolicyViolation, ValueError):
    """A request paymaster cannot price (a missing or malformed amount, currency or id).

    Raised before anything is reserved or sent; audited as a denial with the code
    ``invalid_request``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ViolationCode.INVALID_REQUEST, message, vendor="stripe")


@dataclass(frozen=True)
class StripeRequest:
    """One HTTP request to the Stripe API, as the governed client or the proxy sees it."""

    method: str
    path: str
    params: Mapping[str, str]
    """Top-level scalar parameters (from the query string of a GET, the body of a POST)."""
    roots: frozenset[str]
    """The top-level name of every parameter sent, nested ones included."""
    fingerprint: str
    """A digest of the method, path, every parameter, the account and the context: what an
    idempotency key may be reused for."""
    accounts: frozenset[str] = frozenset()
    """The connected accounts the request acts for (``Stripe-Account``, ``Stripe-Context``)
    or names in any parameter (``transfer_data[destination]``, ``on_behalf_of``, an
    account debit's ``source``, ...): each must be in the policy's ``accounts``."""

    @classmethod
    def parse(
        cls,
        method: str,
        url: str,
        body: str | bytes | None = None,
        *,
        content_type: str | None = None,
        account: str | None = None,
        context: str | None = None,
    ) -> StripeRequest:
        """Read method, canonical path and parameters, exactly as Stripe would.

        Raises :class:`InvalidStripeRequest` for anything Stripe might read differently
        from paymaster: a non-canonical path, a POST that is not form-encoded UTF-8 or
        has a query string, a GET or DELETE with a body, a parameter name Stripe's
        encoding does not produce, a priced parameter sent twice or nested.
        """
        method = method.upper()
        parts = urlsplit(url)
        path = _path_of(parts)
        encoded = _encoded_params(method, parts, body, content_type)
        pairs = parse_qsl(encoded, keep_blank_values=True)
        params, roots = _read_params(pairs)
        # Stripe scopes idempotency keys per account: the same key and body on behalf of
        # another account (Stripe-Account) or context (Stripe-Context) is another call.
        material = json.dumps(
            [method, path, sorted(pairs), account or ""] + ([context] if context else [])
        )
        fingerprint = hashlib.sha256(material.encode()).hexdigest()
        return cls(
            method, path, params, frozenset(roots), fingerprint, _accounts(pairs, account, context)
        )


def _accounts(
    pairs: list[tuple[str, str]], account: str | None, context: str | None
) -> frozenset[str]:
    named = {account} if account else set()
    if context:  # an account, or a path of them
        named.update(part for part in context.split("/") if part)
    named.update(value for _, value in pairs if _ACCOUNT_ID.fullmatch(value))
    if not named and any(key in _FEES for key, _ in pairs):
        raise InvalidStripeRequest(
            "an application fee is taken only on a payment for a connected account; this "
            "request names none (Stripe-Account, transfer_data[destination], on_behalf_of)"
        )
    return frozenset(named)


def _path_of(parts: SplitResult) -> str:
    """The request's canonical path, or a refusal of a non-canonical one."""
    try:
        path = normalise_path(parts.path)
    except ValueError as exc:
        raise InvalidStripeRequest(f"refusing the path {parts.path!r}: {exc}") from exc
    return path


def _encoded_params(
    method: str, parts: SplitResult, body: str | bytes | None, content_type: str | None
) -> str:
    """The form-encoded parameters: a POST's UTF-8 form body, any other method's query."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidStripeRequest("the request body is not UTF-8") from exc
    if method == "POST":
        if parts.query:
            raise InvalidStripeRequest(
                "a POST carries its parameters in the form body, not the query string"
            )
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        if body and media_type != _FORM:
            raise InvalidStripeRequest(
                f"paymaster reads POST bodies sent as {_FORM} only, not "
                f"{media_type or 'an unlabelled body'}"
            )
        encoded = body or ""
    else:
        if body:
            raise InvalidStripeRequest(f"a {method} request has no body")
        encoded = parts.query
    # Some servers split parameters on ";" too; Stripe's clients never send one.
    if ";" in encoded:
        raise InvalidStripeRequest("a raw ';' in the parameters is ambiguous; encode it")
    return encoded


def _read_params(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], set[str]]:
    """The top-level scalar parameters, and the top-level name of every parameter; refuses
    a name Stripe's encoding does not produce and a priced parameter sent twice or nested."""
    params: dict[str, str] = {}
    roots: set[str] = set()
    for key, value in pairs:
        if not _KEY.fullmatch(key):
            raise InvalidStripeRequest(f"{key!r} is not a Stripe parameter name")
        root = key.split("[", 1)[0]
        roots.add(root)
        if root in _UNGOVERNED_PARAMS:
            raise InvalidStripeRequest(
                f"{root!r} names who pays in a way paymaster does not govern; use "
                "'customer' instead"
            )
        if key != root:  # metadata[...], expand[], nested objects
            if root in _PRICED_PARAMS:
                raise InvalidStripeRequest(f"{root!r} must be a single value")
            continue
        if key in params and key in _PRICED_PARAMS and params[key] != value:
            raise InvalidStripeRequest(
                f"parameter {key!r} is sent twice with different values; send it once"
            )
        params[key] = value
    return params, roots
