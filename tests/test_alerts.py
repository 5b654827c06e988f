"""Budget alerts on both backends: thresholds fire once per budget window across
governors (processes), denials, revokes and stale holds alert, and the sinks (a callback,
logging, a webhook against a real local HTTP receiver) never hold up a governed call."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from alembic import command
from sqlalchemy import MetaData, Table, event, func, inspect, select

from conftest import Clock, refund_policy
from paymaster import (
    Alert,
    AlertConfig,
    AlertKind,
    CallbackSink,
    Governor,
    LoggingSink,
    Money,
    PolicyViolation,
    RunPolicy,
    ViolationCode,
    WebhookSink,
    _driver,
)
from paymaster._db import _alembic_config, connect
from paymaster._schema import alert as alert_table

MakeGov = Callable[..., Governor]
USD = "USD"
WAIT = 10.0  # seconds: an upper bound for synchronisation, never a sleep


class Collector:
    """A callback sink that remembers what it was sent."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def __call__(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def of(self, kind: AlertKind) -> list[Alert]:
        return [a for a in self.alerts if a.kind is kind]

    def thresholds(self) -> list[float]:
        return [a.threshold for a in self.of(AlertKind.THRESHOLD) if a.threshold is not None]


def alerting(make_governor: MakeGov, collector: Collector, **config: Any) -> Governor:
    return make_governor(alerts=AlertConfig(sinks=[CallbackSink(collector)], **config))


def refund(gov: Governor, amount: str, *, settle: str | None = None, **kw: Any) -> None:
    """One governed refund (settled at ``settle``, default its estimate)."""
    args: dict[str, Any] = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money.parse(f"{amount} USD"),
        **kw,
    }
    with gov.guard(**args) as call:
        call.settle(Money.parse(f"{settle} USD") if settle else None)


def flush(*govs: Governor) -> None:
    for gov in govs:
        assert gov.flush_alerts(WAIT)


def alert_rows(gov: Governor) -> int:
    with gov.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(alert_table)).scalar_one())


# -- a real local webhook receiver ------------------------------------------------------
class Receiver:
    """An HTTP server on 127.0.0.1 recording each POSTed JSON body in ``posts``.

    ``statuses`` are answered in turn (then 200); with ``gate`` each request first signals
    ``entered`` and waits for the gate to open.
    """

    def __init__(self, statuses: tuple[int, ...] = (), gate: threading.Event | None = None):
        self.posts: queue.Queue[dict[str, Any]] = queue.Queue()
        self.attempts: queue.Queue[int] = queue.Queue()  # the status answered, per request
        self.entered = threading.Event()
        self._statuses = list(statuses)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.entered.set()
                if gate is not None:
                    gate.wait(WAIT * 3)
                with receiver._lock:
                    status = receiver._statuses.pop(0) if receiver._statuses else 200
                receiver.attempts.put(status)
                if status == 200:
                    receiver.posts.put(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/paymaster"

    def drain(self) -> list[dict[str, Any]]:
        items = []
        while not self.posts.empty():
            items.append(self.posts.get_nowait())
        return items

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# -- thresholds -------------------------------------------------------------------------
def test_each_threshold_fires_once_and_only_by_the_governor_that_crossed_it(
    make_governor: MakeGov,
) -> None:
    """Two governors on one ledger (two processes) alternate $10 calls on a $100 cap."""
    first, second = Collector(), Collector()
    govs = [alerting(make_governor, first), alerting(make_governor, second)]
    for i in range(10):
        refund(govs[i % 2], "10.00")
    with pytest.raises(PolicyViolation):
        refund(govs[0], "10.00")
    flush(*govs)
    # 50% by the 5th call (first), 80% by the 8th (second), 100% by the 10th (second).
    assert first.thresholds() == [0.5]
    assert second.thresholds() == [0.8, 1.0]
    fifty = first.of(AlertKind.THRESHOLD)[0]
    assert (fifty.committed, fifty.cap) == (Money(5000, USD), Money(10000, USD))
    assert (fifty.agent, fifty.vendor, fifty.budget) == ("refund-agent", "stripe", "daily")
    assert fifty.window == "2026-11-24" and fifty.at == datetime(
        2026, 11, 24, 12, tzinfo=timezone.utc
    )
    assert fifty.message == (
        "refund-agent/stripe: 50% of the daily budget (2026-11-24) reached: "
        "$50.00 of $100.00 committed"
    )
    full = second.of(AlertKind.THRESHOLD)[1]
    assert full.committed == Money(10000, USD) and full.amount is None
    # The refusal after the cap was reached alerts as a denial, not as 100% again.
    assert [a.code for a in first.of(AlertKind.DENIAL)] == ["cap_exceeded"]
    assert alert_rows(govs[0]) == 3


def test_webhook_receives_each_threshold_once_from_two_governors(
    make_governor: MakeGov, receiver: Receiver
) -> None:
    govs = [
        make_governor(alerts=AlertConfig(sinks=[WebhookSink(receiver.url, timeout=5)]))
        for _ in range(2)
    ]
    for i in range(10):
        refund(govs[i % 2], "10.00")
    flush(*govs)
    posts = receiver.drain()
    assert sorted(p["threshold"] for p in posts) == [0.5, 0.8, 1.0]
    body = next(p for p in posts if p["threshold"] == 0.8)
    assert body["kind"] == "threshold" and body["agent"] == "refund-agent"
    assert body["committed"] == {"amount": 8000, "currency": "USD", "formatted": "80.00 USD"}
    assert body["cap"]["amount"] == 10000 and body["window"] == "2026-11-24"
    assert body["at"] == "2026-11-24T12:00:00+00:00"


def test_concurrent_calls_from_two_governors_fire_each_threshold_once(
    make_governor: MakeGov,
) -> None:
    collectors = [Collector(), Collector()]
    govs = [alerting(make_governor, c) for c in collectors]
    start = threading.Barrier(16)

    def spend(i: int) -> int:
        start.wait()
        made = 0
        while True:
            try:
                refund(govs[i % 2], "1.00")
            except PolicyViolation:
                return made
            made += 1

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(spend, range(16))) == 100
    flush(*govs)
    fired = collectors[0].thresholds() + collectors[1].thresholds()
    assert sorted(fired) == [0.5, 0.8, 1.0]
    assert alert_rows(govs[0]) == 3


