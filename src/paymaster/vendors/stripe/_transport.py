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
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlsplit

import stripe
from stripe._http_client import new_http_client_async_fallback

from ... import _storable as storable
from ..._errors import GovernanceUnavailable, PolicyViolation, ViolationCode
from ..._governor import GovernedCall
from ..._ledger import HoldState
from ..._money import Money
from ..._outcomes import Resolution, decide, resolution_of_status
from ..._policy import RunPolicy
from ._catalogue import (
    CATALOGUE,
    Catalogue,
    InvalidStripeRequest,
    Operation,
    Quote,
    StripeRequest,
)
from ._catalogue import actual_cost as _actual_cost

if TYPE_CHECKING:
    from ..._governor import Governor

__all__ = [
    "GovernedHTTPClient",
    "StripeBinding",
    "accounts_of",
    "bind",
    "current_binding",
    "ledger_key_of",
]

log = logging.getLogger("paymaster.stripe")

VENDOR = "stripe"
#: How long Stripe keeps an idempotency key: a key older than that is a new call.
STRIPE_KEY_WINDOW = timedelta(hours=24)
Response = tuple[Any, int, Mapping[str, str]]
HoldEnd = tuple[Literal["settle", "fail", "unknown"], dict[str, Any]]


@dataclass(frozen=True)
class StripeBinding:
    """Who is calling: fills what the governed client was not given, per context."""

    agent: str | None = None
    run: str | None = None
    run_policy: RunPolicy | None = None
    tool_call_id: str | None = None
    credential: str | None = None
    """What the calls were presented with (the proxy's vault key id), on their rows."""
    run_policy_conflict: str | None = None
    """Set when two different run policies were given for the same calls (a client's or a
    toolkit's, and a bound one): they do not stack, and neither may replace the other
    (the second could widen the first), so the calls are refused."""


def _stacked(
    outer: RunPolicy | None, inner: RunPolicy | None, earlier: str | None
) -> tuple[RunPolicy | None, str | None]:
    """The run policy of calls given ``outer`` and then ``inner``, and a conflict if they
    are two different ones (the outer one is kept, and the calls are refused)."""
    if earlier is not None:
        return outer, earlier
    if outer is None or inner is None or inner == outer:
        return outer or inner, None
    return outer, (
        "two different run policies were given for this call (one by the governed client "
        "or toolkit, one bound for the call or run): run policies do not stack, and one may "
        "not replace the other, so the call was refused; give the run's policy in one place"
    )


_NOBODY = StripeBinding()
_binding: ContextVar[StripeBinding | None] = ContextVar("paymaster_stripe_binding", default=None)


def current_binding() -> StripeBinding:
    """Who the governed Stripe calls of this context are attributed to (by :func:`bind`)."""
    return _binding.get() or _NOBODY


