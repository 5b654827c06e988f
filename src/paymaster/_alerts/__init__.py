"""Budget alerts: events from the ledger, sent to callbacks, logs and webhooks.

::

    gov = Governor(url, policies=..., alerts=AlertConfig(
        thresholds=(0.5, 0.8, 1.0),
        sinks=[CallbackSink(page_someone), LoggingSink(), WebhookSink("https://...")],
    ))

Four kinds of :class:`Alert`:

* ``threshold``: a budget's ``committed`` (pending estimates + settled actuals) reached a
  fraction of its cap. Each threshold fires **once per budget window** (a UTC day of an
  agent type's budget, or a run's budget) across every process on the ledger. It is
  decided in the ledger transaction that takes the budget there (a reserve's conditional
  UPDATE, or a settle above its estimate), under that budget row's lock: the transaction
  inserts a ``paymaster_alert`` row whose unique key is ``(budget_id, threshold)``, and
  only the process whose insert lands emits the alert. A release that lowers
  ``committed`` does not re-arm a threshold. The 100% threshold means the budget is
  exhausted: a reserve landed exactly on the cap, or, whichever comes first, a reserve
  was refused because it would have gone over it (the refusal's audit transaction
  inserts the row). Each process remembers the thresholds it saw recorded, so a reserve
  runs no extra statement unless it reaches one this process has not seen.
* ``denial``: a call was refused (any :class:`~paymaster.ViolationCode`).
* ``revoke``: this process revoked an agent type, a run or everything.
* ``stale_hold``: :meth:`paymaster.Governor.check_stale_holds` found a hold unresolved for
  longer than a limit; each hold alerts once.

Alerts are emitted only after their transaction commits and never on the governed call's
path: sinks run in a background thread fed by a bounded queue (an alert that finds it full
is dropped and logged), and a :class:`WebhookSink` posts from a thread of its own, with a
timeout and retries, so a slow or dead receiver delays nothing else. Delivery is at most
once: an alert whose process dies before sending it, or whose transaction's COMMIT reply
was lost (the ledger's retry finds the commit but not the alerts it decided), is not sent
(the ``paymaster_alert`` row still records that the threshold fired).

Layout: :mod:`.sinks` has what an alert is (:class:`Alert`, :class:`AlertKind`) and where
it goes (:class:`AlertSink`, :class:`CallbackSink`, :class:`LoggingSink`,
:class:`WebhookSink`, and their background thread); :mod:`.alerter` decides them
(:class:`AlertConfig`, and :class:`Alerter`, the ledger observer that records threshold
crossings inside the ledger's transactions and publishes alerts after commit).
"""

from __future__ import annotations

from .alerter import (
    AlertBatch,
    AlertConfig,
    Alerter,
    denial_alert,
    overrun_alert,
    revoke_alert,
    stale_hold_alert,
)
from .sinks import Alert, AlertKind, AlertSink, CallbackSink, LoggingSink, WebhookSink

__all__ = [
    "Alert",
    "AlertBatch",
    "AlertConfig",
    "AlertKind",
    "AlertSink",
    "Alerter",
    "CallbackSink",
    "LoggingSink",
    "WebhookSink",
    "denial_alert",
    "overrun_alert",
    "revoke_alert",
    "stale_hold_alert",
]
