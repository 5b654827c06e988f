"""Policies: what an agent type may do with a vendor, and how a run narrows it.

A :class:`Policy` governs one agent type's calls to one vendor. A :class:`RunPolicy`
narrows it for one run (never widens: an attempt to widen raises :class:`PolicyError`
naming the field). :func:`effective_policy` combines the two into the
:class:`EffectivePolicy` every call is checked against.

The parts live in private sibling modules, all importable from here: reading amounts
(:mod:`.amounts`), the policy models (:mod:`.rules`) and the effective
policy with its checks (:mod:`.effective`). This module holds the
:class:`PolicySet` in force and the suggestions its errors make.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence

from .._errors import PolicyError, PolicyViolation, ViolationCode
from .amounts import MAX_MINOR_UNITS as MAX_MINOR_UNITS
from .effective import EffectivePolicy, effective_policy
from .rules import HTTP_METHODS as HTTP_METHODS
from .rules import MAX_CALLS as MAX_CALLS
from .rules import CallLimit as CallLimit
from .rules import Policy, RunPolicy

__all__ = ["EffectivePolicy", "Policy", "PolicySet", "RunPolicy", "effective_policy"]


class PolicySet:
    """The policies in force, at most one per (agent type, vendor)."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._by_key: dict[tuple[str, str], Policy] = {}
        ids: set[str] = set()
        for policy in policies:
            key = (policy.agent, policy.vendor)
            if key in self._by_key:
                raise PolicyError(
                    f"two policies govern agent {policy.agent!r} with vendor {policy.vendor!r}: "
                    f"{self._by_key[key].id!r} and {policy.id!r}; keep one"
                )
            if policy.id in ids:
                raise PolicyError(f"policy id {policy.id!r} is used twice; ids must be unique")
            ids.add(policy.id)
            self._by_key[key] = policy

    def get(self, agent: str, vendor: str) -> Policy | None:
        return self._by_key.get((agent, vendor))

    @property
    def agents(self) -> list[str]:
        """The agent types the policies name, sorted."""
        return sorted({agent for agent, _ in self._by_key})

    def check_agent(self, agent: str) -> str:
        """``agent`` when a policy names it as its agent type (or there are no policies to
        check it against); else a :class:`PolicyError` that lists the agent types the
        policies know and suggests the nearest. For code that is given an agent type
        before any call is made (the adapters, when tools are wrapped), so that a typo or
        a display name fails there instead of as the first call's ``no_policy``."""
        if not self._by_key or agent in self.agents:
            return agent
        raise PolicyError(
            f"no policy names agent type {agent!r}, so every governed call as it would be "
            f"refused (no_policy); {_known_agents(self.agents, agent)}"
        )

    def require(self, agent: str, vendor: str, *, run: str | None = None) -> Policy:
        """The policy for this agent type and vendor, or a ``no_policy`` violation that
        says which agent types (or, for a known one, which vendors) the policies know."""
        policy = self.get(agent, vendor)
        if policy is None:
            message = (
                f"no policy governs agent {agent!r} with vendor {vendor!r}; calls without a "
                "policy are refused"
            )
            vendors = sorted(v for a, v in self._by_key if a == agent)
            if vendors:
                message += f"; agent {agent!r} has policies for {_listed('vendor', vendors)}"
            elif self._by_key:
                known = self.agents
                suggestion = _nearest(agent, known)
                fix = f"agent={suggestion!r}" if suggestion else "agent= naming one of them"
                message += (
                    f". The policies know {_listed('agent type', known)}. Where the agent "
                    "type is the agent's name (no agent= given when its tools were wrapped), "
                    f"pass {fix} there, or name the agent so"
                )
            else:
                message += "; no policies are loaded"
            raise PolicyViolation(
                ViolationCode.NO_POLICY, message, agent=agent, run=run, vendor=vendor
            )
        return policy

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


#: How many names an error message lists before it says how many more there are.
_LISTED = 10


def _listed(what: str, names: Sequence[str]) -> str:
    """``agent types 'a', 'b'`` (at most :data:`_LISTED` of them)."""
    shown = ", ".join(map(repr, names[:_LISTED]))
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{what}{'s' if len(names) != 1 else ''} {shown}{more}"


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", name.casefold()).strip("-")


def _nearest(name: str, known: Sequence[str]) -> str | None:
    """The known agent type ``name`` was probably meant to be: the same once case, spaces
    and punctuation are ignored (``"Refund Agent"`` for ``refund-agent``), else the
    closest by :mod:`difflib`."""
    slugs = {_slug(k): k for k in known}
    if _slug(name) in slugs:
        return slugs[_slug(name)]
    close = difflib.get_close_matches(_slug(name), list(slugs), n=1, cutoff=0.6)
    return slugs[close[0]] if close else None


def _known_agents(known: Sequence[str], agent: str) -> str:
    """What the policies know, and the nearest to ``agent``."""
    text = f"the policies know {_listed('agent type', known)}"
    suggestion = _nearest(agent, known)
    return f"{text}; did you mean {suggestion!r}?" if suggestion else text
