"""Segment-aware endpoint patterns and request-path normalisation."""

from __future__ import annotations

import pytest

from paymaster._endpoints import (
    InvalidPath,
    normalise_path,
    path_matches,
    pattern_covers,
    validate_pattern,
)


def allows(pattern: str, raw_path: str) -> bool:
    """What a policy check does: normalise the request path, then match it."""
    return path_matches(validate_pattern(pattern), normalise_path(raw_path))


# -- segment-aware matching -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/refunds", "/v1/refunds/re_1", "/v1/refunds/"])
def test_prefix_pattern_allows_itself_and_below(path: str) -> None:
    assert allows("/v1/refunds", path)


def test_prefix_pattern_allows_deeper_paths() -> None:
    assert allows("/v1/refunds", "/v1/refunds/re_1/cancel")


@pytest.mark.parametrize(
    "path", ["/v1/refundsX", "/v1/refunds_x", "/v1/refund", "/v1", "/", "/v2/refunds"]
)
def test_prefix_pattern_never_matches_a_partial_or_shorter_segment(path: str) -> None:
    assert not allows("/v1/refunds", path)


def test_matching_is_case_sensitive() -> None:
    assert not allows("/v1/refunds", "/V1/Refunds")


def test_star_matches_exactly_one_segment() -> None:
    pattern = "/v1/customers/*/balance_transactions"
    assert allows(pattern, "/v1/customers/cus_1/balance_transactions")
    assert allows(pattern, "/v1/customers/cus_2/balance_transactions/cbtxn_1")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/customers/balance_transactions",
        "/v1/customers/cus_1",
        "/v1/customers/cus_1/sources",
        "/v1/customers/cus_1/x/balance_transactions",
        "/v1/customers/cus_1/balance_transactionsX",
    ],
)
def test_star_pattern_rejects_other_shapes(path: str) -> None:
    assert not allows("/v1/customers/*/balance_transactions", path)


def test_trailing_star_needs_a_segment() -> None:
    assert allows("/v1/refunds/*", "/v1/refunds/re_1")
    assert not allows("/v1/refunds/*", "/v1/refunds")


def test_root_pattern_allows_every_path() -> None:
    assert allows("/", "/v1/anything/at/all")


# -- normalisation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/v1/refunds", "/v1/refunds"),
        ("/v1/refunds/", "/v1/refunds"),
        ("/v1/refunds?limit=3", "/v1/refunds"),
        ("/v1/refunds#frag", "/v1/refunds"),
        ("/v1/refunds?next=/v1/charges/../x", "/v1/refunds"),
        ("https://api.stripe.com/v1/refunds?x=1", "/v1/refunds"),
        ("https://api.stripe.com/v1/refunds/re_1#x", "/v1/refunds/re_1"),
        ("/v1/refunds/re%5F1", "/v1/refunds/re_1"),
        ("/", "/"),
    ],
)
def test_normalise_path(raw: str, canonical: str) -> None:
    assert normalise_path(raw) == canonical


def test_full_url_query_is_dropped_before_matching() -> None:
    assert allows("/v1/refunds", "https://api.stripe.com/v1/refunds?x=1")


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/refunds/../charges",
        "/v1/refunds/./re_1",
        "/v1/refunds/..",
        "/v1/refunds/%2e%2e/charges",
        "/v1/refunds/%2E%2E/charges",
        "/v1/refunds/.%2e/charges",
        "/v1/refunds/%2e",
        "/v1/refunds/%252e%252e/charges",
        "/v1/refunds/%25",
        "/v1//refunds",
        "//v1/refunds",
        "/v1/refunds//",
        "//evil.example/v1/refunds",
        "/v1/refunds\\..\\charges",
        "/v1\\refunds",
        "/v1/refunds/%5c..%5ccharges",
        "/v1/refunds/\x00",
        "/v1/refunds/re_1\r\nHost: evil",
        "/v1/refunds/%0a",
        "/v1/refunds/\t",
        "/v1/refunds/\x7f",
        "/v1/refunds/%7f",
        "/v1/refunds/\x85",
        "/v1/refunds/%c2%85",
        "/v1/refunds/%ff",
        "/v1/refunds/%c0%ae%c0%ae/charges",
        "https://api.stripe.com/v1/refunds/../charges",
        "https://api.stripe.com",
        "v1/refunds",
        "refunds",
        "",
    ],
)
def test_non_canonical_paths_raise_invalid_path(raw: str) -> None:
    with pytest.raises(InvalidPath):
        normalise_path(raw)


