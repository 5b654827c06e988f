"""Audit checkpoints: every chain's head at one moment, signed with a key the database
never sees, written to and read from JSON, and the key file they are signed with."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._errors import PaymasterError

CHECKPOINT_FORMAT = "paymaster-audit-checkpoint/1"
CHECKPOINT_MAC = "HMAC-SHA256"
#: The shortest checkpoint key accepted, in bytes.
MIN_KEY_BYTES = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(PaymasterError, ValueError):
    """A checkpoint that cannot be read, or a checkpoint key that cannot be used."""


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _mac(key: bytes, payload: dict[str, Any]) -> str:
    """HMAC-SHA256 (hex) of the payload's canonical JSON: sorted keys, no spaces, ASCII."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def load_key(path: str | Path) -> bytes:
    """The checkpoint key kept in a file: its bytes, surrounding whitespace removed (so a
    key written by ``head -c 32 /dev/urandom | base64 > FILE`` works as it is)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise CheckpointError(
            f"the key file {path} holds {len(key)} bytes; a checkpoint key needs at least "
            f"{MIN_KEY_BYTES} random bytes (head -c 32 /dev/urandom | base64 > {path})"
        )
    return key


@dataclass(frozen=True)
class ChainHead:
    """One chain's head as a checkpoint records it."""

    chain: str
    seq: int
    hash: str
    at: datetime | None = None
    """When the chain's newest row was written."""


@dataclass(frozen=True)
class Checkpoint:
    """Every chain's head at one moment, to keep outside the database, as Certificate
    Transparency logs publish signed tree heads: :meth:`AuditLog.verify` given it proves
    that no row up to these heads was removed or altered since, even by someone who can
    rewrite the database and recompute every hash. Signed (:meth:`signed`) with a key the
    database never sees, it cannot be replaced by a forged one either."""

    created_at: datetime
    heads: tuple[ChainHead, ...]
    signature: str | None = None
    """Hex HMAC-SHA256 of :meth:`payload`'s canonical JSON; ``None`` if unsigned."""

    def payload(self) -> dict[str, Any]:
        """The signed part: everything but the signature."""
        return {
            "format": CHECKPOINT_FORMAT,
            "created_at": _iso(self.created_at),
            "chains": [
                {
                    "chain": head.chain,
                    "seq": head.seq,
                    "hash": head.hash,
                    "at": None if head.at is None else _iso(head.at),
                }
                for head in self.heads
            ],
        }

    def signed(self, key: bytes) -> Checkpoint:
        return replace(self, signature=_mac(key, self.payload()))

    def signature_matches(self, key: bytes) -> bool:
        expected = _mac(key, self.payload())
        return self.signature is not None and hmac.compare_digest(self.signature, expected)

    def to_json(self) -> str:
        document = self.payload()
        if self.signature is not None:
            document["signature"] = {"alg": CHECKPOINT_MAC, "mac": self.signature}
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        """Read a checkpoint written by :meth:`to_json`; :class:`CheckpointError` names
        what is wrong with one that is not."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"a checkpoint is JSON; this is not: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a paymaster audit checkpoint ({CHECKPOINT_FORMAT})")
        unknown = set(document) - {"format", "created_at", "chains", "signature"}
        if unknown:
            raise CheckpointError(f"the checkpoint has unknown fields: {sorted(unknown)}")
        signature = document.get("signature")
        if signature is not None:
            if (
                not isinstance(signature, dict)
                or signature.get("alg") != CHECKPOINT_MAC
                or not _HEX64.fullmatch(str(signature.get("mac")))
            ):
                raise CheckpointError(
                    f'the checkpoint\'s signature is not {{"alg": "{CHECKPOINT_MAC}", '
                    '"mac": "<64 hex digits>"}'
                )
            signature = str(signature["mac"])
        chains = document.get("chains")
        if not isinstance(chains, list):
            raise CheckpointError('the checkpoint has no "chains" list')
        heads: list[ChainHead] = []
        for item in chains:
            if (
                not isinstance(item, dict)
                or set(item) != {"chain", "seq", "hash", "at"}
                or not isinstance(item["chain"], str)
                or type(item["seq"]) is not int
                or item["seq"] < 0
                or not _HEX64.fullmatch(str(item["hash"]))
            ):
                raise CheckpointError(f"a chain head in the checkpoint is malformed: {item!r}")
            at = None if item["at"] is None else _parse_time(item["at"], "a chain head's at")
            heads.append(ChainHead(item["chain"], item["seq"], item["hash"], at))
        if len({head.chain for head in heads}) != len(heads):
            raise CheckpointError("the checkpoint names a chain twice")
        created_at = _parse_time(document.get("created_at"), "created_at")
        return cls(created_at, tuple(heads), signature)


def _parse_time(value: Any, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise CheckpointError(f"the checkpoint's {what} is not an ISO time with its offset")
    return parsed
