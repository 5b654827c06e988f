"""paymaster for the OpenAI Agents SDK: governed tools whose refusals stop the run.

* :func:`govern_tools` / :func:`govern_tool`: govern existing ``FunctionTool`` objects;
* :func:`governed_function_tool`: ``@function_tool`` and governance in one step;
* :func:`stripe_tools`: the prebuilt governed Stripe tools.
"""

from ._propagation import STOPS_THE_RUN, stop_the_run
from ._runs import run_id_of, run_id_of_result, run_policy_of
from .govern import govern_tool, govern_tools, governed_function_tool
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
