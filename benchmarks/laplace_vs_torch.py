"""A trained run's Laplace posterior by funnn and by laplace-torch: calibration and time.

    funnn train --out runs/digits-mlp                 # the digits MLP (64-512-10, ReLU)
    python benchmarks/laplace_vs_torch.py runs/digits-mlp [--prior-precision P]

Both fit a last-layer Laplace posterior (diagonal GGN, and K-FAC) on the run's training
split, in float64, with the same weights (PyTorch's ``nn.Linear`` holds ``W^T``), and
report on the test split the ECE (15 bins) and NLL of the GLM probit predictive, the prior
precision each chose by maximising the marginal likelihood (funnn: bisection on its exact
derivative; laplace-torch: 100 Adam steps on ``log delta``), the log marginal likelihood,
the largest difference between the two predictives at funnn's prior precision, and the
fitting time. laplace-torch's K-FAC keeps the bias as a block of its own (funnn: one
``[W; b]`` block), so its K-FAC numbers differ slightly; the diagonal ones agree to rounding.
Without an importable ``laplace`` (``pip install laplace-torch``) only funnn runs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from funnn import calibration, data, laplace, models, train  # noqa: E402


def load(run_dir):
    ck = train.restore_run(run_dir)
    config = ck.config
    recipe = models.get(config["model"])
    stats = (ck.extras["input_mean"], ck.extras["input_scale"]) if recipe.standardize else None
    train_set, test_set = data.load(config["data"])
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), ck.params)
    model = recipe.build(config["num_outputs"])
    prep = [models.prepare(recipe, s, stats) for s in (train_set, test_set)]
    return model, recipe, params, [(jnp.asarray(x, jnp.float64), y) for x, y in prep]


def report(name, probs, y, delta, lml, seconds):
    y = np.asarray(y)
    print(f"{name:<28} ECE {calibration.expected_calibration_error(probs, y):.4f}  NLL "
          f"{calibration.nll(probs, y):.4f}  acc {np.mean(np.argmax(probs, 1) == y):.4f}  "
          f"prior {delta:9.4g}  log ML {lml:10.2f}  fit {seconds:6.2f} s")


def torch_twin(torch, params):
    layers = [torch.nn.Linear(*p["W"].shape) for p in params if p]
    net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1]).double()
    with torch.no_grad():
        for lin, p in zip(layers, [p for p in params if p]):
            lin.weight.copy_(torch.tensor(np.asarray(p["W"]).T))
            lin.bias.copy_(torch.tensor(np.asarray(p["b"])))
    return net


def run_torch(params, train_xy, test_xy, structure, ours_delta, ours_probs):
    import torch
    from laplace import Laplace

    net = torch_twin(torch, params)
    (x, y), (tx, ty) = train_xy, test_xy
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)),
        batch_size=len(y))
    t0 = time.perf_counter()
    la = Laplace(net, "classification", subset_of_weights="last_layer",
                 hessian_structure={"diag": "diag", "kfac": "kron"}[structure])
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    seconds = time.perf_counter() - t0
    xt = torch.tensor(np.asarray(tx))
    probs = la(xt, pred_type="glm", link_approx="probit").detach().numpy()
    delta = float(la.prior_precision)
    report(f"laplace-torch {structure}", probs, ty, delta,
           float(la.log_marginal_likelihood()), seconds)
    la.prior_precision = ours_delta
    same = la(xt, pred_type="glm", link_approx="probit").detach().numpy()
    print(f"{'':<28} at funnn's prior: largest |p_torch - p_funnn| "
          f"{np.abs(same - ours_probs).max():.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--prior-precision", type=float, default=None)
    args = p.parse_args()
    model, recipe, params, (train_xy, test_xy) = load(args.run_dir)
    tx, ty = test_xy
    probs = jax.nn.softmax(model.apply(params, tx), -1)
    report("softmax (no Laplace)", probs, ty, float("nan"), float("nan"), 0.0)
    try:
        import laplace as _  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    for structure in laplace.STRUCTURES:
        t0 = time.perf_counter()
        post = laplace.laplace(model, recipe.loss, params, train_xy, structure=structure,
                               prior_precision=args.prior_precision)
        jax.block_until_ready(post.prior_precision)
        seconds = time.perf_counter() - t0
        probs = np.asarray(post.predictive(tx))
        report(f"funnn {structure}", probs, ty, float(post.prior_precision),
               float(post.log_marginal), seconds)
        if have_torch:
            run_torch(params, train_xy, test_xy, structure, float(post.prior_precision), probs)


if __name__ == "__main__":
    main()
