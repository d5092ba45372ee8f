"""Training: one jitted, donated step; epochs as one compiled scan; runs you can resume.

``fit`` shuffles mini-batches with an explicit PRNG key, runs a whole epoch as a
single ``lax.scan`` of the step inside one ``jit`` (no Python work per batch),
evaluates on a held-out split, keeps a history, and can keep a run directory
(checkpoints every epoch, resume, metrics). The gradient engine is a choice:
``"autodiff"``, ``"manual"`` (the hand-written backward) or ``"bridge"`` (autodiff
through the hand-written backward as a ``custom_vjp`` rule); all three give the same
trajectory within float tolerance.

Keys are derived, never carried: epoch ``e`` shuffles with ``fold_in(key, e)`` and
step ``i`` of it drops out with ``fold_in(epoch_key, i)``. So a run interrupted
after epoch ``k`` and resumed from its checkpoint ends bit-for-bit where the
uninterrupted run does.

The pieces, each replaceable alone (``fit`` composes them):

* :mod:`~funnn.train.settings`: every argument resolved and checked once (``Settings``);
* :mod:`~funnn.train.inputs`: the data form ``(x, y)`` or ``(x, y, side)``, checked once;
* :mod:`~funnn.train.optim`: optimizers by name, ``optimizer_from(config)``;
* :mod:`~funnn.train.step`: ``TrainState``, gradient functions, the update, ``make_step``;
* :mod:`~funnn.train.epoch`: orders (shuffle, DP sampling) and the one epoch maker;
* :mod:`~funnn.train.placement`: one device or a mesh (place, feed, gather, agree);
* :mod:`~funnn.train.loop`: the epoch loop and ``TrainingDiverged``;
* :mod:`~funnn.train.evaluation`, :mod:`~funnn.train.restore`;
* :mod:`~funnn.train.pipeline`: ``fit`` itself. The run directory is :mod:`funnn.rundir`'s.
"""

from funnn import losses
from funnn.core import CheckpointError, ConfigError, DataError
from funnn.train.epoch import (
    make_checked_epoch,
    make_dp_epoch,
    make_epoch,
    make_sharded_epoch,
)
from funnn.train.evaluation import evaluate, make_evaluate
from funnn.train.loop import TrainingDiverged
from funnn.train.optim import (
    DEFAULT_LR,
    OPTIMIZERS,
    SCHEDULES,
    get_optimizer,
    optimizer_from,
    optimizer_settings,
)
from funnn.train.pipeline import FitResult, fit
from funnn.train.restore import restore_run
from funnn.train.settings import Settings, resolve
from funnn.train.step import ENGINES, TrainState, as_loss, get_engine, make_step

__all__ = ["fit", "FitResult", "TrainingDiverged", "make_step", "make_epoch",
           "make_checked_epoch", "evaluate", "get_engine", "get_optimizer", "as_loss",
           "restore_run", "make_sharded_epoch", "make_dp_epoch", "ENGINES", "OPTIMIZERS",
           "SCHEDULES", "DEFAULT_LR", "TrainState", "make_evaluate", "optimizer_from",
           "optimizer_settings", "Settings", "resolve"]

# Kept importable for code that reached them through this module.
_REEXPORTED = (losses, CheckpointError, ConfigError, DataError)
