"""A tiny implicit layer, z* = tanh(x W + z* U + b), trained on two concentric rings.

The layer's output is not computed by a fixed stack of operations but defined as
the solution of an equation, found by `funnn.control.fixed_point` (iterate
`z <- tanh(x W + z U + b)`). The issue writes `tanh(W x + U z + b)` with column
vectors; funnn uses row vectors (`x @ W`), the transpose. `U` is kept a contraction
(`U = 0.9 A / max(1, |A|_F)`, and tanh is 1-Lipschitz), so the fixed point exists,
is unique, and the iteration converges.

The gradient never goes through the iterations: by the implicit function theorem,
with `s = 1 - z*^2` and `J = diag(s) U^T` (the Jacobian of the map in `z`), one
example's incoming gradient `g = dL/dz*` becomes `u = g (I - J)^(-1)` and

    dL/db = u * s,   dL/dW = x^T (u * s),   dL/dU = z*^T (u * s)

(summed over the batch). This example computes that by hand with dense
`numpy.linalg.solve`, and compares it with the `fixed_point` custom VJP, with
backpropagation through 400 unrolled iterations, and with finite differences.
Adam then fits the layer plus a linear read-out to separate two rings (a task no
linear model can do).

Run: python examples/programs/implicit_layer.py
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for _compare.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

from _compare import central_difference, check, compare, show  # noqa: E402
from funnn.control import fixed_point  # noqa: E402

HIDDEN = 8


def rings(n=200, seed=0):
    """Points on two noisy rings (radius 1 and 2), labels 0 and 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    r = 1.0 + y + rng.normal(0, 0.15, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi)], 1), y.astype(float)


def init(seed=0):
    """Raw parameters: W (2, H), A (H, H), b (H,), V (H,), c ()."""
    rng = np.random.default_rng(seed)
    return {"W": rng.normal(size=(2, HIDDEN)), "A": 0.3 * rng.normal(size=(HIDDEN, HIDDEN)),
            "b": np.zeros(HIDDEN), "V": 0.5 * rng.normal(size=HIDDEN), "c": np.zeros(())}


def contraction(a):
    """U = 0.9 A / max(1, |A|_F): spectral norm <= 0.9."""
    return 0.9 * a / jnp.maximum(1.0, jnp.linalg.norm(a))


def layer(w, u, b, x, **kw):
    """z* = tanh(x W + z* U + b) by fixed_point; x: (batch, 2) -> FixedPointResult, z (batch, H)."""
    return fixed_point(lambda p, z: jnp.tanh(x @ p[0] + z @ p[1] + p[2]), (w, u, b),
                       jnp.zeros((x.shape[0], w.shape[1])), **kw)


def layer_unrolled(w, u, b, x, n=400):
    """The same by n unrolled iterations, backpropagated step by step."""
    z = jnp.zeros((x.shape[0], w.shape[1]))
    z, _ = lax.scan(lambda z, _: (jnp.tanh(x @ w + z @ u + b), None), z, None, length=n)
    return z


def bce(z, v, c, y):
    """Mean binary cross-entropy of the logits z @ V + c."""
    logits = z @ v + c
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


@jax.jit
def loss_implicit(w, u, b, v, c, x, y):
    return bce(layer(w, u, b, x, tol=1e-13, max_iter=1000).x, v, c, y)


@jax.jit
def solve_tight(w, u, b, x):
    return layer(w, u, b, x, tol=1e-14, max_iter=2000).x


def loss_unrolled(w, u, b, v, c, x, y):
    return bce(layer_unrolled(w, u, b, x), v, c, y)


def grads_by_hand(w, u, b, v, c, x, y):
    """dL/dW, dL/dU, dL/db by the implicit function theorem with dense solves (numpy)."""
    w, u, b, v, x, y = map(np.asarray, (w, u, b, v, x, y))
    z = np.asarray(solve_tight(w, u, b, x))
    p = 1 / (1 + np.exp(-(z @ v + c)))
    g = np.outer(p - y, v) / len(y)                        # dL/dz*, (batch, H)
    us = np.empty_like(z)
    for i in range(len(y)):
        s = 1 - z[i] ** 2
        jac = s[:, None] * u.T                             # J = diag(s) U^T
        us[i] = np.linalg.solve((np.eye(len(s)) - jac).T, g[i]) * s   # u (I - J)^-1, times s
    return x.T @ us, z.T @ us, us.sum(0)


