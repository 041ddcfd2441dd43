"""pytest / hypothesis configuration for the tqmetal test suite.

Hypothesis profiles (pick with the environment variable TQMETAL_HYPOTHESIS_PROFILE):

* ``ci`` (default): few examples, no deadline, derandomized -> the same examples on
  every run, so CI is reproducible and the whole suite stays within a few minutes.
* ``thorough``: many random examples (not derandomized) for local bug hunting, e.g.
  ``TQMETAL_HYPOTHESIS_PROFILE=thorough pytest tests -x``.
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Tests load throwaway GGUF files: no converted-model cache under ~/.cache unless a test
# asks for one (tqmetal.gguf.converted_cache_dir).
os.environ.setdefault("TQMETAL_GGUF_CACHE", "0")

# `import reference` from the test modules, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=_SUPPRESS,
)
settings.load_profile(os.environ.get("TQMETAL_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: long-context / large cases (run by default; deselect with -m 'not slow')",
    )


@pytest.fixture(scope="session")
def cpu_workers():
    """{variant: cpu_variants.Worker} for every CPU kernel variant this machine supports."""
    import cpu_variants

    ws = {isa: cpu_variants.Worker(isa) for isa in cpu_variants.supported_variants()}
    yield ws
    for w in ws.values():
        w.close()
