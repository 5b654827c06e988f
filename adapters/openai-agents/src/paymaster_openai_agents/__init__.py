"""paymaster for the OpenAI Agents SDK: governed tools whose refusals stop the run.

* :func:`govern_tools` / :func:`govern_tool`: govern existing ``FunctionTool`` objects;
* :func:`governed_function_tool`: ``@function_tool`` and governance in one step;
* :func:`stripe_tools`: the prebuilt governed Stripe tools.

Layout (module: job):

* :mod:`.govern`: the public wrappers (``govern_tools``, ``govern_tool``,
  ``governed_function_tool``) and :func:`stop_the_run`, which lets a refusal through the
  SDK's tool-error handling to the caller of ``Runner.run``;
* :mod:`._call`: one governed call, from its reservation to its recorded outcome, as one
  piece of work the SDK cancelling the call cannot cut in two;
* :mod:`._runs`: which run a tool call belongs to (its run id) and its run policy;
* :mod:`.stripe`: the prebuilt Stripe tools as ``FunctionTool`` objects (needs
  ``paymaster-openai-agents[stripe]``; imported on first use);
* :mod:`._compat`: every use of the SDK's (and asyncio's) private names, each with the
  version it was read from.

Shared with the other adapters (:mod:`paymaster.integrations`): the outcome rules, the
refusal texts, :data:`STOPS_THE_RUN` and the re-classing behind :func:`stop_the_run`.
"""

from typing import TYPE_CHECKING, Any

from paymaster.integrations import STOPS_THE_RUN, requires

from ._runs import run_id_of, run_id_of_result, run_policy_of
from .govern import govern_tool, govern_tools, governed_function_tool, stop_the_run

if TYPE_CHECKING:
    from .stripe import stripe_tools

__all__ = [
    "STOPS_THE_RUN",
    "govern_tool",
    "govern_tools",
    "governed_function_tool",
    "run_id_of",
    "run_id_of_result",
    "run_policy_of",
    "stop_the_run",
    "stripe_tools",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: the Stripe tools need ``stripe``; governing your own tools
    # does not.
    if name == "stripe_tools":
        with requires("stripe", "stripe_tools", package="paymaster-openai-agents"):
            from .stripe import stripe_tools

        return stripe_tools
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
