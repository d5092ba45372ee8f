"""K-FAC on the digits: steps to a test accuracy and time per step, against Adam and kfac-jax.

    python benchmarks/kfac.py [--model mlp|cnn] [--seeds 3] [--epochs 3] [--target 0.97]
                              [--every 11] [--no-kfac-jax]

Every contender trains the recipe's network (``funnn train --model mlp``: 64-512-10 ReLU on
standardised digits; ``--model cnn``: conv-ReLU-pool x2 then dense) from the same initial
params on the same batches (batch 32, a fresh permutation per epoch, 44 steps an epoch) and
is evaluated on the 360 test digits every ``--every`` steps. Reported per contender: the
median over seeds of the first evaluated step at or above ``--target`` (``-`` if any seed
never gets there within ``--epochs``), the final test accuracy (median), and the median and
the mean time of one jitted step after two warm-up steps (the mean includes K-FAC's inverse
refreshes; the machine's other load shows in both).

Contenders: Adam's default recipe (the model's ``funnn train`` optimizer, rate and schedule),
``funnn.optimizers.kfac`` (``fit(optimizer="kfac")``: sampled-Fisher factors, pi-damping 0.1,
factor averages 0.95, inverses every 10 steps, the adapted rate and momentum) and
``funnn.optimizers.diag_ggn``, and, when ``kfac_jax`` imports (``pip install kfac-jax``),
``kfac_jax.Optimizer`` with the same settings (``estimation_mode="fisher_gradients"``, fixed
damping 0.1, ``curvature_ema=0.95``, ``inverse_update_period=10``, adaptive learning rate and
momentum, no burn-in, no weight decay) on the same funnn network (its ``apply``, traced by
kfac-jax's automatic layer registration).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import funnn
from funnn import data, models, optimizers
from funnn.train import TrainState, make_step, optimizer_from, optimizer_settings


def _problem(name: str, seed: int):
    recipe = models.get(name)
    tr, te = data.load("digits")
    stats = models.input_stats(tr)
    x, y = models.prepare(recipe, tr, stats)
    ex, ey = models.prepare(recipe, te, stats)
    model = recipe.build(10)
    _, params = model.init(jax.random.key(seed), (None,) + tuple(x.shape[1:]))
    return recipe, model, params, (x, y), (ex, ey)


def _batches(n: int, batch: int, epochs: int, seed: int):
    for e in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.key(1000 + seed + e), n))
        for i in range(n // batch):
            yield perm[i * batch:(i + 1) * batch]


def _train(step, state, params_of, model, train_xy, test_xy, args, seed):
    """``(steps to target or None, final accuracy, median and mean step seconds)``."""
    x, y = train_xy
    ex, ey = test_xy
    acc = jax.jit(lambda p: jnp.mean(jnp.argmax(model.apply(p, ex), -1) == ey))
    times, first, n, a = [], None, 0, 0.0
    for idx in _batches(x.shape[0], 32, args.epochs, seed):
        t0 = time.perf_counter()
        state = step(state, x[idx], y[idx], n)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        n += 1
        if n % args.every == 0:
            a = float(acc(params_of(state)))
            if first is None and a >= args.target:
                first = n
    return first, float(acc(params_of(state))), statistics.median(times[2:]), \
        statistics.fmean(times[2:])


def _funnn(opt, model, loss, params):
    step = funnn.jit(make_step(model, loss, opt))
    return (lambda ts, xb, yb, n: step(ts, xb, yb, None)[0],
            TrainState(params, opt.init(params), None), lambda ts: ts.params)


def _patch_kfac_jax():
    """kfac-jax 0.0.8 reads ``get_bind_params`` as ``(subfuns, params)``; jax 0.10 returns
    the params alone (``subfuns`` inside). The same evaluation for both."""
    from kfac_jax._src import tag_graph_matcher as tgm

    def eval_jaxpr_eqn(eqn, in_values):
        got = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(got, tuple):
            subfuns, params = got
        else:
            params = dict(got)
            subfuns = params.pop("subfuns", ())
        with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
            out = eqn.primitive.bind(*subfuns, *in_values, **params)
        return out if isinstance(out, list) else [out]

    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn


def _kfac_jax(model, loss, params, train_xy):
    import kfac_jax

    _patch_kfac_jax()

    def loss_fn(p, batch):
        logits = model.apply(p, batch[0])
        kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
        return loss.value(logits, batch[1])

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        use_adaptive_learning_rate=True, use_adaptive_momentum=True,
        use_adaptive_damping=False, inverse_update_period=10, curvature_ema=0.95,
        estimation_mode="fisher_gradients", num_burnin_steps=0, multi_device=False)
    rng = jax.random.key(0)
    x, y = train_xy
    state = (params, opt.init(params, rng, (x[:32], y[:32])))

    def step(s, xb, yb, n):
        p, st, _ = opt.step(s[0], s[1], jax.random.fold_in(rng, n), batch=(xb, yb),
                            global_step_int=n, damping=0.1)
        return p, st

    return step, state, lambda s: s[0]


def contenders(recipe, model, params, train_xy, with_kfac_jax: bool):
    """``{name: (step, state, params_of)}`` built fresh for one seed."""
    loss = recipe.loss
    setting = optimizer_settings(None, recipe=(recipe.optimizer, recipe.learning_rate,
                                               recipe.schedule))
    config = {**setting, "epochs": recipe.epochs, "batch_size": 32,
              "num_examples": int(train_xy[0].shape[0])}
    out = {f"{recipe.optimizer} (recipe)": _funnn(optimizer_from(config), model, loss, params),
           "funnn kfac": _funnn(optimizers.kfac(model, loss), model, loss, params),
           "funnn diag_ggn": _funnn(optimizers.diag_ggn(model, loss), model, loss, params)}
    if with_kfac_jax:
        out["kfac-jax"] = _kfac_jax(model, loss, params, train_xy)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--every", type=int, default=11)
    p.add_argument("--no-kfac-jax", action="store_true")
    args = p.parse_args(argv)
    try:
        import kfac_jax
        kj = None if args.no_kfac_jax else kfac_jax.__version__
    except ImportError:
        kj = None
    print(f"# {platform.machine()} {jax.default_backend()}, jax {jax.__version__}, kfac-jax "
          f"{kj or 'not run'}; digits {args.model}, batch 32, {args.epochs} epochs, "
          f"{args.seeds} seeds, target {args.target:.0%} (evaluated every {args.every} steps)")
    rows: dict = {}
    for seed in range(args.seeds):
        recipe, model, params, train_xy, test_xy = _problem(args.model, seed)
        for name, (step, state, params_of) in contenders(recipe, model, params, train_xy,
                                                         kj is not None).items():
            got = _train(step, state, params_of, model, train_xy, test_xy, args, seed)
            rows.setdefault(name, []).append(got)
            print(f"  seed {seed} {name}: steps to target {got[0]}, final {got[1]:.4f}, "
                  f"{got[2] * 1e3:.2f} ms/step (mean {got[3] * 1e3:.2f})", flush=True)
    print("| optimizer | steps to target (median; each seed) | final test accuracy | "
          "ms per step (median; mean) |\n|---|---|---|---|")
    for name, rs in rows.items():
        firsts = [r[0] for r in rs]
        reached = sorted(f for f in firsts if f is not None)
        med = statistics.median(reached) if len(reached) == len(firsts) else "-"
        print(f"| {name} | {med} ({', '.join(str(f or '-') for f in firsts)}) | "
              f"{statistics.median(r[1] for r in rs):.4f} | "
              f"{statistics.median(r[2] for r in rs) * 1e3:.2f}; "
              f"{statistics.median(r[3] for r in rs) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
