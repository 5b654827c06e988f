"""The adapter's tests use paymaster's shared fixtures (``tests/paymaster_test_fixtures.py``,
on ``sys.path`` through the root pytest config's ``pythonpath``): ``make_governor`` (its
audit log verified at teardown), ``db_url`` (SQLite and PostgreSQL) and ``clock``.

The helpers are re-exported as in ``tests/conftest.py``: pytest keeps one module named
``conftest``, the last it imported, and ``tests/`` modules import helpers from it.
"""

from paymaster_test_fixtures import *  # noqa: F403 - the fixtures and helpers, see its __all__
