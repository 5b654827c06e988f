"""OpenTelemetry spans and metrics of governed calls, read back with the SDK's in-memory
exporter and reader; and the core without OpenTelemetry installed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from paymaster import Governor, Money, PolicyViolation
from paymaster._telemetry import Telemetry, instrument, uninstrument

MakeGov = Callable[..., Governor]
USD = "USD"
CALL = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}


@dataclass
class Otel:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def otel() -> Iterator[Otel]:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(spans, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def gov(make_governor: MakeGov, otel: Otel) -> Governor:
    governor = make_governor()
    instrument(governor, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider)
    return governor


def test_a_settled_call_is_one_span_with_its_attributes(gov: Governor, otel: Otel) -> None:
    with gov.guard(**CALL, method="post", run="run-1", estimate=Money(5000, USD)) as call:
        assert trace.get_current_span().get_span_context().span_id != 0  # current in the block
        call.settle(Money(3000, USD), http_status=200)
    [span] = otel.finished()
    assert span.name == "paymaster.call"
    assert dict(span.attributes or {}) == {
        "paymaster.agent": "refund-agent",
        "paymaster.vendor": "stripe",
        "paymaster.endpoint": "/v1/refunds",
        "paymaster.method": "POST",
        "paymaster.run": "run-1",
        "paymaster.estimate": 5000,
        "paymaster.currency": "USD",
        "paymaster.hold_id": call.hold_id,
        "paymaster.policy_id": "refunds",
        "paymaster.outcome": "allowed",
        "paymaster.actual": 3000,
    }
    assert span.status.status_code is StatusCode.UNSET


def test_a_free_call_span_carries_the_zero_estimate(gov: Governor, otel: Otel) -> None:
    with gov.guard(**CALL, method="GET", free=True):
        pass
    [span] = otel.finished()
    attributes = dict(span.attributes or {})
    assert attributes["paymaster.estimate"] == 0 and attributes["paymaster.currency"] == "USD"
    assert attributes["paymaster.outcome"] == "allowed" and attributes["paymaster.actual"] == 0


def test_the_vendor_call_span_is_a_child_of_the_governed_call(gov: Governor, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("vendor-sdk")
    with gov.guard(**CALL, estimate=Money(100, USD)):
        with tracer.start_as_current_span("POST /v1/refunds"):
            pass
    vendor, governed = otel.finished()
    assert vendor.parent is not None
    assert vendor.parent.span_id == governed.context.span_id


def test_a_denial_is_an_error_span_and_counted_by_code(gov: Governor, otel: Otel) -> None:
    for endpoint in ("/v1/charges", "/v1/payouts"):
        with pytest.raises(PolicyViolation):
            with gov.guard(
                agent="refund-agent", vendor="stripe", endpoint=endpoint, estimate=Money(100, USD)
            ):
                pytest.fail("a refused call never runs")
    with pytest.raises(PolicyViolation):
        with gov.guard(**CALL, estimate=Money(5001, USD)):
            pass
    spans = otel.finished()
    assert [s.attributes["paymaster.outcome"] for s in spans] == ["denied"] * 3  # type: ignore[index]
    assert [s.attributes["paymaster.violation_code"] for s in spans] == [  # type: ignore[index]
        "endpoint_not_allowed",
        "endpoint_not_allowed",
        "per_call_cap",
    ]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert spans[0].status.description is not None
    assert spans[0].status.description.startswith("endpoint_not_allowed: ")
    counts = {p.attributes["paymaster.code"]: p.value for p in otel.points("paymaster.denials")}
    assert counts == {"endpoint_not_allowed": 2, "per_call_cap": 1}
    [point] = [p for p in otel.points("paymaster.denials") if p.value == 1]
    assert point.attributes == {
        "paymaster.code": "per_call_cap",
        "paymaster.agent": "refund-agent",
        "paymaster.vendor": "stripe",
    }


def test_a_cap_refusal_is_counted_from_the_ledger(gov: Governor, otel: Otel) -> None:
    for _ in range(2):
        with gov.guard(**CALL, estimate=Money(5000, USD)):
            pass
    with pytest.raises(PolicyViolation):
        with gov.guard(**CALL, estimate=Money(1, USD)):
            pass
    [point] = otel.points("paymaster.denials")
    assert point.attributes["paymaster.code"] == "cap_exceeded" and point.value == 1


def test_spend_counts_settled_minor_units_by_currency_agent_and_vendor(
    gov: Governor, otel: Otel
) -> None:
    with gov.guard(**CALL, estimate=Money(5000, USD)) as call:
        call.settle(Money(3000, USD))
    with gov.guard(**CALL, estimate=Money(1000, USD)):
        pass  # settles at the estimate
    with gov.guard(**CALL, estimate=Money(1000, USD)) as call:
        call.fail(http_status=402)  # released: no spend
    [point] = otel.points("paymaster.spend")
    assert point.value == 4000
    assert point.attributes == {
        "paymaster.currency": "USD",
        "paymaster.agent": "refund-agent",
        "paymaster.vendor": "stripe",
    }


def test_governance_latency_per_operation(gov: Governor, otel: Otel) -> None:
    for _ in range(3):
        with gov.guard(**CALL, estimate=Money(100, USD)):
            pass
    with gov.guard(**CALL, estimate=Money(100, USD)) as call:
        call.fail()
    points = {
        p.attributes["paymaster.operation"]: p for p in otel.points("paymaster.governance.duration")
    }
    assert {op: p.count for op, p in points.items()} == {"reserve": 4, "settle": 3, "release": 1}
    assert all(p.sum > 0 for p in points.values())
    assert points["reserve"].explicit_bounds[0] == 0.25  # milliseconds


def test_outcomes_of_calls_that_end_by_an_exception(gov: Governor, otel: Otel) -> None:
    with pytest.raises(ValueError, match="bad input"):
        with gov.guard(**CALL, estimate=Money(100, USD)):
            raise ValueError("bad input")
    with pytest.raises(TimeoutError):
        with gov.guard(**CALL, estimate=Money(100, USD)):
            raise TimeoutError("read timed out")
    with gov.guard(**CALL, estimate=Money(100, USD)) as call:
        call.fail(http_status=402, error="card_declined")
    errored, unknown, failed = otel.finished()
    assert errored.attributes["paymaster.outcome"] == "errored"  # type: ignore[index]
    assert errored.status.status_code is StatusCode.ERROR
    assert [e.name for e in errored.events] == ["exception"]
    assert unknown.attributes["paymaster.outcome"] == "unknown"  # type: ignore[index]
    assert unknown.status.status_code is StatusCode.ERROR
    assert failed.attributes["paymaster.outcome"] == "failed"  # type: ignore[index]
    assert failed.status.status_code is StatusCode.UNSET
    assert "paymaster.actual" in failed.attributes  # type: ignore[operator]


def test_aguard_spans_are_current_in_the_block(gov: Governor, otel: Otel) -> None:
    tracer = otel.tracer_provider.get_tracer("vendor-sdk")

    async def main() -> None:
        async with gov.aguard(**CALL, run="run-2", estimate=Money(700, USD)) as call:
            with tracer.start_as_current_span("vendor"):
                await asyncio.sleep(0)
            await call.settle(Money(600, USD))
        with pytest.raises(PolicyViolation):
            async with gov.aguard(**CALL, estimate=Money(10001, USD)):
                pass

    asyncio.run(main())
    vendor, governed, denied = otel.finished()
    assert vendor.parent is not None and vendor.parent.span_id == governed.context.span_id
    attributes = governed.attributes or {}
    assert attributes["paymaster.outcome"] == "allowed" and attributes["paymaster.actual"] == 600
    assert attributes["paymaster.run"] == "run-2"
    assert denied.status.status_code is StatusCode.ERROR
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


def test_governed_decorator_is_traced(gov: Governor, otel: Otel) -> None:
    @gov.governed(**CALL, estimate=lambda cents: Money(cents, USD), actual=lambda r: r)
    def refund(cents: int) -> int:
        return cents - 1

    assert refund(500) == 499
    [span] = otel.finished()
    assert (span.attributes or {})["paymaster.actual"] == 499


def test_telemetry_given_to_the_governor_and_uninstrument(
    make_governor: MakeGov, otel: Otel
) -> None:
    telemetry = Telemetry(otel.tracer_provider, otel.meter_provider)
    gov = make_governor(telemetry=telemetry)
    assert gov.telemetry is telemetry and gov.ledger.observer is telemetry
    with gov.guard(**CALL, estimate=Money(100, USD)):
        pass
    uninstrument(gov)
    with gov.guard(**CALL, estimate=Money(100, USD)):
        pass
    assert len(otel.finished()) == 1
    assert make_governor(telemetry=True).telemetry is not None  # the global providers
    assert make_governor().telemetry is None


def test_the_core_works_without_opentelemetry(tmp_path: Path) -> None:
    """With opentelemetry unimportable, governed calls work and asking for telemetry says
    what to install."""
    script = textwrap.dedent(
        f"""
        import sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")

        sys.meta_path.insert(0, NoOtel())
        from paymaster import Governor, Money, Policy
        policy = Policy.model_validate(dict(id="p", agent="a", vendor="v", currency="USD",
                                            daily_cap="10.00", endpoints=["/x"]))
        gov = Governor("sqlite:///{tmp_path / "ledger.db"}", policies=[policy])
        with gov.guard(agent="a", vendor="v", endpoint="/x", estimate=Money(100, "USD")):
            pass
        assert gov.budgets()[0].committed == Money(100, "USD")
        try:
            Governor("sqlite:///{tmp_path / "ledger.db"}", policies=[policy], telemetry=True)
        except ImportError as exc:
            assert "paymaster[otel]" in str(exc), exc
        else:
            raise AssertionError("telemetry without opentelemetry must fail")
        assert not any(m.startswith("opentelemetry") for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


class _BrokenSpan(trace.NonRecordingSpan):
    """A span whose exporter-side code raises wherever it is touched."""

    def set_attributes(self, attributes: Any) -> None:
        raise RuntimeError("exporter bug")

    def end(self, end_time: int | None = None) -> None:
        raise RuntimeError("exporter bug")


class _BrokenTracer(trace.NoOpTracer):
    def __init__(self, broken_start: bool) -> None:
        self._broken_start = broken_start

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        if self._broken_start:
            raise RuntimeError("exporter bug")
        return _BrokenSpan(trace.INVALID_SPAN_CONTEXT)


class _BrokenProvider(trace.NoOpTracerProvider):
    def __init__(self, broken_start: bool) -> None:
        self._broken_start = broken_start

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _BrokenTracer(self._broken_start)


@pytest.mark.parametrize("broken_start", [False, True], ids=["span-raises", "start-raises"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["guard", "aguard"])
def test_a_span_that_raises_breaks_no_call_and_loses_no_row(
    make_governor: MakeGov, broken_start: bool, asynchronous: bool
) -> None:
    gov = make_governor()  # $100 a day
    instrument(gov, tracer_provider=_BrokenProvider(broken_start))
    estimate = Money.parse("40.00 USD")

    async def one_async() -> None:
        async with gov.aguard(**CALL, estimate=estimate) as call:
            await call.settle()

    for _ in range(3):
        try:
            if asynchronous:
                asyncio.run(one_async())
            else:
                with gov.guard(**CALL, estimate=estimate) as call:
                    call.settle()
        except PolicyViolation:
            pass
    assert gov.holds() == []  # nothing left pending
    outcomes = sorted(str(r.outcome) for r in gov.audit.query(agent="refund-agent"))
    assert outcomes == ["allowed", "allowed", "denied"]  # one row per attempt
