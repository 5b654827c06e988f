"""paymaster for LangChain: governed tools whose refusals reach the caller of the agent.

* :func:`govern_tools`: govern existing ``BaseTool`` objects;
* :class:`PaymasterMiddleware`: govern every tool call of a ``create_agent`` agent;
* :class:`PaymasterStripeToolkit`: the prebuilt governed Stripe tools.
"""

from typing import TYPE_CHECKING, Any

from paymaster._extras import requires

from ._propagation import STOPS_THE_RUN, stop_the_run
from .govern import GovernedTool, PaymasterMiddleware, govern_tools, run_id_of

if TYPE_CHECKING:
    from .stripe import PaymasterStripeToolkit

__all__ = [
    "STOPS_THE_RUN",
    "GovernedTool",
    "PaymasterMiddleware",
    "PaymasterStripeToolkit",
    "govern_tools",
    "run_id_of",
    "stop_the_run",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: the Stripe toolkit needs ``stripe``; governing your own
    # tools does not.
    if name == "PaymasterStripeToolkit":
        with requires("stripe", "PaymasterStripeToolkit", package="paymaster-langchain"):
            from .stripe import PaymasterStripeToolkit

        return PaymasterStripeToolkit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
