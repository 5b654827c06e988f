"""The governing proxy: a Stripe-compatible ASGI app in front of the real Stripe API.

Agents hold a vault key and the proxy's URL, never the real key. Each request is:

1. authenticated: without a valid vault key it is refused (401) before anything is read
   or reserved, and the failure is counted (:meth:`VaultKeys.record_failure`). A key
   authenticated before is remembered (its expiry still checked on every request); its
   revocation, and an expiry that falls while the request is read or waits for a worker,
   are caught by the ledger, inside the reserve of the request's governed call, and
   answered as for any revoked or expired key;
2. refused, and audited under the key, if its method is not GET, POST or DELETE (405),
   its body is too large (413) or its headers are unreadable (400);
3. replayed, if it is a retry of a POST that already succeeded with the same vault key
   (same ``Idempotency-Key``, same request, within 24 hours): governed as a free call of
   that key (policy, run policy, revocations: refused like any call), never forwarded
   again, and audited as its own attempt;
4. governed exactly as an in-process :func:`~paymaster.vendors.stripe.governed_client`
   governs it (the same catalogue, look-ups, ledger, policies, kill switch and audit),
   forwarded with the real key and an ``Idempotency-Key`` (the client's, or one made from
   the hold), and settled or released from the response.

Refusals answer in Stripe's error shape (see :mod:`paymaster.proxy.responses`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import Receive, Scope, Send

from .._db import unavailable_on_error
from .._errors import GovernanceUnavailable, PolicyViolation, ViolationCode
from .._governor import Governor
from .._governor.cancellation import in_executor
from .._vault import VaultKey, VaultKeyRefused, VaultKeys
from ..vendors.stripe._transport import (
    VENDOR,
    GovernedHTTPClient,
    accounts_of,
    bind,
    ledger_key_of,
)
from .config import ProxyConfig
from .replay import Replay, ReplayStore
from .responses import key_refused_response, stripe_error, violation_response
from .upstream import UpstreamClient, UpstreamNotReached

__all__ = ["FORWARDED_HEADERS", "create_app"]

log = logging.getLogger("paymaster.proxy")

T = TypeVar("T")

#: The request headers forwarded upstream; every other one (the vault key, cookies,
#: forwarding and hop-by-hop headers) is dropped. The real key is added upstream.
FORWARDED_HEADERS = (
    "Content-Type",
    "Idempotency-Key",
    "Stripe-Version",
    "Stripe-Account",
    "Stripe-Context",
    "User-Agent",
    "X-Stripe-Client-User-Agent",
    "Accept",
)
_METHODS = ("GET", "POST", "DELETE")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_PURGE_EVERY = 3600.0  # seconds between sweeps of expired replays
_KNOWN_KEYS = 10_000  # keys remembered as authenticated; the oldest is forgotten first


class _Refused(Exception):
    """A request refused before governance, with its Stripe-shaped response (and the
    violation its audit row names, once the key is known)."""

    def __init__(
        self,
        status: int,
        code: str,
        reason: str,
        violation: ViolationCode = ViolationCode.INVALID_REQUEST,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.violation = violation
        self.response = stripe_error(status, code, reason)


class _Proxy:
    def __init__(
        self,
        governor: Governor,
        config: ProxyConfig,
        transport: httpx.BaseTransport | None,
    ) -> None:
        self.governor = governor
        self.config = config
        self.keys = VaultKeys(governor.engine, governor.ledger.now)
        self.replays = ReplayStore(governor.engine, governor.ledger.now, config.replay_window)
        self.upstream = UpstreamClient(
            config.upstream,
            config.stripe_key,
            timeout=config.upstream_timeout,
            connections=config.workers,
            transport=transport,
        )
        self.stripe = GovernedHTTPClient(governor, inner=self.upstream)
        self._workers = ThreadPoolExecutor(config.workers, thread_name_prefix="paymaster-proxy")
        # Keys authenticated before, by the digest of the whole presented key: a request
        # presenting one is not read again. Its expiry is checked here on every request,
        # and the ledger checks the key again, revoked or expired, inside the reserve of
        # every governed call (a key refused there is forgotten, then refused as any
        # revoked or expired key is).
        self._known: dict[bytes, VaultKey] = {}
        self._known_lock = threading.Lock()

    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn`` on one of the proxy's worker threads, with this task's
        context variables. Each request's ledger work and upstream call run there in one
        piece, one hand-off from the event loop and one back. Work a thread has begun is
        finished even if the request's client goes away, so its hold is settled or
        released from the real response.
        """
        return await in_executor(self._workers, fn, *args)

    def close(self) -> None:
        """Wait for the requests in flight, then close the upstream connections."""
        self._workers.shutdown(wait=True)
        self.upstream.close()

    async def handle(self, request: Request) -> Response:
        # Authenticate first, whatever the request: every refusal after this is audited
        # under the key, and every failure before it is counted.
        try:
            presented = _presented_key(request)
        except _Refused as refused:  # no key at all
            await self._count_failure(None, "missing")
            return refused.response
        key = await self._authenticate(presented, request.url.path)
        if isinstance(key, Response):
            return key
        method, path = request.method, request.url.path
        headers: dict[str, str] = {}
        try:
            _check_method(request)
            _check_declared_length(request, self.config.max_body_bytes)
            body = await _read_body(request, self.config.max_body_bytes)
            headers.update(_forwarded(request))
            url = self.config.upstream + _target(request)
        except _Refused as refused:  # the agent is known: audit the refusal
            work: Callable[[], Response] = functools.partial(
                self._audit_refusal, key, method, path, refused
            )
        else:
            if method == "POST" and "Idempotency-Key" not in headers:
                # Made here rather than from the hold, so the client can be told it
                # (in every answer's headers) and retry with it.
                headers["Idempotency-Key"] = f"paymaster-proxy-{uuid.uuid4().hex}"
            work = functools.partial(self._governed, key, method, url, headers, body)
        response = await self.in_worker(self._answer, key, presented, method, path, work)
        sent_key = headers.get("Idempotency-Key")
        if sent_key is not None and "idempotency-key" not in response.headers:
            response.headers["Idempotency-Key"] = sent_key
        return response

    def _answer(
        self,
        key: VaultKey,
        presented: str,
        method: str,
        path: str,
        work: Callable[[], Response],
    ) -> Response:
        """Run ``work`` (on a worker thread) as the key's agent and run, and answer every
        way it can end in Stripe's error shape."""
        with bind(
            agent=key.agent, run=key.run, run_policy=key.run_policy, credential=key.credential
        ):
            try:
                return work()
            except PolicyViolation as violation:
                if violation.code in (ViolationCode.REVOKED, ViolationCode.EXPIRED):
                    # Perhaps the key itself, revoked or expired since it was checked:
                    # then it is refused as such a key is (401), the failure counted.
                    self._forget(presented)
                    refused = self._refusal_of(presented)
                    if refused is not None:
                        return refused
                return violation_response(violation)
            except GovernanceUnavailable as exc:
                return _unavailable(exc)
            except UpstreamNotReached as exc:
                return stripe_error(
                    502,
                    "upstream_unreachable",
                    f"the proxy could not reach Stripe ({exc}); the request was not sent and "
                    "nothing was spent",
                    kind="api_error",
                    retry=True,
                )
            except httpx.HTTPError as exc:
                return stripe_error(
                    502,
                    "upstream_outcome_unknown",
                    f"the request to Stripe failed mid-way ({type(exc).__name__}), so whether "
                    "it took effect is unknown; its cost stays counted. Retry with the same "
                    "Idempotency-Key (in this response's headers): Stripe will not act twice",
                    kind="api_error",
                    retry=True,
                )
            except Exception:
                log.exception("the proxy failed on %s %r", method, path)
                return stripe_error(
                    500,
                    "proxy_error",
                    "the proxy failed unexpectedly; if this was a payment, check before "
                    "retrying (the proxy's log has the details)",
                    kind="api_error",
                )

    async def _authenticate(self, presented: str, path: str) -> VaultKey | Response:
        """The presented vault key, or the answer refusing it (a failure is counted)."""
        digest = hashlib.sha256(presented.encode()).digest()
        known = self._known.get(digest)
        if known is not None and known.state(self.governor.ledger.now()) == "active":
            return known
        try:
            key = await self.in_worker(self.keys.authenticate, presented)
        except VaultKeyRefused as refused:
            self._forget(presented)
            log.warning("refused a request to %r: %s", path, refused)
            await self._count_failure(refused.key_id, refused.failure)
            return key_refused_response(refused)
        except GovernanceUnavailable as exc:
            return _unavailable(exc)
        with self._known_lock:
            if len(self._known) >= _KNOWN_KEYS:
                del self._known[next(iter(self._known))]
            self._known[digest] = key
        return key

    def _forget(self, presented: str) -> None:
        with self._known_lock:
            self._known.pop(hashlib.sha256(presented.encode()).digest(), None)

    def _refusal_of(self, presented: str) -> Response | None:
        """The answer refusing ``presented`` if it no longer authenticates (the failure
        counted), else ``None``; on a worker thread."""
        try:
            self.keys.authenticate(presented)
        except VaultKeyRefused as refused:
            self._record_failure(refused.key_id, refused.failure)
            return key_refused_response(refused)
        except GovernanceUnavailable:  # the call is refused either way
            return None
        return None

    async def _count_failure(self, key_id: str | None, reason: str) -> None:
        await self.in_worker(self._record_failure, key_id, reason)

    def _record_failure(self, key_id: str | None, reason: str) -> None:
        """Count a failed authentication; the answer is a 401 whether or not it counts."""
        try:
            self.keys.record_failure(key_id, reason)
        except Exception:
            log.exception("could not count a failed authentication (%s)", reason)

    def _audit_refusal(self, key: VaultKey, method: str, path: str, refused: _Refused) -> Response:
        endpoint = path[:500]
        violation = PolicyViolation(
            refused.violation,
            refused.reason,
            vendor=VENDOR,
            agent=key.agent,
            run=key.run,
            endpoint=endpoint,
        )
        self.governor.record_refusal(
            violation,
            agent=key.agent,
            vendor=VENDOR,
            endpoint=endpoint,
            method=method[:10],
            run=key.run,
            credential=key.credential,
        )
        return refused.response

    def _governed(
        self, key: VaultKey, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> Response:
        """Replay, or govern and forward, one request (on a worker thread)."""
        ledger_key = ledger_key_of(method, url, headers, body) if method == "POST" else None
        if ledger_key is not None:
            kept = self.replays.find(ledger_key, key.agent, key.credential)
            if kept is not None:
                return self._replay(key, method, url, headers, body, kept)
        try:
            content, status, sent_back = self.stripe.request(method, url, headers, body or None)
        except PolicyViolation as violation:
            # A retry racing the first attempt's kept response (or a keep that failed):
            # the call succeeded, so its answer is replayed if it was kept.
            if ledger_key is None or violation.code is not ViolationCode.ALREADY_COMPLETED:
                raise
            kept = self.replays.find(ledger_key, key.agent, key.credential)
            if kept is None:
                raise
            return self._replay(key, method, url, headers, body, kept)
        if status == 401:  # the proxy's own key was refused: the agent cannot fix that
            log.error("Stripe refused the proxy's own API key (HTTP 401)")
            return stripe_error(
                502,
                "upstream_authentication_failed",
                "Stripe refused the proxy's API key; the proxy's operator must fix it",
                kind="api_error",
            )
        if ledger_key is not None and 200 <= status < 300:
            try:
                self.replays.keep(
                    ledger_key, key.agent, key.run, key.credential, status, sent_back, content
                )
            except Exception:  # the call happened: its answer goes back regardless
                log.exception("could not keep the response for replay")
        return Response(content, status, headers=dict(sent_back))

    def _replay(
        self,
        key: VaultKey,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        kept: Replay,
    ) -> Response:
        """Answer a retry with the kept response (made with this same key), governed like
        the call it repeats: a free call of the key's agent, run and run policy, checked
        against the policy (endpoint, method, the original hold's customer, connected
        accounts), run policy, expiry and revocations, counted, and audited as its own
        attempt. A refusal raises :class:`PolicyViolation`, answered as any policy
        refusal."""
        with self.governor.guard(
            agent=key.agent,
            vendor=VENDOR,
            endpoint=httpx.URL(url).path,
            method=method,
            customer=kept.customer,
            run=key.run,
            run_policy=key.run_policy,
            credential=key.credential,
            accounts=accounts_of(method, url, headers, body or None),
            free=True,
        ) as call:
            call.settle(http_status=kept.status, vendor_request_id=_get(kept.headers, "Request-Id"))
        headers = {k: v for k, v in kept.headers.items() if k.lower() != "idempotent-replayed"}
        return Response(kept.body, kept.status, headers={**headers, "Idempotent-Replayed": "true"})

    async def health(self, request: Request) -> Response:
        """200 when the ledger answers, 503 when it does not."""
        try:
            await self.in_worker(self._ping)
        except GovernanceUnavailable as exc:
            log.error("health check: %s", exc)
            return JSONResponse({"status": "unavailable"}, 503)
        return JSONResponse({"status": "ok"})

    def _ping(self) -> None:
        engine = self.governor.engine
        with unavailable_on_error(engine, "checking health", "so requests are refused"):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))

    async def purge_forever(self) -> None:
        while True:
            try:
                removed = await self.in_worker(self.replays.purge)
                if removed:
                    log.info("forgot %d replayable responses older than the window", removed)
            except Exception:
                log.exception("could not purge expired replayable responses")
            await asyncio.sleep(_PURGE_EVERY)


