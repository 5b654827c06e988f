"""paymaster for the OpenAI Agents SDK: governed tools whose refusals stop the run.

* :func:`govern_tools` / :func:`govern_tool`: govern existing ``FunctionTool`` objects;
* :func:`governed_function_tool`: ``@function_tool`` and governance in one step;
* :func:`stripe_tools`: the prebuilt governed Stripe tools.
"""

from typing import TYPE_CHECKING, Any

from paymaster._extras import requires

from ._propagation import STOPS_THE_RUN, stop_the_run
from ._runs import run_id_of, run_id_of_result, run_policy_of
from .govern import govern_tool, govern_tools, governed_function_tool

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
