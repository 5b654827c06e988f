"""Policies: what an agent type may do with a vendor, and how a run narrows it.

Layout, one job per module:

* :mod:`.amounts`: reading money amounts in policy files (never floats).
* :mod:`.rules`: the :class:`Policy` and :class:`RunPolicy` models and their validation.
* :mod:`.effective`: :class:`EffectivePolicy` (a policy narrowed by a run policy, never
  widened), its checks of one call, and :func:`effective_policy`.
* :mod:`.sets`: :class:`PolicySet`, the policies in force, one per (agent type, vendor).
"""

from __future__ import annotations

from .sets import EffectivePolicy, Policy, PolicySet, RunPolicy, effective_policy

__all__ = ["EffectivePolicy", "Policy", "PolicySet", "RunPolicy", "effective_policy"]