class _AnyMethod:
    """An ASGI endpoint answering requests of every method with ``handle``: Starlette
    routes a plain function for GET (and HEAD) only, and refuses the rest itself."""

    def __init__(self, handle: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(handle)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def create_app(
    governor: Governor,
    config: ProxyConfig,
    *,
    upstream_transport: httpx.BaseTransport | None = None,
) -> Starlette:
    """The proxy as an ASGI app, governing with ``governor`` (which the caller closes).

    ``upstream_transport`` replaces httpx's network transport (tests record or fault the
    upstream with it); the upstream's address is always ``config.upstream``.
    """
    proxy = _Proxy(governor, config, upstream_transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(proxy.purge_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await asyncio.to_thread(proxy.close)

    app = Starlette(
        routes=[
            Route("/_paymaster/health", proxy.health, methods=["GET"]),
            # Every method reaches the handler (an ASGI endpoint is routed whatever its
            # method), so that the key is read, and the refusal audited, before a method
            # outside GET, POST and DELETE is refused.
            Route("/{path:path}", _AnyMethod(proxy.handle)),
        ],
        lifespan=lifespan,
    )
    app.state.proxy = proxy
    return app


# -- reading the request -----------------------------------------------------------------
def _check_method(request: Request) -> None:
    if request.method not in _METHODS:
        method = request.method[:20]
        raise _Refused(
            405,
            "method_not_allowed",
            f"{method} is not a Stripe API method; use GET, POST or DELETE",
            ViolationCode.METHOD_NOT_ALLOWED,
        )


def _presented_key(request: Request) -> str:
    """The API key from ``Authorization: Bearer KEY`` or ``Basic base64(KEY:)``, as the
    Stripe API accepts it."""
    values = request.headers.getlist("authorization")
    if len(values) != 1:
        raise _Refused(
            401,
            "missing_api_key",
            "You did not provide an API key: send your paymaster vault key as "
            "'Authorization: Bearer pmk_...'"
            if not values
            else "send exactly one Authorization header",
        )
    scheme, _, credentials = values[0].strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "basic":
        try:
            credentials = base64.b64decode(credentials, validate=True).decode().split(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            credentials = ""
    elif scheme.lower() != "bearer":
        credentials = ""
    if not credentials:
        raise _Refused(
            401,
            "missing_api_key",
            "the Authorization header must be 'Bearer pmk_...' (or Basic with the key as user)",
        )
    return credentials


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise _Refused(400, "invalid_request", "the Content-Length header is malformed")
    if int(declared) > limit:
        raise _too_large(limit)


def _too_large(limit: int) -> _Refused:
    return _Refused(
        413, "request_too_large", f"the request body exceeds the proxy's {limit}-byte limit"
    )


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _forwarded(request: Request) -> dict[str, str]:
    forwarded = {}
    for name in FORWARDED_HEADERS:
        values = request.headers.getlist(name)
        if len(values) > 1:
            raise _Refused(400, "invalid_request", f"the {name} header is sent {len(values)} times")
        if values:
            if not _PRINTABLE_ASCII.fullmatch(values[0]):
                raise _Refused(400, "invalid_request", f"the {name} header must be printable ASCII")
            forwarded[name] = values[0]
    return forwarded


def _target(request: Request) -> str:
    """The path and query exactly as the client sent them (percent-encoding kept), so what
    is governed is what is forwarded; only ever appended to the configured upstream."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    path = raw.decode("latin-1")
    if not path.startswith("/"):
        raise _Refused(400, "invalid_request", "the request path is not absolute")
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


def _get(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _unavailable(exc: GovernanceUnavailable) -> Response:
    """Fail closed. The details (which database, the driver's error) go to the log, not to
    the client."""
    log.error("ledger unavailable: %s", exc)
    return stripe_error(
        503,
        "ledger_unavailable",
        "the paymaster ledger is unavailable, so the request was not forwarded; retry later",
        kind="api_error",
        retry=True,
    )
