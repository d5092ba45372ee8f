"""The epoch loop: run an epoch, evaluate, record a history row, stop on divergence, save.

:func:`train_epochs` is everything ``fit`` does per epoch; what an epoch runs, where it
runs and where it saves come in as pieces (``run_epoch``, ``save``), so the loop itself
knows nothing of meshes, DP or run directories.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from funnn import losses, numerics
from funnn.core import FunnnError
from funnn.train.epoch import NonFinite
from funnn.train.inputs import Inputs

__all__ = ["TrainingDiverged", "train_epochs"]


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


_KEYS = {"training loss": "train_loss", "test loss": "eval_loss"}


def _kept(path) -> str:
    return f" (the last finite checkpoint is {path})" if path else ""


def _step_diverged(s, bad: NonFinite, e: int, history: list, last_path) -> TrainingDiverged:
    """The error of a checked epoch's non-finite step, naming the first bad place."""
    nb = s.num_examples // s.batch_size
    step = e * nb + bad.batch + 1
    x, side = bad.x if isinstance(bad.x, Inputs) else (bad.x, {})
    loss_weights, context = losses.split_side(side)
    where = numerics.locate(s.model, losses.weighted(s.loss, loss_weights), bad.ts.params, x,
                            bad.y, key=bad.key, state=bad.ts.model_state, **context)
    history.append({"epoch": e + 1, "train_loss": float("nan")})
    return TrainingDiverged(
        f"step {step} (epoch {e + 1}, batch {bad.batch + 1}): {where} became non-finite; "
        f"training stopped{_kept(last_path)}", ("fit",), history=history, epoch=e + 1,
        quantity="step", step=step, where=where, checkpoint=last_path)


def _check_row(row: dict, history: list, last_path) -> None:
    bad = [q for q, k in _KEYS.items() if k in row and not math.isfinite(row[k])]
    if bad:
        raise TrainingDiverged(
            f"epoch {row['epoch']}: the {bad[0]} is {row[_KEYS[bad[0]]]}; training stopped"
            f"{_kept(last_path)}. Lower the learning rate, or rerun with check_numerics=True "
            f"to find the first layer and step that went non-finite",
            ("fit",), history=history, epoch=row["epoch"], quantity=bad[0],
            checkpoint=last_path)


def train_epochs(s, run_epoch: Callable, ts, history: list, start: int, key, train_xy,
                 evaluate: Callable | None, *, progress, on_epoch, save: Callable):
    """Epochs ``start .. s.epochs``: train, evaluate, check, save; ``(ts, history)``.

    ``s`` is the run's :class:`~funnn.train.settings.Settings`; ``run_epoch(ts, x, y,
    epoch_key)`` runs one epoch; ``evaluate(ts)`` gives ``(loss, accuracy)`` on the
    held-out split; ``save(epoch, ts, history)`` returns the checkpoint's path or None.
    """
    x, y = train_xy
    last_path = None
    bar = _progress(range(start, s.epochs), progress, s.epochs, start)
    for e in bar:
        t0 = time.perf_counter()
        try:
            ts, batch_losses = run_epoch(ts, x, y, jax.random.fold_in(key, e))
        except NonFinite as bad:
            raise _step_diverged(s, bad, e, history, last_path) from None
        row = {"epoch": e + 1, "train_loss": float(jnp.mean(batch_losses))}
        if evaluate is not None:
            el, ea = evaluate(ts)
            row["eval_loss"], row["eval_accuracy"] = float(el), float(ea)
        row["seconds"] = time.perf_counter() - t0
        if s.dp is not None:
            row["epsilon"] = s.dp.epsilon((e + 1) * (s.num_examples // s.batch_size),
                                          s.batch_size, s.num_examples)
        history.append(row)
        _check_row(row, history, last_path)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v:.4f}" for k, v in row.items()
                             if k not in ("epoch", "seconds")})
        last_path = save(e + 1, ts, history) or last_path
        if on_epoch is not None:
            on_epoch(row)
    return ts, history


def _progress(it, progress, total, start):
    if progress is False:
        return it
    from tqdm.auto import tqdm  # a well-kept progress bar; hides itself off a terminal

    return tqdm(it, total=total, initial=start, desc="epochs", unit="epoch",
                disable=None if progress is None else not progress, leave=True)
