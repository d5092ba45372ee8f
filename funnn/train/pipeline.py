"""``fit``: the training pipeline, composed of the small pieces of :mod:`funnn.train`.

Settings resolved and checked once (:mod:`~funnn.train.settings`), a placement on one
device or a mesh (:mod:`~funnn.train.placement`), the run directory claimed and resumed
by :mod:`funnn.rundir`, then the epoch loop (:mod:`~funnn.train.loop`) over the one
epoch maker (:mod:`~funnn.train.epoch`).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from funnn import __version__, privacy, rundir
from funnn.core import FunnnError, Layer
from funnn.train import inputs
from funnn.train.evaluation import make_evaluate
from funnn.train.loop import TrainingDiverged, train_epochs
from funnn.train.placement import placement
from funnn.train.settings import Settings, as_key, resolve
from funnn.train.step import TrainState

__all__ = ["fit", "FitResult"]


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


def fit(model: Layer, params, data, loss, optimizer="sgd", *,
        learning_rate: float | None = None, epochs: int = 10, batch_size: int = 32,
        engine: str = "autodiff", key=None, schedule: str | None = None,
        eval_data=None, model_state=None, progress: bool | None = None,
        checkpoint_dir=None, resume: bool | str = False, overwrite: bool = False,
        from_checkpoint=None, keep: int | None = 3, config: dict | None = None,
        extras=None, check_numerics: bool = False, on_epoch: Callable | None = None,
        run_id: str | None = None, log: Callable[[str], Any] | None = None,
        mesh=None, sharding="replicated", precision=None,
        dp: privacy.DP | None = None, run_dir=None) -> FitResult:
    """Train ``model`` on ``data = (x, y)`` or ``(x, y, side)`` (or a Dataset with ``.x``/``.y``):
    ``x`` an array or a tuple of arrays, ``side`` a dict of arrays, batch axis first (``mask``,
    ``lengths`` to the model, ``weights`` to the loss), batched with the examples; a loss
    ``with_ignore_index(-100)`` skips targets of -100; "mean" then averages over the valid tokens
    and DP clips each example's own mean. Same form for ``eval_data`` (:mod:`funnn.train.inputs`).

    ``loss``: a funnn Loss, a loss name, or (autodiff and bridge engines) a plain
    ``loss(pred, y)`` callable. ``optimizer`` is a name (``sgd``, ``momentum``, ``nesterov``,
    ``adam``, ``adamw``, ``rmsprop``; ``kfac``, ``diag_ggn``: :mod:`funnn.optimizers`), with
    ``learning_rate`` (default per optimizer: ``DEFAULT_LR``, 0.1 for sgd, 1e-3 for adam)
    and ``schedule`` (``constant`` default, or ``cosine``: decay to 0 over the run), or an optax
    transformation, which carries its own rate and schedule: passing ``learning_rate`` or
    ``schedule`` with one is a ConfigError.
    ``progress`` shows a tqdm bar (``None``: only when stderr is a terminal).

    Run directory (:mod:`funnn.rundir`, the same rules and files as ``funnn train``):
    with ``run_dir=D`` the run writes ``D/run.json``, a checkpoint per epoch in
    ``D/checkpoints/``, and at the end (or on divergence) ``D/metrics.json`` and
    ``D/curves.png``; with ``checkpoint_dir=C`` the same files all go in ``C``. A
    checkpoint (the newest ``keep`` of this run are kept) holds params, optimizer state,
    model state, key, ``extras``, the run's config and history. The directory belongs to
    one run and is locked while it trains. A directory holding another run is refused
    unless ``resume=True`` (continue it: every setting must match the saved one, except
    that ``epochs`` may grow), ``resume="auto"`` (continue if there is something to
    continue) or ``overwrite=True`` (delete that run's files first). ``from_checkpoint``
    names the checkpoint to resume from (default: the newest) or, without ``resume``,
    one whose params (and model state) start a new run. Every argument is checked
    before the directory is touched.

    A non-finite training or evaluation loss ends training at the end of that
    epoch with :class:`TrainingDiverged` (its checkpoint is not written, so the
    last one on disk is finite). ``check_numerics=True`` runs steps one at a
    time and checks every step; the error then names the step and the first
    layer whose output or gradient went non-finite. Off, it costs nothing.

    ``run_id`` names a new run (default: random); ``log`` receives one-line notices.

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

    ``dp`` (a :class:`funnn.privacy.DP`) trains with DP-SGD (:mod:`funnn.privacy`): each
    step samples its batch, clips every example's gradient, adds noise from the step's key;
    history rows gain ``epsilon`` and the config the ``dp_*`` settings (compared on resume).
    It runs under ``precision`` (norms in float32) and on a ``mesh`` (batches split over
    ``data``); a stateful model or ``check_numerics`` with ``dp`` raise :class:`ConfigError`.

    History rows hold ``epoch``, ``train_loss`` (mean over the epoch's batches),
    ``eval_loss``, ``eval_accuracy``, ``seconds`` and, with ``dp``, ``epsilon``.
    """
    s, train_xy, held_out = resolve(
        model, params, data, loss, optimizer, learning_rate=learning_rate, epochs=epochs,
        batch_size=batch_size, engine=engine, schedule=schedule, eval_data=eval_data,
        check_numerics=check_numerics, mesh=mesh, sharding=sharding, precision=precision,
        dp=dp, config=config, resume=resume, overwrite=overwrite,
        from_checkpoint=from_checkpoint, run_dir=run_dir, checkpoint_dir=checkpoint_dir,
        keep=keep)
    place = placement(s.plan)
    key_given, key = key is not None, as_key(key)
    ts = _first_state(s, params, model_state, from_checkpoint if not resume else None,
                      train_xy[0])
    run_id, start, history, resumed_from = run_id or uuid.uuid4().hex[:12], 0, [], None
    run, owed = None, True      # this process owes the others one agreement (several processes)
    try:
        place.agree_settings({**s.config, "funnn": __version__})     # before any file
        run = _claim(run_dir, checkpoint_dir, resume, overwrite, from_checkpoint, place, log)
        if run is not None:
            got = run.resume(ts._asdict(), s.config, key, key_given)
            if got is not None:
                s, ts, key, run_id = _resumed(s, got, run_id, log)
                start, history, resumed_from = got.start, got.history, got.path
            owed = False
            place.agree(None, start)        # every process decided before process 0 writes
            owed = True
            run.begin(run_id, s.config, fresh=got is None)
        owed = False
        place.agree(None, start)
        ts = place.place(ts)
        run_epoch = place.feed(s.update(), s.order(), ts, key, checked=s.check_numerics)
        ts, history = train_epochs(
            s, run_epoch, ts, history, start, key, train_xy, _evaluator(s, place, held_out),
            progress=progress if place.is_main else False, on_epoch=on_epoch,
            save=_saver(run, place, s, key, keep, extras, run_id))
        if run is not None:
            run.finish("completed", run_id, s.config, history)
    except (TrainingDiverged, KeyboardInterrupt) as err:
        _stopped(run, run_id, s.config, history, err)
        raise
    except (FunnnError, OSError) as err:
        if owed:
            place.agree(err, 0)     # the other processes stop too, instead of waiting
        raise
    finally:
        if run is not None:
            run.release()
    return FitResult(ts.params, ts.opt_state, ts.model_state, history, len(history), run_id,
                     resumed_from, s.config)


def _stopped(run, run_id, config: dict, history: list, err: BaseException) -> None:
    """``metrics.json`` of a run that stopped early: diverged (its history up to the bad
    epoch), or interrupted (Ctrl-C, SIGTERM in ``funnn train``): the history of its last
    complete checkpoint, which ``resume`` continues from."""
    if run is None:
        return
    if isinstance(err, TrainingDiverged):
        run.finish("diverged", run_id, config, err.history, err)
    else:
        run.finish("interrupted", run_id, config, history[:run.saved(run_id)])


def _first_state(s: Settings, params, model_state, start_from, x) -> TrainState:
    """The state a fresh run starts from: given or checkpointed params, a fresh optimizer."""
    if s.model.init_state is not None and model_state is None:     # model.stateful
        model_state = s.model.init_state(inputs.in_shape(x.x))
    if start_from is not None:
        ck = rundir.read_start(start_from, {"params": params, "model_state": model_state})
        params, model_state = ck.params, ck.model_state
    # The epoch donates its state buffers; copy once so the caller's arrays stay valid.
    params, model_state = jax.tree_util.tree_map(jnp.copy, (params, model_state))
    return TrainState(params, s.optimizer.init(params), model_state)


def _claim(run_dir, checkpoint_dir, resume, overwrite, from_checkpoint, place, log):
    """The claimed :class:`funnn.rundir.Run`, or None when the run keeps no directory; its
    notices (checkpoints whose name and header disagree) said in ``log``."""
    if run_dir is None and checkpoint_dir is None:
        return None
    root = os.fspath(run_dir if run_dir is not None else checkpoint_dir)
    cdir = os.path.join(root, "checkpoints") if run_dir is not None else root
    run = rundir.Run.claim(root, cdir, resume=resume, overwrite=overwrite,
                           from_checkpoint=from_checkpoint, main=place.is_main)
    if log is not None and place.is_main and run.found is not None:
        for line in run.found.notes():
            log(f"note: {line}")
    return run


def _resumed(s: Settings, got: rundir.Resumed, run_id: str, log):
    """``(settings, state, key, run id)`` of a resumed run, said in ``log``. The run keeps
    the ``from_checkpoint`` it started from in its config."""
    c, run_id = got.checkpoint, got.run_id or run_id
    saved = c.config or {}
    if "from_checkpoint" in saved and "from_checkpoint" not in s.config:
        s = dataclasses.replace(s, config={**s.config,
                                           "from_checkpoint": saved["from_checkpoint"]})
    if log is not None:
        log(f"resuming run {run_id} from epoch {got.start} ({got.path})")
        planned = saved.get("epochs")
        if saved.get("schedule") not in (None, "constant") and planned != s.epochs:
            log(f"note: run {run_id} planned {planned} epochs; its {saved['schedule']} "
                f"schedule now spans {s.epochs}, so the learning rates from epoch "
                f"{got.start + 1} on differ from the planned run's")
        if got.start == s.epochs:
            log(f"run {run_id} has already trained all {s.epochs} epochs; nothing to train "
                f"(ask for more epochs to continue)")
    return s, TrainState(c.params, c.opt_state, c.model_state), got.key, run_id


def _evaluator(s: Settings, place, held_out):
    """``evaluate(ts) -> (loss, accuracy)`` on the held-out split, or None without one."""
    if held_out is None:
        return None
    ex, ey = place.place_eval(*held_out)
    run = make_evaluate(s.model, s.loss)
    return lambda ts: run(ts.params, ts.model_state, ex.x, ey, ex.side)


def _saver(run, place, s: Settings, key, keep, extras, run_id):
    """``save(epoch, ts, history) -> path | None``: every process gathers, process 0 writes,
    and a failed write stops every process."""
    def save(e, ts, history):
        if run is None:
            return None
        ts = place.gather(ts)       # a collective: every process takes part
        path, failed = None, None
        try:
            path = run.save(e, keep=keep, run_id=run_id, history=history, params=ts.params,
                            opt_state=ts.opt_state, model_state=ts.model_state, key=key,
                            extras=extras, config=s.config)
        except (FunnnError, OSError) as err:
            failed = err
        place.agree(failed, e)
        if failed is not None:
            raise failed
        return path

    return save
