"""A single neuron f(x) = w x + b learning a line by gradient descent (seed 000).

The seed's "learning neuron": start from some w, b, try the neuron on points
(x, y), see how wrong it is, and move w and b against the derivative of the error.
Here the points come from y = 3 x - 1 plus a little noise (20 points, x in [-2, 2],
noise 0.01, numpy seed 0); the neuron is funnn's ``L.dense(1)`` starting at w = b = 0;
the loss is the mean over the points of 1/2 (f(x) - y)^2, whose gradient, worked
out by hand, is

    dL/dw = mean((w x + b - y) x),      dL/db = mean(w x + b - y).

(The seed writes "delta_w = x / delta_y"; the chain rule gives delta_y * x, as above.)

Checks, at the start and at a random point:
- the hand-derived gradient equals ``jax.grad`` (funnn's autodiff engine) and
  funnn's manual engine (the dense layer's hand-written backward) to 1e-12;
- after 300 steps of plain gradient descent at learning rate 0.1, (w, b) equals the
  least-squares line of the points (``np.polyfit``) to 1e-8, and is within 0.05 of
  the truth (3, -1) (the noise moves the least-squares line a little).

Run: python examples/neuron.py
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from funnn import autodiff, layers as L, losses, manual  # noqa: E402

TRUE_W, TRUE_B = 3.0, -1.0
LOSS = losses.squared_error.with_reduction("mean")     # mean_n 1/2 (f(x_n) - y_n)^2
MODEL = L.dense(1, w_init="zeros", b_init="zeros")        # params {"W": (1, 1), "b": (1,)}


def make_data(n: int = 20, noise: float = 0.01, seed: int = 0):
    """Points on y = 3 x - 1 plus Gaussian noise. x, y: (n, 1)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-2.0, 2.0, n)[:, None]
    y = TRUE_W * x + TRUE_B + noise * rng.standard_normal((n, 1))
    return jnp.asarray(x), jnp.asarray(y)


def hand_grad(params, x, y):
    """The gradient worked out by hand: dL/dw = mean(e x), dL/db = mean(e), e = w x + b - y."""
    e = params["W"][0, 0] * x + params["b"][0] - y
    return {"W": jnp.mean(e * x).reshape(1, 1), "b": jnp.mean(e).reshape(1)}


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v)))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def check_gradients(params, x, y) -> float:
    """Largest difference between the hand-derived, autodiff and manual-engine gradients."""
    g_hand = hand_grad(params, x, y)
    _, g_auto = autodiff.value_and_grad(MODEL, LOSS)(params, x, y)
    _, g_man = manual.value_and_grad(MODEL, LOSS)(params, x, y)
    return max(_max_diff(g_hand, g_auto), _max_diff(g_hand, g_man))


def train(x, y, steps: int = 300, lr: float = 0.1):
    """Plain gradient descent with the hand-derived gradient, all steps in one jitted scan.

    Returns (final params, w per step, b per step, loss per step); the step-i entries
    are taken before the i-th update.
    """
    _, params = MODEL.init(jax.random.key(0), (None, 1))

    def step(p, _):
        g = hand_grad(p, x, y)
        out = (p["W"][0, 0], p["b"][0], LOSS.value(MODEL.apply(p, x), y))
        return jax.tree_util.tree_map(lambda a, d: a - lr * d, p, g), out

    final, (ws, bs, ls) = jax.jit(lambda p: jax.lax.scan(step, p, None, length=steps))(params)
    return final, np.asarray(ws), np.asarray(bs), np.asarray(ls)


def main():
    x, y = make_data()
    _, p0 = MODEL.init(jax.random.key(0), (None, 1))
    p_rand = {"W": jnp.array([[0.7]]), "b": jnp.array([-2.3])}
    grad_err = max(check_gradients(p0, x, y), check_gradients(p_rand, x, y))
    print(f"hand-derived vs jax.grad vs manual engine: max difference {grad_err:.1e}")

    params, ws, bs, ls = train(x, y)
    w, b = float(params["W"][0, 0]), float(params["b"][0])
    print(" step        w         b        loss")
    for i in (0, 1, 5, 10, 20, 50, 100, 299):
        print(f"{i:5d}  {ws[i]:8.5f}  {bs[i]:8.5f}  {ls[i]:.3e}")
    w_ls, b_ls = np.polyfit(np.asarray(x[:, 0]), np.asarray(y[:, 0]), 1)
    print(f"learned      w = {w:.10f}, b = {b:.10f}")
    print(f"least-squares w = {w_ls:.10f}, b = {b_ls:.10f}   (truth: w = {TRUE_W}, b = {TRUE_B})")

    assert grad_err < 1e-12, grad_err
    assert abs(w - w_ls) < 1e-8 and abs(b - b_ls) < 1e-8, (w, b, w_ls, b_ls)
    assert abs(w - TRUE_W) < 0.05 and abs(b - TRUE_B) < 0.05, (w, b)
    assert ls[-1] < 1e-3 * ls[0], (ls[0], ls[-1])
    return {"w": w, "b": b, "w_ls": float(w_ls), "b_ls": float(b_ls), "grad_err": grad_err,
            "losses": ls}


if __name__ == "__main__":
    main()
