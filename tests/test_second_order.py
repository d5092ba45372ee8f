"""Second order through the hand-written backward, for every layer family, in float64.

For a few small networks that together hold every layer family (attention in each strategy,
causal or not, with and without dropout; recurrent layers; a transformer language model):

* grad-of-grad: ``jax.grad`` of a gradient penalty ``L + sum(g^2)`` whose ``g`` comes from
  ``manual.value_and_grad`` (reverse over the manual backward) and, for some, from autodiff
  through ``manual.bridge`` (reverse over the ``custom_vjp`` rule), against the same penalty
  built by autodiff only (``jax.grad`` of ``jax.grad`` of the plain ``apply`` loss);
* Hessian-vector products ``H g``: ``jax.jvp`` of the manual gradient and of the autodiff
  gradient (forward over reverse), against reverse over reverse autodiff: the penalty's
  gradient is ``g + 2 H g``.

The reference never runs a hand-written backward; for attention it is the materialized layer
(autodiff of ``softmax(QK^T)V`` as written). Each case is one jitted program, compiled at
XLA's optimisation level 0: compiling, not running, is what these cost (CPU seconds, measured
on 2 idle cores: conv 1.5, tiled causal attention 4.1; the slow tier 3.6-8.5 each).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import autodiff, losses, manual
from funnn import layers as L


class Case(NamedTuple):
    model: object
    x_shape: tuple               # a pair of shapes for a pair input (cross-attention)
    train: bool = False          # dropout and batch statistics on (with a fixed key)
    lengths: tuple = ()          # the ``lengths=`` side input, if any
    integer_x: int = 0           # > 0: integer inputs below this (embedding)
    reference: object = None     # the model autodiff differentiates (default: the same)
    hvp: bool = True             # also H v by jvp of the manual gradient
    bridge: bool = False         # also grad-of-grad through manual.bridge
    autodiff_hvp: bool = False   # also H v by jvp of the autodiff engine's gradient


def _mha(impl, causal, **kw):
    return L.multi_head_attention(2, head_dim=2, causal=causal, implementation=impl,
                                  block_size=2, **kw)


def _lm(impl):
    return L.serial(L.embedding(7, 4), L.positional_embedding(5),
                    L.transformer_block(2, 4, causal=True, implementation=impl), L.dense(3))


def _attention(impl):
    """Cross-attention (not causal) and causal self-attention by ``impl``, then chunked and
    materialized attention dropout (their masks differ: these two are their own reference)."""
    cross = L.cross_attention(2, head_dim=2, block_size=2, implementation=impl)
    return L.serial(cross, _mha(impl, True),
                    _mha("chunked", True, dropout=0.3), _mha("materialized", False, dropout=0.3))


# Families are grouped into a few small networks by input type, one compile each (the
# suite's time budget); every layer constructor of funnn.layers appears in one of them. The
# attention references are materialized layers (same params, no scan to differentiate):
# autodiff of softmax(QK^T)V as written, independent of the tiled and chunked kernels.
CASES = {
    # fast tier: dense, activation, conv, flatten, serial. Slow tier from here: tiled causal
    # attention (the traced-bound loop of issue 20) on 3x3 tiles of 2 with a padded last
    # tile, grouped heads
    "conv": Case(L.serial(L.conv2d(2, (2, 2)), L.activation("tanh"), L.flatten(), L.dense(2)),
                 (2, 3, 3, 2), bridge=True, autodiff_hvp=True),
    "attention-tiled-causal": Case(_mha("auto", True, num_kv_heads=1), (2, 5, 3),
                                   lengths=(5, 3), bridge=True,
                                   reference=_mha("materialized", True, num_kv_heads=1)),
    "image-and-vector": Case(L.serial(
        L.conv2d(2, (2, 2), padding="SAME"), L.batch_norm(), L.activation("tanh"),
        L.max_pool((2, 2)), L.avg_pool((1, 2)), L.global_avg_pool(), L.dense(3),
        L.activation("sigmoid"), L.prelu(), L.activation("softplus"), L.activation("gelu"),
        L.activation("elu"), L.layer_norm(), L.dropout(0.5),
        L.parallel(L.dense(2), L.serial(L.dense(2), L.activation("tanh"))),
        L.residual(L.serial(L.dense(4), L.activation("tanh"))), L.dense(2)), (3, 4, 4, 1),
        train=True, hvp=False),
    "recurrent": Case(L.serial(L.conv1d(2, 2, padding="SAME"), L.rnn(2), L.lstm(2), L.gru(2),
                               L.dense(2)), (2, 3, 2), lengths=(3, 2), hvp=False),
    "language-model": Case(_lm("auto"), (2, 4), lengths=(4, 3), integer_x=7,
                           reference=_lm("materialized")),
    "attention": Case(_attention("chunked"), ((2, 3, 3), (2, 4, 2)), lengths=(3, 2),
                      train=True, reference=_attention("materialized"), hvp=False),
}
FAST = ("conv",)


def _inputs(case):
    keys = jax.random.split(jax.random.key(1), 2)
    if case.integer_x:
        return jax.random.randint(keys[0], case.x_shape, 0, case.integer_x)
    if isinstance(case.x_shape[0], tuple):
        return tuple(jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, case.x_shape))
    return jax.random.normal(keys[0], case.x_shape, jnp.float64)


def _spec(x):
    if isinstance(x, tuple):
        return tuple((None,) + a.shape[1:] for a in x)
    return (None,) + x.shape[1:]


def _tree_sq(g):
    return sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(g))


def _penalty(grad_fn):
    """``p -> L(p) + sum(g(p)^2)``, a gradient penalty: its gradient is ``g + 2 H g``."""
    def f(p):
        value, g = grad_fn(p)
        return value + _tree_sq(g)
    return f


@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={"xla_backend_optimization_level": 0})  # compile time
def _second_order(case):
    """Every result of one case, from one jitted program: the reference ``g``, grad-of-grad
    by each engine (``gg_*``) and by autodiff only, ``H g`` by jvp (``hvp_*``)."""
    model, loss = case.model, losses.mse
    x = _inputs(case)
    params = model.init(jax.random.key(0), _spec(x))[1]
    kw = {"key": jax.random.key(2)} if case.train else {}
    if model.stateful:
        kw["state"] = model.init_state(_spec(x))
    ctx = {"lengths": jnp.asarray(case.lengths)} if case.lengths else {}

    def out(p, m=case.reference or model):
        o = m.apply(p, x, train=case.train, **kw, **ctx)
        return o[0] if model.stateful else o

    y = jax.random.normal(jax.random.key(3), out(params, model).shape, jnp.float64)

    def plain_loss(p):                                   # autodiff only, no manual backward
        return loss.value(out(p), y)

    def engine(make, m):
        vg = make(m, loss, train=case.train)

        def g(p):
            value, grads = vg(p, x, y, **kw, **ctx)
            return (value[0] if model.stateful else value), grads
        return g

    man = engine(manual.value_and_grad, model)
    g_ref = jax.grad(plain_loss)(params)
    r = {"g_ref": g_ref,
         "gg_ref": jax.grad(_penalty(lambda p: (plain_loss(p), jax.grad(plain_loss)(p))))(
             params),
         "gg_manual": jax.grad(_penalty(man))(params)}
    if case.hvp:
        r["hvp_manual"] = jax.jvp(lambda p: man(p)[1], (params,), (g_ref,))[1]
    if case.bridge:
        brg = engine(autodiff.value_and_grad, manual.bridge(model))
        r["gg_bridge"] = jax.grad(_penalty(brg))(params)
    if case.autodiff_hvp:
        aut = engine(autodiff.value_and_grad, model)
        r["hvp_autodiff"] = jax.jvp(lambda p: aut(p)[1], (params,), (g_ref,))[1]
    return r


def _close(got, want, what):
    flat_w, _ = jax.tree_util.tree_flatten_with_path(want)
    flat_g = jax.tree_util.tree_leaves(got)
    assert len(flat_g) == len(flat_w), what
    scale = max(float(jnp.max(jnp.abs(w))) for _, w in flat_w)
    assert scale > 1e-6, f"{what}: the reference is zero, the check would be empty"
    for (path, w), g in zip(flat_w, flat_g):
        np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-10 * scale,
                                   err_msg=f"{what} at {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES])
def test_grad_of_grad_and_hvp_equal_autodiff_only(name):
    r = _second_order(CASES[name])
    hvp_ref = jax.tree_util.tree_map(lambda gg, g: (gg - g) / 2, r["gg_ref"], r["g_ref"])
    for what in ("gg_manual", "gg_bridge"):
        if what in r:
            _close(r[what], r["gg_ref"], f"{name}: {what}")
    for what in ("hvp_manual", "hvp_autodiff"):
        if what in r:
            _close(r[what], hvp_ref, f"{name}: {what}")
