"""``aguard`` for asyncio, safe under cancellation: ledger work runs in worker threads,
never on the loop, and a cancelled task never leaves a hold pending or resolves it twice.

:class:`AsyncGovernedCall` wraps a :class:`~paymaster._governor.call.GovernedCall` (as
SQLAlchemy's ``AsyncSession`` wraps a ``Session``): its resolving methods run the
wrapped call's in a worker thread, to completion (:func:`to_completion`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

from .._audit import Outcome
from .._ledger import Hold, Reservation, ReserveRequest
from .._money import Money
from .._outcomes import Resolution, Verdict
from .._policy import EffectivePolicy
from .call import _NO_SPAN, CallSpan, GovernedCall, close_call, open_call

if TYPE_CHECKING:
    from .governor import Governor

__all__ = ["AsyncGovernedCall", "AsyncGuard", "aconclude", "finish", "to_completion"]

log = logging.getLogger("paymaster")

T = TypeVar("T")


async def in_executor(executor: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Await blocking ``fn`` run in ``executor`` with this task's context variables. Once
    a thread has begun it, ``fn`` runs to completion even if the awaiting task is
    cancelled (which ends at once); work cancelled before a thread picks it up never
    starts."""
    work = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.wrap_future(executor.submit(work))


async def to_completion(
    executor: Executor,
    fn: Callable[..., T],
    *args: Any,
    polling: bool = False,
    on_cancel: Callable[[], None] | None = None,
    **kwargs: Any,
) -> tuple[T, bool]:
    """Run ``fn`` in a worker thread and wait for it even if this task is cancelled
    meanwhile (a ledger write cannot be abandoned half-way); report the cancellation.

    A task being cancelled (``polling``, or once a cancellation arrives) waits by
    polling rather than by awaiting the thread, so that a framework draining
    cancelled tasks sees it make progress (the Agents SDK keeps waiting only for
    tasks whose next wake-up is a timer) instead of abandoning it mid-write.
    ``on_cancel`` runs once, when a cancellation is first seen: for work that must
    finish correctly even if this task is then abandoned and never resumes.
    """
    future = asyncio.get_running_loop().run_in_executor(
        executor, functools.partial(fn, *args, **kwargs)
    )
    cancelled = False
    if not polling:
        try:
            return await asyncio.shield(future), False
        except asyncio.CancelledError:
            if future.done() and future.cancelled():
                raise
            cancelled = True
            if on_cancel is not None:
                on_cancel()
    while not future.done():
        try:
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled = True
    return future.result(), cancelled


