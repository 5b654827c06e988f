"""Vault keys: what an agent holds instead of a vendor's real API key.

A vault key (``pmk_<id>_<secret>``) is shown once, when it is made; the ledger stores its
public id and a SHA-256 digest of its secret only. (The secret is 256 random bits, so a
fast digest is enough: there is nothing to guess.) A key binds the calls made with it to
an agent type, optionally a run and a run policy, and an expiry. The governing proxy
(:mod:`paymaster.proxy`) authenticates a key with :meth:`VaultKeys.authenticate` and then
remembers it; the ledger checks the key again inside the reserve of every governed call
presented with it (its ``credential``), so a revoke, or the key's expiry, refuses the very
next call. A key made
without a run has its own id (``pmk_<id>``) as its run, so ``paymaster revoke --run
pmk_<id>`` stops its calls.

Failed authentications are counted, not logged one row each
(:meth:`VaultKeys.record_failure`, :meth:`VaultKeys.failures`): one row per known key id
(or ``"unknown"``) and reason, so a flood of bad keys cannot grow the ledger.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from . import _storable as storable
from ._db import unavailable_on_error
from ._errors import PaymasterError
from ._policy import RunPolicy
from ._schema import VAULT_KEY_PREFIX, auth_failure, vault_key

__all__ = [
    "KEY_PREFIX",
    "UNKNOWN_KEY",
    "AuthFailure",
    "NewVaultKey",
    "VaultKey",
    "VaultKeyError",
    "VaultKeyNotFound",
    "VaultKeyRefused",
    "VaultKeys",
]

KEY_PREFIX = VAULT_KEY_PREFIX
_ID_LENGTH = 12
_KEY = re.compile(r"pmk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_PRESENTED_ID = re.compile(r"pmk_([0-9a-f]{12})(?![0-9a-f])")
#: Where failed authentications that name no known key are counted.
UNKNOWN_KEY = "unknown"
# Compared against when the presented id is unknown, so that an unknown id costs the
# same digest and comparison as a known one.
_DUMMY_DIGEST = hashlib.sha256(b"paymaster: no such key").hexdigest()


class VaultKeyError(PaymasterError):
    """A vault key operation that cannot be done."""


class VaultKeyNotFound(VaultKeyError, LookupError):
    """No vault key has this id."""


class VaultKeyRefused(VaultKeyError):
    """A presented vault key does not authenticate. ``reason`` is stable: match on it."""

    class Reason(str, Enum):
        MALFORMED = "malformed"
        UNKNOWN = "unknown"
        EXPIRED = "expired"
        REVOKED = "revoked"

    def __init__(
        self,
        reason: VaultKeyRefused.Reason,
        message: str,
        *,
        key_id: str | None = None,
        failure: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        #: The id the presented key names, if it names one (known or not).
        self.key_id = key_id
        #: The reason counted by :meth:`VaultKeys.record_failure`: the ``reason``, or
        #: ``bad_secret`` for a known id with a wrong secret (told to the client as
        #: ``unknown``, so that it cannot tell which ids exist).
        self.failure = failure or reason.value


@dataclass(frozen=True)
class AuthFailure:
    """Failed authentications of one vault key (or of none: ``key_id`` is
    :data:`UNKNOWN_KEY`) for one reason: ``missing``, ``malformed``, ``unknown``,
    ``bad_secret``, ``expired`` or ``revoked``."""

    key_id: str
    reason: str
    count: int
    first_at: datetime
    last_at: datetime


@dataclass(frozen=True)
class VaultKey:
    """A vault key's stored record (never its secret)."""

    id: str
    agent: str
    run: str
    """The run its calls count against: the one it was made with, or ``pmk_<id>``."""
    run_policy: RunPolicy | None
    label: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None

    @property
    def credential(self) -> str:
        """The key's public id, ``pmk_<id>``: what audit rows name it by."""
        return f"{KEY_PREFIX}{self.id}"

    def state(self, now: datetime) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class NewVaultKey:
    """A key just made: ``secret`` is the whole key, shown this once and stored nowhere."""

    secret: str
    record: VaultKey


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class VaultKeys:
    """Make, list, revoke and authenticate vault keys in the ledger database."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def create(
        self,
        agent: str,
        *,
        by: str,
        run: str | None = None,
        run_policy: RunPolicy | None = None,
        expires_at: datetime | None = None,
        label: str | None = None,
    ) -> NewVaultKey:
        """Make a key for ``agent``. Without ``run``, the key's own id (``pmk_<id>``) is
        its run: every key's calls count against, and can be revoked as, a run."""
        if not agent.strip():
            raise ValueError("a vault key needs an agent type")
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise ValueError(f"expires_at {expires_at.isoformat()} is not in the future")
        key_id = secrets.token_hex(_ID_LENGTH // 2)
        secret = secrets.token_urlsafe(32)
        if run is None:
            run = f"{KEY_PREFIX}{key_id}"
        # Stored as the ledger stores every agent type and run, so the key's calls count
        # against (and are revoked as) exactly the run and agent type the key names.
        agent, run = storable.field("agent", agent), storable.field("run", run)
        label, by = storable.field("label", label), storable.field("by", by)
        record = VaultKey(
            id=key_id,
            agent=agent,
            run=run,
            run_policy=run_policy,
            label=label,
            created_at=now,
            created_by=by,
            expires_at=expires_at,
            revoked_at=None,
            revoked_by=None,
            revoke_reason=None,
        )
        with unavailable_on_error(self._engine, "making a vault key", "so no key was made"):
            with self._engine.begin() as conn:
                conn.execute(
                    insert(vault_key).values(
                        id=key_id,
                        secret_sha256=_digest(secret),
                        agent=agent,
                        run=run,
                        run_policy=None
                        if run_policy is None
                        else run_policy.model_dump_json(exclude_none=True),
                        label=label,
                        created_at=now,
                        created_by=by,
                        expires_at=expires_at,
                    )
                )
        return NewVaultKey(f"{KEY_PREFIX}{key_id}_{secret}", record)

    def list(self, *, include_revoked: bool = False) -> list[VaultKey]:
        """Keys, newest first; revoked ones only if asked."""
        query = select(vault_key).order_by(vault_key.c.created_at.desc(), vault_key.c.id)
        if not include_revoked:
            query = query.where(vault_key.c.revoked_at.is_(None))
        with unavailable_on_error(self._engine, "listing vault keys", "so none are listed"):
            with self._engine.connect() as conn:
                return [_record(row) for row in conn.execute(query)]

    def get(self, key_id: str) -> VaultKey:
        """The key with this id (``pmk_<id>`` or the bare id)."""
        key_id = _bare_id(key_id)
        with unavailable_on_error(self._engine, "reading a vault key", "so nothing changed"):
            with self._engine.connect() as conn:
                row = conn.execute(select(vault_key).where(vault_key.c.id == key_id)).first()
        if row is None:
            raise VaultKeyNotFound(f"no vault key has the id {key_id!r}")
        return _record(row)

    def revoke(self, key_id: str, *, by: str, reason: str) -> VaultKey:
        """Revoke a key for good: the proxy refuses its next request. Revoking a revoked
        key changes nothing and returns it."""
        key_id = _bare_id(key_id)
        with unavailable_on_error(self._engine, "revoking a vault key", "so it is not revoked"):
            with self._engine.begin() as conn:
                conn.execute(
                    update(vault_key)
                    .where(vault_key.c.id == key_id, vault_key.c.revoked_at.is_(None))
                    .values(
                        revoked_at=self._clock(),
                        revoked_by=storable.field("by", by),
                        revoke_reason=storable.field("reason", reason),
                    )
                )
        return self.get(key_id)

    def authenticate(self, presented: str) -> VaultKey:
        """The active key ``presented`` is, or :class:`VaultKeyRefused` saying why.

        The secret is compared in constant time, and an unknown id costs the same
        comparison. A database failure raises
        :class:`~paymaster.GovernanceUnavailable` (fail closed).
        """
        match = _KEY.fullmatch(presented)
        if match is None:
            named = _PRESENTED_ID.match(presented)
            raise VaultKeyRefused(
                VaultKeyRefused.Reason.MALFORMED,
                "the API key is not a paymaster vault key (pmk_...); ask your operator for "
                "one made with `paymaster keys create`",
                key_id=None if named is None else named.group(1),
            )
        key_id, secret = match.groups()
        with unavailable_on_error(
            self._engine, "checking a vault key", "so the request was not forwarded"
        ):
            with self._engine.connect() as conn:
                row = conn.execute(select(vault_key).where(vault_key.c.id == key_id)).first()
        stored = row.secret_sha256 if row is not None else _DUMMY_DIGEST
        if not hmac.compare_digest(_digest(secret), stored) or row is None:
            raise VaultKeyRefused(
                VaultKeyRefused.Reason.UNKNOWN,
                f"no such vault key: {KEY_PREFIX}{key_id}_...",
                key_id=key_id,
                failure=None if row is None else "bad_secret",
            )
        record = _record(row)
        state = record.state(self._clock())
        if state == "revoked":
            raise VaultKeyRefused(
                VaultKeyRefused.Reason.REVOKED,
                f"vault key {KEY_PREFIX}{key_id} was revoked by {record.revoked_by} at "
                f"{record.revoked_at:%Y-%m-%d %H:%M:%S}Z: {record.revoke_reason}",
                key_id=key_id,
            )
        if state == "expired":
            assert record.expires_at is not None
            raise VaultKeyRefused(
                VaultKeyRefused.Reason.EXPIRED,
                f"vault key {KEY_PREFIX}{key_id} expired at {record.expires_at:%Y-%m-%d %H:%M:%S}Z",
                key_id=key_id,
            )
        return record

    def record_failure(self, key_id: str | None, reason: str) -> None:
        """Count a failed authentication: under ``key_id`` if it names a stored key, else
        under :data:`UNKNOWN_KEY`, so the rows stay bounded by the keys times the reasons
        whatever is presented. A database failure raises
        :class:`~paymaster.GovernanceUnavailable`."""
        now = self._clock()
        reason = storable.storable(reason, storable.limit_of(auth_failure.c.reason))
        key_id = None if key_id is None else storable.storable(key_id, _ID_LENGTH)
        with unavailable_on_error(
            self._engine, "counting a failed authentication", "so it was not counted"
        ):
            for _ in range(3):  # a first insert racing another process's: count again
                with self._engine.begin() as conn:
                    credential = UNKNOWN_KEY
                    if key_id is not None:
                        known = select(vault_key.c.id).where(vault_key.c.id == key_id)
                        if conn.execute(known).first() is not None:
                            credential = key_id
                    counted = conn.execute(
                        update(auth_failure)
                        .where(
                            auth_failure.c.credential == credential,
                            auth_failure.c.reason == reason,
                        )
                        .values(count=auth_failure.c.count + 1, last_at=now)
                    ).rowcount
                    if counted:
                        return
                try:
                    with self._engine.begin() as conn:
                        conn.execute(
                            insert(auth_failure).values(
                                credential=credential,
                                reason=reason,
                                count=1,
                                first_at=now,
                                last_at=now,
                            )
                        )
                    return
                except IntegrityError:
                    continue

    def failures(self, key_id: str | None = None) -> builtins.list[AuthFailure]:
        """Failed authentications counted, most recent first; of one key if asked
        (``pmk_<id>``, the bare id, or :data:`UNKNOWN_KEY`)."""
        query = select(auth_failure).order_by(
            auth_failure.c.last_at.desc(), auth_failure.c.credential, auth_failure.c.reason
        )
        if key_id is not None:
            wanted = key_id if key_id == UNKNOWN_KEY else _bare_id(key_id)
            query = query.where(auth_failure.c.credential == wanted)
        with unavailable_on_error(
            self._engine, "listing failed authentications", "so none are listed"
        ):
            with self._engine.connect() as conn:
                return [_failure(row._mapping) for row in conn.execute(query)]


def _failure(m: Any) -> AuthFailure:
    return AuthFailure(m["credential"], m["reason"], m["count"], m["first_at"], m["last_at"])


def _bare_id(key_id: str) -> str:
    """``pmk_<id>``, ``pmk_<id>_<secret>`` or ``<id>`` -> ``<id>``."""
    text = key_id.strip()
    if text.startswith(KEY_PREFIX):
        text = text[len(KEY_PREFIX) :][:_ID_LENGTH]
    # Any text names no key rather than failing the look-up (PostgreSQL refuses a NUL).
    return storable.storable(text, _ID_LENGTH)


def _record(row: object) -> VaultKey:
    m = row._mapping  # type: ignore[attr-defined]
    policy = m["run_policy"]
    return VaultKey(
        # Keys stored before revision 0007 without a run have their own id as their run.
        id=m["id"],
        agent=m["agent"],
        run=m["run"] or f"{KEY_PREFIX}{m['id']}",
        run_policy=None if policy is None else RunPolicy.model_validate_json(policy),
        label=m["label"],
        created_at=m["created_at"],
        created_by=m["created_by"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        revoked_by=m["revoked_by"],
        revoke_reason=m["revoke_reason"],
    )
