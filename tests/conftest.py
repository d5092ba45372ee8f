"""Shared test set-up: float64 everywhere, small hypothesis budgets."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_enable_x64", True)

from hypothesis import HealthCheck, settings  # noqa: E402

# JAX compiles a new program for every new shape, so each example costs ~0.1-1 s.
settings.register_profile(
    "funnn", max_examples=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# `pytest --hypothesis-profile=thorough`: many more examples, for runs outside the default suite
# (tests/test_properties.py draws a new random network per example: ~0.3-3 s each).
settings.register_profile("thorough", parent=settings.get_profile("funnn"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "funnn"))

# A finished 2-epoch XOR run: a fixture of tests/test_rundir.py, test_train.py and test_cli.py.
from _runs import xor_run  # noqa: E402, F401
