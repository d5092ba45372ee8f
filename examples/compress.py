"""'Compressing' a network (seed 000): three linear layers collapse into one.

With identity activations, three layers are one affine map::

    ((x W1 + b1) W2 + b2) W3 + b3 = x (W1 W2 W3) + (b1 W2 W3 + b2 W3 + b3)

so W = W1 W2 W3 and b = b1 W2 W3 + b2 W3 + b3. The script builds the large network
(4 -> 6 -> 5 -> 3, each dense layer followed by the identity activation, as the
seed's ``[i, i, i]``) and the small one (a single L.dense(3) with W and b given as
explicit initialisers), both as funnn ``serial`` models in float64.

Checks:
- on 16 random inputs the two outputs are equal to 1e-12;
- so are their Jacobians with respect to the input (both constant, W^T);
- with tanh in place of the identity, the same W, b is far off (> 0.01): only
  linear layers compress.

Run: python examples/compress.py
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from funnn import activations as A, layers as L  # noqa: E402

SIZES = (4, 6, 5, 3)


def large(act=A.identity):
    """L.dense(6), act, L.dense(5), act, L.dense(3), act: the three-layer network."""
    layers = []
    for n in SIZES[1:]:
        layers += [L.dense(n, b_init="normal"), L.activation(act)]
    return L.serial(*layers)


def init(model, key):
    """``model.init`` under jit: one XLA compile instead of one per random draw."""
    return jax.jit(lambda k: model.init(k, (None, SIZES[0]))[1])(key)


def compress(params):
    """(W, b) of the one-layer network equal to the large one's params (identity acts)."""
    (l1, _, l2, _, l3, _) = params
    w = l1["W"] @ l2["W"] @ l3["W"]
    b = l1["b"] @ l2["W"] @ l3["W"] + l2["b"] @ l3["W"] + l3["b"]
    return w, b


def main():
    k_init = jax.random.key(0)
    big = large()
    params = init(big, k_init)
    w, b = jax.jit(compress)(params)
    small = L.serial(L.dense(SIZES[-1], w_init=w, b_init=b), L.activation(A.identity))
    small_params = init(small, k_init)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, SIZES[0])))

    @jax.jit
    def compare(params, small_params, x):
        y_big, y_small = big.apply(params, x), small.apply(small_params, x)
        jac = [jax.jacobian(lambda v, m=m, p=p: m.apply(p, v))(x[0])
               for m, p in ((big, params), (small, small_params))]
        y_tanh = large(A.tanh).apply(params, x)
        return (y_big, jnp.max(jnp.abs(y_big - y_small)), jnp.max(jnp.abs(jac[0] - jac[1])),
                jac[1], jnp.max(jnp.abs(y_tanh - y_small)))

    y_big, out_err, jac_err, jac_small, tanh_err = compare(params, small_params, x)
    out_err, jac_err, tanh_err = float(out_err), float(jac_err), float(tanh_err)

    shapes = ", ".join(f"W{i + 1} {p['W'].shape}" for i, p in enumerate(params[::2]))
    print(f"large: three dense layers with identity activations, {shapes}")
    print(f"small: one dense layer, W {w.shape}, b {b.shape}")
    print(f"max |large(x) - small(x)| on {x.shape[0]} inputs: {out_err:.1e}")
    print(f"max |d large/dx - d small/dx| (= W):  {jac_err:.1e}")
    print(f"with tanh activations instead: {tanh_err:.2f} (no longer one layer)")

    assert y_big.dtype == jnp.float64
    assert out_err < 1e-12, out_err
    assert jac_err < 1e-12 and np.allclose(jac_small, w.T, atol=1e-15), jac_err
    assert tanh_err > 1e-2, tanh_err
    return {"out_err": out_err, "jac_err": jac_err, "tanh_err": tanh_err, "W": w, "b": b,
            "params": params}


if __name__ == "__main__":
    main()
