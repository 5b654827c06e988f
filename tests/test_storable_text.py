"""Text the database cannot store never costs an attempt its audit row (issue 15, item 2).

Every text field a call, a tool or an operator gives the ledger is generated long (past
its column), with NUL, lone surrogates (``json.loads('"\\ud800"')``), control characters
and bidirectional marks, through ``guard``, ``aguard``, ``record_refusal``,
``record_error``, ``free_call`` and the operator's acts, on both backends. Each attempt
leaves exactly one row, a refusal is a :class:`PolicyViolation`, holds end resolved, and
the audit chain verifies.

One governor serves all the examples of a test (its database is the test's), so each
example checks what it added; the health check about function-scoped fixtures is
suppressed for that reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import refund_policy
from paymaster import Governor, HoldState, Money, Outcome, PolicyViolation, ViolationCode
from paymaster._audit import AuditRecord
from paymaster._ledger import hold_key
from paymaster._schema import audit, hold
from paymaster._storable import TEXT_LIMIT, field, limit_of, storable
from paymaster._vault import VaultKeyNotFound, VaultKeys

MakeGov = Callable[..., Governor]
AGENT = "refund-agent"

EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: What databases refuse or mangle, and what merely looks odd: NUL, lone and paired
#: surrogates, C0/C1 controls, DEL, bidirectional overrides and marks, the escape and
#: the marker themselves.
ODD = st.sampled_from(
    [
        "\x00",
        "\ud800",
        "\udfff",
        "\udc80",
        "\ud83d\ude00",
        "\x1b[31m",
        "\x7f",
        "\x85",
        "\r\n",
        "\t",
        "\u200f",
        "\u202e",
        "\u2066",
        "\ufeff",
        "\\x00",
        "…[cut, sha256:",
        "😀",
        "é",
    ]
)
_PIECE = st.lists(st.one_of(ODD, st.characters()), max_size=12).map("".join)


@st.composite
def texts(draw: st.DrawFn, min_size: int = 0) -> str:
    """Odd text, often past any column (up to ~5000 characters)."""
    head, tail = draw(_PIECE), draw(_PIECE)
    times = draw(st.sampled_from([0, 1, 2, 40, 400]))
    text = head * times + tail
    return text if len(text) >= min_size else text + "x" * (min_size - len(text))


#: Path-safe text (no '/', '%', '.', controls): an allowed endpoint past 500 characters.
SEGMENT = st.text(st.sampled_from("abcXYZ019_-é😀"), min_size=1, max_size=8).map(lambda s: s * 90)


def _row_is_storable(row: AuditRecord) -> None:
    for column in audit.c:
        value = getattr(row, column.name, None)
        if isinstance(value, str):
            assert len(value) <= limit_of(column), column.name
            assert "\x00" not in value, column.name
            assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value), column.name


@pytest.fixture
def gov(make_governor: MakeGov) -> Governor:
    return make_governor(refund_policy(daily_cap="1000000.00", per_call_cap="50.00"))


class Attempts:
    """Counts the rows each attempt adds and checks the ledger after it."""

    def __init__(self, gov: Governor) -> None:
        self.gov = gov

    def one(self, attempt: Callable[[], object], *, rows: int = 1) -> list[AuditRecord]:
        before = self.gov.audit.count()
        attempt()
        added = self.gov.audit.query(newest_first=True, limit=rows + 1)
        assert self.gov.audit.count() == before + rows
        for row in added[:rows]:
            _row_is_storable(row)
        assert self.gov.holds() == [], "every hold is resolved"
        result = self.gov.audit.verify()
        assert result.ok, result.reason
        return added[:rows]


def _raises(exc_type: type[BaseException], fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with pytest.raises(exc_type):
            fn()

    return run


# -- the rule --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(text=texts(), limit=st.integers(min_value=1, max_value=TEXT_LIMIT))
def test_the_rule_bounds_escapes_and_is_idempotent(text: str, limit: int) -> None:
    stored, escaped = storable(text, limit), storable(text, 10**9)
    assert len(stored) <= limit
    stored.encode("utf-8")  # no surrogate left
    assert "\x00" not in stored
    assert storable(stored, limit) == stored  # storable text is stored as it is
    clean = "\x00" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    if clean:
        assert escaped == text
    if len(escaped) <= limit:
        assert stored == escaped
    else:  # cut, visibly, keeping the original's digest
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        assert "…" in stored and stored.startswith(escaped[: max(0, len(stored) // 2 - 1)])
        if limit >= 158:
            assert stored.endswith(f"…[cut, sha256:{digest}]")


@settings(max_examples=100, deadline=None, database=None)
@given(head=st.text(min_size=300, max_size=400), a=texts(), b=texts())
def test_cut_keys_stay_distinct(head: str, a: str, b: str) -> None:
    if a != b:
        assert field("idempotency_key", head + a) != field("idempotency_key", head + b)


def test_limits_come_from_the_schema() -> None:
    assert field("endpoint", "/" + "a" * 1000) == storable("/" + "a" * 1000, 500)
    assert limit_of(hold.c.endpoint) == 500 and limit_of(hold.c.resolution) == TEXT_LIMIT
    assert len(field("method", "X" * 50)) == 10
    assert field("run", "r\x00\ud800") == "r\\x00\\ud800"
    assert field("run", "pair \ud83d\ude00") == "pair 😀"


# -- refusals --------------------------------------------------------------------------


@EXAMPLES
@given(
    agent=st.one_of(st.just(AGENT), texts(min_size=1)),
    endpoint=texts(),
    run=st.one_of(st.none(), texts()),
    method=texts(),
    customer=st.one_of(st.none(), texts()),
    key=st.one_of(st.none(), texts()),
    tool_call_id=st.one_of(st.none(), texts()),
    credential=st.one_of(st.none(), texts()),
    subject=st.one_of(st.none(), texts()),
    use_async=st.booleans(),
)
def test_a_refused_call_is_a_policy_violation_with_its_row(
    gov: Governor,
    agent: str,
    endpoint: str,
    run: str | None,
    method: str,
    customer: str | None,
    key: str | None,
    tool_call_id: str | None,
    credential: str | None,
    subject: str | None,
    use_async: bool,
) -> None:
    kwargs: dict[str, Any] = {
        "agent": agent,
        "vendor": "stripe",
        "endpoint": "/v1/charges" + endpoint,  # never an allowed endpoint
        "method": method,
        "run": run,
        "customer": customer,
        "idempotency_key": key,
        "tool_call_id": tool_call_id,
        "credential": credential,
        "subject": subject,
        "estimate": Money(100, "USD"),
    }
    if use_async:

        async def call() -> None:
            async with gov.aguard(**kwargs):
                raise AssertionError("a refused call's block never runs")

        attempt: Callable[[], object] = lambda: asyncio.run(call())  # noqa: E731
    else:

        def attempt() -> None:
            with gov.guard(**kwargs):
                raise AssertionError("a refused call's block never runs")

    [row] = Attempts(gov).one(_raises(PolicyViolation, attempt))
    assert row.outcome == Outcome.DENIED.value
    assert row.violation_code in (ViolationCode.NO_POLICY, ViolationCode.ENDPOINT_NOT_ALLOWED)
    assert row.agent == field("agent", agent) == row.chain
    assert row.run == field("run", run)
    assert row.customer == field("customer", customer)
    assert row.tool_call_id == field("tool_call_id", tool_call_id)
    assert row.credential == field("credential", credential)


@pytest.mark.parametrize(
    "endpoint",
    [
        "/v1/refunds/" + "a" * 600 + "/\x00",  # cannot be normalised: a control character
        "/v1/refunds/\x00" + "\ud800" * 600,
        "/v1/refunds/" + "x" * 480 + "/../../v1/charges",  # '..' past the column's size
        "/v1/charges/" + "a" * 600,
        "/v1/refunds/%ED%A0%80" * 50,  # an encoded surrogate
    ],
)
def test_an_endpoint_the_policy_refuses_is_refused_with_its_row(
    gov: Governor, endpoint: str
) -> None:
    def attempt() -> None:
        with gov.guard(agent=AGENT, vendor="stripe", endpoint=endpoint, estimate=Money(100, "USD")):
            raise AssertionError("never runs")

    [row] = Attempts(gov).one(_raises(PolicyViolation, attempt))
    assert row.violation_code == ViolationCode.ENDPOINT_NOT_ALLOWED
    assert row.endpoint == field("endpoint", endpoint)


# -- allowed calls ---------------------------------------------------------------------

_EXAMPLE = itertools.count()


def _unique(text: str | None) -> str | None:
    """``text`` made unique per example at its very end (past any cut)."""
    return None if text is None else f"{text}#{next(_EXAMPLE)}"


@EXAMPLES
@given(
    segment=SEGMENT,
    run=st.one_of(st.none(), texts()),
    method=texts(),
    customer=st.one_of(st.none(), texts()),
    key=st.one_of(st.none(), texts()),
    tool_call_id=st.one_of(st.none(), texts()),
    credential=st.one_of(st.none(), texts()),
    subject=st.one_of(st.none(), texts()),
    vendor_request_id=texts(),
    error=texts(),
    ending=st.sampled_from(["settle", "fail", "raise", "unknown"]),
    use_async=st.booleans(),
)
def test_an_allowed_call_with_any_text_is_made_and_resolved(
    gov: Governor,
    segment: str,
    run: str | None,
    method: str,
    customer: str | None,
    key: str | None,
    tool_call_id: str | None,
    credential: str | None,
    subject: str | None,
    vendor_request_id: str,
    error: str,
    ending: str,
    use_async: bool,
) -> None:
    kwargs: dict[str, Any] = {
        "agent": AGENT,
        "vendor": "stripe",
        "endpoint": f"/v1/refunds/{segment}",
        "method": method,
        "run": run,
        "customer": customer,
        "idempotency_key": _unique(key),
        "tool_call_id": tool_call_id,
        "credential": credential,
        "subject": _unique(subject),
        "estimate": Money(100, "USD"),
    }
    failure = ValueError(error) if ending == "raise" else TimeoutError(error)

    def sync_attempt() -> None:
        with gov.guard(**kwargs) as call:
            if ending == "settle":
                call.settle(http_status=200, vendor_request_id=vendor_request_id)
            elif ending == "fail":
                call.fail(http_status=402, vendor_request_id=vendor_request_id, error=error)
            else:
                raise failure

    async def async_call() -> None:
        async with gov.aguard(**kwargs) as call:
            if ending == "settle":
                await call.settle(http_status=200, vendor_request_id=vendor_request_id)
            elif ending == "fail":
                await call.fail(http_status=402, vendor_request_id=vendor_request_id, error=error)
            else:
                raise failure

    def attempt() -> None:
        if use_async:
            asyncio.run(async_call())
        else:
            sync_attempt()

    def attempt_and_reconcile() -> None:
        with pytest.raises(type(failure)):
            attempt()
        [held] = gov.holds()  # kept counted: money may have moved
        assert held.state == "unknown"
        gov.resolve_hold(held.id, release=True, reason=f"checked: {error}", by=error or "op")

    checks = Attempts(gov)
    if ending == "unknown":
        rows = checks.one(attempt_and_reconcile, rows=2)
        assert [r.outcome for r in rows] == [Outcome.RECONCILED.value, Outcome.UNKNOWN.value]
        row = rows[1]
    else:
        [row] = checks.one(
            attempt if ending in ("settle", "fail") else _raises(ValueError, attempt)
        )
        expected = {"settle": "allowed", "fail": "failed", "raise": "errored"}[ending]
        assert row.outcome == expected
    assert row.endpoint == field("endpoint", kwargs["endpoint"])
    assert row.method == field("method", method.upper())
    assert row.run == field("run", run)
    assert row.customer == field("customer", customer)
    assert row.tool_call_id == field("tool_call_id", tool_call_id)
    assert row.credential == field("credential", credential)
    if ending in ("settle", "fail"):
        assert row.vendor_request_id == field("vendor_request_id", vendor_request_id)
    if key is not None:
        held = gov.ledger.hold_for_key(kwargs["idempotency_key"], agent=AGENT, run=run)
        assert held is not None and held.id == row.hold_id


def test_long_keys_with_one_prefix_are_distinct_calls_and_a_key_is_one_call(
    gov: Governor,
) -> None:
    prefix = "k\x00\ud800" + "x" * 400
    kwargs: dict[str, Any] = {
        "agent": AGENT,
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "customer": "c" * 300,
        "run": "r" * 300,
        "estimate": Money(100, "USD"),
    }
    checks = Attempts(gov)
    ids = []
    for ending in ("a", "b"):

        def attempt(key: str = prefix + ending) -> None:
            with gov.guard(**kwargs, idempotency_key=key) as call:
                assert call.idempotency_key == field("idempotency_key", key)
                ids.append(call.hold_id)

        checks.one(attempt)
    assert ids[0] != ids[1]
    found = gov.ledger.hold_for_key(prefix + "a", agent=AGENT, run=kwargs["run"])
    assert found is not None and found.id == ids[0]
    # The ledger's key is the same from the text as given and from its stored form (the
    # proxy's replays look holds up by it).
    stored = field("idempotency_key", prefix + "a")
    assert hold_key(AGENT, "r" * 300, prefix + "a") == hold_key(
        AGENT, field("run", "r" * 300), stored
    )

    def again() -> None:  # the same key, the same call: its same-call check passes
        with pytest.raises(PolicyViolation) as refused:
            with gov.guard(**kwargs, idempotency_key=prefix + "a"):
                raise AssertionError("settled already: not repeated")
        assert refused.value.code is ViolationCode.ALREADY_COMPLETED

    checks.one(again)


# -- the other ways in -----------------------------------------------------------------


@EXAMPLES
@given(
    agent=texts(min_size=1),
    vendor=texts(min_size=1),
    endpoint=texts(),
    method=texts(),
    run=st.one_of(st.none(), texts()),
    customer=st.one_of(st.none(), texts()),
    tool_call_id=st.one_of(st.none(), texts()),
    credential=st.one_of(st.none(), texts()),
    message=texts(),
)
def test_record_refusal_and_record_error_write_their_row(
    gov: Governor,
    agent: str,
    vendor: str,
    endpoint: str,
    method: str,
    run: str | None,
    customer: str | None,
    tool_call_id: str | None,
    credential: str | None,
    message: str,
) -> None:
    fields: dict[str, Any] = {
        "agent": agent,
        "vendor": vendor,
        "endpoint": endpoint,
        "method": method,
        "run": run,
        "customer": customer,
        "tool_call_id": tool_call_id,
        "credential": credential,
    }
    violation = PolicyViolation(ViolationCode.UNKNOWN_OPERATION, message, agent=agent)
    checks = Attempts(gov)
    [refused] = checks.one(lambda: gov.record_refusal(violation, **fields))
    [errored] = checks.one(lambda: gov.record_error(message, **fields))
    assert (refused.outcome, errored.outcome) == ("denied", "errored")
    assert refused.error == errored.error
    assert refused.agent == field("agent", agent) and refused.vendor == field("vendor", vendor)


@EXAMPLES
@given(
    agent=st.one_of(st.just(AGENT), texts(min_size=1)),
    endpoint=texts(),
    method=texts(),
    run=texts(min_size=1),
    tool_call_id=st.one_of(st.none(), texts()),
    credential=st.one_of(st.none(), texts()),
    error=st.one_of(st.none(), texts(min_size=1)),
    vendor_request_id=st.one_of(st.none(), texts()),
    reason=texts(min_size=1),
)
def test_free_calls_and_the_kill_switch_with_any_text(
    gov: Governor,
    agent: str,
    endpoint: str,
    method: str,
    run: str,
    tool_call_id: str | None,
    credential: str | None,
    error: str | None,
    vendor_request_id: str | None,
    reason: str,
) -> None:
    fields: dict[str, Any] = {
        "agent": agent,
        "vendor": "stripe",
        "endpoint": endpoint,
        "method": method,
        "run": run,
        "tool_call_id": tool_call_id,
        "credential": credential,
    }
    checks = Attempts(gov)

    def free() -> None:
        gov.free_call(**fields)(error, 5, http_status=200, vendor_request_id=vendor_request_id)

    [row] = checks.one(free)
    assert row.outcome == ("errored" if error else "allowed")
    assert row.run == field("run", run)
    # Revoked by the very text the calls give: the kill switch stops them, with their rows.
    gov.revoke(run=run, reason="why: " + reason, by=reason)
    [revoked] = checks.one(_raises(PolicyViolation, lambda: gov.free_call(**fields)))
    assert revoked.violation_code == ViolationCode.REVOKED

    def guarded() -> None:
        with gov.guard(agent=AGENT, vendor="stripe", endpoint="/v1/refunds", run=run, free=True):
            raise AssertionError("revoked: never runs")

    [refused] = checks.one(_raises(PolicyViolation, guarded))
    assert refused.violation_code == ViolationCode.REVOKED
    assert [r.reason for r in gov.revocations()] == [field("reason", "why: " + reason)]
    assert gov.restore(run=run, reason=reason, by=reason) == 1


# -- reading and naming what was stored --------------------------------------------------


@EXAMPLES
@given(run=texts(min_size=1))
def test_the_reads_find_a_run_by_the_text_it_was_given(gov: Governor, run: str) -> None:
    """A filter is the text the caller gave: it finds the stored (cut, escaped) run and
    never fails the read (PostgreSQL refuses a NUL in a query parameter)."""
    run = f"{next(_EXAMPLE)}#{run}"
    with gov.guard(
        agent=AGENT, vendor="stripe", endpoint="/v1/refunds", run=run, estimate=Money(1, "USD")
    ) as call:
        call.settle(1)
        hold_id = call.hold_id
    assert [row.hold_id for row in gov.audit.query(run=run)] == [hold_id]
    assert gov.audit.count(run=run, agent=AGENT, vendor="stripe") == 1
    assert gov.audit.run_summary(run).calls == 1
    assert [h.id for h in gov.ledger.holds(states=[HoldState.SETTLED], run=run)] == [hold_id]


def test_an_unknown_outcome_filter_names_the_outcomes(gov: Governor) -> None:
    with pytest.raises(ValueError, match="outcome 'alowed\\\\x00' is not an outcome; use one"):
        gov.audit.query(outcome="alowed\x00")


@EXAMPLES
@given(agent=texts(min_size=1), run=texts(min_size=1), label=texts(), by=texts(min_size=1))
def test_a_vault_key_names_its_run_as_the_ledger_stores_it(
    gov: Governor, agent: str, run: str, label: str, by: str
) -> None:
    assume(agent.strip())  # a blank agent type is refused, by design
    keys = VaultKeys(gov.engine, gov.ledger.now)
    made = keys.create(agent, by=by, run=run, label=label)
    assert made.record.agent == field("agent", agent) and made.record.run == field("run", run)
    assert keys.authenticate(made.secret) == made.record
    assert keys.get(made.record.id) == made.record
    revoked = keys.revoke(made.record.id, by=by, reason=label + "\x00")
    assert revoked.revoked_by == field("by", by)
    with pytest.raises(VaultKeyNotFound):
        keys.get("pmk_\x00\ud800" + "z" * 40)
    keys.record_failure("\x00" * 40, "bad\x00secret-and-more")


@pytest.mark.parametrize(("name", "limit"), [("id", 200), ("agent", 200), ("vendor", 100)])
def test_a_policy_naming_more_than_the_ledger_stores_is_refused_at_load(
    name: str, limit: int
) -> None:
    assert refund_policy(**{name: "p" * limit})
    with pytest.raises(ValidationError, match=f"{name}\n.*at most {limit} characters"):
        refund_policy(**{name: "p" * (limit + 1)})


def test_a_policy_id_the_database_cannot_store_is_stored_as_every_text_is(
    make_governor: MakeGov,
) -> None:
    policy_id = "refunds\x00" + "é" * 190
    gov = make_governor(refund_policy(id=policy_id))
    checks = Attempts(gov)

    def attempt() -> None:
        with gov.guard(
            agent=AGENT, vendor="stripe", endpoint="/v1/refunds", estimate=Money(100, "USD")
        ) as call:
            call.settle(100)

    [row] = checks.one(attempt)
    assert row.policy_id == field("policy_id", policy_id)
    [settled] = gov.ledger.holds(states=[HoldState.SETTLED])
    assert settled.policy_id == row.policy_id


# -- numbers a row cannot hold -------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [{"duration_ms": 2**63}, {"duration_ms": -1}, {"http_status": 2**31}, {"http_status": True}],
)
def test_a_free_call_given_numbers_a_row_cannot_hold_still_leaves_its_row(
    gov: Governor, given: dict[str, Any]
) -> None:
    checks = Attempts(gov)
    record = gov.free_call(agent=AGENT, vendor="stripe", endpoint="/v1/charges", method="GET")
    [row] = checks.one(_raises(ValueError, lambda: record(None, **given)))
    assert row.outcome == "errored" and row.error is not None
    assert row.error.startswith(f"record(): {next(iter(given))} must be an int")


def test_a_settle_given_a_status_no_row_can_hold_is_refused_with_its_row(gov: Governor) -> None:
    """Refused before the ledger is written (before, PostgreSQL's integer overflow came back
    as ``GovernanceUnavailable``, blaming the ledger); the block's exception then ends the
    call as any exception does, with its one row."""

    def attempt() -> None:
        with gov.guard(
            agent=AGENT, vendor="stripe", endpoint="/v1/refunds", estimate=Money(100, "USD")
        ) as call:
            call.settle(100, http_status=10**10)

    [row] = Attempts(gov).one(_raises(ValueError, attempt))
    assert row.error is not None and "http_status must be an int from 100 to 599" in row.error


def test_text_given_as_a_number_is_stored_and_hashed_as_its_str(gov: Governor) -> None:
    """Before, a numeric request id was hashed as a number but stored as text, so the row
    failed ``verify()``; a numeric tool call id failed the call with no row."""
    checks = Attempts(gov)

    def settled() -> None:
        with gov.guard(
            agent=AGENT,
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(100, "USD"),
            tool_call_id=7,  # type: ignore[arg-type]
        ) as call:
            call.settle(100, vendor_request_id=5)  # type: ignore[arg-type]

    [row] = checks.one(settled)
    assert (row.tool_call_id, row.vendor_request_id) == ("7", "5")
    record = gov.free_call(agent=AGENT, vendor="stripe", endpoint="/v1/charges", method="GET")
    [free] = checks.one(lambda: record(123, vendor_request_id=5))  # type: ignore[arg-type]
    assert (free.error, free.vendor_request_id, free.outcome) == ("123", "5", "errored")


def test_a_free_call_records_one_row(gov: Governor) -> None:
    checks = Attempts(gov)
    record = gov.free_call(agent=AGENT, vendor="stripe", endpoint="/v1/charges", method="GET")
    checks.one(record)
    checks.one(_raises(RuntimeError, record), rows=0)
