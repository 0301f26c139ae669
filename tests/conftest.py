"""Shared test configuration.

Every test runs with ``jax_numpy_rank_promotion="raise"``: an implicit
broadcast in a forward pass is a hidden sum in its backward, so fbp writes
every broadcast explicitly and the suite holds it to that.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# JAX compile time dominates on small CI machines: hypothesis gets no deadline
# (first examples compile) and a modest number of examples per test.
settings.register_profile(
    "fbp",
    deadline=None,
    max_examples=int(os.environ.get("FBP_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("fbp")


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test (scoped, never global)."""
    with jax.enable_x64(True):
        yield
