"""The responses a proxy replays to a retry, as Stripe does for 24 hours.

When a POST with an ``Idempotency-Key`` succeeds, its response is kept under the ledger's
key for that exact request. A retry within the window gets that response again (marked
``Idempotent-Replayed: true``) and is neither reserved nor forwarded: the call it repeats
was counted once, and an upstream that ignores idempotency keys (localstripe) cannot act
twice. Shared by every proxy on the ledger, since it lives in the ledger's database.

A kept response is served only to the vault key that made the call (its ``credential``):
another key presenting the same request and ``Idempotency-Key`` finds nothing here. The
caller governs the replay itself, as a free call of that key (see
:meth:`paymaster.proxy.app._Proxy._replay`), with the original hold's customer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from .._db import unavailable_on_error
from .._ledger import hold_key
from .._schema import hold, proxy_replay

__all__ = ["Replay", "ReplayStore"]

log = logging.getLogger("paymaster.proxy")


@dataclass(frozen=True)
class Replay:
    """A kept response."""

    status: int
    headers: dict[str, str]
    body: bytes
    hold_id: str | None
    created_at: datetime
    customer: str | None = None
    """The customer of the call's hold, checked again against the policy on a replay."""
    run: str | None = None


class ReplayStore:
    """Kept responses in the ledger database, ``window`` long."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime], window: timedelta) -> None:
        self._engine = engine
        self._clock = clock
        self.window = window

    def find(self, key: str, agent: str, credential: str) -> Replay | None:
        """The kept response for this ledger key, if one is younger than the window and was
        made with the same vault key (``credential``) for the same agent type."""
        since = self._clock() - self.window
        query = (
            select(proxy_replay, hold.c.customer.label("hold_customer"))
            .select_from(proxy_replay.outerjoin(hold, hold.c.id == proxy_replay.c.hold_id))
            .where(
                proxy_replay.c.key == _stored_key(credential, key),
                proxy_replay.c.credential == credential,
                proxy_replay.c.agent == agent,
                proxy_replay.c.created_at > since,
            )
        )
        with unavailable_on_error(
            self._engine, "looking up a replayable response", "so the request was not forwarded"
        ):
            with self._engine.connect() as conn:
                row = conn.execute(query).first()
        if row is None:
            return None
        return Replay(
            row.status,
            json.loads(row.headers),
            row.body,
            row.hold_id,
            row.created_at,
            customer=row.hold_customer,
            run=row.run,
        )

    def keep(
        self,
        key: str,
        agent: str,
        run: str | None,
        credential: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        """Keep a response for the vault key ``credential`` that made the call. The first
        one kept for a key stands (two attempts that both got an answer got the same one
        from Stripe)."""
        scoped = hold_key(agent, run, key)
        hold_id = select(hold.c.id).where(hold.c.idempotency_key == scoped).scalar_subquery()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(proxy_replay).values(
                        key=_stored_key(credential, key),
                        agent=agent,
                        hold_id=hold_id,
                        status=status,
                        headers=json.dumps(dict(headers)),
                        body=body,
                        created_at=self._clock(),
                        credential=credential,
                        run=run,
                    )
                )
        except IntegrityError:
            pass

    def purge(self) -> int:
        """Forget responses older than the window; returns how many."""
        before = self._clock() - self.window
        with self._engine.begin() as conn:
            return conn.execute(
                delete(proxy_replay).where(proxy_replay.c.created_at <= before)
            ).rowcount


def _stored_key(credential: str, key: str) -> str:
    """The row's key: the ledger key scoped to the vault key, so two keys presenting the
    same request keep (and find) their own responses. Hashed if too long to store."""
    scoped = f"{credential}:{key}"
    if len(scoped) <= 255:
        return scoped
    return "h:" + hashlib.sha256(scoped.encode()).hexdigest()
