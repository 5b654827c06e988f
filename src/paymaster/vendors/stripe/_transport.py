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
import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import stripe
from stripe._http_client import new_http_client_async_fallback

from ..._errors import GovernanceUnavailable, PolicyViolation, ViolationCode
from ..._ledger import HoldState
from ..._policy import RunPolicy
from ._binding import StripeBinding, _stacked, bind, current_binding
from ._catalogue import (
    CATALOGUE,
    Catalogue,
    InvalidStripeRequest,
    Operation,
    Quote,
    StripeRequest,
)
from ._plan import _not_recorded, _Plan, _resolution
from ._wire import (
    VENDOR,
    Response,
    _check_headers,
    _header_name,
    _idempotency_key,
    _join,
    _json,
    _ledger_key,
    _parse,
    _single_header,
    accounts_of,
    ledger_key_of,
)

if TYPE_CHECKING:
    from ..._governor import Governor

__all__ = [
    "VENDOR",
    "GovernedHTTPClient",
    "StripeBinding",
    "accounts_of",
    "bind",
    "current_binding",
    "ledger_key_of",
]

log = logging.getLogger("paymaster.stripe")

#: How long Stripe keeps an idempotency key: a key older than that is a new call.
STRIPE_KEY_WINDOW = timedelta(hours=24)


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
        with self.governor.guard(plan.call_request()) as call:
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
        async with self.governor.aguard(plan.call_request()) as call:
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
        request, wire_key, operation = self._read(binding, method, url, headers, post_data)
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

    def _read(
        self,
        binding: StripeBinding,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any,
    ) -> tuple[StripeRequest, str | None, Operation]:
        """The request, its Idempotency-Key and the catalogued operation it matches.
        Refusals are audited and raised."""
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
        return request, wire_key, operation

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


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run a step that may write an audit row off the event loop."""
    return await asyncio.to_thread(fn, *args)
