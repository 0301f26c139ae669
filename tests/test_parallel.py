"""Data-parallel steps on 4 forced CPU devices equal the single-device step.

JAX fixes its device count when it starts, so the check runs in a fresh
Python process with ``--xla_force_host_platform_device_count=4``. That process
compares a sharded ``fit`` too (two more training programs) only when the slow
test that reads it is selected.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def results(request):
    script = Path(__file__).with_name("sharded_script.py")
    fit_wanted = any(
        item.module is request.module and item.get_closest_marker("slow")
        for item in request.session.items
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(script), *(["--fit"] if fit_wanted else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        name: float(value) for name, value in (line.split() for line in done.stdout.splitlines())
    }


@pytest.mark.parametrize("check", ["step_params", "step_loss", "multi_params"])
def test_sharded_equals_single_device(results, check):
    assert results[check] < 1e-6


@pytest.mark.slow  # two more training programs; the fast loop compares the sharded steps
def test_sharded_fit_equals_single_device_fit(results):
    assert results["fit_params"] < 1e-6


def test_sharded_params_live_on_every_device(results):
    assert results["step_sharding"] == 1


def test_indivisible_batch_is_a_clear_error(results):
    assert results["indivisible_error"] == 1
