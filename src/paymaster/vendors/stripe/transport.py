"""A ``stripe`` HTTP client that governs every request before it leaves the process.

The official client hands each HTTP request to its ``HTTPClient``; this one sits there,
so every call made through a governed :class:`stripe.StripeClient` (``client.v1.refunds
.create``, the deprecated ``client.refunds``, ``raw_request``, sync or async) is matched
against the :data:`~paymaster.vendors.stripe.CATALOGUE`, reserved, sent, and settled or
released from the real HTTP response. A request that matches no catalogued operation is
refused and audited, never passed through.

Outcomes: a 2xx settles at the amount Stripe reports; a 4xx releases the hold and audits
the status and Stripe's error code; a 5xx or a lost connection keeps the hold counted and
marks it for reconciliation (Stripe may have acted; its idempotency key replays the call).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlsplit

import stripe
from stripe._http_client import new_http_client_async_fallback

from ...errors import PolicyViolation, ViolationCode
from ...money import Money
from ...policy import RunPolicy
from .catalogue import (
    CATALOGUE,
    Catalogue,
    InvalidStripeRequest,
    Operation,
    Quote,
    StripeRequest,
)
from .catalogue import actual_cost as _actual_cost

if TYPE_CHECKING:
    from ...governor import GovernedCall, Governor

__all__ = ["GovernedHTTPClient", "StripeBinding", "bind", "current_binding"]

VENDOR = "stripe"
Response = tuple[Any, int, Mapping[str, str]]
Resolution = tuple[Literal["settle", "fail", "unknown"], dict[str, Any]]


@dataclass(frozen=True)
class StripeBinding:
    """Who is calling: fills what the governed client was not given, per context."""

    agent: str | None = None
    run: str | None = None
    run_policy: RunPolicy | None = None


_NOBODY = StripeBinding()
_binding: ContextVar[StripeBinding | None] = ContextVar("paymaster_stripe_binding", default=None)


def current_binding() -> StripeBinding:
    """Who the governed Stripe calls of this context are attributed to (by :func:`bind`)."""
    return _binding.get() or _NOBODY


@contextmanager
def bind(
    *, agent: str | None = None, run: str | None = None, run_policy: RunPolicy | None = None
) -> Iterator[StripeBinding]:
    """Attribute the governed Stripe calls made inside the block (in this thread or task
    and the tasks it starts) to ``agent`` and ``run``: how tools tie calls to their run."""
    outer = current_binding()
    binding = StripeBinding(
        agent=agent or outer.agent,
        run=run or outer.run,
        run_policy=run_policy or outer.run_policy,
    )
    token = _binding.set(binding)
    try:
        yield binding
    finally:
        _binding.reset(token)


class GovernedHTTPClient(stripe.HTTPClient):
    """Governs the requests of a :class:`stripe.StripeClient`; see :func:`governed_client`.

    ``agent`` and ``run`` are the defaults; :func:`bind` overrides them for a block.
    """

    name = "paymaster"

    def __init__(
        self,
        governor: Governor,
        *,
        agent: str | None = None,
        run: str | None = None,
        run_policy: RunPolicy | None = None,
        inner: stripe.HTTPClient | None = None,
        catalogue: Catalogue = CATALOGUE,
    ) -> None:
        super().__init__()
        if inner is None:
            inner = stripe.new_default_http_client(
                async_fallback_client=new_http_client_async_fallback()
            )
        if isinstance(inner, GovernedHTTPClient):
            raise TypeError("this HTTP client is governed already; govern the original once")
        self.governor = governor
        self.inner = inner
        self.catalogue = catalogue
        self._defaults = StripeBinding(agent, run, run_policy)

    # -- stripe.HTTPClient ---------------------------------------------------------------
    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None,
        *, _usage: list[str] | None = None,
    ) -> Response:  # fmt: skip
        return self._request(method, url, headers, post_data)

    def _request(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any,
        pricing_lookup: bool = False,
    ) -> Response:  # fmt: skip
        binding = self._who()
        request, operation = self._match(method, url, post_data, binding)
        quote = self._prior_quote(request, headers)
        lookup = None if quote else self._lookup_path(request, operation, binding)
        looked_up = None
        if lookup is not None:
            response = self._request(
                "GET", _join(url, lookup), _lookup_headers(headers), None, pricing_lookup=True
            )
            if response[1] >= 300:  # the object cannot be read: Stripe's own error says why
                return response
            looked_up = _json(response[0])
        quote = quote or self._quote(request, operation, looked_up, binding)
        spec = self._spec(request, binding, quote, headers, pricing_lookup)
        with self.governor.guard(**spec) as call:
            response = self.inner.request(
                method, url, _with_key(headers, request, call.idempotency_key), post_data
            )
            kind, kwargs = _resolution(call, operation, response)
            getattr(call, kind)(**kwargs)
        return response

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> Response:
        return await self._request_async(method, url, headers, post_data)

    async def _request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any,
        pricing_lookup: bool = False,
    ) -> Response:  # fmt: skip
        binding = self._who()
        request, operation = await _in_thread(self._match, method, url, post_data, binding)
        quote = await _in_thread(self._prior_quote, request, headers)
        lookup = None if quote else await _in_thread(self._lookup_path, request, operation, binding)
        looked_up = None
        if lookup is not None:
            response = await self._request_async(
                "GET", _join(url, lookup), _lookup_headers(headers), None, pricing_lookup=True
            )
            if response[1] >= 300:
                return response
            looked_up = _json(response[0])
        quote = quote or await _in_thread(self._quote, request, operation, looked_up, binding)
        spec = self._spec(request, binding, quote, headers, pricing_lookup)
        async with self.governor.aguard(**spec) as call:
            response = await self.inner.request_async(
                method, url, _with_key(headers, request, call.idempotency_key) or {}, post_data
            )
            kind, kwargs = _resolution(call, operation, response)
            await getattr(call, kind)(**kwargs)
        return response

    def request_stream(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None,
        *, _usage: list[str] | None = None,
    ) -> Response:  # fmt: skip
        self._refuse_stream(method, url)

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> Response:
        await _in_thread(self._refuse_stream, method, url)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self.inner.close()  # type: ignore[no-untyped-call]

    async def close_async(self) -> None:
        await self.inner.close_async()  # type: ignore[no-untyped-call]

    def sleep_async(self, secs: float) -> Any:
        return self.inner.sleep_async(secs)

    # -- the steps -----------------------------------------------------------------------
    def _who(self) -> StripeBinding:
        bound = current_binding()
        binding = StripeBinding(
            agent=bound.agent or self._defaults.agent,
            run=bound.run or self._defaults.run,
            run_policy=bound.run_policy or self._defaults.run_policy,
        )
        if binding.agent is None:
            raise ValueError(
                "a governed Stripe call needs an agent: pass agent= to governed_client() "
                "or call inside paymaster.vendors.stripe.bind(agent=...)"
            )
        return binding

    def _match(
        self, method: str, url: str, post_data: Any, binding: StripeBinding
    ) -> tuple[StripeRequest, Operation]:
        try:
            request = StripeRequest.parse(method, url, post_data)
        except InvalidStripeRequest as violation:
            self._refuse(violation, binding, urlsplit(url).path or "/", method)
        operation = self.catalogue.match(request)
        if operation is None:
            self._refuse(
                PolicyViolation(
                    ViolationCode.UNKNOWN_OPERATION,
                    f"{request.method} {request.path} is not a Stripe operation paymaster "
                    "governs, so it was not sent (see paymaster.vendors.stripe.CATALOGUE)",
                    vendor=VENDOR,
                ),
                binding, request.path, request.method,
            )  # fmt: skip
        return request, operation

    def _prior_quote(
        self, request: StripeRequest, headers: Mapping[str, str] | None
    ) -> Quote | None:
        """A retry (a POST whose idempotency key the ledger knows) is priced as the call it
        repeats: re-pricing "refund what remains" after the first attempt refunded it
        would price the retry at nothing and make it look like another call."""
        key = _request_key(request, headers)
        held = self.governor.ledger.hold_for_key(key) if key else None
        return Quote(held.estimate, held.customer) if held else None

    def _lookup_path(
        self, request: StripeRequest, operation: Operation, binding: StripeBinding
    ) -> str | None:
        try:
            return operation.lookup_path(request)
        except InvalidStripeRequest as violation:
            self._refuse(violation, binding, request.path, request.method)

    def _quote(
        self,
        request: StripeRequest,
        operation: Operation,
        looked_up: Mapping[str, Any] | None,
        binding: StripeBinding,
    ) -> Quote:
        try:
            return operation.quote(request, looked_up)
        except InvalidStripeRequest as violation:
            self._refuse(violation, binding, request.path, request.method)

    def _refuse(
        self, violation: PolicyViolation, binding: StripeBinding, path: str, method: str
    ) -> NoReturn:
        assert binding.agent is not None
        violation.agent, violation.run, violation.endpoint = binding.agent, binding.run, path
        raise self.governor.record_refusal(
            violation, agent=binding.agent, vendor=VENDOR, endpoint=path, method=method,
            run=binding.run,
        )  # fmt: skip

    def _refuse_stream(self, method: str, url: str) -> NoReturn:
        self._refuse(
            PolicyViolation(
                ViolationCode.UNKNOWN_OPERATION,
                "streamed Stripe requests are not governed, so they are not sent",
                vendor=VENDOR,
            ),
            self._who(), urlsplit(url).path or "/", method.upper(),
        )  # fmt: skip

    @staticmethod
    def _spec(
        request: StripeRequest,
        binding: StripeBinding,
        quote: Quote,
        headers: Mapping[str, str] | None,
        pricing_lookup: bool,
    ) -> dict[str, Any]:
        key = _request_key(request, headers)
        assert binding.agent is not None
        return {
            "agent": binding.agent, "vendor": VENDOR, "endpoint": request.path,
            "method": request.method, "estimate": quote.estimate, "customer": quote.customer,
            "run": binding.run, "run_policy": binding.run_policy, "idempotency_key": key,
            "pricing_lookup": pricing_lookup,
        }  # fmt: skip


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run a step that may write an audit row off the event loop."""
    return await asyncio.to_thread(fn, *args)


