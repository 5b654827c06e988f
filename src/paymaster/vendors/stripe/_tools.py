"""Prebuilt governed Stripe tools, framework-neutral.

Each :class:`StripeTool` has a name, a description a model can act on, a Pydantic
argument schema, the catalogued operations it calls (its governance spec) and how it
calls the Stripe client. :class:`StripeToolkit` runs them through a governed client; the
adapters (``paymaster-openai-agents``, ``paymaster-langchain``) turn the same tools into
their framework's tools, so no tool is written twice.

The set covers what stripe-agent-toolkit offered as local tools in its 0.6 line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..._outcomes import model_message, tool_failure_text
from ..._policy import RunPolicy

if TYPE_CHECKING:
    import stripe

    from ..._governor import Governor

__all__ = [
    "STRIPE_TOOLS",
    "StripeTool",
    "StripeToolkit",
    "idempotency_key",
    "model_message",
    "select_tools",
    "tool_failure_text",
]

_AMOUNT = (
    "in the currency's smallest unit as an integer: cents for USD (1050 is $10.50), "
    "whole yen for JPY (500 is ¥500)"
)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Limit(_Args):
    limit: int = Field(10, ge=1, le=100, description="How many to return (1-100).")


class CreateCustomer(_Args):
    name: str = Field(min_length=1, description="The customer's full name.")
    email: str | None = Field(None, description="The customer's email address.")


class ListCustomers(_Limit):
    email: str | None = Field(None, description="Only customers with this email address.")


class CreateProduct(_Args):
    name: str = Field(min_length=1, description="The product's name, shown to customers.")
    description: str | None = Field(None, description="What the product is.")


class ListProducts(_Limit):
    pass


class CreatePrice(_Args):
    product: str = Field(description="The id of the product (prod_...) this price is for.")
    unit_amount: int = Field(ge=0, description=f"The price {_AMOUNT}.")
    currency: str = Field(
        min_length=3, max_length=3, description="Three-letter ISO currency code, e.g. usd."
    )


class ListPrices(_Limit):
    product: str | None = Field(None, description="Only prices of this product (prod_...).")


class CreatePaymentLink(_Args):
    price: str = Field(description="The id of the price (price_...) to sell.")
    quantity: int = Field(1, ge=1, description="How many units the link sells.")


class CreateInvoice(_Args):
    customer: str = Field(description="The id of the customer (cus_...) to invoice.")
    days_until_due: int = Field(30, ge=0, le=365, description="Days the customer has to pay.")


class CreateInvoiceItem(_Args):
    customer: str = Field(description="The id of the customer (cus_...).")
    price: str = Field(description="The id of the price (price_...) to add.")
    invoice: str = Field(description="The id of the draft invoice (in_...) to add it to.")


class FinalizeInvoice(_Args):
    invoice: str = Field(description="The id of the draft invoice (in_...) to finalize.")


class RetrieveBalance(_Args):
    pass


class CreateRefund(_Args):
    payment_intent: str = Field(description="The id of the PaymentIntent (pi_...) to refund.")
    amount: int | None = Field(
        None, ge=1, description=f"How much to refund, {_AMOUNT}. Omit to refund what remains."
    )
    reason: str | None = Field(
        None,
        pattern="^(duplicate|fraudulent|requested_by_customer)$",
        description="duplicate, fraudulent or requested_by_customer.",
    )


class ListPaymentIntents(_Limit):
    customer: str | None = Field(None, description="Only this customer's (cus_...) payments.")


class RetrievePaymentIntent(_Args):
    payment_intent: str = Field(description="The id of the PaymentIntent (pi_...).")


@dataclass(frozen=True)
class StripeTool:
    """One prebuilt tool: what the model sees and which Stripe call it makes."""

    name: str
    description: str
    args_schema: type[BaseModel]
    service: str
    """The ``client.v1`` service: ``refunds``."""
    method: str
    """The service method: ``create``."""
    operations: tuple[str, ...]
    """The catalogued operations the tool calls: what a policy must allow."""
    id_field: str | None = None
    """The argument passed positionally as the object id (``retrieve(id, params)``)."""
    fixed: Mapping[str, Any] | None = None
    """Parameters the tool always sends."""

    def arguments(self, raw: Mapping[str, Any] | BaseModel) -> BaseModel:
        """Validate the model's arguments (``pydantic.ValidationError`` names the field)."""
        if isinstance(raw, self.args_schema):
            return raw
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        return self.args_schema.model_validate(raw)

    def call(self, client: stripe.StripeClient, args: BaseModel, key: str | None = None) -> Any:
        """Make the tool's Stripe call with validated ``args`` (and an idempotency key)."""
        params = args.model_dump(exclude_none=True)
        params.update(self.fixed or {})
        positional = [params.pop(self.id_field)] if self.id_field else []
        options = {"idempotency_key": key} if key else {}
        method = getattr(getattr(client.v1, self.service), self.method)
        return method(*positional, params=params or None, options=options or None)