def spend_with_a_webhook(url: str, hook: str, start: Any) -> int:
    """In a child process: $1 refunds until refused, alerts posted to ``hook``."""
    sink = WebhookSink(hook, timeout=WAIT)
    gov = Governor(url, policies=[refund_policy()], alerts=AlertConfig(sinks=[sink]))
    made = 0
    start.wait()
    try:
        while True:
            try:
                refund(gov, "1.00")
            except PolicyViolation:
                return made
            made += 1
    finally:
        gov.close()  # delivers what is queued


@pytest.mark.slow
def test_four_processes_post_each_threshold_once(db_url: str, receiver: Receiver) -> None:
    Governor(db_url, policies=[refund_policy()]).close()  # create the schema once
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            made = pool.starmap(spend_with_a_webhook, [(db_url, receiver.url, start)] * 4)
    assert sum(made) == 100
    posts = receiver.drain()
    assert sorted(p["threshold"] for p in posts if p["kind"] == "threshold") == [0.5, 0.8, 1.0]
    assert [p["code"] for p in posts if p["kind"] == "denial"] == ["cap_exceeded"] * 4


def test_first_refusal_for_the_cap_is_the_100_percent_alert(make_governor: MakeGov) -> None:
    """$30 calls on a $100 cap never land on it: the first refusal says it is exhausted."""
    seen = Collector()
    gov = alerting(make_governor, seen)
    for _ in range(3):
        refund(gov, "30.00")
    for _ in range(2):
        with pytest.raises(PolicyViolation):
            refund(gov, "30.00")
    flush(gov)
    assert seen.thresholds() == [0.5, 0.8, 1.0]
    exhausted = seen.of(AlertKind.THRESHOLD)[-1]
    assert exhausted.committed == Money(9000, USD) and exhausted.amount == Money(3000, USD)
    assert "exhausted: a call of $30.00 was refused with $90.00 of $100.00" in exhausted.message
    assert len(seen.of(AlertKind.DENIAL)) == 2  # each refusal, but 100% only once


