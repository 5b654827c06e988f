"""Proof against the vendor's record (issue 13): the fake vendor's own books, and a seeded
random simulation of agents checked against them on each backend.

The simulation's driver is ``tests/vendor_sim.py`` (``make soak`` runs it for longer).
A failing seed is printed with the command that replays it: ``PAYMASTER_SIM_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from paymaster.testing.vendor import (
    FakeVendor,
    Fault,
    VendorClient,
    VendorRefused,
    VendorServer,
    VendorServerError,
)
from vendor_sim import DEFAULT_SEED, SEED_ENV, SHORT, SHORT_SEEDS, simulate

#: ``PAYMASTER_SIM_SEED=<seed>`` replays one seed; otherwise a fixed few.
SEEDS = (
    [int(os.environ[SEED_ENV])]
    if os.environ.get(SEED_ENV)
    else [DEFAULT_SEED + i for i in range(SHORT_SEEDS)]
)


# -- the fake vendor's books ------------------------------------------------------------------
def test_a_replayed_key_returns_the_first_result_and_charges_once() -> None:
    vendor = FakeVendor()
    first = vendor.charge(2500, "usd", idempotency_key="k1", labels=("day:a",))
    again = vendor.charge(2500, "USD", idempotency_key="k1", labels=("day:a",))
    assert (again.charge_id, again.replayed, first.replayed) == (first.charge_id, True, False)
    assert vendor.total() == {"USD": 2500}
    assert vendor.total(label="day:a") == {"USD": 2500}
    with pytest.raises(VendorRefused) as caught:  # the same key with other parameters
        vendor.charge(2600, "USD", idempotency_key="k1")
    assert caught.value.http_status == 400
    assert [c.idempotency_key for c in vendor.charges()] == ["k1"]


def test_a_request_in_progress_refuses_its_key_with_409_until_it_finishes() -> None:
    vendor = FakeVendor()
    with pytest.raises(TimeoutError):
        vendor.charge(700, "EUR", idempotency_key="slow", fault=Fault.TIMEOUT_THEN_CHARGE)
    assert vendor.total() == {}  # parked, not charged yet
    with pytest.raises(VendorRefused) as caught:
        vendor.charge(700, "EUR", idempotency_key="slow")
    assert caught.value.http_status == 409
    assert vendor.release("slow") == 1
    assert vendor.total() == {"EUR": 700}
    assert vendor.charge(700, "EUR", idempotency_key="slow").replayed
    with pytest.raises(TimeoutError):
        vendor.charge(300, "EUR", idempotency_key="dropped", fault=Fault.TIMEOUT_NO_CHARGE)
    vendor.release()
    assert not vendor.charge(300, "EUR", idempotency_key="dropped").replayed  # runs afresh
    assert vendor.total() == {"EUR": 1000}


@pytest.mark.parametrize(
    ("fault", "error", "moved"),
    [
        (Fault.DECLINED, VendorRefused, False),
        (Fault.RATE_LIMITED, VendorRefused, False),
        (Fault.SERVER_ERROR_BEFORE, VendorServerError, False),
        (Fault.SERVER_ERROR_AFTER, VendorServerError, True),
        (Fault.LOST_BEFORE, ConnectionResetError, False),
        (Fault.LOST_AFTER_CHARGE, ConnectionResetError, True),
    ],
)
def test_each_fault_moves_money_or_not(fault: Fault, error: type[Exception], moved: bool) -> None:
    vendor = FakeVendor()
    with pytest.raises(error):
        vendor.charge(100, "USD", idempotency_key="k", fault=fault)
    assert vendor.total() == ({"USD": 100} if moved else {})
    assert fault.moves_money is moved
    if fault is Fault.DECLINED:  # stored: a retry is declined again
        with pytest.raises(VendorRefused):
            vendor.charge(100, "USD", idempotency_key="k")
        assert vendor.total() == {}
        return
    retry = vendor.charge(100, "USD", idempotency_key="k")
    assert retry.replayed is moved  # a retry replays a charge that was made, or makes it
    assert vendor.total() == {"USD": 100}


def test_faults_come_from_the_call_a_script_or_a_seed() -> None:
    def draws(seed: int) -> list[str]:
        vendor = FakeVendor(rng=random.Random(seed), faults={Fault.RATE_LIMITED: 0.5})
        seen = []
        for i in range(20):
            try:
                vendor.charge(1, "USD", idempotency_key=f"k{i}")
                seen.append("ok")
            except VendorRefused:
                seen.append("429")
        return seen

    assert draws(7) == draws(7) != draws(8)
    vendor = FakeVendor(rng=random.Random(1), faults={Fault.RATE_LIMITED: 1.0})
    vendor.script(Fault.NONE)
    assert vendor.charge(5, "USD").amount == 5  # the script wins over the seed
    assert vendor.charge(6, "USD", fault=Fault.NONE).amount == 6  # the call wins over both
    with pytest.raises(VendorRefused):
        vendor.charge(7, "USD")
    assert vendor.stats()["faults"] == {"none": 2, "rate_limited": 1}


def test_concurrent_requests_with_one_key_charge_once() -> None:
    vendor = FakeVendor()
    start = threading.Barrier(8)
    answers: list[str] = []

    def one() -> None:
        start.wait()
        try:
            answers.append(
                "replayed" if vendor.charge(900, "JPY", idempotency_key="k").replayed else "charged"
            )
        except VendorRefused as exc:
            answers.append(str(exc.http_status))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers.count("charged") == 1
    assert vendor.total() == {"JPY": 900}


def test_the_http_face_charges_the_same_books() -> None:
    vendor = FakeVendor()
    with VendorServer(vendor) as server:
        client = VendorClient(server.url)
        assert client.charge(1200, "USD", idempotency_key="h1", labels=("run:r1",)).amount == 1200
        assert client.charge(1200, "USD", idempotency_key="h1").replayed
        for fault, error in [
            (Fault.LOST_AFTER_CHARGE, ConnectionResetError),
            (Fault.TIMEOUT_THEN_CHARGE, TimeoutError),
            (Fault.SERVER_ERROR_AFTER, VendorServerError),
            (Fault.DECLINED, VendorRefused),
        ]:
            with pytest.raises(error):
                client.charge(100, "USD", idempotency_key=f"h-{fault}", fault=fault)
        with pytest.raises(VendorRefused) as caught:
            client.charge(100, "USD", idempotency_key=f"h-{Fault.TIMEOUT_THEN_CHARGE}")
        assert caught.value.http_status == 409
        assert client.release() == 1
        assert asyncio.run(client.acharge(5, "USD")).amount == 5
        books = client.charges()
    assert [(c.amount, c.labels) for c in books] == [
        (1200, ("run:r1",)),
        (100, ()),
        (100, ()),
        (100, ()),
        (5, ()),
    ]
    assert vendor.total(label="run:r1") == {"USD": 1200}
    assert vendor.total() == {"USD": 1505}


# -- the simulation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker_pool() -> Iterator[ProcessPoolExecutor]:
    """Two spawned worker processes, shared by both backends' simulations."""
    with ProcessPoolExecutor(
        SHORT.processes, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        yield pool


@pytest.mark.parametrize("seed", SEEDS)
def test_simulation_the_vendor_never_moves_more_than_the_ledger_allows(
    db_url: str, worker_pool: ProcessPoolExecutor, seed: int
) -> None:
    """Threads, tasks, the decorator, two processes and both adapters against a few
    budgets, with faults: every invariant holds per budget (see ``vendor_sim``)."""
    report = simulate(seed, db_url, SHORT, pool=worker_pool)
    print(report.line())
    if report.failures:
        pytest.fail(report.failure_text(), pytrace=False)
