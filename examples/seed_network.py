"""The numpy network of seed 001 (section 4), rebuilt from funnn layers.

Data: X = [[4, 9, 1], [2, 5, 6], [1, 8, 3]], targets t = X @ (2, -1, 5)^T = (4, 29, 9).
Network: 3 inputs -> 2 tanh units -> 1 linear output, initial weights as in the
seed: hidden W = [[0.5, 0.5, 0.5], [0.1, 0.1, 0.1]], biases (1, 1); output W =
[[1, 1]], bias (1). The seed computes ``W x + b`` with W of shape (out, in); funnn's
dense layer computes ``x @ W + b`` with W of shape (in, out), so funnn's W is the
TRANSPOSE of the seed's (hidden W (3, 2), output W (2, 1)).

Training: 1000 steps of plain gradient descent at learning rate 0.001 on the
SUMMED error y - t, i.e. the gradient of ``losses.squared_error`` (1/2 sum (y - t)^2,
reduction "sum"), with funnn's manual engine (the layers' hand-written backward is
the seed's delta rule). The printed "mean squared error" is the seed's
mean((t - y)^2) / 2.

Checks:
- before training the predictions are the seed's (2.98367463, 2.98009578,
  2.97574147) and the error its 119.060003918;
- manual and autodiff gradients agree (``gradcheck.compare`` report, with finite
  differences), at the start and at every one of the 1001 points of the run (1e-12);
- over the first 800 steps the manual run, the autodiff run and a plain numpy
  transcription of the seed's loop (:func:`seed_numpy`) give the same predictions
  to a relative 1e-10;
- the sharpness is below 2 / lr at step 700 and above it at step 900;
- after training the error is below 2 (from 119), and the seed's printed
  predictions (5.53866817, 26.56379198, 7.78180535) match ours to 0.05.

Why only to 0.05 at the end: the run reaches the edge of stability. The largest
eigenvalue of the loss Hessian (the "sharpness", :func:`sharpness`) grows from 172
to above 2 / lr = 2000 around step 800, so from there gradient descent amplifies
the error along that direction each step, and a period-2 oscillation grows out of
rounding error (the third prediction ends up alternating between about 7.78 and
9.73). A perturbation of 1e-15 in the initial weights changes the step-999
predictions by up to 2, so the final digits depend on the order of floating-point
operations. That is why the seed's printed numbers differ from float64 reruns in
the third decimal, why the manual, autodiff and numpy runs part after step ~850
although each of their steps agrees, and why which phase of the oscillation step
999 lands on differs between them (and between machines): the end check accepts
either of the last two steps. The seed prints ``predicted`` after its loop, i.e.
the forward pass of the last iteration, before its update: ``preds[999]`` here
(``preds[1000]`` is the network after all 1000 updates).

Run: python examples/seed_network.py
"""

import jax
import jax.flatten_util

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from funnn import activations as A, autodiff, gradcheck, losses, manual  # noqa: E402
from funnn import layers as L  # noqa: E402

X = np.array([[4.0, 9.0, 1.0], [2.0, 5.0, 6.0], [1.0, 8.0, 3.0]])
T = X @ np.array([[2.0, -1.0, 5.0]]).T                           # (3, 1): 4, 29, 9
HIDDEN_W_SEED = np.array([[0.5, 0.5, 0.5], [0.1, 0.1, 0.1]])    # seed's (out, in)
HIDDEN_B, OUTPUT_W_SEED, OUTPUT_B = np.ones(2), np.array([[1.0, 1.0]]), np.ones(1)
SEED_BEFORE = np.array([2.98367463, 2.98009578, 2.97574147])
SEED_MSE_BEFORE = 119.060003918
SEED_AFTER = np.array([5.53866817, 26.56379198, 7.78180535])
STABLE_STEPS = 800          # before the edge-of-stability oscillation grows (see docstring)

MSE = losses.squared_error.with_reduction("mean")    # seed's mean((t - y)^2) / 2 (one output)


def build():
    """The seed network as a funnn model and its initial params (funnn W = seed W^T)."""
    model = L.serial(L.dense(2, w_init=HIDDEN_W_SEED.T, b_init=HIDDEN_B),
                     L.activation(A.tanh),
                     L.dense(1, w_init=OUTPUT_W_SEED.T, b_init=OUTPUT_B))
    _, params = model.init(jax.random.key(0), (None, 3))
    return model, params


def make_step(lr: float = 0.001, engine: str = "manual"):
    """One gradient-descent step ``p -> p - lr * grad`` of squared_error (sum); pure, jit-able."""
    model, _ = build()
    vg = {"manual": manual, "autodiff": autodiff}[engine].value_and_grad(
        model, losses.squared_error)
    x, t = jnp.asarray(X), jnp.asarray(T)

    def step(p):
        _, g = vg(p, x, t)
        return jax.tree_util.tree_map(lambda a, d: a - lr * d, p, g)

    return step


def train(steps: int = 1000, lr: float = 0.001, engine: str = "manual"):
    """Gradient descent on squared_error (sum), all steps in one jitted ``lax.scan``.

    Returns a dict: ``preds`` (steps + 1, 3), row i the predictions after i updates;
    ``mse`` (steps + 1,) the seed's error for each row; ``history`` the params after
    i updates, stacked on a leading axis of steps + 1; ``params`` after training.
    """
    model, params = build()
    step, x, t = make_step(lr, engine), jnp.asarray(X), jnp.asarray(T)

    @jax.jit
    def run(p0):
        p, hist = jax.lax.scan(lambda p, _: (step(p), p), p0, None, length=steps)
        hist = jax.tree_util.tree_map(lambda h, last: jnp.concatenate([h, last[None]]), hist, p)
        return p, hist, jax.vmap(lambda q: model.apply(q, x))(hist)

    params, hist, ys = run(params)
    mse = jax.vmap(lambda y: MSE.value(y, t))(ys)
    return {"preds": np.asarray(ys[..., 0]), "mse": np.asarray(mse), "history": hist,
            "params": params}


