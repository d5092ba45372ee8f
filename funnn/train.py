"""The training loop: one jitted, donated step; epochs as one compiled scan.

``fit`` shuffles mini-batches with an explicit PRNG key, runs a whole epoch as a
single ``lax.scan`` of the step inside one ``jit`` (no Python work per batch),
evaluates on a held-out split, keeps a history, and can checkpoint every epoch
and resume. The gradient engine is a choice: ``"autodiff"``, ``"manual"`` (the
hand-written backward) or ``"bridge"`` (autodiff through the hand-written
backward as a ``custom_vjp`` rule); all three give the same trajectory within
float tolerance.

Keys are derived, never carried: epoch ``e`` shuffles with ``fold_in(key, e)`` and
step ``i`` of it drops out with ``fold_in(epoch_key, i)``. So a run interrupted
after epoch ``k`` and resumed from its checkpoint ends bit-for-bit where the
uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jmp
import optax

from funnn import _files, autodiff, core, losses, manual, numerics, privacy
from funnn.core import CheckpointError, ConfigError, DataError, FunnnError, Layer
from funnn.precision import LossScaled, apply_policy, get_policy, loss_scaled, scaled_loss

__all__ = ["fit", "FitResult", "TrainingDiverged", "make_step", "make_epoch",
           "make_checked_epoch", "evaluate", "get_engine", "get_optimizer", "as_loss",
           "restore_run", "make_sharded_epoch", "make_dp_epoch", "ENGINES", "OPTIMIZERS"]

ENGINES = ("autodiff", "manual", "bridge")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")


def get_engine(name: str) -> Callable:
    """``value_and_grad(model, loss, train=...)`` for an engine name."""
    if name == "autodiff":
        return autodiff.value_and_grad
    if name == "manual":
        return manual.value_and_grad
    if name == "bridge":
        return lambda model, loss, **kw: autodiff.value_and_grad(manual.bridge(model), loss, **kw)
    raise ConfigError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}", ("fit",))


SCHEDULES = ("constant", "cosine")
# A sensible starting rate per optimizer, used when a name comes without a rate.
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adam": 1e-3, "adamw": 1e-3,
              "rmsprop": 1e-3}


def get_optimizer(name, learning_rate: float, *, schedule: str = "constant",
                  total_steps: int | None = None) -> optax.GradientTransformation:
    """An optax optimizer by name (or pass an optax ``GradientTransformation`` through).

    ``sgd`` is plain gradient descent ``w -= lr * g`` as in the seed notes;
    ``momentum``/``nesterov`` use momentum 0.9; ``adamw`` weight decay 1e-4.
    ``schedule="cosine"`` decays the rate to 0 over ``total_steps`` (optax's schedule).
    """
    if isinstance(name, optax.GradientTransformation):
        return name
    try:
        lr_ok = (not isinstance(learning_rate, bool)
                 and 0 < float(learning_rate) < float("inf"))
    except (TypeError, ValueError):
        lr_ok = False
    if not lr_ok:
        raise ConfigError(f"learning rate must be a positive finite number, got "
                          f"{learning_rate!r}", ("fit",))
    learning_rate = float(learning_rate)
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}",
                          ("fit",))
    if schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(learning_rate, max(int(total_steps or 1), 1))
    table = {
        "sgd": lambda: optax.sgd(learning_rate),
        "momentum": lambda: optax.sgd(learning_rate, momentum=0.9),
        "nesterov": lambda: optax.sgd(learning_rate, momentum=0.9, nesterov=True),
        "adam": lambda: optax.adam(learning_rate),
        "adamw": lambda: optax.adamw(learning_rate, weight_decay=1e-4),
        "rmsprop": lambda: optax.rmsprop(learning_rate),
    }
    if name not in table:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}",
                          ("fit",))
    return table[name]()


class TrainState(NamedTuple):
    """Everything a step changes: parameters, optimizer state, layer state (batch-norm)."""

    params: Any
    opt_state: Any
    model_state: Any


def make_step(model: Layer, loss, optimizer: optax.GradientTransformation,
              engine: str = "autodiff"):
    """``step(ts, x, y, key) -> (ts, loss)``: one optimizer update, pure and jit-able.

    Jit it with :func:`funnn.jit` (``funnn.jit(step, donate_argnums=0)``) to get the XLA
    options funnn tunes per backend (:func:`funnn.core.compiler_options`), as :func:`fit` does.

    Under a :func:`funnn.precision.loss_scaled` optimizer (float16 training) the loss is
    multiplied by the scale in the optimizer state before the backward pass, the gradients are
    divided by it, and a step with non-finite gradients changes nothing but the scale.
    """
    engine_vg = get_engine(engine)
    vg = engine_vg(model, loss, train=True)

    def grads_of(vg_, ts, x, y, key):
        if model.stateful:
            (value, new_state), grads = vg_(ts.params, x, y, key=key, state=ts.model_state)
        else:
            value, grads = vg_(ts.params, x, y, key=key)
            new_state = ts.model_state
        return value, grads, new_state

    def step(ts: TrainState, x, y, key):
        value, grads, new_state = grads_of(vg, ts, x, y, key)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        return TrainState(optax.apply_updates(ts.params, updates), opt_state, new_state), value

    def scaled_step(ts: TrainState, x, y, key):
        scale = optimizer.loss_scale(ts.opt_state)
        scaled = engine_vg(model, scaled_loss(loss, scale.loss_scale), train=True)
        value, grads, new_state = grads_of(scaled, ts, x, y, key)
        grads = scale.unscale(grads)
        finite = jmp.all_finite(grads)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        new = TrainState(optax.apply_updates(ts.params, updates), opt_state, new_state)
        new = jmp.select_tree(finite, new, ts)
        opt = optimizer.with_loss_scale(new.opt_state, scale.adjust(finite))
        return new._replace(opt_state=opt), value / scale.loss_scale.astype(value.dtype)

    return scaled_step if isinstance(optimizer, LossScaled) else step


def make_epoch(model: Layer, loss, optimizer, engine: str, batch_size: int, num_examples: int):
    """A jitted ``epoch(ts, x, y, key) -> (ts, batch_losses)`` that donates ``ts``.

    Shuffles with ``key``, drops the last ``num_examples % batch_size`` examples of
    the permutation (a different few each epoch), and scans the step over batches.
    """
    step = make_step(model, loss, optimizer, engine)
    num_batches = num_examples // batch_size

    def epoch(ts, x, y, key):
        perm = jax.random.permutation(key, num_examples)[: num_batches * batch_size]
        idx = perm.reshape(num_batches, batch_size)

        def body(ts, i):
            b = idx[i]
            return step(ts, x[b], y[b], jax.random.fold_in(key, i))

        return jax.lax.scan(body, ts, jnp.arange(num_batches))

    return core.jit(epoch, donate_argnums=0)


def make_dp_epoch(model: Layer, loss, optimizer, engine: str, batch_size: int,
                  num_examples: int, dp: privacy.DP):
    """A jitted DP-SGD ``epoch(ts, x, y, key) -> (ts, batch_losses)`` that donates ``ts``.

    ``num_examples // batch_size`` steps; step ``i`` draws its own batch from all of ``x``
    (Poisson or fixed-size, :mod:`funnn.privacy`) and its noise with ``fold_in(key, i)``, as
    :func:`make_epoch` derives its step keys. The gradient is clipped, summed, noised and
    divided by ``batch_size`` (:func:`funnn.privacy.make_dp_grad`).
    """
    grad = privacy.make_dp_grad(model, loss, dp, engine, batch_size, num_examples)
    num_batches = num_examples // batch_size

    def epoch(ts, x, y, key):
        def body(ts, i):
            value, grads = grad(ts.params, x, y, jax.random.fold_in(key, i))
            updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
            return TrainState(optax.apply_updates(ts.params, updates), opt_state,
                              ts.model_state), value

        return jax.lax.scan(body, ts, jnp.arange(num_batches))

    return core.jit(epoch, donate_argnums=0)


def make_sharded_epoch(model: Layer, loss, optimizer, engine: str, plan, state_shardings,
                       key_impl):
    """:func:`make_epoch` on a mesh: ``epoch(ts, xb, yb, key_data) -> (ts, batch_losses)``.

    ``xb``/``yb`` are the epoch's batches stacked ``(num_batches, batch, ...)`` and
    split over the mesh's ``data`` axis (``plan.feed``); ``ts`` lives on
    ``state_shardings`` (``plan.params``/``plan.like``) in and out, and is donated.
    ``key_data`` is a typed key's data for ``key_impl`` (None: a raw uint32 key).
    The same step as :func:`make_epoch` with the same per-step keys; XLA inserts
    the collectives, so both engines run sharded unchanged.
    """
    step = make_step(model, loss, optimizer, engine)

    def epoch(ts, xb, yb, key_data):
        key = key_data if key_impl is None else jax.random.wrap_key_data(key_data,
                                                                          impl=key_impl)

        def body(ts, batch):
            x, y, i = batch
            x = jax.lax.with_sharding_constraint(x, plan.rows)
            y = jax.lax.with_sharding_constraint(y, plan.rows)
            return step(ts, x, y, jax.random.fold_in(key, i))

        return jax.lax.scan(body, ts, (xb, yb, jnp.arange(xb.shape[0])))

    return core.jit(epoch, in_shardings=(state_shardings, plan.batches, plan.batches,
                                         plan.replicated),
                    out_shardings=(state_shardings, plan.replicated), donate_argnums=0)


@functools.lru_cache(maxsize=64)
def make_evaluate(model: Layer, loss):
    """A jitted ``evaluate(params, model_state, x, y) -> (loss, accuracy)`` in inference mode.

    Cached per ``(model, loss)`` (both are hashable frozen dataclasses), so repeated
    calls reuse one compiled function.
    """

    def evaluate(params, model_state, x, y):
        if model.stateful:
            pred, _ = model.apply(params, x, state=model_state, train=False)
        else:
            pred = model.apply(params, x, train=False)
        acc = losses.accuracy(pred, y) if pred.shape[-1] > 1 else jnp.nan
        return loss.value(pred, y), acc

    return core.jit(evaluate)


def evaluate(model: Layer, loss, params, x, y, model_state=None):
    """Loss and accuracy of ``model`` on ``(x, y)`` in inference mode, as Python floats."""
    value, acc = make_evaluate(model, loss)(params, model_state, x, y)
    return float(value), float(acc)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: final parameters and states, and one history row per epoch.

    ``run_id`` names the run (checkpoints carry it); ``resumed_from`` is the
    checkpoint a resumed run continued from (None for a fresh run).
    """

    params: Any
    opt_state: Any
    model_state: Any
    history: list
    epochs_done: int
    run_id: str | None = None
    resumed_from: str | None = None
    config: dict | None = None


class TrainingDiverged(FunnnError, RuntimeError):
    """Training produced a non-finite loss (or, with ``check_numerics``, any value).

    ``history`` holds every epoch run, the last one with the non-finite value;
    ``epoch``, ``quantity`` and (with ``check_numerics``) ``step`` and ``where``
    say what went wrong; ``checkpoint`` is the last finite checkpoint, if any.
    """

    def __init__(self, message: str, path=(), *, history=(), epoch=None, quantity=None,
                 step=None, where=None, checkpoint=None):
        super().__init__(message, path)
        self.history, self.epoch, self.quantity = list(history), epoch, quantity
        self.step, self.where, self.checkpoint = step, where, checkpoint


def _check_positive(name, value, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or value <= 0:
        raise ConfigError(f"{name} must be a positive {'number' if kind is float else 'int'}, "
                          f"got {value!r}", ("fit",))


@dataclasses.dataclass(frozen=True)
class _PlainLoss:
    """A plain ``loss(pred, y) -> scalar`` callable dressed as a Loss without ``.grad``."""

    fn: Callable
    name: str

    def value(self, pred, y):
        return self.fn(pred, y)


def as_loss(loss, engine: str = "autodiff"):
    """A Loss from a Loss, a loss name (``"mse"``) or a plain ``loss(pred, y)`` callable.

    The autodiff and bridge engines differentiate ``loss.value``; the manual engine
    needs the hand-written ``loss.grad`` too, so a plain callable is refused there.
    """
    if isinstance(loss, str):
        return losses.get(loss)
    if hasattr(loss, "value"):
        if engine == "manual" and not callable(getattr(loss, "grad", None)):
            raise ConfigError(f"the manual engine needs a loss with a hand-written gradient "
                              f"(.grad); {loss!r} has none; use engine='autodiff'", ("fit",))
        return loss
    if callable(loss):
        if engine == "manual":
            raise ConfigError("the manual engine needs a loss with a hand-written gradient "
                              "(.grad), got a plain callable; use a funnn.losses Loss (or its "
                              "name), or engine='autodiff' or 'bridge'", ("fit",))
        return _PlainLoss(loss, getattr(loss, "__name__", type(loss).__name__))
    raise ConfigError(f"loss must be a funnn Loss, a loss name or a callable loss(pred, y), "
                      f"got {type(loss).__name__}", ("fit",))


# Settings that may change on resume: epochs may grow; the others do not change results.
_SAVED_DEFAULTS = {"precision": "f32"}
_RESUMABLE = ("epochs", "batch_size_asked", "from_checkpoint", "mesh", "sharding")


def _config_diff(saved: dict, now: dict, ignore=_RESUMABLE) -> list[str]:
    """``["learning_rate: 0.1 -> 0.2", ...]`` for every setting that differs."""
    out = []
    saved = {**_SAVED_DEFAULTS, **saved}        # runs saved before a setting existed
    for k in sorted(set(saved) | set(now), key=str):
        if k in ignore:
            continue
        a, b = saved.get(k, "(unset)"), now.get(k, "(unset)")
        if a != b:
            out.append(f"{k}: {a} -> {b}")
    return out


def _check_history(history, step: int, path: str) -> list:
    ok = isinstance(history, list) and len(history) == step and all(
        isinstance(r, dict) and r.get("epoch") == i + 1 for i, r in enumerate(history))
    if not ok:
        raise CheckpointError(f"checkpoint {path}: its history does not match its step {step} "
                              f"(expected one row per epoch, epochs 1..{step})")
    return history


def _header_point(path: str, directory: str | None) -> dict:
    """The header of the checkpoint to resume from; a damaged one lists the alternatives."""
    from funnn import checkpoint as ckpt
    return _damaged_hint(lambda: ckpt.header(path), path, directory)


def _restore_point(path: str, like: dict, directory: str | None):
    """Restore a checkpoint to resume from; a damaged one lists the intact alternatives."""
    from funnn import checkpoint as ckpt
    return _damaged_hint(lambda: ckpt.restore(path, like=like), path, directory)


def _damaged_hint(read, path: str, directory: str | None):
    from funnn import checkpoint as ckpt
    try:
        return read()
    except CheckpointError as err:
        if directory is None:
            raise
        others = [(s, p) for s, p in ckpt.intact(directory) if p != path]
        if others:
            listing = ", ".join(f"{p} (epoch {s})" for s, p in reversed(others))
            hint = (f" Intact checkpoints: {listing}. Resume from one with "
                    f"--from-checkpoint PATH (fit: from_checkpoint=PATH).")
        else:
            hint = " No intact checkpoint is left; start again with --overwrite."
        raise CheckpointError(f"cannot resume: {err}.{hint}") from None


def fit(model: Layer, params, data, loss, optimizer="sgd", *,
        learning_rate: float | None = None, epochs: int = 10, batch_size: int = 32,
        engine: str = "autodiff", key=None, schedule: str | None = None,
        eval_data=None, model_state=None, progress: bool | None = None,
        checkpoint_dir=None, resume: bool | str = False, overwrite: bool = False,
        from_checkpoint=None, keep: int | None = 3, config: dict | None = None,
        extras=None, check_numerics: bool = False, on_epoch: Callable | None = None,
        run_id: str | None = None, log: Callable[[str], Any] | None = None,
        mesh=None, sharding="replicated", precision=None,
        dp: privacy.DP | None = None) -> FitResult:
    """Train ``model`` on ``data = (x, y)`` (or a Dataset with ``.x``/``.y``).

    ``loss``: a funnn Loss, a loss name, or (autodiff and bridge engines) a plain
    ``loss(pred, y)`` callable. ``optimizer`` is a name (``sgd``, ``momentum``,
    ``nesterov``, ``adam``, ``adamw``, ``rmsprop``), with ``learning_rate``
    (default per optimizer: ``DEFAULT_LR``, 0.1 for sgd, 1e-3 for adam) and ``schedule``
    (``constant`` default, or ``cosine``: decay to 0 over the run), or an optax
    transformation, which carries its own rate and schedule: passing ``learning_rate`` or
    ``schedule`` with one is a ConfigError.
    ``progress`` shows a tqdm bar (``None``: only when stderr is a terminal).

    Checkpoints: with ``checkpoint_dir`` a checkpoint is written after every epoch
    (the newest ``keep`` of this run are kept) holding params, optimizer state,
    model state, key, ``extras``, the run's config and history. The directory
    belongs to one run and is locked while it trains. A directory holding another
    run's checkpoints is refused unless ``resume=True`` (continue it: every
    setting must match the saved one, except that ``epochs`` may grow),
    ``resume="auto"`` (continue if there is something to continue) or
    ``overwrite=True`` (delete that run's checkpoints first). ``from_checkpoint``
    names the checkpoint to resume from (default: the newest) or, without
    ``resume``, one whose params (and model state) start a new run.

    A non-finite training or evaluation loss ends training at the end of that
    epoch with :class:`TrainingDiverged` (its checkpoint is not written, so the
    last one on disk is finite). ``check_numerics=True`` runs steps one at a
    time and checks every step; the error then names the step and the first
    layer whose output or gradient went non-finite. Off, it costs nothing.

    ``run_id`` names a new run (default: a random id); ``log`` receives one-line
    notices (``resuming run R from epoch N (path)``).

    ``mesh`` (a ``jax.sharding.Mesh`` with a ``data`` axis, or a number of local
    devices) trains data-parallel: each batch is split over ``data``, and
    ``sharding`` lays out the parameters and optimizer state (``"replicated"``,
    ``"fsdp"``, ``"tensor"`` or per-path rules: see :mod:`funnn.parallel`). The
    results equal single-device training up to float rounding; ``batch_size`` must
    be a multiple of the data degree. With several processes
    (``parallel.initialize``) call ``fit`` with the same arguments on every one
    and a mesh over all their devices: each feeds its own rows of every batch,
    process 0 alone writes checkpoints, and every process reads them to resume
    (``checkpoint_dir`` on a filesystem they share). ``check_numerics`` needs no mesh.

    ``precision`` (``"f32"`` default, ``"bf16"``, ``"f16"`` or a
    :class:`funnn.precision.Policy`) trains with float32 master weights and the layers
    computing in the policy's compute dtype, on either engine (:mod:`funnn.precision`);
    ``"f16"`` adds dynamic loss scaling (the scale lives in the optimizer state). Evaluation
    runs under the same policy.

    ``dp`` (a :class:`funnn.privacy.DP`) trains with DP-SGD: each step samples its batch
    (Poisson by default), clips every example's gradient to ``dp.clip_norm``, adds Gaussian
    noise from the step's key and divides by ``batch_size``; history rows gain ``epsilon``
    (at ``dp.delta``, dp-accounting's RDP accountant) and the config ``dp_clip``,
    ``dp_noise``, ``dp_delta``, ``dp_sampling`` (compared on resume). The manual engine clips
    by the per-example norm rules (one extra backward); ``autodiff`` and ``bridge`` fall back
    to ``vmap(jax.grad)`` over single examples. A stateful model (batch-norm), a ``mesh`` or
    ``check_numerics`` with ``dp`` raise :class:`ConfigError`.

    History rows hold ``epoch``, ``train_loss`` (mean over the epoch's batches),
    ``eval_loss``, ``eval_accuracy``, ``seconds`` and, with ``dp``, ``epsilon``.
    """
    from funnn import checkpoint as ckpt  # imported lazily: only runs that save need it
    from funnn import rundir

    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    if engine not in ENGINES:
        get_engine(engine)
    loss = as_loss(loss, engine)
    x, y = _xy(data)
    num = int(x.shape[0])
    if num == 0:
        raise DataError(f"the training data is empty (x has shape {tuple(x.shape)})", ("fit",))
    _check_labels(model, x, y, "training")
    if eval_data is not None:
        ex, ey = _xy(eval_data)
        if int(ex.shape[0]) == 0:
            raise DataError(f"the evaluation data is empty (x has shape {tuple(ex.shape)})",
                            ("fit",))
        _check_labels(model, ex, ey, "evaluation")
    if batch_size > num:
        raise ConfigError(f"batch_size {batch_size} exceeds the {num} training examples",
                          ("fit",))
    _check_dp(dp, model, mesh, check_numerics)
    plan = _plan(mesh, sharding, params, batch_size, check_numerics)
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}", ("fit",))
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume continues the run "
                          "in checkpoint_dir, overwrite deletes it", ("fit",))
    custom = isinstance(optimizer, optax.GradientTransformation)
    if custom and (learning_rate is not None or schedule is not None):
        raise ConfigError("learning_rate and schedule apply to a named optimizer; an optax "
                          "optimizer carries its own (build it with the rate or schedule "
                          "you want)", ("fit",))
    if learning_rate is None:
        learning_rate = DEFAULT_LR.get(optimizer, 0.1) if isinstance(optimizer, str) else 0.1
    schedule = "constant" if schedule is None else schedule
    opt = get_optimizer(optimizer, learning_rate, schedule=schedule,
                        total_steps=epochs * (num // batch_size))
    dtype = next((jnp.result_type(p) for p in jax.tree_util.tree_leaves(params)
                  if jnp.issubdtype(jnp.result_type(p), jnp.floating)), jnp.float32)
    if not custom and float(learning_rate) > float(jnp.finfo(dtype).max):
        raise ConfigError(f"learning rate {learning_rate!r} is not finite in the parameters' "
                          f"dtype {jnp.dtype(dtype).name} (largest: "
                          f"{float(jnp.finfo(dtype).max):.3g})", ("fit",))
    settings = {"optimizer": f"optax:{type(optimizer).__name__}" if custom else optimizer,
                "learning_rate": None if custom else float(learning_rate),
                "schedule": None if custom else schedule, "engine": engine,
                "loss": getattr(loss, "name", repr(loss)), "batch_size": batch_size,
                "epochs": epochs, "num_examples": num}
    policy = get_policy(precision)
    if dp is not None and policy.name != "f32":
        raise ConfigError(f"dp= trains in float32: the per-example rules do not run under a "
                          f"mixed-precision policy yet; leave out precision={policy.name!r}",
                          ("fit",))
    settings["precision"] = policy.name
    model = apply_policy(model, policy)                 # the float32 policy: the model itself
    if policy.needs_loss_scaling:
        opt = loss_scaled(opt)
    if plan is not None:
        settings.update(mesh=dict(plan.mesh.shape), sharding=str(sharding))
    if dp is not None:
        settings.update(dp.config())
    run_config = {**(config or {}), **settings}
    key_given = key is not None
    key = jax.random.key(0) if key is None else key
    if model.init_state is not None and model_state is None:     # model.stateful
        model_state = model.init_state((None,) + tuple(x.shape[1:]))
    if from_checkpoint is not None and not resume:
        start_ck = _restore_point(os.fspath(from_checkpoint),
                                  {"params": params, "model_state": model_state}, None)
        params, model_state = start_ck.params, start_ck.model_state
        run_config["from_checkpoint"] = os.fspath(from_checkpoint)
    # The epoch donates its state buffers; copy once so the caller's arrays stay valid.
    params, model_state = jax.tree_util.tree_map(jnp.copy, (params, model_state))
    ts = TrainState(params, opt.init(params), model_state)
    history: list = []
    start, run_id, resumed_from = 0, run_id or uuid.uuid4().hex[:12], None

    lock, main, ready = None, plan is None or _is_main(), False
    try:
        if checkpoint_dir is not None:
            cdir = os.fspath(checkpoint_dir)
            if main:    # with several processes, process 0 alone owns the directory
                lock = rundir.RunLock(cdir, "fit").acquire()
            found = rundir.find_run(cdir, cdir)
            if resume is True and found is None and from_checkpoint is None:
                raise ConfigError(f"nothing to resume in {cdir}: it holds no checkpoints "
                                  f"(a typo in the directory?)", ("fit",))
            if resume and (found is not None or from_checkpoint is not None):
                if from_checkpoint is not None:
                    path = os.fspath(from_checkpoint)
                else:   # find_run(cdir, cdir) finds a run here only by its checkpoints
                    assert found is not None and found.newest is not None
                    path = found.newest
                head = _header_point(path, cdir)
                diffs = _config_diff(head.get("config") or {}, run_config)
                if diffs:
                    raise ConfigError(f"cannot resume run {head.get('run') or '(no id)'} from "
                                      f"{path}: settings differ from the saved run: "
                                      f"{'; '.join(diffs)}. Resume with the saved settings, or "
                                      f"start a new run (another directory, or --overwrite)",
                                      ("fit",))
                saved = _restore_point(path, {"params": ts.params, "opt_state": ts.opt_state,
                                              "model_state": ts.model_state}, cdir)
                if key_given and saved.key is not None and not bool(jnp.array_equal(
                        jax.random.key_data(saved.key), jax.random.key_data(key))):
                    raise ConfigError(f"cannot resume run {saved.run or '(no id)'} from {path}: "
                                      f"it was trained with another PRNG key; pass the same "
                                      f"key (or none) to resume", ("fit",))
                if "from_checkpoint" in (saved.config or {}):  # keep the run's provenance
                    run_config.setdefault("from_checkpoint", saved.config["from_checkpoint"])
                start = int(saved.step)
                history = list(_check_history((saved.metadata or {}).get("history"),
                                              start, path))
                if start > epochs:
                    raise ConfigError(f"run {saved.run} has already trained {start} epochs; "
                                      f"epochs={epochs} would undo them: ask for at least "
                                      f"{start}", ("fit",))
                ts = TrainState(saved.params, saved.opt_state, saved.model_state)
                key = saved.key if saved.key is not None else key
                run_id, resumed_from = saved.run or run_id, path
                if log is not None:
                    log(f"resuming run {run_id} from epoch {start} ({path})")
                    if start == epochs:
                        log(f"run {run_id} has already trained all {epochs} epochs; nothing "
                            f"to train (ask for more epochs to continue)")
            elif found is not None:
                if not overwrite:
                    raise ConfigError(f"{cdir} already holds {found.describe()}; pass "
                                      f"resume=True to continue it or overwrite=True to "
                                      f"replace it", ("fit",))
                if main:
                    rundir.remove_run(cdir, cdir)
            if main:
                _files.remove_temp_files(cdir)
                assert lock is not None     # taken above whenever checkpoint_dir is given
                lock.mark()
        ready = True
        if plan is not None:
            _agree(None, start)
            ts = TrainState(*(plan.place(t, s) for t, s in zip(ts, _state_shardings(plan, ts))))

        def save(e, ts_, hist):
            if checkpoint_dir is None:
                return None
            if plan is not None:
                ts_ = _gather(ts_)      # a collective: every process takes part
            path, failed = None, None
            try:
                path = ckpt.save_in(
                    cdir, e, keep=keep, params=ts_.params, opt_state=ts_.opt_state,
                    model_state=ts_.model_state, key=key, extras=extras, config=run_config,
                    metadata={"history": hist}, run=run_id) if main else None
            except (FunnnError, OSError) as err:
                failed = err
            if plan is not None:
                _agree(failed, e)       # a failed write stops every process, not just 0
            if failed is not None:
                raise failed
            return path

        ts, history = _train_epochs(
            model, loss, opt, engine, batch_size, num, ts, history, start, epochs, key,
            x, y, eval_data, progress if main else False, check_numerics, on_epoch, save, plan,
            dp)
    except (FunnnError, OSError) as err:
        if plan is not None and not ready:
            _agree(err, 0)     # the other processes stop too, instead of waiting for this one
        raise
    finally:
        if lock is not None:
            lock.release()
    return FitResult(ts.params, ts.opt_state, ts.model_state, history, len(history), run_id,
                     resumed_from, run_config)


def restore_run(directory, model: Layer | None = None, optimizer=None, *, checkpoint=None):
    """Restore a run written by :func:`fit` or ``funnn train``: a :class:`Checkpoint`.

    ``directory`` is a run directory (its ``checkpoints/``) or a ``checkpoint_dir``;
    ``checkpoint`` picks a file (default: the newest). The optimizer state comes back
    in optax's own classes, ready for ``optimizer.update``: ``optimizer`` is a name
    or optax transformation, by default the named optimizer the run's config
    records. With ``model`` (and an ``input_shape`` in the config, as the CLI
    records) the params are checked against the model's own shapes. A run trained under a
    mixed-precision policy records it (``config["precision"]``); predict with
    ``precision.apply_policy(model, config["precision"])`` to compute as it trained.
    """
    from funnn import checkpoint as ckpt

    directory = os.fspath(directory)
    path = os.fspath(checkpoint) if checkpoint is not None else None
    if path is None:
        for d in (os.path.join(directory, "checkpoints"), directory):
            if os.path.isdir(d) and (path := ckpt.latest(d)) is not None:
                break
    if path is None:
        raise CheckpointError(f"no checkpoint in {directory} (nor in its checkpoints/)")
    plain = ckpt.restore(path)
    config = plain.config or {}
    like: dict = {"params": plain.params}
    if model is not None and config.get("input_shape") is not None:
        in_shape = (None,) + tuple(config["input_shape"])
        like["params"] = jax.eval_shape(lambda k: model.init(k, in_shape)[1], jax.random.key(0))
    if optimizer is None and config.get("optimizer") in OPTIMIZERS:
        optimizer = config["optimizer"]
    if optimizer is not None:
        steps = int(config.get("epochs", 1)) * max(
            int(config.get("num_examples", 1)) // int(config.get("batch_size", 1)), 1)
        opt = get_optimizer(optimizer, config.get("learning_rate") or 0.1,
                            schedule=config.get("schedule") or "constant", total_steps=steps)
        if get_policy(config.get("precision")).needs_loss_scaling:
            opt = loss_scaled(opt)          # float16 runs keep the loss scale with the optimizer
        like["opt_state"] = jax.eval_shape(opt.init, plain.params)
    return ckpt.restore(path, like=like)


def _train_epochs(model, loss, opt, engine, batch_size, num, ts, history, start, epochs, key,
                  x, y, eval_data, progress, check_numerics, on_epoch, save, plan=None,
                  dp=None):
    """The epoch loop of :func:`fit`: train, evaluate, check, checkpoint."""
    run_eval = make_evaluate(model, loss) if eval_data is not None else None
    ex, ey = _xy(eval_data) if eval_data is not None else (None, None)
    if plan is not None:
        run_epoch = _sharded_runner(model, loss, opt, engine, batch_size, num, plan, ts, key)
        if ex is not None and ey is not None:   # split over data when it divides the split
            split = plan.rows if int(ex.shape[0]) % plan.data_size == 0 else plan.replicated
            ex, ey = plan.place(ex, split), plan.place(ey, split)
    elif dp is not None:
        run_epoch = make_dp_epoch(model, loss, opt, engine, batch_size, num, dp)
    else:
        run_epoch = (make_checked_epoch if check_numerics else make_epoch)(
            model, loss, opt, engine, batch_size, num)
    last_path = None
    bar = _progress(range(start, epochs), progress, epochs, start)
    for e in bar:
        t0 = time.perf_counter()
        try:
            ts, batch_losses = run_epoch(ts, x, y, jax.random.fold_in(key, e))
        except _NonFinite as bad:
            step = e * (num // batch_size) + bad.batch + 1
            where = numerics.locate(model, loss, bad.ts.params, bad.x, bad.y, key=bad.key,
                                    state=bad.ts.model_state)
            history.append({"epoch": e + 1, "train_loss": float("nan")})
            raise TrainingDiverged(
                f"step {step} (epoch {e + 1}, batch {bad.batch + 1}): {where} became "
                f"non-finite; training stopped{_kept(last_path)}", ("fit",), history=history,
                epoch=e + 1, quantity="step", step=step, where=where,
                checkpoint=last_path) from None
        row = {"epoch": e + 1, "train_loss": float(jnp.mean(batch_losses))}
        if run_eval is not None:
            el, ea = run_eval(ts.params, ts.model_state, ex, ey)
            row["eval_loss"], row["eval_accuracy"] = float(el), float(ea)
        row["seconds"] = time.perf_counter() - t0
        if dp is not None:
            row["epsilon"] = dp.epsilon((e + 1) * (num // batch_size), batch_size, num)
        history.append(row)
        bad_q = [q for q, k in (("training loss", "train_loss"), ("test loss", "eval_loss"))
                 if k in row and not math.isfinite(row[k])]
        if bad_q:
            raise TrainingDiverged(
                f"epoch {e + 1}: the {bad_q[0]} is {row[_KEYS[bad_q[0]]]}; training stopped"
                f"{_kept(last_path)}. Lower the learning rate, or rerun with --check-numerics "
                f"(check_numerics=True) to find the first layer and step that went non-finite",
                ("fit",), history=history, epoch=e + 1, quantity=bad_q[0],
                checkpoint=last_path)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v:.4f}" for k, v in row.items()
                             if k not in ("epoch", "seconds")})
        last_path = save(e + 1, ts, history) or last_path
        if on_epoch is not None:
            on_epoch(row)
    return ts, history


_KEYS = {"training loss": "train_loss", "test loss": "eval_loss"}


def _check_dp(dp, model: Layer, mesh, check_numerics: bool) -> None:
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
    if mesh is not None:
        raise ConfigError("dp= trains on one device; leave out mesh= (DP-SGD on a mesh is not "
                          "implemented)", ("fit",))
    if check_numerics:
        raise ConfigError("check_numerics runs plain steps one at a time; leave it out with "
                          "dp=", ("fit",))


def _plan(mesh, sharding, params, batch_size: int, check_numerics: bool):
    """fit's mesh settings checked before anything compiles: a ``parallel.Plan`` or None."""
    if mesh is None:
        if not (isinstance(sharding, str) and sharding == "replicated"):
            raise ConfigError(f"sharding={sharding!r} needs a mesh: pass mesh=N (devices) or "
                              f"a jax.sharding.Mesh", ("fit",))
        return None
    from funnn import parallel

    if check_numerics:
        raise ConfigError("check_numerics runs one step at a time on one device; leave out "
                          "mesh= to use it", ("fit",))
    plan = parallel.plan(mesh, params, sharding)
    parallel.check_batch(batch_size, plan.mesh)
    return plan


def _is_main() -> bool:
    from funnn import parallel
    return parallel.is_main()


def _agree(err, value: int) -> None:
    from funnn import parallel
    parallel.agree(err, value, "the epoch to start from")


def _gather(tree):
    from funnn import parallel
    return parallel.gather(tree)


def _state_shardings(plan, ts: TrainState) -> TrainState:
    return TrainState(plan.params, plan.like(ts.opt_state),
                      jax.tree_util.tree_map(lambda _: plan.replicated, ts.model_state))


def _sharded_runner(model, loss, opt, engine, batch_size, num, plan, ts, key):
    """``run(ts, x, y, epoch_key)`` for a mesh: the same shuffle as :func:`make_epoch`,
    computed on the host; each process feeds its own rows of every batch."""
    import numpy as np

    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    epoch = make_sharded_epoch(model, loss, opt, engine, plan, _state_shardings(plan, ts),
                               jax.random.key_impl(key) if typed else None)
    nb = num // batch_size
    order = jax.jit(lambda k: jax.random.permutation(k, num)[: nb * batch_size]
                    .reshape(nb, batch_size))
    host: dict = {}

    def run(ts, x, y, k):
        if not host:
            host.update(x=np.asarray(x), y=np.asarray(y))
        idx = np.asarray(order(k))
        kd = plan.place(jax.random.key_data(k) if typed else k, plan.replicated)
        return epoch(ts, plan.feed(host["x"], idx), plan.feed(host["y"], idx), kd)

    return run


def _kept(path) -> str:
    return f" (the last finite checkpoint is {path})" if path else ""


class _NonFinite(Exception):
    """Raised by a checked epoch: the state before the bad step and that step's batch."""

    def __init__(self, batch, ts, x, y, key):
        super().__init__(f"non-finite at batch {batch}")
        self.batch, self.ts, self.x, self.y, self.key = batch, ts, x, y, key


def make_checked_epoch(model: Layer, loss, optimizer, engine: str, batch_size: int,
                       num_examples: int):
    """Like :func:`make_epoch`, but one jitted step at a time, each checked for non-finite
    loss, parameters and state; raises ``_NonFinite`` with the state before the bad step.

    Same batches and keys as :func:`make_epoch` (results agree to float rounding).
    Slower: a dispatch and a host sync per step; only used when asked for.
    """
    step = make_step(model, loss, optimizer, engine)
    nb = num_examples // batch_size

    @core.jit
    def checked(ts, x, y, key):
        new, value = step(ts, x, y, key)
        return new, value, numerics.all_finite((value, new.params, new.model_state))

    @jax.jit
    def order(key):
        return jax.random.permutation(key, num_examples)[: nb * batch_size].reshape(nb, batch_size)

    def epoch(ts, x, y, key):
        idx, values = order(key), []
        for i in range(nb):
            b, k = idx[i], jax.random.fold_in(key, i)
            new, value, ok = checked(ts, x[b], y[b], k)
            if not bool(ok):
                raise _NonFinite(i, ts, x[b], y[b], k)
            ts = new
            values.append(value)
        return ts, jnp.stack(values)

    return epoch


def _check_labels(model: Layer, x, y, what: str) -> None:
    """Integer labels must lie in [0, classes): inside the jitted epoch nobody could check.

    Checked once, eagerly, against the model's output width (from its shapes alone).
    """
    if x.shape[:1] != y.shape[:1]:
        raise DataError(f"{what} data: x has {x.shape[0]} examples, y has {y.shape[0]}",
                        ("fit",))
    if not jnp.issubdtype(y.dtype, jnp.integer):
        return
    from funnn.layers.combinators import out_shape
    classes = out_shape(model, (None,) + tuple(x.shape[1:]))[-1]
    lo, hi = int(jnp.min(y)), int(jnp.max(y))
    if classes is not None and (lo < 0 or hi >= classes):
        raise DataError(f"{what} labels must lie in [0, {classes}) for a model with {classes} "
                        f"outputs; got min {lo}, max {hi}", ("fit",))


def _xy(data):
    if hasattr(data, "x") and hasattr(data, "y"):
        return jnp.asarray(data.x), jnp.asarray(data.y)
    x, y = data
    return jnp.asarray(x), jnp.asarray(y)


def _progress(it, progress, total, start):
    if progress is False:
        return it
    from tqdm.auto import tqdm  # a well-kept progress bar; hides itself off a terminal

    return tqdm(it, total=total, initial=start, desc="epochs", unit="epoch",
                disable=None if progress is None else not progress, leave=True)
