"""funnn/dtypes.py: the wide dtype mixed precision accumulates in, and the upcast and matmul
that use it, against float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from funnn import dtypes


@pytest.mark.parametrize("low", [jnp.bfloat16, jnp.float16])
def test_low_precision_widens_to_float32_and_everything_else_stays(low):
    assert dtypes.wide(low) == jnp.float32 and dtypes.wide(jnp.dtype(low)) == jnp.float32
    for dt in (jnp.float32, jnp.float64, jnp.int32, jnp.int8, jnp.bool_):
        assert dtypes.wide(dt) == jnp.dtype(dt)
    x = jnp.asarray([1.5, -2.25, 3.0], low)
    up = dtypes.upcast(x)
    assert up.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(up), [1.5, -2.25, 3.0])   # exact in both
    ids = jnp.arange(3, dtype=jnp.int32)
    assert dtypes.upcast(ids) is ids
    f64 = jnp.ones(2, jnp.float64)
    assert dtypes.upcast(f64).dtype == jnp.float64


def test_matmul_wide_accumulates_bfloat16_in_float32():
    """Sums of 256 products of bfloat16 inputs: in float32 they match float64 on the same
    rounded inputs to 1e-5; a bfloat16 result (8 bits of mantissa) would be off by ~1e-2."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 256))
    b = rng.normal(size=(256, 3))
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    got = dtypes.matmul_wide(a16, b16)
    assert got.dtype == jnp.float32
    want = np.asarray(a16, np.float64) @ np.asarray(b16, np.float64)   # the rounded inputs
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    f64 = dtypes.matmul_wide(jnp.asarray(a), jnp.asarray(b))
    assert f64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(f64), a @ b, rtol=1e-12)