_CUSTOMERS, _INVOICES = "customers", "invoices"

_PREBUILT = (
    StripeTool(
        "create_customer",
        "Create a Stripe customer with a name and optional email. Returns the customer, "
        "whose id (cus_...) other tools take.",
        CreateCustomer,
        _CUSTOMERS,
        "create",
        ("customers.create",),
    ),
    StripeTool(
        "list_customers",
        "List Stripe customers, newest first, optionally only those with an email.",
        ListCustomers,
        _CUSTOMERS,
        "list",
        ("customers.list",),
    ),
    StripeTool(
        "create_product",
        "Create a product to sell. Returns it with its id (prod_...); give it a price "
        "with create_price.",
        CreateProduct,
        "products",
        "create",
        ("products.create",),
    ),
    StripeTool(
        "list_products",
        "List the products for sale, newest first, with their ids (prod_...).",
        ListProducts,
        "products",
        "list",
        ("products.list",),
    ),
    StripeTool(
        "create_price",
        "Create a one-time price for a product. unit_amount is in the currency's "
        "smallest unit (cents for USD, yen for JPY).",
        CreatePrice,
        "prices",
        "create",
        ("prices.create",),
    ),
    StripeTool(
        "list_prices",
        "List prices, optionally of one product.",
        ListPrices,
        "prices",
        "list",
        ("prices.list",),
    ),
    StripeTool(
        "create_payment_link",
        "Create a payment link a customer can open to buy a price. Returns its url.",
        CreatePaymentLink,
        "payment_links",
        "create",
        ("payment_links.create",),
        fixed=None,
    ),
    StripeTool(
        "create_invoice",
        "Create a draft invoice for a customer, paid by bank transfer or card within "
        "days_until_due. Add items with create_invoice_item, then finalize_invoice.",
        CreateInvoice,
        _INVOICES,
        "create",
        ("invoices.create",),
        fixed={"collection_method": "send_invoice"},
    ),
    StripeTool(
        "create_invoice_item",
        "Add a price to a customer's draft invoice.",
        CreateInvoiceItem,
        "invoice_items",
        "create",
        ("invoice_items.create", "invoices.retrieve"),
    ),
    StripeTool(
        "finalize_invoice",
        "Finalize a draft invoice so it can be sent and paid. Returns it with its "
        "hosted_invoice_url.",
        FinalizeInvoice,
        _INVOICES,
        "finalize_invoice",
        ("invoices.finalize_invoice", "invoices.retrieve"),
        id_field="invoice",
    ),
    StripeTool(
        "retrieve_balance",
        "Retrieve the Stripe account's available and pending balance.",
        RetrieveBalance,
        "balance",
        "retrieve",
        ("balance.retrieve",),
    ),
    StripeTool(
        "create_refund",
        "Refund a payment (a PaymentIntent, pi_...), fully or in part. amount is in the "
        "currency's smallest unit; omit it to refund what remains. Refunds are limited "
        "by a spending policy: a refusal means stop, not retry.",
        CreateRefund,
        "refunds",
        "create",
        ("refunds.create", "payment_intents.retrieve"),
    ),
    StripeTool(
        "list_payment_intents",
        "List payments (PaymentIntents), newest first, optionally of one customer.",
        ListPaymentIntents,
        "payment_intents",
        "list",
        ("payment_intents.list",),
    ),
    StripeTool(
        "retrieve_payment_intent",
        "Retrieve one payment (PaymentIntent) by id: amount, currency, status, customer.",
        RetrievePaymentIntent,
        "payment_intents",
        "retrieve",
        ("payment_intents.retrieve",),
        id_field="payment_intent",
    ),
)
#: The prebuilt tools, by name.
STRIPE_TOOLS: dict[str, StripeTool] = {tool.name: tool for tool in _PREBUILT}


def select_tools(only: Iterable[str] | None = None) -> list[StripeTool]:
    """The prebuilt tools named in ``only`` (all of them by default), in that order."""
    if only is None:
        return list(STRIPE_TOOLS.values())
    names = list(only)
    unknown = [name for name in names if name not in STRIPE_TOOLS]
    if unknown:
        raise ValueError(
            f"no prebuilt Stripe tool named {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(STRIPE_TOOLS)}"
        )
    return [STRIPE_TOOLS[name] for name in names]


