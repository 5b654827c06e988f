"""paymaster for the OpenAI Agents SDK: governed tools whose refusals stop the run."""

from ._propagation import STOPS_THE_RUN, stop_the_run
from .stripe import run_id_of, stripe_tools

__all__ = ["STOPS_THE_RUN", "run_id_of", "stop_the_run", "stripe_tools"]
