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
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from funnn import autodiff, losses, manual
from funnn.core import ConfigError, DataError, Layer

__all__ = ["fit", "FitResult", "make_step", "make_epoch", "evaluate", "get_engine",
           "get_optimizer", "ENGINES", "OPTIMIZERS"]

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


def make_step(model: Layer, loss, optimizer: optax.GradientTransformation, engine: str = "autodiff"):
    """``step(ts, x, y, key) -> (ts, loss)``: one optimizer update, pure and jit-able."""
    vg = get_engine(engine)(model, loss, train=True)

    def step(ts: TrainState, x, y, key):
        if model.stateful:
            (value, new_state), grads = vg(ts.params, x, y, key=key, state=ts.model_state)
        else:
            value, grads = vg(ts.params, x, y, key=key)
            new_state = ts.model_state
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        return TrainState(optax.apply_updates(ts.params, updates), opt_state, new_state), value

    return step


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

    return jax.jit(epoch, donate_argnums=0)


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

    return jax.jit(evaluate)


def evaluate(model: Layer, loss, params, x, y, model_state=None):
    """Loss and accuracy of ``model`` on ``(x, y)`` in inference mode, as Python floats."""
    value, acc = make_evaluate(model, loss)(params, model_state, x, y)
    return float(value), float(acc)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: final parameters and states, and one history row per epoch."""

    params: Any
    opt_state: Any
    model_state: Any
    history: list
    epochs_done: int


def _check_positive(name, value, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or value <= 0:
        raise ConfigError(f"{name} must be a positive {'number' if kind is float else 'int'}, "
                          f"got {value!r}", ("fit",))


def fit(model: Layer, params, data, loss, optimizer="sgd", *, learning_rate: float = 0.1,
        epochs: int = 10, batch_size: int = 32, engine: str = "autodiff", key=None,
        schedule: str = "constant",
        eval_data=None, model_state=None, progress: bool | None = None,
        checkpoint_dir=None, resume: bool = False, config: dict | None = None,
        on_epoch: Callable | None = None) -> FitResult:
    """Train ``model`` on ``data = (x, y)`` (or a Dataset with ``.x``/``.y``).

    ``optimizer`` is a name (``sgd``, ``momentum``, ``nesterov``, ``adam``, ``adamw``,
    ``rmsprop``) or an optax transformation; ``schedule`` is ``constant`` or ``cosine``
    (decay to 0 over the run). ``progress`` shows a tqdm bar with the
    loss and accuracy (``None``: only when stderr is a terminal). With
    ``checkpoint_dir`` a checkpoint is written after every epoch; ``resume=True``
    continues from the newest one there. History rows hold ``epoch``,
    ``train_loss`` (mean over the epoch's batches), ``eval_loss``, ``eval_accuracy``
    and ``seconds``.
    """
    from funnn import checkpoint as ckpt  # imported lazily: only runs that save need it

    _check_positive("epochs", epochs)
    _check_positive("batch_size", batch_size)
    x, y = _xy(data)
    num = int(x.shape[0])
    _check_labels(model, x, y, "training")
    if eval_data is not None:
        _check_labels(model, *_xy(eval_data), "evaluation")
    if batch_size > num:
        raise ConfigError(f"batch_size {batch_size} exceeds the {num} training examples",
                          ("fit",))
    opt = get_optimizer(optimizer, learning_rate, schedule=schedule,
                        total_steps=epochs * (num // batch_size))
    if engine not in ENGINES:
        get_engine(engine)
    key = jax.random.key(0) if key is None else key
    if model.stateful and model_state is None:
        model_state = model.init_state((None,) + tuple(x.shape[1:]))
    # The epoch donates its state buffers; copy once so the caller's arrays stay valid.
    params, model_state = jax.tree_util.tree_map(jnp.copy, (params, model_state))
    ts = TrainState(params, opt.init(params), model_state)
    history, start = [], 0
    if resume and checkpoint_dir is not None:
        path = ckpt.latest(checkpoint_dir)
        if path is not None:
            saved = ckpt.restore(path, like={"params": {"params": ts.params,
                                             "opt_state": ts.opt_state,
                                             "model_state": ts.model_state}})
            tree = saved.params
            ts = TrainState(tree["params"], tree["opt_state"], tree["model_state"])
            start = int(saved.step)
            history = list((saved.metadata or {}).get("history", []))
            if saved.key is not None:
                key = saved.key

    run_epoch = make_epoch(model, loss, opt, engine, batch_size, num)
    run_eval = make_evaluate(model, loss) if eval_data is not None else None
    ex, ey = _xy(eval_data) if eval_data is not None else (None, None)

    bar = _progress(range(start, epochs), progress, epochs, start)
    for e in bar:
        t0 = time.perf_counter()
        ts, batch_losses = run_epoch(ts, x, y, jax.random.fold_in(key, e))
        row = {"epoch": e + 1, "train_loss": float(jnp.mean(batch_losses))}
        if run_eval is not None:
            el, ea = run_eval(ts.params, ts.model_state, ex, ey)
            row["eval_loss"], row["eval_accuracy"] = float(el), float(ea)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds")})
        if checkpoint_dir is not None:
            ckpt.save_in(checkpoint_dir, e + 1, params={"params": ts.params,
                         "opt_state": ts.opt_state, "model_state": ts.model_state},
                         key=key, config=config or {}, metadata={"history": history})
        if on_epoch is not None:
            on_epoch(row)
    return FitResult(ts.params, ts.opt_state, ts.model_state, history, len(history))


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