def idempotency_key(
    tool: str, run: str | None, tool_call_id: str | None, arguments: BaseModel
) -> str | None:
    """One Stripe idempotency key per tool call (``None`` without a call id): the same
    call executed again reuses it, so Stripe cannot act twice; the arguments are part of
    it, so another run or call that happens to reuse a call id is not mistaken for it."""
    if not tool_call_id:
        return None
    canonical = json.dumps(arguments.model_dump(mode="json"), sort_keys=True)
    material = "\x00".join((run or "", tool, tool_call_id, canonical))
    return f"paymaster-{hashlib.sha256(material.encode()).hexdigest()[:40]}"


class StripeToolkit:
    """The prebuilt tools bound to a governor, a Stripe client and an agent type.

    ``client`` may be a plain ``StripeClient`` (a governed copy is made) or one from
    :func:`~paymaster.vendors.stripe.governed_client`. Adapters call :meth:`invoke` /
    :meth:`ainvoke` with the run and tool call they know about.

    ``agent`` is the agent type of every call (default: the governed ``client``'s); given
    either way, it is checked here against the governor's policies
    (:meth:`~paymaster.Governor.check_agent`). Without one, each call names its own
    (``invoke(..., agent=...)``: the adapters pass the running agent's name).
    """

    def __init__(
        self,
        governor: Governor,
        client: stripe.StripeClient,
        *,
        agent: str | None = None,
        run_policy: RunPolicy | None = None,
        only: Sequence[str] | None = None,
    ) -> None:
        from ._client import default_agent, govern, is_governed

        self.governor = governor
        #: The agent type of every call, or ``None``: each call names its own.
        self.agent = agent or default_agent(client)
        if self.agent is not None:
            governor.check_agent(self.agent)
        self.run_policy = run_policy
        self.client = client if is_governed(client) else govern(client, governor, agent=agent)
        self.tools = select_tools(only)

    def _prepare(
        self,
        name: str,
        arguments: Mapping[str, Any] | BaseModel,
        tool_call_id: str | None,
        run: str | None,
    ) -> tuple[StripeTool, BaseModel, str | None]:
        tool = self._tool(name)
        args = tool.arguments(arguments)
        return tool, args, idempotency_key(tool.name, run, tool_call_id, args)

    def _tool(self, name: str) -> StripeTool:
        for tool in self.tools:
            if tool.name == name:
                return tool
        raise ValueError(f"this toolkit has no tool {name!r}")

    def invoke(
        self,
        name: str,
        arguments: Mapping[str, Any] | BaseModel,
        *,
        run: str | None = None,
        tool_call_id: str | None = None,
        run_policy: RunPolicy | None = None,
        agent: str | None = None,
    ) -> dict[str, Any]:
        """Run one tool; returns the Stripe object as a dict. ``run_policy`` is the run's
        policy when the toolkit has none (a different one from the toolkit's is refused:
        run policies do not stack); ``agent`` is the call's agent type when the toolkit
        has none.

        Raises :class:`~paymaster.PolicyViolation` (the call was refused before it was
        sent) and ``stripe.StripeError`` (Stripe refused it; nothing moved).
        """
        from ._transport import bind

        tool, args, key = self._prepare(name, arguments, tool_call_id, run)
        # The toolkit's run policy, then the call's: two different ones are refused.
        with (
            bind(run_policy=self.run_policy),
            bind(
                agent=self.agent or agent, run=run, run_policy=run_policy, tool_call_id=tool_call_id
            ),
        ):
            return _as_dict(tool.call(self.client, args, key))

    async def ainvoke(
        self,
        name: str,
        arguments: Mapping[str, Any] | BaseModel,
        *,
        run: str | None = None,
        tool_call_id: str | None = None,
        run_policy: RunPolicy | None = None,
        agent: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`invoke` for asyncio, run in the governor's worker threads.

        A tool call whose task is cancelled (an agent framework tearing down the siblings
        of a refused call) is not cut off: its Stripe request and settle finish in their
        thread and record what really happened, instead of an unknown outcome.
        """
        return await self.governor.in_worker(
            self.invoke,
            name,
            arguments,
            run=run,
            tool_call_id=tool_call_id,
            run_policy=run_policy,
            agent=agent,
        )


def _as_dict(result: Any) -> dict[str, Any]:
    to_dict = getattr(result, "to_dict", None)
    value = to_dict() if callable(to_dict) else result
    if not isinstance(value, dict):
        raise TypeError(f"expected a Stripe object, got {type(result).__name__}")
    return value
