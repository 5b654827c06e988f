"""Segment-aware endpoint patterns and request-path normalisation.

A pattern such as ``/v1/refunds`` allows ``/v1/refunds`` and everything below it
(``/v1/refunds/re_1``) but never ``/v1/refundsX``. A ``*`` segment matches exactly one
segment: ``/v1/customers/*/balance_transactions``.

A request path is normalised before it is matched: the query string and fragment are
dropped and the path is percent-decoded once. A path that is not canonical after that
(``.`` or ``..`` segments, empty segments, a ``%`` left over from double encoding,
backslashes or control characters) is refused outright rather than "repaired", so
``/v1/refunds/../charges`` and ``/v1/refunds/%2e%2e/charges`` never match ``/v1/refunds``.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ._errors import PaymasterError

__all__ = ["InvalidPath", "normalise_path", "path_matches", "pattern_covers", "validate_pattern"]


class InvalidPath(PaymasterError, ValueError):
    """A request path that is not in canonical form."""


def _segments(path: str) -> list[str]:
    return path.strip("/").split("/") if path.strip("/") else []


def _is_control(ch: str) -> bool:
    """C0 controls, DEL and C1 controls (Unicode category Cc)."""
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F


def normalise_path(raw: str) -> str:
    """Return the canonical form of a request path, or raise :class:`InvalidPath`."""
    if not isinstance(raw, str) or not raw:
        raise InvalidPath("the endpoint path is empty")
    # Accept a full URL but keep only its path; the host is not the policy's business.
    path = urlsplit(raw).path if "://" in raw else raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise InvalidPath(f"endpoint {raw!r} must be an absolute path such as '/v1/refunds'")
    body = path[1:]
    if body.endswith("/"):
        body = body[:-1]
    segments = []
    # Split first, then decode each segment: an encoded slash (%2F) must not add a
    # segment that a '*' pattern would then match.
    for encoded in body.split("/") if body else []:
        try:
            segment = unquote(encoded, errors="strict")
        except UnicodeDecodeError:
            raise InvalidPath(
                f"endpoint {raw!r} percent-encodes bytes that are not UTF-8"
            ) from None
        if any(ch in segment for ch in ("/", "\\", "%")) or any(_is_control(ch) for ch in segment):
            raise InvalidPath(f"endpoint {raw!r} is not a canonical path")
        if segment in ("", ".", ".."):
            raise InvalidPath(
                f"endpoint {raw!r} has an empty, '.' or '..' segment; it is refused, not resolved"
            )
        segments.append(segment)
    return "/" + "/".join(segments)


def validate_pattern(pattern: str) -> str:
    """Check an allowlist pattern and return its canonical form."""
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ValueError(f"endpoint pattern {pattern!r} must start with '/', e.g. '/v1/refunds'")
    if "?" in pattern or "#" in pattern or "%" in pattern:
        raise ValueError(f"endpoint pattern {pattern!r} must be a plain path (no query or %)")
    segments = _segments(pattern)
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"endpoint pattern {pattern!r} has an empty, '.' or '..' segment")
        if "*" in segment and segment != "*":
            raise ValueError(
                f"endpoint pattern {pattern!r}: '*' must be a whole segment, "
                "as in '/v1/customers/*/balance_transactions'"
            )
    return "/" + "/".join(segments)


def path_matches(pattern: str, canonical_path: str) -> bool:
    """Whether a canonical path is allowed by one pattern (prefix match on whole segments)."""
    want = _segments(pattern)
    have = _segments(canonical_path)
    if len(have) < len(want):
        return False
    return all(w == "*" or w == h for w, h in zip(want, have[: len(want)], strict=True))


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every path the pattern ``inner`` allows is also allowed by ``outer``.

    A ``*`` in ``inner`` is covered only by a ``*`` in ``outer``, which is exactly the
    segment comparison :func:`path_matches` makes.
    """
    return path_matches(outer, inner)
