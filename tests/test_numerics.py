"""funnn/numerics.py: where a training step first went non-finite (the parameters, a layer's
output, the loss, a parameter or input gradient, or else the optimizer update), named by
layer path, and the jit-able ``all_finite`` the checked training loop tests each step with."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from funnn import core, losses, numerics
from funnn import layers as L
from funnn.layers.derived import layer_from_apply

KEY = jax.random.key(0)


def _grads_become(name, fix):
    """A dense(2) whose backward's ``(grads, dx)`` pass through ``fix``."""
    good = L.dense(2)
    return core.Layer(name, good.init, good.apply, good.forward,
                      lambda p, r, dy: fix(*good.backward(p, r, dy)))


def test_all_finite_looks_at_floating_leaves_only_and_runs_under_jit():
    good = {"W": jnp.ones((2, 3)), "n": jnp.array([1, 2]), "s": (jnp.zeros(()),)}
    assert bool(numerics.all_finite(good)) and bool(jax.jit(numerics.all_finite)(good))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        tree = {**good, "s": (jnp.asarray(bad),)}
        assert not bool(numerics.all_finite(tree)) and not bool(jax.jit(numerics.all_finite)(tree))
    assert bool(numerics.all_finite({"ids": jnp.arange(3)}))     # no floating leaf: finite
    assert bool(numerics.all_finite(()))


NON_FINITE = [
    ("finite", "the optimizer update (outputs, loss and gradients were finite: the step is "
               "too large)"),
    ("params", "the parameters (already non-finite before this step)"),
    ("loss", "the loss (on finite outputs: e.g. a log of 0 or an overflow in the loss)"),
    ("param_grad", "the gradient of serial[1] nan_grad (parameter W)"),
    ("input_grad", "the input gradient of serial[1] nan_dx"),
]


@pytest.mark.parametrize("case, want", NON_FINITE, ids=[case for case, _ in NON_FINITE])
def test_locate_names_the_first_non_finite_place(case, want):
    last = {"param_grad": _grads_become("nan_grad", lambda g, dx: ({**g, "W": g["W"] * jnp.nan},
                                                                  dx)),
            "input_grad": _grads_become("nan_dx", lambda g, dx: (g, dx * jnp.nan))}
    model = L.serial(L.dense(3), last.get(case, L.dense(2)))
    _, params = model.init(KEY, (None, 4))
    x, y = jnp.ones((4, 4)), jnp.zeros((4, 2))
    if case == "params":
        params = (params[0], {**params[1], "b": params[1]["b"].at[0].set(jnp.nan)})
    if case == "loss":
        y = jnp.full((4, 2), 1e200)                 # (out - y)^2 overflows float64
    assert numerics.locate(model, losses.mse, params, x, y) == want


def test_numerics_descends_by_kind_not_by_display_name():
    nan_after_3 = layer_from_apply(lambda k, s: (s, {}), lambda p, x, **kw: jnp.log(x - 3.0),
                                   name="log_minus_3")
    model = L.serial(L.dense(2, w_init="ones"), nan_after_3)
    _, params = model.init(jax.random.key(0), (None, 2))
    x, y = jnp.ones((4, 2)), jnp.zeros((4, 2))
    want = "the output of serial[1] log_minus_3"
    assert numerics.locate(model, losses.mse, params, x, y) == want
    renamed = dataclasses.replace(model, name="my network")  # still a serial stack
    assert renamed.kind == "serial"
    assert numerics.locate(renamed, losses.mse, params, x, y) == want
