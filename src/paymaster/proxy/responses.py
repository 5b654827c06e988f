"""Refusals in Stripe's error shape, so stripe-python raises an exception the agent's
code already handles (``stripe.PermissionError`` for a policy refusal, and so on).

Every refusal carries ``Stripe-Should-Retry: false`` unless retrying is safe and may
succeed (the ledger briefly unreachable, the upstream unreachable): stripe-python honours
the header, so it does not retry a refusal.
"""

from __future__ import annotations

import secrets

from starlette.responses import JSONResponse

from .._errors import PolicyViolation, ViolationCode
from .._vault import VaultKeyRefused

__all__ = ["key_refused_response", "stripe_error", "violation_response"]

_STATUS = {
    ViolationCode.INVALID_REQUEST: 400,
    ViolationCode.IDEMPOTENCY_KEY_REUSED: 400,
}
_TYPE = {ViolationCode.IDEMPOTENCY_KEY_REUSED: "idempotency_error"}


def stripe_error(
    status: int,
    code: str,
    message: str,
    *,
    kind: str = "invalid_request_error",
    retry: bool = False,
) -> JSONResponse:
    """``{"error": {"type", "code", "message"}}`` with a proxy request id. ``code`` is
    stable and always starts with ``paymaster_``."""
    headers = {"Request-Id": f"req_pm_{secrets.token_hex(8)}"}
    if not retry:
        headers["Stripe-Should-Retry"] = "false"
    body = {"error": {"type": kind, "code": f"paymaster_{code}", "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def violation_response(violation: PolicyViolation) -> JSONResponse:
    """A policy refusal: 403 (``stripe.PermissionError``: this key may not do this), 400
    for a request paymaster cannot read."""
    code = violation.code
    return stripe_error(
        _STATUS.get(code, 403),
        code.value,
        f"paymaster refused this request: {violation.message}",
        kind=_TYPE.get(code, "invalid_request_error"),
    )


def key_refused_response(refused: VaultKeyRefused) -> JSONResponse:
    """401 (``stripe.AuthenticationError``)."""
    return stripe_error(401, f"vault_key_{refused.reason.value}", str(refused))
