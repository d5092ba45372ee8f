"""Reading a finished (or interrupted) run back: :func:`restore_run`."""

from __future__ import annotations

import os

import jax

from funnn import checkpoint as ckpt
from funnn import rundir
from funnn.core import CheckpointError, Layer
from funnn.train.optim import CURVATURE, OPTIMIZERS, optimizer_from

__all__ = ["restore_run"]


def restore_run(directory, model: Layer | None = None, optimizer=None, *, checkpoint=None):
    """Restore a run written by :func:`fit` or ``funnn train``: a :class:`Checkpoint`.

    ``directory`` is a run directory (its ``checkpoints/``) or a ``checkpoint_dir``;
    ``checkpoint`` picks a file (default: the newest). The optimizer state comes back
    in optax's own classes, ready for ``optimizer.update``: ``optimizer`` is a name
    or optax transformation, by default the named optimizer the run's config
    records (built by :func:`~funnn.train.optim.optimizer_from`, as ``fit`` built it; a
    curvature optimizer, ``kfac`` or ``diag_ggn``, only with ``model``: without it the
    optimizer state comes back as plain dicts and tuples).
    With ``model`` (and an ``input_shape`` in the config, as the CLI records) the params
    are checked against the model's own shapes. A run trained under a mixed-precision
    policy records it (``config["precision"]``); predict with
    ``precision.apply_policy(model, config["precision"])`` to compute as it trained.
    """
    directory = os.fspath(directory)
    path = os.fspath(checkpoint) if checkpoint is not None else None
    if path is None:
        for d in (os.path.join(directory, "checkpoints"), directory):
            if os.path.isdir(d) and (path := ckpt.latest(d)) is not None:
                break
    if path is None:
        raise CheckpointError(f"no checkpoint in {directory} (nor in its checkpoints/)")
    plain = ckpt.restore(path)
    config = rundir.check_config(plain.config, path)
    like: dict = {"params": plain.params}
    if model is not None and config.get("input_shape") is not None:
        in_shape = (None,) + tuple(config["input_shape"])
        like["params"] = jax.eval_shape(lambda k: model.init(k, in_shape)[1], jax.random.key(0))
    if optimizer is None and config.get("optimizer") in OPTIMIZERS and (
            model is not None or config["optimizer"] not in CURVATURE):
        optimizer = config["optimizer"]
    if optimizer is not None:
        opt = optimizer_from(config, optimizer, model=model)
        like["opt_state"] = jax.eval_shape(opt.init, plain.params)
    return ckpt.restore(path, like=like)
