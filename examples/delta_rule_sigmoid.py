"""The two-layer sigmoid network of seed 003, trained by the hand-written delta rule.

Network: 2 inputs -> 5 sigmoid units -> 1 sigmoid output, built from funnn layers;
cost the seed's quadratic 1/2 sum_n (y_hat_n - y_n)^2 (``losses.squared_error``,
reduction "sum"). Data: XOR, the four points (0,0)->0, (0,1)->1, (1,0)->1,
(1,1)->0, which no single neuron can fit. Weights start from a standard normal
(key 0), biases at zero; 5000 iterations of gradient descent at learning rate 1.
(The seed's 0.01 is far too small for XOR in 5000 steps; the seed also updates
only the weights, here the biases learn too.)

The delta rule (row-vector form, O_j hidden outputs, O_k network outputs)::

    delta_k = (O_k - t_k) O_k (1 - O_k)               dW2 = O_j^T delta_k
    delta_j = O_j (1 - O_j) sum_k delta_k W2_jk       dW1 = x^T delta_j

is what funnn's manual engine computes from the layers' hand-written backward;
:func:`delta_rule` writes it out once more by hand. Note the seed's code has a bug
when it pushes the delta back: ``dh1 = np.dot(dw2.T, dz2)`` uses the weight
*gradient* dw2 where the weights W2 belong (``dh1 = W2.T dz2`` in its own
summary). :func:`seed_bug` reproduces that line to show it gives a wrong gradient.

All 5000 iterations run inside one jitted ``jax.lax.scan``, keeping the cost curve.

Checks:
- the written-out delta rule equals the manual engine and autodiff (1e-12), the
  seed's buggy line does not (relative error > 0.1);
- the cost falls by more than a factor 100 and the network answers XOR (outputs
  on the right side of 0.5);
- the manual-engine run and the autodiff-engine run give the same cost curve and
  final weights (relative 1e-9).

Run: python examples/delta_rule_sigmoid.py [--plot cost.png]
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from funnn import activations as A, autodiff, layers as L, losses, manual  # noqa: E402

X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = jnp.array([[0.0], [1.0], [1.0], [0.0]])
HIDDEN, LR, ITERATIONS = 5, 1.0, 5000
LOSS = losses.squared_error                       # 1/2 sum_n (y_hat_n - y_n)^2


def build(hidden: int = HIDDEN, seed: int = 0):
    """The 2 -> hidden -> 1 sigmoid network and its initial params."""
    model = L.serial(L.dense(hidden, w_init="normal"), L.activation(A.sigmoid),
                     L.dense(1, w_init="normal"), L.activation(A.sigmoid))
    _, params = model.init(jax.random.key(seed), (None, 2))
    return model, params


def delta_rule(params, x, t, bug: bool = False):
    """The delta rule written out; params as ``build`` makes them. Returns the same pytree.

    ``bug=True`` pushes the delta back the seed's way, through dW2 instead of W2.
    """
    (l1, _, l2, _) = params
    o_j = A.sigmoid(x @ l1["W"] + l1["b"])                    # (n, hidden)
    o_k = A.sigmoid(o_j @ l2["W"] + l2["b"])                  # (n, 1)
    delta_k = (o_k - t) * o_k * (1 - o_k)                     # (n, 1)
    if bug:   # per example: dw2 = dz2 h1^T, dh1 = dw2^T dz2 = h1 dz2^2
        back = o_j * delta_k ** 2
    else:
        back = delta_k @ l2["W"].T                            # sum_k delta_k W2_jk
    delta_j = o_j * (1 - o_j) * back                          # (n, hidden)
    return ({"W": x.T @ delta_j, "b": delta_j.sum(0)}, {},
            {"W": o_j.T @ delta_k, "b": delta_k.sum(0)}, {})


def seed_bug(params, x, t):
    """The gradient the seed's code computes (``dh1 = np.dot(dw2.T, dz2)``)."""
    return delta_rule(params, x, t, bug=True)


def train(engine: str = "manual", iterations: int = ITERATIONS, lr: float = LR):
    """Gradient descent in one jitted scan. Returns (final params, cost per iteration).

    cost[i] is the cost before the i-th update, as the seed records it.
    """
    model, params = build()
    vg = {"manual": manual, "autodiff": autodiff}[engine].value_and_grad(model, LOSS)

    def step(p, _):
        cost, g = vg(p, X, Y)
        return jax.tree_util.tree_map(lambda a, d: a - lr * d, p, g), cost

    params, cost = jax.jit(lambda p: jax.lax.scan(step, p, None, length=iterations))(params)
    return params, np.asarray(cost)


def _rel(a, b) -> float:
    """Largest leaf-wise max|a - b| / max|b| over two pytrees."""
    return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def plot(cost, path) -> bool:
    """Save the cost curve as a PNG; False (and a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'funnn[plot]'): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(cost)), cost)
    ax.set(title="Cost function", xlabel="Training iterations", ylabel="Cost", yscale="log")
    ax.grid(True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def main(plot_path=None):
    model, p0 = build()
    g_auto = autodiff.value_and_grad(model, LOSS)(p0, X, Y)[1]
    g_man = manual.value_and_grad(model, LOSS)(p0, X, Y)[1]
    rule_err = max(_rel(delta_rule(p0, X, Y), g_auto), _rel(g_man, g_auto))
    bug_err = _rel(seed_bug(p0, X, Y), g_auto)
    print(f"delta rule written out vs manual engine vs autodiff: {rule_err:.1e}")
    print(f"the seed's dh1 = dw2.T dz2 vs autodiff: relative error {bug_err:.2f}")

    params, cost = train("manual")
    params_auto, cost_auto = train("autodiff")
    for i in (0, 100, 500, 1000, 2000, 3000, 4000, ITERATIONS - 1):
        print(f"iteration {i:4d}  cost {cost[i]:.6f}")
    out = np.asarray(model.apply(params, X))[:, 0]
    print(f"cost fell by a factor {cost[0] / cost[-1]:.0f}; XOR outputs {np.round(out, 3)}")
    run_gap = max(_rel(cost, cost_auto), _rel(params, params_auto))
    rule_end = _rel(delta_rule(params, X, Y), autodiff.value_and_grad(model, LOSS)(params, X, Y)[1])
    print(f"manual vs autodiff run: cost curve and final weights agree to {run_gap:.1e}")
    if plot_path and plot(cost, plot_path):
        print(f"cost curve saved to {plot_path}")

    assert rule_err < 1e-12 and rule_end < 1e-12, (rule_err, rule_end)
    assert bug_err > 0.1, bug_err
    assert cost[-1] < cost[0] / 100, (cost[0], cost[-1])
    assert np.array_equal(out > 0.5, np.asarray(Y[:, 0]) > 0.5), out
    assert run_gap < 1e-9, run_gap
    return {"cost": cost, "cost_autodiff": cost_auto, "outputs": out, "rule_err": rule_err,
            "bug_err": bug_err, "run_gap": run_gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PATH", help="save the cost curve as a PNG")
    main(parser.parse_args().plot)