def _resolution(call: GovernedCall, operation: Operation, response: Response) -> Resolution:
    """How the hold ends, from Stripe's HTTP response."""
    body, status, headers = response
    request_id = _header(headers, "Request-Id")
    if status >= 500 or status < 200:
        return "unknown", {
            "error": f"Stripe answered HTTP {status} (request {request_id}): it may have "
            "acted; a retry with the same idempotency key replays the call"
        }
    if status >= 300:
        return "fail", {
            "http_status": status, "vendor_request_id": request_id, "error": _error_text(body),
        }  # fmt: skip
    try:
        actual = _actual_cost(operation, _json(body))
    except ValueError as exc:
        return "unknown", {"error": f"HTTP {status} but the cost is unreadable: {exc}"}
    if actual is not None and actual.currency != call.estimate.currency:
        return "unknown", {
            "error": f"Stripe charged {actual}, but {call.estimate} was reserved in "
            f"{call.estimate.currency}: reconcile this hold"
        }
    return "settle", {
        "actual": actual if actual is not None else Money.zero(call.estimate.currency),
        "http_status": status, "vendor_request_id": request_id,
    }  # fmt: skip


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


def _request_key(request: StripeRequest, headers: Mapping[str, str] | None) -> str | None:
    """The idempotency key a POST was sent with (Stripe ignores keys on GET)."""
    return _header(headers, "Idempotency-Key") if request.method == "POST" else None


def _with_key(
    headers: Mapping[str, str] | None, request: StripeRequest, key: str
) -> Mapping[str, str] | None:
    """POSTs carry the governed call's idempotency key (the one they sent, or one made
    from the hold), so a retry of this call cannot pay twice."""
    if request.method != "POST" or _header(headers, "Idempotency-Key") == key:
        return headers
    kept = {k: v for k, v in (headers or {}).items() if k.lower() != "idempotency-key"}
    return {**kept, "Idempotency-Key": key}


def _lookup_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The original request's credentials and versions, for a GET of the same account."""
    dropped = {"idempotency-key", "content-type", "content-length"}
    return {k: v for k, v in (headers or {}).items() if k.lower() not in dropped}


def _join(url: str, path: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{path}"
