"""The test suite. Hypothesis profiles are set here so trial and pytest share them.

``sockproto`` (the default) keeps the property tests well under 30 s on a
shared machine; ``ci`` (chosen when ``CI`` is set) is derandomized, so a CI run
cannot fail on an example no one can reproduce; ``thorough`` is for a long
local hunt: ``HYPOTHESIS_PROFILE=thorough scripts/test -k properties``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sockproto",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("sockproto"), derandomize=True, database=None)
settings.register_profile("thorough", parent=settings.get_profile("sockproto"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "sockproto"))
