"""Hypothesis profiles: `ci` (default, keeps the suite fast) and `thorough` (thousands of examples per property).

Select with the environment variable HYPOTHESIS_PROFILE, e.g. `HYPOTHESIS_PROFILE=thorough pytest tests`.
"""

import os

import torch
from hypothesis import HealthCheck, settings

# The tests run tiny models: one intra-op thread is faster than two, and does not oversubscribe the 2-core CI box
# while hypothesis, HF generate and our decoders take turns.
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter):
    """Report the accepted-length histogram the EESD property tests saw (rounds per accepted length)."""
    import sys

    module = sys.modules.get("test_losslessness")
    histogram = getattr(module, "ACCEPTED_HISTOGRAM", None)
    if histogram:
        rounds = sum(histogram.values())
        cells = ", ".join(f"{k}: {v}" for k, v in sorted(histogram.items()))
        terminalreporter.write_line(f"EESD property tests: {rounds} rounds, accepted-length histogram {{{cells}}}")
