"""Revocations, the kill switch: revoke an agent type, a run or everything (every later
reserve in scope is refused, by the budget's own UPDATE), restore, and list them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, func, insert, select, update

from .. import _driver
from .. import _statements as S
from .. import _storable as storable
from .._db import read_only, unavailable_on_error
from .._errors import ViolationCode
from .._schema import VAULT_KEY_PREFIX, revocation, vault_key_id
from ._core import CALL_NOT_MADE, _LedgerCore
from .models import Revocation, RevocationScope


def stopped_because(
    conn: Connection, agent: str, run: str | None, credential: str | None, now: datetime
) -> tuple[ViolationCode, str] | None:
    """Why a call of ``agent`` (in ``run``, presented with ``credential``) may not be
    made at ``now``, or ``None``: a revocation in force for it, or its vault key revoked
    (both :attr:`~ViolationCode.REVOKED`) or expired (:attr:`~ViolationCode.EXPIRED`)."""
    row = _driver.run(conn, S.ACTIVE_REVOCATION, {"p_agent": agent, "p_run": run}).first()
    if row is not None:
        what = "everything" if row.kind == "all" else f"{row.kind} {row.target!r}"
        return ViolationCode.REVOKED, f"{what} is revoked: {row.reason}"
    key_id = vault_key_id(credential)
    if key_id is None:
        return None
    key = _driver.run(conn, S.REFUSED_VAULT_KEY, {"p_vault_key": key_id, "p_now": now}).first()
    if key is None:
        return None
    name = f"{VAULT_KEY_PREFIX}{key.id}"
    if key.revoked_at is not None:
        return (
            ViolationCode.REVOKED,
            f"vault key {name} was revoked by {key.revoked_by}: {key.revoke_reason}",
        )
    return ViolationCode.EXPIRED, f"vault key {name} expired at {key.expires_at:%Y-%m-%d %H:%M:%S}Z"


def _target(scope: RevocationScope, target: str | None) -> str:
    """A revocation's target as the calls it stops store their agent type or run."""
    if scope is RevocationScope.ALL:
        return ""
    return storable.field("agent" if scope is RevocationScope.AGENT else "run", str(target))


class _Revoking(_LedgerCore):
    """The kill switch."""

    # -- revocations ---------------------------------------------------------------------
    def revoke(self, scope: RevocationScope, target: str | None, *, reason: str, by: str) -> int:
        """Refuse every later reserve in ``scope`` until restored; returns the revocation id."""
        scope = RevocationScope(scope)
        if scope is not RevocationScope.ALL and not target:
            raise ValueError(f"revoking a {scope} needs its name")
        if not reason.strip():
            raise ValueError("a revocation needs a reason")
        at, name = self.now(), _target(scope, target)
        reason, by = storable.field("reason", reason), storable.field("by", by)
        fields = {"kind": scope.value, "target": name, "reason": reason, "revoked_by": by}

        def work(conn: Connection, retrying: bool) -> int:
            if retrying:  # written already by an attempt whose COMMIT reply was lost?
                found = conn.execute(
                    select(revocation.c.id).where(
                        *(revocation.c[k] == v for k, v in fields.items()),
                        revocation.c.revoked_at == at,
                    )
                ).scalar()
                if found is not None:
                    return int(found)
            inserted = insert(revocation).values(**fields, revoked_at=at)
            return int(conn.execute(inserted.returning(revocation.c.id)).scalar_one())

        revocation_id = self._write("revoking", "so nothing was revoked", work)
        if self.observer is not None:
            self.observer.revoked(scope, name, reason=reason, by=by, at=at)
        return revocation_id

    def restore(self, scope: RevocationScope, target: str | None, *, reason: str, by: str) -> int:
        """Lift the active revocations of exactly this scope; returns how many."""
        scope = RevocationScope(scope)
        at, name = self.now(), _target(scope, target)
        reason, by = storable.field("reason", reason), storable.field("by", by)
        same_scope = (revocation.c.kind == scope.value, revocation.c.target == name)

        def work(conn: Connection, retrying: bool) -> int:
            earlier = 0
            if retrying:  # lifted already by an attempt whose COMMIT reply was lost?
                earlier = int(
                    conn.execute(
                        select(func.count()).where(
                            *same_scope, revocation.c.lifted_at == at, revocation.c.lifted_by == by
                        )
                    ).scalar_one()
                )
            lifted = conn.execute(
                update(revocation)
                .where(revocation.c.lifted_at.is_(None), *same_scope)
                .values(lifted_at=at, lifted_by=by, lift_reason=reason)
            )
            return earlier + int(lifted.rowcount)

        return self._write("restoring", "so nothing was restored", work)

    def revocations(self, *, active_only: bool = True) -> list[Revocation]:
        query = select(revocation).order_by(revocation.c.id)
        if active_only:
            query = query.where(revocation.c.lifted_at.is_(None))
        with read_only(self._engine) as conn:
            return [
                Revocation(
                    id=int(r.id),
                    scope=RevocationScope(r.kind),
                    target=r.target,
                    reason=r.reason,
                    revoked_by=r.revoked_by,
                    revoked_at=r.revoked_at,
                    lifted_at=r.lifted_at,
                )
                for r in conn.execute(query)
            ]

    def active_revocation(self, agent: str, run: str | None) -> str | None:
        """Why ``agent`` (or ``run``) is revoked now, or ``None``."""
        stopped = self.stopped(agent, run)
        return None if stopped is None else stopped[1]

    def stopped(
        self, agent: str, run: str | None, credential: str | None = None
    ) -> tuple[ViolationCode, str] | None:
        """Why a call of ``agent`` (in ``run``, presented with ``credential``) may not be
        made now (:func:`stopped_because`), or ``None``: the kill switch for calls that
        reserve nothing."""
        agent, run = storable.field("agent", agent), storable.field("run", run)
        with (
            unavailable_on_error(self._engine, "reading revocations", CALL_NOT_MADE),
            read_only(self._engine) as conn,
        ):
            return stopped_because(conn, agent, run, credential, self.now())
