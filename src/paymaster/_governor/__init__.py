"""The governor: the facade users hold, and one governed call's life.

Layout, one job per module:

* :mod:`.governor`: :class:`Governor`, the facade (``guard``, ``aguard``, ``governed``,
  ``free_call``, revocations, status); it delegates to the modules below.
* :mod:`.request`: :class:`CallRequest`, one governed call as a frozen value.
* :mod:`.prepare`: the pure checks of a request against its effective policy, and the one
  place the ledger's ``ReserveRequest`` is built.
* :mod:`.call`: :class:`GovernedCall`, a reserved call resolved exactly once, and
  :func:`conclude`.
* :mod:`.cancellation`: ``aguard``: :class:`AsyncGovernedCall` wraps a
  :class:`GovernedCall`, and the machinery that keeps a cancelled task from leaving a hold
  pending or resolving it twice.
* :mod:`.records`: rows of attempts that reserve nothing (refusals, errors, free calls).
* :mod:`.decorator`: the ``governed`` decorator.
"""

from __future__ import annotations

from .governor import (
    AsyncGovernedCall,
    AsyncGuard,
    CallRequest,
    GovernedCall,
    Governor,
    aconclude,
    conclude,
)

__all__ = [
    "AsyncGovernedCall",
    "AsyncGuard",
    "CallRequest",
    "GovernedCall",
    "Governor",
    "aconclude",
    "conclude",
]