def test_one_call_crossing_several_thresholds_fires_each(make_governor: MakeGov) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen)
    refund(gov, "45.00")
    refund(gov, "45.00")  # 45% -> 90%: 50% and 80% at once
    flush(gov)
    assert seen.thresholds() == [0.5, 0.8]


def test_settle_above_the_estimate_crosses_a_threshold(make_governor: MakeGov) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen)
    refund(gov, "40.00", settle="55.00")
    flush(gov)
    [fifty] = seen.of(AlertKind.THRESHOLD)
    assert fifty.threshold == 0.5 and fifty.committed == Money(5500, USD)


def test_a_threshold_fires_once_per_window_even_after_a_release(
    make_governor: MakeGov, clock: Clock
) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen)
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("50.00 USD"),
    ) as call:
        call.fail(http_status=402)  # released: committed falls back to 0
    refund(gov, "50.00")  # 50% again, same window
    flush(gov)
    assert seen.thresholds() == [0.5]
    clock.advance(days=1)  # a new window fires again
    refund(gov, "50.00")
    flush(gov)
    assert [a.window for a in seen.of(AlertKind.THRESHOLD)] == ["2026-11-24", "2026-11-25"]


def test_a_fresh_governor_learns_fired_thresholds_from_the_ledger(make_governor: MakeGov) -> None:
    """A process started after 50% fired does not fire it again (the unique row refuses)."""
    early, late = Collector(), Collector()
    first = alerting(make_governor, early)
    refund(first, "50.00")
    gov = alerting(make_governor, late)
    refund(gov, "1.00")
    refund(gov, "1.00")
    flush(first, gov)
    assert early.thresholds() == [0.5]
    assert late.thresholds() == []


def test_run_budget_thresholds(make_governor: MakeGov) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen, thresholds=(0.5,))
    tight = RunPolicy(cap=Money.parse("20.00 USD"))
    refund(gov, "10.00", run="run-7", run_policy=tight)
    flush(gov)
    [run_alert] = seen.of(AlertKind.THRESHOLD)
    assert (run_alert.budget, run_alert.run, run_alert.window) == ("run", "run-7", None)
    assert run_alert.cap == Money(2000, USD)
    assert "refund-agent/stripe run 'run-7': 50% of the run budget reached" in run_alert.message


def test_aguard_calls_alert_too(make_governor: MakeGov) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen)

    async def main() -> None:
        async with gov.aguard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.parse("50.00 USD"),
        ) as call:
            await call.settle()

    asyncio.run(main())
    flush(gov)
    assert seen.thresholds() == [0.5]


# -- denials, revokes, stale holds --------------------------------------------------------
def test_denials_alert_with_their_code(make_governor: MakeGov) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen)
    with pytest.raises(PolicyViolation):
        refund(gov, "1.00", endpoint="/v1/charges")
    flush(gov)
    [denial] = seen.alerts
    assert denial.kind is AlertKind.DENIAL and denial.code == "endpoint_not_allowed"
    assert denial.endpoint == "/v1/charges" and denial.amount == Money(100, USD)
    assert denial.message.startswith("refund-agent/stripe POST /v1/charges refused")


def test_denial_and_revoke_alerts_can_be_turned_off(make_governor: MakeGov) -> None:
    seen = Collector()
    gov = alerting(make_governor, seen, denials=False, revokes=False)
    gov.revoke(agent="refund-agent", reason="drill")
    with pytest.raises(PolicyViolation):
        refund(gov, "1.00")
    flush(gov)
    assert seen.alerts == []


def test_revoke_alerts_from_the_revoking_governor_only(make_governor: MakeGov) -> None:
    mine, theirs = Collector(), Collector()
    gov, other = alerting(make_governor, mine), alerting(make_governor, theirs)
    gov.revoke(run="run-9", reason="runaway loop", by="oncall")
    with pytest.raises(PolicyViolation) as info:
        refund(other, "1.00", run="run-9")
    assert info.value.code is ViolationCode.REVOKED
    flush(gov, other)
    [revoke] = mine.alerts
    assert revoke.kind is AlertKind.REVOKE and revoke.run == "run-9"
    assert revoke.message == "run 'run-9' revoked by oncall: runaway loop"
    assert [a.code for a in theirs.alerts] == ["revoked"]  # the refused call, a denial