def train(params, x, y, steps=300, lr=0.05):
    """Adam through the implicit layer; returns params, losses and whether every solve converged."""
    opt = optax.adam(lr)

    def loss(p):
        out = layer(p["W"], contraction(p["A"]), p["b"], x)
        return bce(out.x, p["V"], p["c"], y), out.converged.all()

    def step(carry, _):
        p, state = carry
        (value, ok), g = jax.value_and_grad(loss, has_aux=True)(p)
        upd, state = opt.update(g, state, p)
        return (optax.apply_updates(p, upd), state), (value, ok)

    run = jax.jit(lambda p: lax.scan(step, (p, opt.init(p)), None, length=steps))
    (params, _), (losses, ok) = run(params)
    return params, losses, ok


@jax.jit
def accuracy(p, x, y):
    z = layer(p["W"], contraction(p["A"]), p["b"], x).x
    return jnp.mean((z @ p["V"] + p["c"] > 0) == (y > 0.5))


def main(n=200, steps=300):
    x, y = rings(n)
    params = jax.tree_util.tree_map(jnp.asarray, init())
    w, u, b, v, c = (params["W"], contraction(params["A"]), params["b"], params["V"],
                     params["c"])
    xs, ys = x[:24], y[:24]                 # a small batch for the three-way check
    auto = jax.grad(loss_implicit, argnums=(0, 1, 2))(w, u, b, v, c, xs, ys)
    unrolled = jax.jit(jax.grad(loss_unrolled, argnums=(0, 1, 2)))(w, u, b, v, c, xs, ys)
    hand = grads_by_hand(w, u, b, v, c, xs, ys)

    def fd(which, idx):
        def f(t):
            args = [np.array(a) for a in (w, u, b)]
            args[which][idx] = t
            return loss_implicit(*args, v, c, xs, ys)
        return central_difference(f, np.asarray((w, u, b)[which])[idx])

    rows = []
    for which, idx, name in ((0, (1, 2), "W[1,2]"), (1, (3, 4), "U[3,4]"), (2, (0,), "b[0]"),
                             (2, (5,), "b[5]")):
        rows.append(compare(f"dL/d{name} fixed_point", auto[which][idx], hand[which][idx],
                            fd(which, idx), 1e-10, 1e-7))
        rows.append(compare(f"dL/d{name} unrolled", unrolled[which][idx], hand[which][idx],
                            fd(which, idx), 1e-10, 1e-7))
    show(rows)
    gap = max(float(np.max(np.abs(np.asarray(a) - h))) for a, h in zip(auto, hand, strict=True))
    gap_unrolled = max(float(np.max(np.abs(np.asarray(a) - np.asarray(h))))
                       for a, h in zip(auto, unrolled, strict=True))
    print(f"all entries: max |fixed_point - by hand| = {gap:.1e}, "
          f"max |fixed_point - unrolled| = {gap_unrolled:.1e}")

    trained, losses, ok = train(params, jnp.asarray(x), jnp.asarray(y), steps)
    acc = float(accuracy(trained, jnp.asarray(x), jnp.asarray(y)))
    print(f"training on {n} ring points: loss {float(losses[0]):.4f} -> "
          f"{float(losses[-1]):.4f}, accuracy {acc:.3f}, every solve converged: "
          f"{bool(ok.all())}")

    check(rows)
    assert gap < 1e-10 and gap_unrolled < 1e-10
    assert bool(ok.all()) and float(losses[-1]) < 0.5 * float(losses[0]) and acc >= 0.95
    return {"rows": rows, "gap": gap, "gap_unrolled": gap_unrolled, "accuracy": acc,
            "losses": np.asarray(losses)}


if __name__ == "__main__":
    main()
