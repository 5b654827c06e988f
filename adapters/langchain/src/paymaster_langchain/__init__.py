"""paymaster for LangChain: governed tools whose refusals reach the caller of the agent.

* :func:`govern_tools`: govern existing ``BaseTool`` objects;
* :class:`PaymasterMiddleware`: govern every tool call of a ``create_agent`` agent;
* :class:`PaymasterStripeToolkit`: the prebuilt governed Stripe tools.

Layout (module: job):

* :mod:`.govern`: the public wrappers: :class:`GovernedTool` (a governed stand-in that
  wraps the tool's ``invoke``), :func:`govern_tools`, :class:`PaymasterMiddleware` (a
  ``create_agent`` middleware's ``wrap_tool_call``), :func:`run_id_of`;
* :mod:`._governance`: one governed call, shared by both: admission (the spec, a
  refusal), the reservation around the tool, the recorded outcome, and
  :func:`stop_the_run`, which lets a refusal through every tool-error handler;
* :mod:`.stripe`: the prebuilt Stripe tools as LangChain tools (needs
  ``paymaster-langchain[stripe]``; imported on first use);
* :mod:`.testing`: an offline scripted chat model for tests and examples;
* :mod:`._compat`: every use of LangChain's and LangGraph's private names, each with the
  version it was read from.

Shared with the other adapters (:mod:`paymaster.integrations`): the outcome rules, the
refusal texts, :data:`STOPS_THE_RUN` and the re-classing behind :func:`stop_the_run`.
"""

from typing import TYPE_CHECKING, Any

from paymaster.integrations import STOPS_THE_RUN, requires

from .govern import GovernedTool, PaymasterMiddleware, govern_tools, run_id_of, stop_the_run

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