def test_stale_holds_alert_once_each_across_governors(make_governor: MakeGov, clock: Clock) -> None:
    seen = Collector()
    gov, other = alerting(make_governor, seen), make_governor()
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("5.00 USD"),
        run="run-1",
    ) as call:
        assert gov.check_stale_holds(timedelta(minutes=5)) == []
        clock.advance(minutes=6)
        [stale] = gov.check_stale_holds(timedelta(minutes=5))
        assert other.check_stale_holds(timedelta(minutes=5)) == []  # alerted already
        assert gov.check_stale_holds(timedelta(minutes=1)) == []
        call.settle()
    flush(gov)
    assert seen.alerts == [stale]
    assert (stale.kind, stale.hold_id, stale.run) == (AlertKind.STALE_HOLD, call.hold_id, "run-1")
    assert stale.amount == Money(500, USD)
    assert "is still pending after 0:06:00 (limit 0:05:00)" in stale.message


def test_a_hold_reserved_again_after_release_can_go_stale_again(
    make_governor: MakeGov, clock: Clock
) -> None:
    gov = make_governor()
    key = {"idempotency_key": "refund-1"}
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money(500, USD),
        **key,
    ) as call:
        clock.advance(minutes=10)
        assert len(gov.check_stale_holds(timedelta(minutes=5))) == 1
        call.fail(http_status=500)
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money(500, USD),
        **key,
    ) as again:
        assert again.hold_id == call.hold_id
        clock.advance(minutes=10)
        assert len(gov.check_stale_holds(timedelta(minutes=5))) == 1