def engine_gap(history) -> float:
    """Largest relative difference of manual vs autodiff gradients over stacked params."""
    model, _ = build()
    x, t = jnp.asarray(X), jnp.asarray(T)
    g = [jax.jit(jax.vmap(lambda p, e=e: e.value_and_grad(model, losses.squared_error)(
        p, x, t)[1]))(history) for e in (manual, autodiff)]
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(*map(jax.tree_util.tree_leaves, g)))


def sharpness(history, steps) -> np.ndarray:
    """Largest eigenvalue of the Hessian of squared_error (sum) at the given steps of a run."""
    model, params = build()
    x, t = jnp.asarray(X), jnp.asarray(T)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def top(p):
        f = lambda v: losses.squared_error.value(model.apply(unravel(v), x), t)
        return jnp.linalg.eigvalsh(jax.hessian(f)(jax.flatten_util.ravel_pytree(p)[0]))[-1]

    at = jax.tree_util.tree_map(lambda h: h[jnp.asarray(steps)], history)
    return np.asarray(jax.jit(jax.vmap(top))(at))


def seed_numpy(steps: int = 1000, lr: float = 0.001) -> np.ndarray:
    """The seed's loop in plain numpy (its W x convention); predictions (steps + 1, 3)."""
    w1, b1 = HIDDEN_W_SEED.copy(), HIDDEN_B.copy()
    w2, b2 = OUTPUT_W_SEED.copy(), OUTPUT_B.copy()
    preds = []
    for _ in range(steps + 1):
        hidden_linout = X @ w1.T + b1
        hidden_output = np.tanh(hidden_linout)
        predicted = hidden_output @ w2.T + b2
        preds.append(predicted[:, 0])
        delta_output = predicted - T
        delta_hidden = delta_output * w2 * (1 - np.tanh(hidden_linout) ** 2)
        w2 = w2 - lr * delta_output.T @ hidden_output
        b2 = b2 - lr * delta_output.sum(axis=0)
        w1 = w1 - lr * delta_hidden.T @ X
        b1 = b1 - lr * delta_hidden.sum(axis=0)
    return np.array(preds)


def _rel_gap(a, b) -> float:
    """max |a - b| / |b|, elementwise."""
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main():
    model, params = build()
    report = gradcheck.compare(model, losses.squared_error, params, X, T)
    print("gradients at the initial weights (manual vs autodiff vs finite differences):")
    print(report)

    run = train()
    run_auto = train(engine="autodiff")
    ref = seed_numpy()
    preds, mse = run["preds"], run["mse"]
    print(f"targets           {T[:, 0]}")
    print(f"before training   {preds[0]}   mse {mse[0]:.9f}")
    print(f"  (seed printed   {SEED_BEFORE}   mse {SEED_MSE_BEFORE})")
    for i in (100, 250, 500, 800, 990, 998, 999):
        print(f"step {i:4d}         {preds[i]}   mse {mse[i]:.6f}")
    print(f"after 1000 steps  {preds[-1]}   mse {mse[-1]:.6f}")
    print(f"  (seed printed   {SEED_AFTER}, its last forward pass = our step 999)")
    n = STABLE_STEPS
    grad_gap = engine_gap(run["history"])
    engines = _rel_gap(preds[:n], run_auto["preds"][:n])
    stable = _rel_gap(preds[:n], ref[:n])
    end = float(np.max(np.abs(preds[-200:] - ref[-200:])))
    seed_end = min(float(np.max(np.abs(preds[i] - SEED_AFTER))) for i in (998, 999))
    print(f"manual vs autodiff gradients at all 1001 points of the run: {grad_gap:.1e}")
    print(f"relative gap over the first {n} steps: manual vs autodiff run {engines:.1e}, "
          f"funnn vs plain numpy {stable:.1e}")
    print(f"funnn vs plain numpy over the last 200 steps: {end:.1e} (edge of stability)")
    print(f"seed's printed predictions vs our steps 998/999: {seed_end:.1e}")
    sharp_steps = (0, 500, 700, 800, 900)
    sharp = sharpness(run["history"], sharp_steps)
    print("largest Hessian eigenvalue (2 / lr = 2000): "
          + ", ".join(f"step {i} {v:.0f}" for i, v in zip(sharp_steps, sharp)))

    assert report.ok, report
    assert np.allclose(preds[0], SEED_BEFORE, atol=1e-8) and abs(mse[0] - SEED_MSE_BEFORE) < 1e-8
    assert grad_gap < 1e-12, grad_gap
    assert engines < 1e-10 and stable < 1e-10, (engines, stable)
    assert mse[-1] < 2.0 and mse[-2] < 2.0 and run_auto["mse"][-1] < 2.0, mse[-2:]
    assert seed_end < 0.05, seed_end
    assert sharp[2] < 2 / 0.001 < sharp[4], sharp
    return {"preds": preds, "mse": mse, "preds_autodiff": run_auto["preds"], "report": report,
            "grad_gap": grad_gap, "numpy_gap": stable, "engine_run_gap": engines,
            "seed_after_diff": seed_end, "sharpness": dict(zip(sharp_steps, sharp))}


if __name__ == "__main__":
    main()
