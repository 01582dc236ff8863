"""Hypothesis profiles, chosen by ``HYPOTHESIS_PROFILE`` (default ``dev``; tox sets ``ci``).

* ``ci``: derandomized (the same examples on every run, so CI is reproducible),
  modest example counts, no deadline (CPU timing on shared runners is noisy);
* ``dev``: random, a few more examples, for local runs;
* ``thorough``: many examples, for a long hunt before a release.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None, print_blob=True)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
