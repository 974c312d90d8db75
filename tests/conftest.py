"""Shared pytest setup: the `gpu` marker and hypothesis profiles."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,  # first calls include JIT compilation
    max_examples=25,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=10,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _platforms() -> set[str]:
    try:
        return {d.platform for d in jax.devices()}
    except RuntimeError:  # no backend could be initialised
        return set()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    platforms = _platforms()
    if "gpu" in platforms:
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA GPU; jax.devices() platforms: {sorted(platforms)}"
    )
    for item in gpu_items:
        item.add_marker(skip)
