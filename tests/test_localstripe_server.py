"""The localstripe test server: starts, serves the Stripe API, is isolated, and stops cleanly."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

pytest.importorskip("stripe")
pytest.importorskip("localstripe")

from paymaster.testing.localstripe import LocalStripe, run_localstripe


@pytest.fixture(scope="module")
def localstripe() -> Iterator[LocalStripe]:
    with run_localstripe() as server:
        yield server


def test_creates_and_retrieves_a_customer(localstripe: LocalStripe) -> None:
    client = localstripe.client()
    created = client.v1.customers.create(params={"email": "agent@example.com"})
    assert created.id.startswith("cus_")
    fetched = client.v1.customers.retrieve(created.id)
    assert fetched.email == "agent@example.com"
    assert (localstripe.state_dir / "localstripe.pickle").exists()


def test_servers_are_isolated_and_stop_cleanly() -> None:
    with run_localstripe() as first, run_localstripe() as second:
        assert first.port != second.port
        assert first.url == f"http://127.0.0.1:{first.port}"
        customer = first.client().v1.customers.create()
        assert [c.id for c in first.client().v1.customers.list().data] == [customer.id]
        assert second.client().v1.customers.list().data == []
    for server in (first, second):
        with pytest.raises(ProcessLookupError):
            os.kill(server.pid, 0)
        assert not server.state_dir.exists()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        socket.create_server(("127.0.0.1", server.port)).close()  # the port can be reused
