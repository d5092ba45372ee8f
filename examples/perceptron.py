"""The perceptron of seed 002: "do I go to the festival?", and Rosenblatt's learning rule.

Three binary inputs: x1 "is the weather good?", x2 "is a friend coming?", x3 "is
the venue easy to reach?"; weights w = (6, 2, 2); output 1 iff w . x > threshold.
Written as a funnn neuron: ``L.dense(1)`` with W = (6, 2, 2)^T and bias b = -threshold,
then the binary step (1 for z >= 0). With these weights w . x is an even integer,
never equal to the thresholds 5 or 3, so ">" and ">=" give the same table.

Shows and checks, over all 8 input combinations:
- threshold 5: go iff the weather is good (w . x > 5 needs x1);
- threshold 3: go iff the weather is good OR (a friend AND an easy commute);
- both tables equal the direct rule ``w . x > threshold`` computed in numpy;
- the gradient of a squared error through the binary step is zero everywhere
  (manual and autodiff engines agree), so gradient descent cannot train it;
- Rosenblatt's rule, one example at a time, o = step(w . x + b),
  w += lr (t - o) x, b += lr (t - o), from zero weights at lr = 1, learns each
  table: after it converges the funnn neuron classifies all 8 examples correctly.
  The number of epochs (passes over the 8 examples, the last one without a
  mistake) is printed. The rule guarantees correctness only for the step it trains
  with: the learned weights put some 1s exactly on z = 0, where the step (z >= 0)
  says 1 and the seed's strict "w . x > threshold" would say 0; the script prints z.

Run: python examples/perceptron.py
"""

import itertools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from funnn import activations as A, autodiff, layers as L, losses, manual  # noqa: E402

WEIGHTS = np.array([6.0, 2.0, 2.0])
THRESHOLDS = (5.0, 3.0)
X = np.array(list(itertools.product([0.0, 1.0], repeat=3)))     # (8, 3): weather, friend, commute


def neuron(w, threshold):
    """A funnn binary-step neuron: step(x @ w - threshold). Returns (model, params)."""
    model = L.serial(L.dense(1, w_init=np.asarray(w, float).reshape(3, 1),
                             b_init=np.array([-float(threshold)])),
                     L.activation(A.binary_step))
    _, params = model.init(jax.random.key(0), (None, 3))
    return model, params


def decisions(threshold) -> np.ndarray:
    """The festival decisions (8,) of the seed's neuron at ``threshold``."""
    model, params = neuron(WEIGHTS, threshold)
    return np.asarray(model.apply(params, jnp.asarray(X)))[:, 0]


def rosenblatt(t, lr: float = 1.0, max_epochs: int = 100):
    """Rosenblatt's perceptron rule from zero weights until an epoch has no mistake.

    t: (8,) targets for the rows of X. Returns (model, params, epochs, mistakes per epoch).
    """
    model, params = neuron(np.zeros(3), 0.0)
    xs, ts = jnp.asarray(X), jnp.asarray(t, float)[:, None]

    def one(p, xt):
        xi, ti = xt
        err = ti - model.apply(p, xi[None])[0]                     # (1,): t - o
        w, b = p[0]["W"], p[0]["b"]
        return ({"W": w + lr * xi[:, None] * err, "b": b + lr * err},) + p[1:], jnp.abs(err[0])

    epoch = jax.jit(lambda p: jax.lax.scan(one, p, (xs, ts)))
    mistakes = []
    for _ in range(max_epochs):
        params, errs = epoch(params)
        mistakes.append(int(jnp.sum(errs)))
        if mistakes[-1] == 0:
            break
    return model, params, len(mistakes), mistakes


def step_gradient(threshold) -> float:
    """Largest |gradient| of 1/2 sum (o - t)^2 through the step, by both engines."""
    model, params = neuron(WEIGHTS, threshold)
    t = jnp.asarray(1.0 - decisions(threshold))[:, None]           # every answer wrong
    g = [vg(model, losses.squared_error)(params, jnp.asarray(X), t)[1]
         for vg in (manual.value_and_grad, autodiff.value_and_grad)]
    return max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(g))


def main():
    tables = {th: decisions(th) for th in THRESHOLDS}
    print("weather friend commute | w.x | go (threshold 5) | go (threshold 3)")
    for x, s, a, b in zip(X, X @ WEIGHTS, tables[5.0], tables[3.0]):
        print(f"   {x[0]:.0f}       {x[1]:.0f}      {x[2]:.0f}    | {s:3.0f} |        {a:.0f}"
              f"         |        {b:.0f}")
    weather, friend, commute = X[:, 0] > 0, X[:, 1] > 0, X[:, 2] > 0
    step_grad = max(step_gradient(th) for th in THRESHOLDS)
    print(f"gradient through the binary step: max |g| = {step_grad} (zero: no gradient descent)")

    learned = {}
    for th, t in tables.items():
        model, params, epochs, mistakes = rosenblatt(t)
        z = X @ np.asarray(params[0]["W"])[:, 0] + float(params[0]["b"][0])
        learned[th] = {"W": np.asarray(params[0]["W"])[:, 0], "b": float(params[0]["b"][0]),
                       "epochs": epochs, "mistakes": mistakes, "z": z,
                       "out": np.asarray(model.apply(params, jnp.asarray(X)))[:, 0]}
        print(f"threshold {th:.0f}: Rosenblatt learned w = {learned[th]['W']}, "
              f"b = {learned[th]['b']} in {epochs} epochs (mistakes per epoch {mistakes})")
        print(f"    z = w.x + b on the 8 inputs: {z}")

    for th, t in tables.items():
        assert np.array_equal(t, (X @ WEIGHTS > th).astype(float)), th
        assert np.all(X @ WEIGHTS != th)                 # no ties: ">" and ">=" agree
    assert np.array_equal(tables[5.0] > 0, weather)
    assert np.array_equal(tables[3.0] > 0, weather | (friend & commute))
    assert step_grad == 0.0
    for th, t in tables.items():
        r = learned[th]
        assert r["mistakes"][-1] == 0 and np.array_equal(r["out"], t), (th, r)
        assert np.array_equal((r["z"] >= 0).astype(float), t), (th, r["z"])
    return {"tables": tables, "learned": learned, "step_grad": step_grad}


if __name__ == "__main__":
    main()
