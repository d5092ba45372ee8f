"""A run's settings, resolved and checked once, before anything compiles or touches disk.

:func:`resolve` turns ``fit``'s arguments into one frozen :class:`Settings`: the model
under its precision policy, the loss, the engine, the optax optimizer (loss-scaled when
the policy needs it), DP-SGD, the sharding plan, and ``config``, the flat record of every
setting that shapes the results (saved in every checkpoint, compared on resume, written
to ``run.json`` and ``metrics.json``). A ``Settings`` prints as that config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funnn import engines, losses, privacy, rundir
from funnn.core import ConfigError, DataError, Layer, check_context
from funnn.precision import Policy, apply_policy, get_policy
from funnn.train import inputs
from funnn.train.epoch import Order, dp_sampled, shuffled
from funnn.train.optim import optimizer_from, optimizer_settings
from funnn.train.step import as_loss, dp_grad, engine_grad, make_update
from funnn.trees import tree_paths

__all__ = ["Settings", "resolve", "fingerprint", "as_key"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, resolved: prints as the run's ``config``."""

    model: Layer
    loss: Any
    engine: str
    optimizer: optax.GradientTransformation
    policy: Policy
    dp: privacy.DP | None
    plan: Any                   # a parallel.Plan, or None for one device
    epochs: int
    batch_size: int
    num_examples: int
    check_numerics: bool
    config: dict

    def __repr__(self) -> str:
        return f"Settings({self.config!r})"

    __str__ = __repr__

    def update(self):
        """``update(ts, x, y, weights, key) -> (ts, loss)``: this run's gradient and step."""
        grad = dp_grad(self.model, self.loss, self.engine, self.batch_size, self.dp) \
            if self.dp is not None else engine_grad(self.model, self.loss, self.engine)
        return make_update(grad, self.optimizer)

    def order(self) -> Order:
        """The rows each step trains on: DP sampling with ``dp`` (Poisson batches padded to a
        multiple of the mesh's data degree), else a shuffle."""
        if self.dp is not None:
            data = 1 if self.plan is None else self.plan.data_size
            return dp_sampled(self.dp, self.batch_size, self.num_examples, data)
        return shuffled(self.num_examples, self.batch_size)


def resolve(model: Layer, params, data, loss, optimizer, *, learning_rate, epochs,
            batch_size, engine, schedule, eval_data, check_numerics, mesh, sharding,
            precision, dp, config, resume, overwrite, from_checkpoint, run_dir=None,
            checkpoint_dir=None, keep=3):
    """``(settings, (inputs, y), eval (inputs, y) or None)``, the inputs an
    :class:`~funnn.train.inputs.Inputs` ``(x, side)``; every bad argument is raised here."""
    epochs, batch_size = _positive("epochs", epochs), _positive("batch_size", batch_size)
    engines.get(engine)
    loss = as_loss(loss, engine)
    train_xy = _data(model, loss, data, "training")
    num = inputs.count(*train_xy)
    held_out = _data(model, loss, eval_data, "evaluation") if eval_data is not None else None
    _check_float_params(params)
    if batch_size > num:
        raise ConfigError(f"batch_size {batch_size} exceeds the {num} training examples",
                          ("fit",))
    _check_dp(dp, model, check_numerics, batch_size, get_policy(precision))
    plan = _plan(mesh, sharding, params, batch_size, check_numerics)
    rundir.check_mode(resume, overwrite)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ConfigError(f"keep must be a positive int or None, got {keep!r}", ("fit",))
    if run_dir is not None and checkpoint_dir is not None:
        raise ConfigError("give run_dir (a run directory with checkpoints/ inside) or "
                          "checkpoint_dir (checkpoints and run files in one folder), not both",
                          ("fit",))
    settings = optimizer_settings(optimizer, learning_rate, schedule)
    _check_rate_fits(settings["learning_rate"], params)
    policy = get_policy(precision)
    if getattr(loss, "ignore_index", None) is not None:
        settings.update(loss_ignore_index=loss.ignore_index)
    settings.update(engine=engine, loss=getattr(loss, "name", repr(loss)),
                    batch_size=batch_size, epochs=epochs, num_examples=num,
                    precision=policy.name,
                    data_sha256=fingerprint(*_arrays(train_xy), *_arrays(held_out)),
                    dtypes=_dtypes(params, inputs.first(train_xy[0])))
    if plan is not None:
        settings.update(mesh=dict(plan.mesh.shape), sharding=str(sharding))
    if dp is not None:
        settings.update(dp.config())
    run_config = {**(config or {}), **settings}
    if from_checkpoint is not None and not resume:
        run_config["from_checkpoint"] = os.fspath(from_checkpoint)
    custom = isinstance(optimizer, optax.GradientTransformation)
    opt = optimizer_from(run_config, optimizer if custom else None, policy)
    if dp is not None and dp.adaptive is not None:
        opt = privacy.adaptive_clipped(opt, dp.clip_norm)
    s = Settings(apply_policy(model, policy), loss, engine, opt, policy, dp, plan, epochs,
                 batch_size, num, bool(check_numerics), run_config)
    return s, train_xy, held_out


