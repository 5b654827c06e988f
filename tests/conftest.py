"""paymaster's tests: the shared fixtures come from :mod:`paymaster_test_fixtures`.

Its helpers are re-exported too, for the tests that import them from here
(``from conftest import Clock, refund_policy``).
"""

from paymaster_test_fixtures import *  # noqa: F403 - the fixtures and helpers, see its __all__
