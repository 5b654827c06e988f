"""``paymaster init``: an example policy file and a ready database."""

from __future__ import annotations

from pathlib import Path

import typer

from .params import DEFAULT_DB, DEFAULT_POLICIES, DbOption, PoliciesFile
from .runtime import EXIT_USAGE, fail, open_database

__all__ = ["EXAMPLE_POLICIES", "init"]

EXAMPLE_POLICIES = """\
# paymaster policies: what each agent type may spend and call, per vendor.
# Check this file with `paymaster policy check <file>`; load it in code with
# paymaster.load_policies("<file>").
policies:
  - id: refunds-v1               # a unique id, recorded on every audit row
    agent: refund-agent          # the agent type (every run of it shares the daily cap)
    vendor: stripe
    currency: USD                # ISO 4217; every amount below is in this currency
    daily_cap: "100.00"          # pending + settled spend per UTC day
    per_call_cap: "25.00"        # the most one call may be estimated at
    max_calls_per_day: 50        # omit for no call-count limit
    # Segment-aware allowlist: /v1/refunds allows /v1/refunds/re_1, never /v1/refundsX.
    # Stripe refunds look their payment up first, so allow that too.
    endpoints: [/v1/refunds, /v1/payment_intents, /v1/charges]
    methods: [GET, POST]         # omit for any method
    # customers: [cus_alice]     # if set, every call must name an allowed customer
    # expires_at: 2027-01-01T00:00:00Z   # must carry a timezone; refused after it

  - id: email-v1
    agent: support-agent
    vendor: resend
    currency: USD
    daily_cap: "5.00"
    per_call_cap: "0.01"
    endpoints: [/emails]
    methods: [POST]
"""


def init(
    policies: PoliciesFile = Path(DEFAULT_POLICIES),
    db: DbOption = DEFAULT_DB,
) -> None:
    """Write a commented example policy file and create the ledger database.

    Refuses to overwrite an existing policy file. The database is created (or upgraded to
    this version's schema) first, so a failure leaves no policy file behind.
    """
    from .._db import describe
    from .._operations import upgrade_schema

    if policies.suffix.lower() not in (".yaml", ".yml"):
        fail(f"{policies}: init writes YAML, so name the file .yaml or .yml", EXIT_USAGE)
    if policies.exists():
        fail(
            f"{policies} already exists; not overwriting it (choose another --policies)", EXIT_USAGE
        )
    if not policies.parent.is_dir():
        fail(f"{policies.parent} is not a directory", EXIT_USAGE)
    with open_database(db, create=True) as engine:
        before, head = upgrade_schema(engine)
        where = describe(engine)
    try:
        with policies.open("x", encoding="utf-8") as file:
            file.write(EXAMPLE_POLICIES)
    except FileExistsError:
        fail(f"{policies} already exists; not overwriting it", EXIT_USAGE)
    typer.echo(f"wrote example policies to {policies}")
    state = "created" if before is None else ("ready" if before == head else "upgraded")
    typer.echo(f"database {where} {state} (schema {head})")
    typer.echo(f"next: edit {policies}, then `paymaster policy check {policies}`")