def _arrays(xy) -> list:
    """Every array of ``(inputs, y)`` in the order ``x`` (its parts), side inputs, ``y``:
    for plain ``(x, y)`` data the fingerprint is that of ``x, y``, as before side inputs."""
    return [] if xy is None else [a for _, a in inputs.leaves_named(*xy)]


def _data(model: Layer, loss, data, what: str) -> tuple:
    """``(Inputs(x, side), y)`` of ``data`` in the pinned form, checked: non-empty, finite,
    labels in range, side inputs the model (or the loss: ``"weights"``) reads."""
    x, y, side = inputs.split(data, what)
    xs = inputs.Inputs(x, side)
    if inputs.count(xs, y, what) == 0:
        raise DataError(f"the {what} data is empty (x has shape "
                        f"{tuple(inputs.first(x).shape)})", ("fit",))
    loss_weights, context = losses.split_side(side)
    check_context(model, context)
    losses.weighted(loss, loss_weights)         # weights need a funnn Loss
    for name, a in inputs.leaves_named(xs, y):
        _check_finite(f"{what} {name}", a)
    _check_labels(model, x, y, what, getattr(loss, "ignore_index", None))
    return xs, y


def fingerprint(*arrays) -> str:
    """The data's content in 16 hex digits: sha256 over each array's dtype, shape and bytes
    (once per run; resuming on other data with the same counts is then refused)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _dtypes(params, x) -> str:
    """The dtypes the run actually trains in (``JAX_ENABLE_X64=1`` makes them float64):
    ``"params float32, x float32"``."""
    kinds = sorted({jnp.dtype(jnp.result_type(p)).name for p in jax.tree_util.tree_leaves(params)
                    if jnp.issubdtype(jnp.result_type(p), jnp.inexact)})
    return f"params {'/'.join(kinds) or 'none'}, x {jnp.dtype(x.dtype).name}"


def _positive(name, value) -> int:
    """A positive integer (``np.int64(2)`` too) as a Python int; anything else refused."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        n = 0
    if n <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}", ("fit",))
    return n


