"""paymaster for LangChain: governed tools whose refusals reach the caller of the agent."""

from ._propagation import STOPS_THE_RUN, stop_the_run
from .stripe import PaymasterStripeToolkit, run_id_of

__all__ = ["STOPS_THE_RUN", "PaymasterStripeToolkit", "run_id_of", "stop_the_run"]
