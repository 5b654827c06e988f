"""The proxy as a fleet: real ``paymaster proxy`` processes on one ledger (a SQLite file or
PostgreSQL), the real stripe client, localstripe upstream.

Several processes hold one cap exactly, one revoke stops the next request of every
process, and a proxy killed mid-call leaves its hold pending and counted.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import stripe
import yaml
from typer.testing import CliRunner

from paymaster import Governor, HoldState, Money
from paymaster._vault import VaultKeys
from paymaster.cli.app import app
from paymaster.testing.localstripe import LocalStripe
from paymaster.testing.proxy import run_proxy
from stripe_fixtures import localstripe, paid_intent, refunds_of

__all__ = ["localstripe"]

ENDPOINTS = ["/v1/refunds", "/v1/payment_intents", "/v1/charges"]


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """refund-agent: $100 a day, as the proxies read it from a file."""
    path = tmp_path / "policies.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "policies": [
                    {
                        "id": "refunds",
                        "agent": "refund-agent",
                        "vendor": "stripe",
                        "currency": "USD",
                        "daily_cap": "100.00",
                        "per_call_cap": "100.00",
                        "endpoints": ENDPOINTS,
                    }
                ]
            }
        )
    )
    return path


@pytest.fixture
def ledger(db_url: str, policies: Path) -> Iterator[Governor]:
    """The shared ledger, made ready (schema at head) before any proxy starts."""
    with Governor(db_url, policies=policies) as gov:
        yield gov


def vault_key(gov: Governor) -> str:
    return VaultKeys(gov.engine).create("refund-agent", by="test").secret


def code_of(exc: stripe.StripeError) -> str | None:
    return exc.error.code if exc.error is not None else None


def test_two_proxy_processes_hold_one_cap_exactly(
    db_url: str, policies: Path, ledger: Governor, localstripe: LocalStripe
) -> None:
    intent = paid_intent(localstripe, 100_000)
    key = vault_key(ledger)
    outcomes: Counter[str] = Counter()
    with (
        run_proxy(db_url, policies, localstripe.url) as first,
        run_proxy(db_url, policies, localstripe.url) as second,
    ):
        clients = [first.client(key), second.client(key)]

        def refund(i: int) -> str:
            try:
                clients[i % 2].v1.refunds.create(params={"payment_intent": intent, "amount": 1000})
            except stripe.PermissionError as refused:
                return str(code_of(refused))
            return "refunded"

        with ThreadPoolExecutor(8) as pool:
            outcomes.update(pool.map(refund, range(40)))
    # $100 cap, $10 refunds: exactly 10 pass, whichever process and thread sent them.
    assert outcomes == {"refunded": 10, "paymaster_cap_exceeded": 30}
    assert refunds_of(localstripe, intent) == [1000] * 10
    (budget,) = [b for b in ledger.budgets() if b.kind == "daily"]
    assert (budget.committed, budget.settled) == (Money(10_000, "USD"), Money(10_000, "USD"))
    assert ledger.holds() == []
    posts = [r for r in ledger.audit.query() if r.endpoint == "/v1/refunds"]
    assert Counter(r.outcome for r in posts) == {"allowed": 10, "denied": 30}


def test_one_revoke_stops_the_next_request_of_every_proxy_process(
    db_url: str, policies: Path, ledger: Governor, localstripe: LocalStripe
) -> None:
    intent = paid_intent(localstripe)
    key = vault_key(ledger)
    cli = CliRunner()
    with (
        run_proxy(db_url, policies, localstripe.url) as first,
        run_proxy(db_url, policies, localstripe.url) as second,
    ):
        clients = [first.client(key), second.client(key)]
        for client in clients:
            client.v1.payment_intents.retrieve(intent)

        revoked = cli.invoke(
            app, ["revoke", "--agent", "refund-agent", "--reason", "runaway", "--db", db_url]
        )
        assert revoked.exit_code == 0, revoked.output
        for client in clients:
            with pytest.raises(stripe.PermissionError) as refused:
                client.v1.payment_intents.retrieve(intent)
            assert code_of(refused.value) == "paymaster_revoked"

        restored = cli.invoke(app, ["restore", "--agent", "refund-agent", "--db", db_url])
        assert restored.exit_code == 0, restored.output
        for client in clients:
            client.v1.payment_intents.retrieve(intent)

        key_id = key[: len("pmk_") + 12]
        dropped = cli.invoke(app, ["keys", "revoke", key_id, "--reason", "leaked", "--db", db_url])
        assert dropped.exit_code == 0, dropped.output
        for client in clients:
            with pytest.raises(stripe.AuthenticationError) as unknown:
                client.v1.payment_intents.retrieve(intent)
            assert code_of(unknown.value) == "paymaster_vault_key_revoked"


class HangingUpstream:
    """An upstream that accepts a request, says so, and never answers."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.received = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        self._held.append(conn)
        conn.recv(65536)
        self.received.set()

    def close(self) -> None:
        for sock in (*self._held, self._server):
            sock.close()


def test_a_killed_proxy_leaves_its_hold_pending_and_counted(
    db_url: str, policies: Path, ledger: Governor
) -> None:
    key = vault_key(ledger)
    upstream = HangingUpstream()
    errors: list[BaseException] = []
    try:
        with run_proxy(db_url, policies, upstream.url) as proxy:
            client = proxy.client(key)

            def pay() -> None:
                try:
                    client.v1.payment_intents.create(params={"amount": 3000, "currency": "usd"})
                except BaseException as exc:
                    errors.append(exc)

            payer = threading.Thread(target=pay)
            payer.start()
            # The upstream sees the request only after its hold is committed.
            assert upstream.received.wait(60)
            proxy.kill()
            payer.join()
        assert len(errors) == 1 and isinstance(errors[0], stripe.APIConnectionError)

        (held,) = ledger.holds()
        assert (held.state, held.estimate) == (HoldState.PENDING, Money(3000, "USD"))
        (budget,) = [b for b in ledger.budgets() if b.kind == "daily"]
        assert budget.committed == Money(3000, "USD")

        # A restarted proxy still counts it: $80 more would pass $100 only without it.
        with run_proxy(db_url, policies, upstream.url) as restarted:
            with pytest.raises(stripe.PermissionError) as refused:
                restarted.client(key).v1.payment_intents.create(
                    params={"amount": 8000, "currency": "usd"}
                )
            assert code_of(refused.value) == "paymaster_cap_exceeded"
    finally:
        upstream.close()