@contextmanager
def bind(
    *,
    agent: str | None = None,
    run: str | None = None,
    run_policy: RunPolicy | None = None,
    tool_call_id: str | None = None,
    credential: str | None = None,
) -> Iterator[StripeBinding]:
    """Attribute the governed Stripe calls made inside the block (in this thread or task
    and the tasks it starts) to ``agent``, ``run`` and the tool call that makes them: how
    tools tie calls to their run."""
    outer = current_binding()
    stacked, conflict = _stacked(outer.run_policy, run_policy, outer.run_policy_conflict)
    binding = StripeBinding(
        agent=agent or outer.agent,
        run=run or outer.run,
        run_policy=stacked,
        tool_call_id=tool_call_id or outer.tool_call_id,
        credential=credential or outer.credential,
        run_policy_conflict=conflict,
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

    @property
    def default_agent(self) -> str | None:
        """The agent type of calls made outside :func:`bind` (``agent=`` given here)."""
        return self._defaults.agent

    # -- stripe.HTTPClient ---------------------------------------------------------------
    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> Response:
        return self._request(method, url, headers, post_data)

    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any,
        pricing_lookup: bool = False,
    ) -> Response:
        plan = self._plan(method, url, headers, post_data, pricing_lookup)
        if plan.lookup is not None:
            response = self._request(
                "GET", _join(url, plan.lookup), self._lookup_headers(headers), None, True
            )
            if response[1] >= 300:  # the object cannot be read: Stripe's own error says why
                self._unpriced(plan, response[1])
                return response
            plan = self._priced(plan, response[0])
        with self.governor.guard(**plan.spec()) as call:
            if plan.operation.reprices_in_flight:
                lookup = plan.operation.lookup_path(plan.request)
                assert lookup is not None
                again = self._request(
                    "GET", _join(url, lookup), self._lookup_headers(headers), None, True
                )
                stale = self._stale(plan, again)
                if stale is not None:
                    call.fail(error=f"{stale.code}: {stale.message}")
                    raise stale
            response = self.inner.request(method, url, plan.outgoing(call), post_data)
            kind, kwargs = _resolution(call, plan.operation, response)
            try:
                getattr(call, kind)(**kwargs)
            except GovernanceUnavailable:
                _not_recorded(call, response)
        return response

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> Response:
        return await self._request_async(method, url, headers, post_data)

    async def _request_async(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        post_data: Any,
        pricing_lookup: bool = False,
    ) -> Response:
        plan = await _in_thread(self._plan, method, url, headers, post_data, pricing_lookup)
        if plan.lookup is not None:
            response = await self._request_async(
                "GET", _join(url, plan.lookup), self._lookup_headers(headers), None, True
            )
            if response[1] >= 300:
                await _in_thread(self._unpriced, plan, response[1])
                return response
            plan = await _in_thread(self._priced, plan, response[0])
        async with self.governor.aguard(**plan.spec()) as call:
            if plan.operation.reprices_in_flight:
                lookup = plan.operation.lookup_path(plan.request)
                assert lookup is not None
                again = await self._request_async(
                    "GET", _join(url, lookup), self._lookup_headers(headers), None, True
                )
                stale = await _in_thread(self._stale, plan, again)
                if stale is not None:
                    await call.fail(error=f"{stale.code}: {stale.message}")
                    raise stale
            response = await self.inner.request_async(
                method, url, plan.outgoing(call) or {}, post_data
            )
            kind, kwargs = _resolution(call, plan.operation, response)
            try:
                await getattr(call, kind)(**kwargs)
            except GovernanceUnavailable:
                _not_recorded(call, response)
        return response

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> Response:
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
        stacked, conflict = _stacked(
            self._defaults.run_policy, bound.run_policy, bound.run_policy_conflict
        )
        binding = StripeBinding(
            agent=bound.agent or self._defaults.agent,
            run=bound.run or self._defaults.run,
            run_policy=stacked,
            tool_call_id=bound.tool_call_id,
            credential=bound.credential,
            run_policy_conflict=conflict,
        )
        if binding.agent is None:
            raise ValueError(
                "a governed Stripe call needs an agent: pass agent= to governed_client() "
                "or call inside paymaster.vendors.stripe.bind(agent=...)"
            )
        return binding

    def _plan(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any,
        pricing_lookup: bool,
    ) -> _Plan:
        """Read and match the request; price it now, or name what to look up first.
        Refusals are audited and raised."""
        binding = self._who()
        path = urlsplit(url).path or "/"
        if binding.run_policy_conflict is not None:
            self._refuse(
                PolicyViolation(
                    ViolationCode.RUN_POLICY_WIDENED, binding.run_policy_conflict, vendor=VENDOR
                ),
                binding,
                path,
                method.upper(),
            )
        try:
            _check_headers(headers)
            wire_key = _idempotency_key(headers)
            self.catalogue.check_version(_single_header(headers, "Stripe-Version"))
            request = _parse(method, url, headers, post_data)
        except InvalidStripeRequest as violation:
            self._refuse(violation, binding, path, method.upper())
        operation = self.catalogue.match(request)
        if operation is None:
            self._refuse(
                PolicyViolation(
                    ViolationCode.UNKNOWN_OPERATION,
                    f"{request.method} {request.path} is not a Stripe operation paymaster "
                    "governs, so it was not sent (see paymaster.vendors.stripe.CATALOGUE)",
                    vendor=VENDOR,
                ),
                binding,
                request.path,
                request.method,
            )
        try:
            lookup = operation.lookup_path(request)
            subject = operation.subject_of(request)
        except InvalidStripeRequest as violation:
            self._refuse(violation, binding, request.path, request.method)
        ledger_key, held = self._current_key(binding, _ledger_key(request, wire_key, headers))
        plan = _Plan(
            binding,
            request,
            operation,
            headers,
            wire_key,
            ledger_key,
            pricing_lookup,
            subject=subject,
            version=self.catalogue.stripe_version,
        )
        if lookup is None:  # priced from the request alone: a retry prices the same
            return self._priced(plan, None)
        # Priced from the world: a retry of a call that may have acted (its hold pending,
        # unknown or settled) is priced as the call it repeats, since re-pricing "refund
        # what remains" after the first attempt refunded it would price the retry at
        # nothing. A retry of a released hold (nothing moved) is priced afresh: the world
        # may have changed since, and the hold is re-armed at the new price.
        if held is not None and held.state is not HoldState.RELEASED:
            return replace(plan, quote=Quote(held.estimate, held.customer))
        return replace(plan, lookup=lookup)

    def _current_key(self, binding: StripeBinding, key: str | None) -> tuple[str | None, Any]:
        """The ledger key a request with ``key`` reserves under, and the hold it finds
        there. Stripe forgets an idempotency key after 24 hours: a key whose hold is older
        is a new call at Stripe, so it is a new call in the ledger too (under a key derived
        from the old hold's)."""
        if key is None or binding.agent is None:
            return key, None
        ledger = self.governor.ledger
        held = ledger.hold_for_key(key, agent=binding.agent, run=binding.run)
        while held is not None and held.created_at <= ledger.now() - STRIPE_KEY_WINDOW:
            key = "e:" + hashlib.sha256(f"{key}|{held.id}".encode()).hexdigest()[:48]
            held = ledger.hold_for_key(key, agent=binding.agent, run=binding.run)
        return key, held

    def _lookup_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The original request's credentials and account, for a GET of the same account,
        at the version the catalogue prices for."""
        dropped = {"idempotency-key", "content-type", "content-length", "stripe-version"}
        kept = {k: v for k, v in (headers or {}).items() if _header_name(k) not in dropped}
        return {**kept, "Stripe-Version": self.catalogue.stripe_version}

    def _stale(self, plan: _Plan, looked_up: Response) -> PolicyViolation | None:
        """The refusal of a call whose object, read again while the ledger holds it, now
        costs more than was reserved (``None``: it does not)."""
        reserved = plan.quote.estimate if plan.quote is not None else None
        body, status, _ = looked_up
        if status >= 300:
            return PolicyViolation(
                ViolationCode.STALE_PRICE,
                f"{plan.operation.name}: the object could not be read again before the call "
                f"(HTTP {status}); nothing was sent",
                vendor=VENDOR,
            )
        try:
            now = plan.operation.quote(plan.request, _json(body)).estimate
        except (InvalidStripeRequest, ValueError) as exc:
            return PolicyViolation(
                ViolationCode.STALE_PRICE,
                f"{plan.operation.name}: read again before the call, it cannot be priced "
                f"({exc}); nothing was sent",
                vendor=VENDOR,
            )
        if now is None or (
            reserved is not None and now.currency == reserved.currency and now <= reserved
        ):
            return None
        return PolicyViolation(
            ViolationCode.STALE_PRICE,
            f"{plan.operation.name}: it was priced at {reserved or 'nothing'}, but it changed "
            f"before it was sent and would now cost {now}; nothing was sent. Retry: it will "
            "be priced again",
            vendor=VENDOR,
        )

    def _priced(self, plan: _Plan, looked_up: Any) -> _Plan:
        """Price the planned request, from the raw body of its look-up if it had one."""
        try:
            if looked_up is not None:
                try:
                    looked_up = _json(looked_up)
                except ValueError as exc:
                    raise InvalidStripeRequest(
                        f"{plan.operation.name}: the looked-up object is unreadable ({exc})"
                    ) from exc
            quote = plan.operation.quote(plan.request, looked_up)
        except InvalidStripeRequest as violation:
            self._refuse(violation, plan.binding, plan.request.path, plan.request.method)
        return replace(plan, quote=quote, lookup=None)

    def _unpriced(self, plan: _Plan, status: int) -> None:
        """Audit the attempt whose pricing look-up Stripe refused (Stripe's answer goes
        back to the caller; nothing was reserved or sent)."""
        binding, request = plan.binding, plan.request
        assert binding.agent is not None
        self.governor.record_refusal(
            PolicyViolation(
                ViolationCode.INVALID_REQUEST,
                f"{plan.operation.name} is priced from {plan.lookup}, which Stripe answered "
                f"with HTTP {status}; nothing was sent",
                vendor=VENDOR,
            ),
            agent=binding.agent,
            vendor=VENDOR,
            endpoint=request.path,
            method=request.method,
            run=binding.run,
            tool_call_id=binding.tool_call_id,
            credential=binding.credential,
        )

    def _refuse(
        self, violation: PolicyViolation, binding: StripeBinding, path: str, method: str
    ) -> NoReturn:
        assert binding.agent is not None
        violation.agent, violation.run, violation.endpoint = binding.agent, binding.run, path
        raise self.governor.record_refusal(
            violation,
            agent=binding.agent,
            vendor=VENDOR,
            endpoint=path,
            method=method,
            run=binding.run,
            tool_call_id=binding.tool_call_id,
            credential=binding.credential,
        )

    def _refuse_stream(self, method: str, url: str) -> NoReturn:
        self._refuse(
            PolicyViolation(
                ViolationCode.UNKNOWN_OPERATION,
                "streamed Stripe requests are not governed, so they are not sent",
                vendor=VENDOR,
            ),
            self._who(),
            urlsplit(url).path or "/",
            method.upper(),
        )


@dataclass(frozen=True)
class _Plan:
    """One request on its way through governance."""

    binding: StripeBinding
    request: StripeRequest
    operation: Operation
    sent_headers: Mapping[str, str] | None
    wire_key: str | None
    """The Idempotency-Key the client sent (POST only)."""
    ledger_key: str | None
    """The governed call's key: the wire key, scoped to this exact request."""
    pricing_lookup: bool
    lookup: str | None = None
    quote: Quote | None = None
    subject: str | None = None
    """The object the call changes (no other call on it while this one is in flight)."""
    version: str | None = None
    """The Stripe-Version sent when the client names none."""

    def spec(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`Governor.guard`."""
        assert self.binding.agent is not None
        assert self.quote is not None
        return {
            "agent": self.binding.agent,
            "vendor": VENDOR,
            "endpoint": self.request.path,
            "method": self.request.method,
            "estimate": self.quote.estimate,
            "customer": self.quote.customer,
            "run": self.binding.run,
            "run_policy": self.binding.run_policy,
            "idempotency_key": self.ledger_key,
            "pricing_lookup": self.pricing_lookup,
            "tool_call_id": self.binding.tool_call_id,
            "credential": self.binding.credential,
            "subject": self.subject,
            "accounts": self.request.accounts,
            # The catalogue declares a call free by pricing it at nothing.
            "free": self.quote.estimate is None,
        }

    def outgoing(self, call: GovernedCall) -> Mapping[str, str] | None:
        """The headers sent: a POST always carries an idempotency key (one made from the
        hold when the client sent none), so a retry of this call cannot pay twice."""
        sent = dict(self.sent_headers or {})
        if self.version is not None and _single_header(sent, "Stripe-Version") is None:
            sent["Stripe-Version"] = self.version  # the version the call was priced for
        if self.request.method == "POST":
            sent = {k: v for k, v in sent.items() if _header_name(k) != "idempotency-key"}
            if self.wire_key is None:
                sent["Idempotency-Key"] = call.idempotency_key
            else:
                sent["Idempotency-Key"] = _vendor_key(self.binding, self.wire_key)
        return sent


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run a step that may write an audit row off the event loop."""
    return await asyncio.to_thread(fn, *args)


def _resolution(call: GovernedCall, operation: Operation, response: Response) -> HoldEnd:
    """How the hold ends, from Stripe's HTTP response."""
    body, status, headers = response
    request_id = _header(headers, "Request-Id")
    free = not operation.moves_money
    by_status = resolution_of_status(status)
    if by_status is not Resolution.SETTLE:
        replayed = _header(headers, "Idempotent-Replayed") == "true"
        # A retry refused (409 in progress, 429, a key mismatch) says nothing about the
        # earlier attempt whose hold it resumed, which may have paid; a replayed refusal
        # is that attempt's own answer.
        shared = call.reservation.resumed and not replayed
        failure = _VendorRefused() if by_status is Resolution.RELEASE else _VendorMayHaveActed()
        if decide(failure, shared=shared, moves_money=not free) is Resolution.RELEASE:
            error = _error_text(body) if 400 <= status < 500 else f"Stripe answered HTTP {status}"
            return "fail", {"http_status": status, "vendor_request_id": request_id, "error": error}
        if by_status is Resolution.RELEASE:
            return "unknown", {
                "error": f"a retry got HTTP {status} ({_error_text(body)}); whether the first "
                "attempt moved money is unknown"
            }
        return "unknown", {
            "error": f"Stripe answered HTTP {status} (request {request_id}): it may have "
            "acted; a retry with the same idempotency key replays the call"
        }
    try:
        actual = _actual_cost(operation, _json(body))
    except Exception as exc:
        if free:
            actual = None
        else:
            return "unknown", {"error": f"HTTP {status} but the cost is unreadable: {exc}"}
    if actual is not None and actual.currency != call.estimate.currency:
        return "unknown", {
            "error": f"Stripe charged {actual}, but {call.estimate} was reserved in "
            f"{call.estimate.currency}: reconcile this hold"
        }
    return "settle", {
        "actual": actual if actual is not None else Money.zero(call.estimate.currency),
        "http_status": status,
        "vendor_request_id": request_id,
    }


class _VendorRefused(Exception):
    """Stripe refused the request (4xx): nothing moved."""


class _VendorMayHaveActed(TimeoutError):
    """Stripe answered 5xx, 1xx or 3xx: it may have acted."""


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


def _not_recorded(call: GovernedCall, response: Response) -> None:
    """Stripe answered but the ledger could not record it. Raising now would tell the
    caller the call failed (and invite a retry) when Stripe acted: its answer is returned,
    and the hold stays pending, counted against its budgets until it is reconciled."""
    log.error(
        "Stripe answered HTTP %s (request %s) but the ledger could not record it: hold %s "
        "stays pending and counted; reconcile it with `paymaster holds resolve`",
        response[1],
        _header(response[2], "Request-Id"),
        call.hold_id,
    )


def _join(url: str, path: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{path}"