def test_non_str_path_raises_invalid_path() -> None:
    with pytest.raises(InvalidPath):
        normalise_path(None)  # type: ignore[arg-type]


def test_invalid_path_is_a_value_error() -> None:
    assert issubclass(InvalidPath, ValueError)


def test_traversal_message_says_it_is_refused() -> None:
    with pytest.raises(InvalidPath, match="refused"):
        normalise_path("/v1/refunds/../charges")


# -- patterns -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "canonical"),
    [
        ("/v1/refunds", "/v1/refunds"),
        ("/v1/refunds/", "/v1/refunds"),
        ("/v1/customers/*/balance_transactions", "/v1/customers/*/balance_transactions"),
        ("/", "/"),
    ],
)
def test_validate_pattern_returns_canonical_form(pattern: str, canonical: str) -> None:
    assert validate_pattern(pattern) == canonical


@pytest.mark.parametrize(
    "pattern",
    [
        "v1/refunds",
        "",
        "/v1/ref*",
        "/v1/*refunds",
        "/v1/**",
        "/v1/refunds?x",
        "/v1/refunds#x",
        "/v1/refunds/%2e%2e",
        "/v1//refunds",
        "/v1/./refunds",
        "/v1/../refunds",
    ],
)
def test_validate_pattern_rejects(pattern: str) -> None:
    with pytest.raises(ValueError, match="endpoint pattern"):
        validate_pattern(pattern)


def test_validate_pattern_rejects_non_str() -> None:
    with pytest.raises(ValueError):
        validate_pattern(None)  # type: ignore[arg-type]


# -- pattern_covers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        ("/v1/refunds", "/v1/refunds"),
        ("/v1/refunds", "/v1/refunds/re_1"),
        ("/v1", "/v1/refunds"),
        ("/", "/v1/refunds"),
        ("/v1/customers/*", "/v1/customers/cus_1/balance_transactions"),
        ("/v1/customers/*", "/v1/customers/*"),
        ("/v1/customers/*/balance_transactions", "/v1/customers/*/balance_transactions"),
    ],
)
def test_pattern_covers(outer: str, inner: str) -> None:
    assert pattern_covers(outer, inner)


@pytest.mark.parametrize(
    ("outer", "inner"),
    [
        ("/v1/refunds", "/v1"),
        ("/v1/refunds", "/v1/refundsX"),
        ("/v1/refunds", "/v1/charges"),
        ("/v1/refunds/re_1", "/v1/refunds"),
        # A literal segment does not cover a '*': '*' allows every customer.
        ("/v1/customers/cus_1", "/v1/customers/*"),
        ("/v1/customers/cus_1/balance_transactions", "/v1/customers/*/balance_transactions"),
    ],
)
def test_pattern_does_not_cover(outer: str, inner: str) -> None:
    assert not pattern_covers(outer, inner)


@pytest.mark.parametrize(
    "path",
    ["/v1/customers/cus_1%2Fbalance_transactions", "/v1/customers/cus_1%2fx/balance_transactions"],
)
def test_encoded_slash_cannot_add_a_segment(path: str) -> None:
    """Split before decoding: %2F inside a segment must not widen a '*' pattern."""
    with pytest.raises(InvalidPath):
        normalise_path(path)