# -- sinks ------------------------------------------------------------------------------
def test_logging_sink_warns_on_paymaster_alerts(
    make_governor: MakeGov, caplog: pytest.LogCaptureFixture
) -> None:
    gov = make_governor(alerts=AlertConfig(thresholds=(0.5,), sinks=[LoggingSink()]))
    with caplog.at_level(logging.WARNING, logger="paymaster.alerts"):
        refund(gov, "50.00")
        flush(gov)
    [record] = [r for r in caplog.records if r.name == "paymaster.alerts"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("paymaster threshold alert: refund-agent/stripe: 50%")
    assert record.paymaster_alert["threshold"] == 0.5  # type: ignore[attr-defined]


def test_a_blocked_webhook_never_delays_the_governed_call(make_governor: MakeGov) -> None:
    gate = threading.Event()
    blocked = Receiver(gate=gate)
    try:
        sink = WebhookSink(blocked.url, timeout=WAIT * 3)
        gov = make_governor(alerts=AlertConfig(sinks=[sink]))
        refund(gov, "50.00")  # 50%: its POST reaches the receiver, which holds it
        assert blocked.entered.wait(WAIT)
        refund(gov, "30.00")  # 80% while the receiver still holds the first POST
        refund(gov, "20.00")  # 100%
        with pytest.raises(PolicyViolation):
            refund(gov, "0.01")
        assert not gate.is_set()  # every governed call returned with the webhook stuck
        assert gov.budgets()[0].committed == Money(10000, USD)
        gate.set()
        flush(gov)
        posts = blocked.drain()
        assert [p["threshold"] for p in posts if p["kind"] == "threshold"] == [0.5, 0.8, 1.0]
        assert [p["code"] for p in posts if p["kind"] == "denial"] == ["cap_exceeded"]
    finally:
        gate.set()
        blocked.close()


def test_a_down_webhook_is_retried_then_given_up_without_failing_calls(
    make_governor: MakeGov, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = WebhookSink(f"http://127.0.0.1:{port}/", timeout=1, retries=2, backoff=0)
    gov = make_governor(alerts=AlertConfig(thresholds=(0.5,), sinks=[sink]))
    with caplog.at_level(logging.WARNING, logger="paymaster.alerts"):
        refund(gov, "50.00")
        flush(gov)
    assert gov.budgets()[0].committed == Money(5000, USD)
    [gave_up] = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert "ConnectError" in gave_up or "URLError" in gave_up


def test_webhook_retries_server_errors(make_governor: MakeGov) -> None:
    flaky = Receiver(statuses=(503, 500))
    try:
        sink = WebhookSink(flaky.url, retries=3, backoff=0)
        gov = make_governor(alerts=AlertConfig(thresholds=(0.5,), sinks=[sink]))
        refund(gov, "50.00")
        flush(gov)
        assert [flaky.attempts.get_nowait() for _ in range(3)] == [503, 500, 200]
        [post] = flaky.drain()
        assert post["threshold"] == 0.5
    finally:
        flaky.close()


def test_webhook_does_not_retry_a_client_error(
    make_governor: MakeGov, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = Receiver(statuses=(400,))
    try:
        sink = WebhookSink(refusing.url, retries=3, backoff=0)
        gov = make_governor(alerts=AlertConfig(thresholds=(0.5,), sinks=[sink]))
        with caplog.at_level(logging.WARNING, logger="paymaster.alerts"):
            refund(gov, "50.00")
            flush(gov)
        assert refusing.attempts.qsize() == 1
        assert any("(HTTP 400)" in r.getMessage() for r in caplog.records)
    finally:
        refusing.close()


def test_full_webhook_queue_drops_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    blocked = Receiver(gate=gate)
    sink = WebhookSink(blocked.url, timeout=WAIT * 3, queue_size=1)
    at = datetime(2026, 11, 24, tzinfo=timezone.utc)
    alerts = [Alert(kind=AlertKind.REVOKE, message=f"alert {i}", at=at) for i in range(3)]
    try:
        with caplog.at_level(logging.WARNING, logger="paymaster.alerts"):
            sink.send(alerts[0])
            assert blocked.entered.wait(WAIT)  # in flight: the queue is empty again
            sink.send(alerts[1])  # queued
            sink.send(alerts[2])  # dropped
            gate.set()
            assert sink.flush(WAIT)
        assert [p["message"] for p in blocked.drain()] == ["alert 0", "alert 1"]
        assert any(
            "queue full, dropped revoke alert: alert 2" in r.getMessage() for r in caplog.records
        )
    finally:
        gate.set()
        sink.close(WAIT)
        blocked.close()


def test_a_slow_callback_never_delays_calls_and_a_full_queue_drops(
    make_governor: MakeGov, caplog: pytest.LogCaptureFixture
) -> None:
    entered, gate = threading.Event(), threading.Event()
    got: list[Alert] = []

    def slow(alert: Alert) -> None:
        entered.set()
        gate.wait(WAIT * 3)
        got.append(alert)

    gov = make_governor(alerts=AlertConfig(sinks=[slow], queue_size=1))
    with caplog.at_level(logging.WARNING, logger="paymaster.alerts"):
        refund(gov, "50.00")  # 50%: the callback takes it and blocks
        assert entered.wait(WAIT)
        refund(gov, "30.00")  # 80%: queued
        refund(gov, "20.00")  # 100%: the queue is full, dropped
        gate.set()
        flush(gov)
    assert [a.threshold for a in got] == [0.5, 0.8]
    assert any(
        "alert queue full: dropped threshold alert" in r.getMessage() for r in caplog.records
    )


def test_a_failing_sink_does_not_stop_the_others(make_governor: MakeGov) -> None:
    seen = Collector()

    def broken(alert: Alert) -> None:
        raise RuntimeError("pager down")

    gov = make_governor(alerts=AlertConfig(thresholds=(0.5,), sinks=[broken, seen]))
    refund(gov, "50.00")
    flush(gov)
    assert seen.thresholds() == [0.5]


# -- configuration and cost ---------------------------------------------------------------
def test_alert_config_validates_thresholds() -> None:
    assert AlertConfig(thresholds=(1.0, 0.5, 0.5, "0.825")).threshold_bps == (5000, 8250, 10000)
    assert AlertConfig(thresholds=()).threshold_bps == ()
    for bad in (0, 1.5, -0.1, 0.00001):
        with pytest.raises(ValueError, match="fraction of the cap"):
            AlertConfig(thresholds=(bad,))
    with pytest.raises(TypeError):
        AlertConfig(thresholds=(True,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="http"):
        WebhookSink("ftp://example.com/")


def test_alert_to_dict_is_json() -> None:
    at = datetime(2026, 11, 24, tzinfo=timezone.utc)
    alert = Alert(
        kind=AlertKind.THRESHOLD,
        message="m",
        at=at,
        threshold=0.5,
        committed=Money(5000, "JPY"),
        cap=Money(10000, "JPY"),
    )
    data = json.loads(json.dumps(alert.to_dict()))
    assert data["kind"] == "threshold" and data["at"] == "2026-11-24T00:00:00+00:00"
    assert data["committed"] == {"amount": 5000, "currency": "JPY", "formatted": "5000 JPY"}
    assert data["amount"] is None


def _statements_per_call(gov: Governor, amount: str, agent: str) -> int:
    """Statements sent to the database: through SQLAlchemy, and on the driver's cursor
    (:mod:`paymaster._driver`, which SQLAlchemy's events do not see)."""
    count = 0

    def counted(*args: object) -> None:
        nonlocal count
        count += 1

    def run_counted(*args: Any, **kwargs: Any) -> Any:
        counted()
        return run(*args, **kwargs)

    run = _driver.run
    event.listen(gov.engine, "before_cursor_execute", counted)
    _driver.run = run_counted
    try:
        refund(gov, amount, agent=agent)
    finally:
        _driver.run = run
        event.remove(gov.engine, "before_cursor_execute", counted)
    return count


def test_alerts_add_no_statement_to_a_call_below_every_threshold(make_governor: MakeGov) -> None:
    plain = make_governor()  # alerts off
    watched = make_governor(
        refund_policy(agent="watched-agent", id="watched"), alerts=AlertConfig(sinks=[Collector()])
    )
    refund(plain, "1.00")  # first use of a window: the budget row and the chain head
    refund(watched, "1.00", agent="watched-agent")
    base = _statements_per_call(plain, "1.00", "refund-agent")
    assert _statements_per_call(watched, "1.00", "watched-agent") == base
    # Crossing 50% costs one insert; after it the calls are back to the base count.
    assert _statements_per_call(watched, "50.00", "watched-agent") == base + 1
    assert _statements_per_call(watched, "1.00", "watched-agent") == base
    assert alert_rows(watched) == 1


def test_a_database_at_0002_upgrades_and_alerts_on_its_old_holds(db_url: str, clock: Clock) -> None:
    engine = connect(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "0002")
            old_hold = Table("paymaster_hold", MetaData(), autoload_with=conn)
            conn.execute(
                old_hold.insert().values(
                    id="h" * 32,
                    agent="refund-agent",
                    vendor="stripe",
                    endpoint="/v1/refunds",
                    method="POST",
                    currency="USD",
                    estimate=500,
                    daily_budget_id=1,
                    policy_id="refunds",
                    policy_hash="0" * 64,
                    state="pending",
                    created_at=clock.now - timedelta(hours=2),
                )
            )
    finally:
        engine.dispose()
    gov = Governor(db_url, policies=[refund_policy()], clock=clock)  # upgrades to head
    try:
        columns = {c["name"] for c in inspect(gov.engine).get_columns("paymaster_hold")}
        assert "stale_alerted_at" in columns
        [stale] = gov.check_stale_holds(timedelta(hours=1))
        assert stale.hold_id == "h" * 32 and stale.amount == Money(500, USD)
        refund(gov, "1.00")
        with gov.engine.begin() as conn:  # and back down, for a rollback of the upgrade
            command.downgrade(_alembic_config(conn), "0002")
            assert "paymaster_alert" not in inspect(conn).get_table_names()
    finally:
        gov.close()


def test_a_refusal_on_a_budget_it_just_created_is_not_an_exhaustion(
    make_governor: MakeGov,
) -> None:
    """A new run whose first call is too big for its run cap: its budget row is rolled
    back, so no 100% alert may be claimed for it (its id could be handed to the next)."""
    collector = Collector()
    gov = alerting(make_governor, collector, thresholds=(0.5, 1.0))
    refund(gov, "1.00", run="r0", run_policy=RunPolicy(cap="50.00 USD"))
    with pytest.raises(PolicyViolation):
        refund(gov, "20.00", run="r1", run_policy=RunPolicy(cap="10.00 USD"))
    refund(gov, "20.00", run="r2", run_policy=RunPolicy(cap="20.00 USD"))
    flush(gov)
    runs = [(a.run, a.threshold) for a in collector.of(AlertKind.THRESHOLD) if a.run]
    assert sorted(runs) == [("r2", 0.5), ("r2", 1.0)]