def as_key(key):
    """``fit``'s ``key``: None (key 0), an int seed, or a JAX PRNG key (typed or raw)."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, bool):
        raise ConfigError(f"key must be a jax.random.key, an int seed or None, got {key!r}",
                          ("fit",))
    try:
        return jax.random.key(operator.index(key))
    except TypeError:
        pass
    if isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or (key.dtype == jnp.uint32 and key.shape == (2,))):
        return key
    raise ConfigError(f"key must be a jax.random.key, an int seed or None, got "
                      f"{type(key).__name__}", ("fit",))


def _check_rate_fits(learning_rate, params) -> None:
    """A named optimizer's rate must be finite in the parameters' floating dtype."""
    if learning_rate is None:
        return
    dtype = next((jnp.result_type(p) for p in jax.tree_util.tree_leaves(params)
                  if jnp.issubdtype(jnp.result_type(p), jnp.floating)), jnp.float32)
    if float(learning_rate) > float(jnp.finfo(dtype).max):
        raise ConfigError(f"learning rate {learning_rate!r} is not finite in the parameters' "
                          f"dtype {jnp.dtype(dtype).name} (largest: "
                          f"{float(jnp.finfo(dtype).max):.3g})", ("fit",))


def _check_dp(dp, model: Layer, check_numerics: bool, batch_size: int, policy: Policy) -> None:
    """fit's ``dp=`` checked before anything compiles."""
    if dp is None:
        return
    if not isinstance(dp, privacy.DP):
        raise ConfigError(f"dp must be a funnn.privacy.DP(clip_norm, noise_multiplier, ...), "
                          f"got {type(dp).__name__}", ("fit",))
    if model.stateful:
        raise ConfigError("DP-SGD needs per-example gradients, which are undefined for a "
                          "stateful model: batch_norm normalises each example by statistics of "
                          "the whole batch, so one example's gradient depends on the others; "
                          "use layer_norm instead", ("fit",))
    if check_numerics:
        raise ConfigError("check_numerics runs plain steps one at a time; leave it out with "
                          "dp=", ("fit",))
    if policy.needs_loss_scaling:
        raise ConfigError(f"dp= trains in float32 or bfloat16: float16's loss scaling would "
                          f"scale the per-example norms that clipping compares with clip_norm; "
                          f"leave out precision={policy.name!r} or use 'bf16'", ("fit",))
    if dp.adaptive is not None:       # the count's noise must leave the gradient some privacy
        privacy.adaptive_noise(dp.noise_multiplier, dp.adaptive.sigma_b(batch_size))


def _plan(mesh, sharding, params, batch_size: int, check_numerics: bool):
    """fit's mesh settings checked before anything compiles: a ``parallel.Plan`` or None."""
    if mesh is None:
        if not (isinstance(sharding, str) and sharding == "replicated"):
            raise ConfigError(f"sharding={sharding!r} needs a mesh: pass mesh=N (devices) or "
                              f"a jax.sharding.Mesh", ("fit",))
        return None
    from funnn import parallel  # jax.sharding and the process helpers: only on a mesh

    if check_numerics:
        raise ConfigError("check_numerics runs one step at a time on one device; leave out "
                          "mesh= to use it", ("fit",))
    plan = parallel.plan(mesh, params, sharding)
    parallel.check_batch(batch_size, plan.mesh)
    return plan


def _check_finite(what: str, a) -> None:
    """NaN or inf in the data would show up as a diverged loss blamed on the learning rate:
    named here, as the data's, before anything trains."""
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return
    bad = ~jnp.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
    if bool(bad.any()):
        rows = jnp.nonzero(bad)[0]
        raise DataError(f"the {what} data holds NaN or inf in {int(rows.size)} of its "
                        f"{a.shape[0]} examples (the first: row {int(rows[0])}); clean or drop "
                        f"them before training", ("fit",))


def _check_float_params(params) -> None:
    """Gradient descent moves floating parameters; an integer leaf would be truncated."""
    for path, p in tree_paths(params):
        dt = jnp.result_type(p)
        if not jnp.issubdtype(dt, jnp.inexact):
            raise ConfigError(f"params {path} is {jnp.dtype(dt).name}; training needs "
                              f"floating-point parameters (cast it, e.g. to float32)", ("fit",))


def _check_labels(model: Layer, x, y, what: str, ignore_index=None) -> None:
    """Integer labels must lie in [0, classes) (or equal the loss's ``ignore_index``):
    inside the jitted epoch nobody could check.

    Checked once, eagerly, against the model's output width (from its shapes alone).
    """
    if not jnp.issubdtype(y.dtype, jnp.integer):
        return
    from funnn.layers.combinators import out_shape
    classes = out_shape(model, inputs.in_shape(x))[-1]
    kept = y if ignore_index is None else y[y != ignore_index]
    if classes is None or kept.size == 0:
        return
    lo, hi = int(jnp.min(kept)), int(jnp.max(kept))
    if lo < 0 or hi >= classes:
        also = "" if ignore_index is None else f" (or equal ignore_index {ignore_index})"
        raise DataError(f"{what} labels must lie in [0, {classes}){also} for a model with "
                        f"{classes} outputs; got min {lo}, max {hi}", ("fit",))
