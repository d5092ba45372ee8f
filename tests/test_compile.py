"""funnn.jit and core.compiler_options: the XLA options funnn compiles its steps with."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import funnn
from funnn import compile as fcompile
from funnn import core, manual

X = jax.random.normal(jax.random.key(0), (16, 14, 14, 32))     # big enough for YNNPACK to take
W = jax.random.normal(jax.random.key(1), (3, 3, 32, 64)) * 0.05
DN = lax.conv_dimension_numbers(X.shape, W.shape, ("NHWC", "HWIO", "NHWC"))


def conv_loss(w, x):
    return jnp.sum(jnp.tanh(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=DN)))


def library_convolutions(compiled_text: str) -> int:
    """How many convolutions XLA handed to a CPU kernel library (YNNPACK) in this program:
    library fusions whose called computation holds a ``convolution``."""
    bodies = dict(re.findall(r"^%(\S+) .*?\{\n(.*?)\n\}", compiled_text, re.M | re.S))
    called = re.findall(r"calls=%([\w.\-]+).*__ynn_fusion", compiled_text)
    return sum(" convolution(" in bodies.get(name, "") for name in called)


def test_options_are_for_the_cpu_only():
    assert core.compiler_options("gpu") == {}
    assert core.compiler_options("tpu") == {}
    assert funnn.compiler_options is core.compiler_options and funnn.jit is core.jit


def test_moved_names_stay_importable_where_they_were():
    # compiling moved from core (and jit_reusing from manual) into funnn.compile
    assert core.jit is fcompile.jit and core.compiler_options is fcompile.compiler_options
    assert manual.jit_reusing is fcompile.jit_reusing


def test_an_option_this_jaxlib_does_not_know_is_dropped_not_fatal():
    assert fcompile._accepted((("xla_cpu_no_such_option_funnn", "1"),)) is False


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_options_apply_on_the_measured_jaxlib_only(monkeypatch):
    if fcompile._jaxlib_series() in fcompile._CPU_OPTIONS_JAXLIB:
        assert core.compiler_options() == fcompile._CPU_OPTIONS
    monkeypatch.setattr(fcompile, "_CPU_OPTIONS_JAXLIB", ((0, 1),))
    assert core.compiler_options() == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_funnn_jit_moves_convolutions_off_ynnpack_and_agrees_with_jax_jit():
    g_funnn = funnn.jit(jax.value_and_grad(conv_loss))
    g_jax = jax.jit(jax.value_and_grad(conv_loss))
    v1, d1 = g_funnn(W, X)
    v0, d0 = g_jax(W, X)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(d1, d0, rtol=1e-4, atol=1e-5)
    plain = library_convolutions(g_jax.lower(W, X).compile().as_text())
    if not core.compiler_options() or plain == 0:
        pytest.skip("this jaxlib does not send convolutions to YNNPACK")
    assert library_convolutions(g_funnn.lower(W, X).compile().as_text()) == 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_xla_flags_that_choose_the_libraries_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS",
                       "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
    assert core.compiler_options() == {}


def test_jit_passes_jax_jit_arguments_through_and_merges_options():
    f = funnn.jit(lambda a, n: a * n, static_argnums=1, donate_argnums=0,
                  compiler_options={"xla_cpu_enable_fast_math": False}
                  if jax.default_backend() == "cpu" else None)
    a = jnp.arange(3.0)
    np.testing.assert_array_equal(f(a, 2), [0.0, 2.0, 4.0])
    assert a.is_deleted()                                # donated, as jax.jit would
