"""Code that runs in child processes (spawned, so it must be importable by name)."""

from __future__ import annotations

import os
import signal
from typing import Any

from sqlalchemy import Engine, text

from paymaster import Governor, Money, Policy, PolicyViolation, ViolationCode

EXPOSURE_SQL = text(
    "SELECT COALESCE(SUM(CASE WHEN state = 'settled' THEN actual "
    "WHEN state IN ('pending', 'unknown') THEN estimate ELSE 0 END), 0) FROM paymaster_hold"
)


def exposure(engine: Engine) -> int:
    """Pending + unknown estimates plus settled actuals, summed from the holds themselves."""
    with engine.connect() as conn:
        return int(conn.execute(EXPOSURE_SQL).scalar_one())


def policy_from(fields: dict[str, Any]) -> Policy:
    return Policy.model_validate(fields)


def spend_until_denied(url: str, fields: dict[str, Any], amount: int, start: Any) -> dict[str, int]:
    """Make $amount-cent refunds until the cap refuses one; watch the exposure while inside."""
    gov = Governor(url, policies=[policy_from(fields)])
    allowed = denied = max_seen = 0
    start.wait()
    try:
        while True:
            try:
                with gov.guard(
                    agent=fields["agent"],
                    vendor="stripe",
                    endpoint="/v1/refunds",
                    estimate=Money(amount, "USD"),
                ) as call:
                    max_seen = max(max_seen, exposure(gov.engine))
                    call.settle(http_status=200)
                allowed += 1
            except PolicyViolation as violation:
                assert violation.code is ViolationCode.CAP_EXCEEDED, violation
                denied += 1
                break
    finally:
        gov.close()
    return {"allowed": allowed, "denied": denied, "max_seen": max_seen}


def reserve_then_die(url: str, fields: dict[str, Any], amount: int) -> None:
    """Reserve, then get SIGKILLed before the vendor call returns: no cleanup can run."""
    gov = Governor(url, policies=[policy_from(fields)])
    with gov.guard(
        agent=fields["agent"],
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money(amount, "USD"),
    ):
        os.kill(os.getpid(), signal.SIGKILL)


def revoke_agent(url: str, fields: dict[str, Any], agent: str) -> None:
    gov = Governor(url, policies=[policy_from(fields)])
    gov.revoke(agent=agent, reason="runaway loop", by="ops-process")
    gov.close()
