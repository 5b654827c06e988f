"""``paymaster proxy``: serve the Stripe-compatible governing proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .params import DEFAULT_DB, DbOption, PoliciesFile
from .runtime import fail, open_database

__all__ = ["proxy"]


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(
            f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8421", param_hint="'--listen'"
        )
    return host.strip("[]"), int(port)


UpstreamOption = Annotated[
    str,
    typer.Option(
        "--upstream",
        help="The Stripe API every request is forwarded to "
        "(fixed here: no request can choose another).",
    ),
]
ListenOption = Annotated[
    str, typer.Option("--listen", metavar="HOST:PORT", help="Where to listen.")
]
StripeKeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--stripe-key-file",
        help="A file holding the real Stripe key "
        "(default: the PAYMASTER_STRIPE_KEY environment variable).",
    ),
]
MaxBodyOption = Annotated[
    int, typer.Option("--max-body", min=1, help="Largest request body, in bytes.")
]
UpstreamTimeoutOption = Annotated[
    float,
    typer.Option("--upstream-timeout", min=1, help="Seconds to wait for the upstream."),
]
WorkersOption = Annotated[
    int,
    typer.Option(
        "--workers",
        min=1,
        max=1024,
        help="Requests governed and forwarded at once (one worker thread and one upstream "
        "connection each); more wait for a free worker.",
    ),
]
FdOption = Annotated[int | None, typer.Option("--fd", hidden=True)]
LogLevelOption = Annotated[str, typer.Option("--log-level", help="uvicorn's log level.")]


def proxy(
    policies: PoliciesFile,
    upstream: UpstreamOption = "https://api.stripe.com",
    listen: ListenOption = "127.0.0.1:8421",
    stripe_key_file: StripeKeyFileOption = None,
    max_body: MaxBodyOption = 256 * 1024,
    upstream_timeout: UpstreamTimeoutOption = 60.0,
    workers: WorkersOption = 32,
    fd: FdOption = None,
    log_level: LogLevelOption = "info",
    db: DbOption = DEFAULT_DB,
) -> None:
    """Serve the Stripe-compatible governing proxy for agents holding vault keys.

    Agents use a vault key (`paymaster keys create`) and this address as their Stripe API
    base; every request is governed by the ledger. The real Stripe key is read from
    PAYMASTER_STRIPE_KEY or --stripe-key-file, never from the command line or the database.
    """
    try:
        from pydantic import ValidationError

        from .._governor import Governor
        from ..proxy import ProxyConfig, read_stripe_key, serve
        from ..proxy.config import describe_error
    except ModuleNotFoundError as exc:
        fail(f"the proxy needs paymaster[proxy] ({exc.name} is not installed)", 2)
    host, port = _listen(listen)
    try:
        key = read_stripe_key(stripe_key_file)
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        config = ProxyConfig(
            upstream=upstream,
            stripe_key=key,
            max_body_bytes=max_body,
            upstream_timeout=upstream_timeout,
            workers=workers,
        )
    except ValidationError as exc:
        fail(describe_error(exc), 2)
    with (
        open_database(db) as engine,
        Governor(engine, policies=policies, upgrade_schema=False) as governor,
    ):
        typer.echo(f"paymaster proxy: forwarding to {config.upstream}, ledger {db}", err=True)
        serve(governor, config, host=host, port=port, fd=fd, log_level=log_level)