async def finish(executor: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """:func:`to_completion`, then end cancelled if the task was cancelled meanwhile."""
    result, cancelled = await to_completion(executor, fn, *args, **kwargs)
    if cancelled:
        raise asyncio.CancelledError
    return result


class _ReserveJob:
    """A reserve run in a worker thread that frees its own hold if the task that asked
    for it was cancelled meanwhile (a framework may abandon that task, never resuming it
    to do so)."""

    def __init__(self, governor: Governor, prepare: Callable[[], ReserveRequest]) -> None:
        self._governor = governor
        # The checks run in the same job as the reserve, so a task cancelled during
        # either still leaves its attempt's row: a refusal, or the freed reservation.
        self._prepare = prepare
        self.request: ReserveRequest | None = None
        self._lock = threading.Lock()
        self.abandoned = False
        self._reservation: Reservation | None = None
        self._released = threading.Event()

    def run(self) -> Reservation:
        self.request = self._prepare()
        reservation = self._governor.ledger.reserve(self.request)
        with self._lock:
            self._reservation = reservation
            abandoned = self.abandoned
        if abandoned:
            self._release()
        return reservation

    def abandon(self) -> None:
        """The asking task was cancelled (on the event loop)."""
        with self._lock:
            self.abandoned = True
            landed = self._reservation is not None
        if landed:  # reserved already: free it in a worker, without waiting
            self._governor._executor.submit(self._release)

    def wait_released(self) -> None:
        self._released.wait()

    def _release(self) -> None:
        reservation = self._reservation
        try:
            if reservation is not None:  # the call never ran: give up this attempt's
                # share (a hold other attempts still hold stays counted for them)
                request = self.request
                self._governor.ledger.release(
                    reservation.hold.id,
                    outcome=Outcome.ERRORED,
                    error="task cancelled before the call was made",
                    tool_call_id=None if request is None else request.tool_call_id,
                    credential=None if request is None else request.credential,
                )
        except Exception:
            log.exception("could not free the hold of a cancelled call; it stays pending")
        finally:
            self._released.set()


class AsyncGuard:
    """The ``async with`` block of :meth:`Governor.aguard`.

    A class rather than an async generator: its awaits stay visible to frameworks that
    inspect a cancelled task to decide whether to wait for it (the Agents SDK), and an
    event loop shutting down has no generator of ours to close mid-write.
    """

    def __init__(
        self,
        governor: Governor,
        prepare: Callable[[], ReserveRequest],
        span: CallSpan = _NO_SPAN,
    ) -> None:
        self._governor = governor
        self._prepare = prepare
        self._span = span
        self._call: AsyncGovernedCall | None = None

    async def __aenter__(self) -> AsyncGovernedCall:
        self._span.__enter__()
        try:
            call = await self._enter()
        except BaseException as exc:
            self._span.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._span.started(call.sync_call)
        return call

    async def _enter(self) -> AsyncGovernedCall:
        gov = self._governor
        job = _ReserveJob(gov, self._prepare)
        try:
            reservation, cancelled = await to_completion(
                gov._executor, job.run, on_cancel=job.abandon
            )
        except Exception as exc:
            if job.abandoned:  # refused (and audited) while the task was being cancelled
                raise asyncio.CancelledError from exc
            raise
        request = job.request
        assert request is not None
        if cancelled:
            # The job frees the hold in its worker thread (the call never ran), so it is
            # freed even if this task is abandoned now; wait for that when we can.
            await to_completion(gov._executor, job.wait_released, polling=True)
            raise asyncio.CancelledError
        call = open_call(gov.ledger, reservation, request, gov._unknown_on)
        self._call = AsyncGovernedCall(call, gov._executor)
        return self._call

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        try:
            return await self._exit(exc)
        finally:
            self._span.__exit__(exc_type, exc, tb)

    async def _exit(self, exc: BaseException | None) -> bool:
        gov, call = self._governor, self._call
        assert call is not None
        if exc is None:
            await finish(gov._executor, close_call, call.sync_call, None, gov._unknown_on)
            return False
        _, cancelled = await to_completion(
            gov._executor,
            close_call,
            call.sync_call,
            exc,
            gov._unknown_on,
            polling=isinstance(exc, asyncio.CancelledError),
        )
        if cancelled and not isinstance(exc, asyncio.CancelledError):
            # Cancelled while recording: the task must still end cancelled.
            raise asyncio.CancelledError from exc
        return False


class AsyncGovernedCall:
    """The call object of :meth:`Governor.aguard`: a :class:`GovernedCall` whose
    resolving methods are awaitable. Each runs the wrapped call's in a worker thread, to
    completion even if the task is cancelled meanwhile (the task then ends cancelled)."""

    def __init__(self, call: GovernedCall, executor: Executor) -> None:
        #: The wrapped blocking call (resolve it from a worker thread, not the loop).
        self.sync_call = call
        self._executor = executor

    # -- what the wrapped call reads ------------------------------------------------------
    @property
    def reservation(self) -> Reservation:
        return self.sync_call.reservation

    @property
    def policy(self) -> EffectivePolicy:
        return self.sync_call.policy

    @property
    def free(self) -> bool:
        return self.sync_call.free

    @property
    def tool_call_id(self) -> str | None:
        return self.sync_call.tool_call_id

    @property
    def credential(self) -> str | None:
        return self.sync_call.credential

    @property
    def unknown_on(self) -> tuple[type[BaseException], ...]:
        return self.sync_call.unknown_on

    @property
    def hold(self) -> Hold:
        return self.sync_call.hold

    @property
    def hold_id(self) -> str:
        return self.sync_call.hold_id

    @property
    def estimate(self) -> Money:
        return self.sync_call.estimate

    @property
    def remaining(self) -> Money:
        """What was left of the daily budget once this call was reserved."""
        return self.sync_call.remaining

    @property
    def idempotency_key(self) -> str:
        """The key to send to the vendor so a retry cannot pay twice."""
        return self.sync_call.idempotency_key

    @property
    def resolved(self) -> bool:
        """Whether this attempt's outcome is recorded (its audit row written)."""
        return self.sync_call.resolved

    # -- resolving it, awaited ------------------------------------------------------------
    async def settle(
        self,
        actual: Money | int | None = None,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
    ) -> Hold:
        """:meth:`GovernedCall.settle`, awaited."""
        return await finish(
            self._executor,
            self.sync_call.settle,
            actual,
            http_status=http_status,
            vendor_request_id=vendor_request_id,
        )

    async def fail(
        self,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        error: str | None = None,
    ) -> Hold:
        """:meth:`GovernedCall.fail`, awaited."""
        return await finish(
            self._executor,
            self.sync_call.fail,
            http_status=http_status,
            vendor_request_id=vendor_request_id,
            error=error,
        )

    async def unknown(self, error: str) -> Hold:
        """:meth:`GovernedCall.unknown`, awaited."""
        return await finish(self._executor, self.sync_call.unknown, error)


async def aconclude(call: GovernedCall | AsyncGovernedCall, verdict: Verdict) -> Hold:
    """:func:`~paymaster._governor.call.conclude` for the call of an ``aguard``, awaited on its
    event loop."""
    if not isinstance(call, AsyncGovernedCall):
        raise TypeError("aconclude takes the call of an aguard block; use conclude")
    if verdict.resolution is Resolution.SETTLE:
        return await call.settle(verdict.actual)
    if verdict.resolution is Resolution.UNKNOWN:
        return await call.unknown(verdict.reason)
    return await call.fail(error=verdict.reason)
