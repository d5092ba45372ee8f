"""Optimizers by name, and the one place a run's optimizer is decided from its settings.

:func:`optimizer_settings` turns what a caller asked for (a name or nothing, a rate or
nothing, a schedule or nothing, and optionally a recipe's own choice) into the three
recorded settings; :func:`optimizer_from` builds the optax transformation a run config
describes. ``fit``, ``restore_run`` and the ``funnn`` command all go through these two.

The curvature optimizers (``CURVATURE``: ``kfac``, ``diag_ggn``, from :mod:`funnn.optimizers`)
are built from the model and loss too; their update takes the batch, which the training step
passes (:func:`funnn.train.step.batch_args`).
"""

from __future__ import annotations

import optax

from funnn import losses, optimizers
from funnn.core import ConfigError
from funnn.precision import get_policy, loss_scaled

__all__ = ["OPTIMIZERS", "CURVATURE", "SCHEDULES", "DEFAULT_LR", "get_optimizer",
           "optimizer_settings", "optimizer_from", "total_steps"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "kfac", "diag_ggn")
CURVATURE = ("kfac", "diag_ggn")
SCHEDULES = ("constant", "cosine")
# A sensible starting rate per optimizer, used when a name comes without a rate.
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adam": 1e-3, "adamw": 1e-3,
              "rmsprop": 1e-3, "kfac": 1.0, "diag_ggn": 1.0}

_TABLE = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr, weight_decay=1e-4),
    "rmsprop": lambda lr: optax.rmsprop(lr),
}
# Built from the model and loss as well: the adapted step (the rate scales it; 1 is the
# K-FAC paper's rule) with funnn.optimizers' defaults.
_CURVATURE_TABLE = {
    "kfac": lambda lr, model, loss: optimizers.kfac(model, loss, lr),
    "diag_ggn": lambda lr, model, loss: optimizers.diag_ggn(model, loss, lr),
}


def _check_rate(learning_rate) -> float:
    try:
        ok = not isinstance(learning_rate, bool) and 0 < float(learning_rate) < float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"learning rate must be a positive finite number, got "
                          f"{learning_rate!r}", ("fit",))
    return float(learning_rate)


def get_optimizer(name, learning_rate: float, *, schedule: str = "constant",
                  total_steps: int | None = None, model=None,
                  loss=None) -> optax.GradientTransformation:
    """An optax optimizer by name (or pass an optax ``GradientTransformation`` through).

    ``sgd`` is plain gradient descent ``w -= lr * g`` as in the seed notes;
    ``momentum``/``nesterov`` use momentum 0.9; ``adamw`` weight decay 1e-4; ``kfac`` and
    ``diag_ggn`` (:mod:`funnn.optimizers`: the adapted rate and momentum of the K-FAC paper,
    scaled by the learning rate) need the ``model`` and ``loss``.
    ``schedule="cosine"`` decays the rate to 0 over ``total_steps`` (optax's schedule).
    """
    if isinstance(name, optax.GradientTransformation):
        return name
    rate = _check_rate(learning_rate)
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}",
                          ("fit",))
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}",
                          ("fit",))
    lr = optax.cosine_decay_schedule(rate, max(int(total_steps or 1), 1)) \
        if schedule == "cosine" else rate
    if name in _CURVATURE_TABLE:
        if model is None or loss is None:
            raise ConfigError(f"optimizer {name!r} preconditions with the curvature of the "
                              f"model and loss: pass model= and loss=", ("fit",))
        return _CURVATURE_TABLE[name](lr, model, loss)
    return _TABLE[name](lr)


def optimizer_settings(optimizer, learning_rate=None, schedule=None, *,
                       recipe: tuple | None = None) -> dict:
    """``{"optimizer", "learning_rate", "schedule"}`` as a run will use them.

    ``optimizer`` is a name or None (the ``recipe``'s, a ``(name, rate, schedule)``
    triple, else ``"sgd"``). A missing rate or schedule comes from the recipe when the
    optimizer is the recipe's own, else ``DEFAULT_LR[name]`` and ``"constant"``. An optax
    transformation carries its own rate and schedule: it is recorded as
    ``optax:<TypeName>`` with ``None`` for both, and asking for either is a ConfigError.
    """
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None or schedule is not None:
            raise ConfigError("learning_rate and schedule apply to a named optimizer; an optax "
                              "optimizer carries its own (build it with the rate or schedule "
                              "you want)", ("fit",))
        return {"optimizer": f"optax:{type(optimizer).__name__}", "learning_rate": None,
                "schedule": None}
    own_name, own_rate, own_schedule = recipe if recipe is not None else ("sgd", None, None)
    name = optimizer if optimizer is not None else own_name
    own = recipe is not None and name == own_name
    if learning_rate is None:
        learning_rate = own_rate if own else DEFAULT_LR.get(name, 0.1)
    if schedule is None:
        schedule = own_schedule if own else "constant"
    return {"optimizer": name, "learning_rate": _check_rate(learning_rate),
            "schedule": schedule}


def total_steps(config: dict) -> int:
    """Optimizer steps of the whole run a config describes: epochs x batches per epoch."""
    return int(config.get("epochs", 1)) * max(
        int(config.get("num_examples", 1)) // int(config.get("batch_size", 1)), 1)


def optimizer_from(config: dict, optimizer=None, policy=None, *, model=None,
                   loss=None) -> optax.GradientTransformation:
    """The optimizer a run config describes (``optimizer``, ``learning_rate``,
    ``schedule`` over :func:`total_steps`), loss-scaled when its ``precision`` needs it.

    ``optimizer`` (a name or an optax transformation) overrides the config's name; an
    optax transformation is used as it is. ``policy`` (a :class:`~funnn.precision.Policy`)
    overrides the config's ``precision``. ``model`` and ``loss`` (default: the config's
    ``loss`` by name) build the curvature optimizers.
    """
    name = optimizer if optimizer is not None else config.get("optimizer")
    scaled = get_policy(policy if policy is not None else config.get("precision")) \
        .needs_loss_scaling
    if isinstance(name, str) and name in CURVATURE:
        if scaled:
            raise ConfigError(f"optimizer {name!r} does not run under float16 loss scaling; "
                              f"train in f32 or bf16", ("fit",))
        if loss is None and config.get("loss") is not None:
            loss = losses.get(config["loss"])
    opt = get_optimizer(name, config.get("learning_rate") or 0.1,
                        schedule=config.get("schedule") or "constant",
                        total_steps=total_steps(config), model=model, loss=loss)
    if scaled:
        opt = loss_scaled(opt)          # float16 runs keep the loss scale with the optimizer
    return opt
