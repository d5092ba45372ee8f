"""The XLA flags the test suite compiles with (set by ``tests/conftest.py``, kept by the docs
pages in ``tests/test_docs.py``): backend optimisation level 0 and XLA's CPU loop emitters
instead of its fusion emitters. Why: conftest's comment."""

SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def names(flags: tuple[str, ...] = SUITE_XLA_FLAGS) -> tuple[str, ...]:
    """``("--xla_backend_optimization_level", ...)``: the flags without their values."""
    return tuple(f.split("=")[0] for f in flags)
