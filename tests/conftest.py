"""Hypothesis profiles: `ci` (default, keeps the suite fast) and `thorough` (thousands of examples per property).

Select with the environment variable HYPOTHESIS_PROFILE, e.g. `HYPOTHESIS_PROFILE=thorough pytest tests`.

Parallel runs: with pytest-xdist installed (the test extra), the whole suite (`python -m pytest`, no paths, no `-n`)
runs on one worker per CPU, at most MAX_WORKERS (PYTEST_XDIST_AUTO_NUM_WORKERS overrides); chosen paths, or a box
without pytest-xdist, run in this process, and `-n N` decides where given. Tests go to whichever worker is free, one at
a time, except the files in SHARED_SETUP_FILES, each sent whole to one worker (first, being the largest units): their
session fixtures cost tens of seconds per worker that builds them.
"""

import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings

MAX_WORKERS = 4  # each worker may hold the real models (about 2 GB)
# tests/test_models.py converts the packaged SmolLM2 into a session-scoped cache directory (about 40 s of CPU)
SHARED_SETUP_FILES = frozenset({"tests/test_models.py"})
HISTOGRAM_KEY = "eesd_accepted_histogram"

# The tests run tiny models: one intra-op thread is faster than two, and does not oversubscribe the 2-core CI box
# while hypothesis, HF generate and our decoders take turns.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test, the count restored after it (a CLI run with --threads changes it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`-n auto` for a whole-suite run where pytest-xdist is installed and no `-n` was given (read by xdist next)."""
    whole_suite = config.args_source is pytest.Config.ArgsSource.TESTPATHS
    worker = hasattr(config, "workerinput")
    if whole_suite and not worker and config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None:
        config.option.numprocesses = "auto"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto`: one per usable CPU, at most MAX_WORKERS; none (this process) on a single CPU."""
    chosen = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if chosen:
        return int(chosen)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cpus, MAX_WORKERS)
    return workers if workers > 1 else 0


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's default (`--dist load`) replaced by per-test scheduling that keeps SHARED_SETUP_FILES whole; another
    `--dist` is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedSetupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in SHARED_SETUP_FILES else nodeid

    return SharedSetupScheduling(config, log)


def _accepted_histogram() -> Counter:
    import sys

    return Counter(getattr(sys.modules.get("test_losslessness"), "ACCEPTED_HISTOGRAM", None) or {})


WORKER_HISTOGRAMS: Counter = Counter()  # merged on the xdist controller as workers finish


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its histogram to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output[HISTOGRAM_KEY] = dict(_accepted_histogram())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    WORKER_HISTOGRAMS.update(getattr(node, "workeroutput", {}).get(HISTOGRAM_KEY, {}))


def pytest_terminal_summary(terminalreporter):
    """Report the accepted-length histogram the EESD property tests saw (rounds per accepted length)."""
    histogram = _accepted_histogram() + WORKER_HISTOGRAMS
    if histogram:
        rounds = sum(histogram.values())
        cells = ", ".join(f"{k}: {v}" for k, v in sorted(histogram.items()))
        terminalreporter.write_line(f"EESD property tests: {rounds} rounds, accepted-length histogram {{{cells}}}")
