"""The one epoch: a step function scanned over the batches an order picks.

An *order* says which rows each step of an epoch trains on: :func:`shuffled` (a fresh
permutation per epoch, :func:`funnn.data.epoch_order`) or :func:`dp_sampled` (DP-SGD's
Poisson or fixed-size draw per step). :func:`epoch_fn` scans an ``update`` (a gradient
function and an optimizer, :mod:`funnn.train.step`) over them inside one ``jit``;
:func:`checked_epoch_fn` steps the same pieces one batch at a time and checks each.

Keys are derived, never carried: step ``i`` of the epoch keyed ``k`` uses
``fold_in(k, i)``, so a run interrupted after any epoch and resumed ends bit-for-bit
where the uninterrupted run does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from funnn import core, data, numerics, privacy
from funnn.core import Layer
from funnn.train.step import TrainState, dp_grad, engine_grad, make_update

__all__ = ["Order", "shuffled", "dp_sampled", "epoch_fn", "checked_epoch_fn", "NonFinite",
           "make_epoch", "make_checked_epoch", "make_dp_epoch", "make_sharded_epoch"]


class Order(NamedTuple):
    """``draw(epoch_key) -> (idx, weights)``: ``idx[i]`` the rows of step ``i`` (``weights``
    per row, or None), for ``num_batches`` steps."""

    num_batches: int
    draw: Callable


def shuffled(num_examples: int, batch_size: int) -> Order:
    """A fresh permutation each epoch, cut into whole batches (the rest sit it out)."""
    return Order(num_examples // batch_size,
                 lambda key: (data.epoch_order(key, num_examples, batch_size), None))


def dp_sampled(dp: privacy.DP, batch_size: int, num_examples: int, multiple: int = 1) -> Order:
    """``num_examples // batch_size`` steps, each drawing its own rows
    (:func:`funnn.privacy.dp_sample` keyed by the step's key; Poisson batches padded to a
    ``multiple`` of rows, a mesh's data degree)."""
    sample = privacy.dp_sample(dp, batch_size, num_examples, multiple)
    nb = num_examples // batch_size

    def draw(key):
        return jax.lax.map(lambda i: sample(jax.random.fold_in(key, i)), jnp.arange(nb))

    return Order(nb, draw)


def _rows(tree, b):
    return jax.tree_util.tree_map(lambda a: a[b], tree)


def epoch_fn(update, order: Order | None, *, constrain=None):
    """``epoch(ts, x, y, key) -> (ts, batch_losses)``: ``update`` scanned over one epoch.

    ``x`` is a pytree of inputs (an :class:`~funnn.train.inputs.Inputs` ``(x, side)`` in
    ``fit``): every leaf is batched alike, so side inputs and tuple parts keep their rows.
    With an ``order``, ``x``/``y`` are the whole training set and step ``i`` takes the rows
    ``order.draw(key)`` gives it. Without one, ``x``/``y`` arrive as the epoch's batches
    stacked ``(num_batches, batch, ...)`` (a mesh feeds them so) and step ``i`` takes batch
    ``i`` (and row weights ``w[i]``, DP's Poisson padding, when ``w`` is given).
    ``constrain`` (a sharding constraint) is applied to each batch.
    """
    def step(ts, xb, yb, wb, key, i):
        if constrain is not None:
            xb, yb, wb = constrain(xb), constrain(yb), constrain(wb)
        return update(ts, xb, yb, wb, jax.random.fold_in(key, i))

    def epoch(ts, x, y, key, w=None):
        if order is None:
            n = jax.tree_util.tree_leaves(x)[0].shape[0]
            return jax.lax.scan(lambda t, s: step(t, s[0], s[1], s[2], key, s[3]), ts,
                                (x, y, w, jnp.arange(n)))
        idx, w = order.draw(key)

        def body(t, i):
            b = idx[i]
            return step(t, _rows(x, b), y[b], None if w is None else w[i], key, i)

        return jax.lax.scan(body, ts, jnp.arange(order.num_batches))

    return epoch


class NonFinite(Exception):
    """Raised by a checked epoch: the state before the bad step and that step's batch."""

    def __init__(self, batch, ts, x, y, key):
        super().__init__(f"non-finite at batch {batch}")
        self.batch, self.ts, self.x, self.y, self.key = batch, ts, x, y, key


def checked_epoch_fn(update, order: Order):
    """:func:`epoch_fn` one jitted step at a time, each checked for a non-finite loss,
    parameters or state; raises :class:`NonFinite` with the state before the bad step.

    Same rows and keys as :func:`epoch_fn` (results agree to float rounding). Slower: a
    dispatch and a host sync per step; only used when asked for.
    """
    @core.jit
    def checked(ts, x, y, w, key):
        new, value = update(ts, x, y, w, key)
        return new, value, numerics.all_finite((value, new.params, new.model_state))

    draw = jax.jit(order.draw)

    def epoch(ts, x, y, key):
        idx, w = draw(key)
        values = []
        for i in range(order.num_batches):
            b, k = idx[i], jax.random.fold_in(key, i)
            xb, yb = _rows(x, b), y[b]
            new, value, ok = checked(ts, xb, yb, None if w is None else w[i], k)
            if not bool(ok):
                raise NonFinite(i, ts, xb, yb, k)
            ts = new
            values.append(value)
        return ts, jnp.stack(values)

    return epoch


# ------------------------------------------------------------ the named makers, as before


def make_epoch(model: Layer, loss, optimizer, engine: str, batch_size: int, num_examples: int):
    """A jitted ``epoch(ts, x, y, key) -> (ts, batch_losses)`` that donates ``ts``.

    Shuffles with ``key``, drops the last ``num_examples % batch_size`` examples of
    the permutation (a different few each epoch), and scans the step over batches.
    """
    update = make_update(engine_grad(model, loss, engine), optimizer)
    return core.jit(epoch_fn(update, shuffled(num_examples, batch_size)), donate_argnums=0)


def make_checked_epoch(model: Layer, loss, optimizer, engine: str, batch_size: int,
                       num_examples: int):
    """Like :func:`make_epoch`, but one step at a time, each checked (:func:`checked_epoch_fn`)."""
    update = make_update(engine_grad(model, loss, engine), optimizer)
    return checked_epoch_fn(update, shuffled(num_examples, batch_size))


def make_dp_epoch(model: Layer, loss, optimizer, engine: str, batch_size: int,
                  num_examples: int, dp: privacy.DP):
    """A jitted DP-SGD ``epoch(ts, x, y, key) -> (ts, batch_losses)`` that donates ``ts``.

    ``num_examples // batch_size`` steps; step ``i`` draws its own batch from all of ``x``
    (Poisson or fixed-size, :mod:`funnn.privacy`) and its noise with ``fold_in(key, i)``.
    """
    update = make_update(dp_grad(model, loss, engine, batch_size, dp), optimizer)
    return core.jit(epoch_fn(update, dp_sampled(dp, batch_size, num_examples)),
                    donate_argnums=0)


def make_sharded_epoch(model: Layer, loss, optimizer, engine: str, plan, state_shardings,
                       key_impl):
    """:func:`make_epoch` on a mesh: ``epoch(ts, xb, yb, key_data) -> (ts, batch_losses)``.

    ``xb``/``yb`` are the epoch's batches stacked ``(num_batches, batch, ...)`` and split
    over the mesh's ``data`` axis (``plan.feed``; ``xb`` may be a pytree of inputs, every
    leaf split alike); ``ts`` lives on ``state_shardings`` in
    and out, and is donated. ``key_data`` is a typed key's data for ``key_impl`` (None: a
    raw uint32 key). The same step and per-step keys as :func:`make_epoch`.
    """
    update = make_update(engine_grad(model, loss, engine), optimizer)
    return sharded_epoch(update, plan, state_shardings, key_impl)


def sharded_epoch(update, plan, state_shardings, key_impl, weighted: bool = False):
    """:func:`epoch_fn` over stacked, mesh-fed batches, jitted with the plan's shardings:
    ``run(ts, xb, yb, key_data)``, or with ``weighted`` ``run(ts, xb, yb, key_data, wb)``
    with the batches' row weights ``wb (num_batches, batch)`` split like them."""
    epoch = epoch_fn(update, None, constrain=lambda tree: jax.tree_util.tree_map(
        lambda a: jax.lax.with_sharding_constraint(a, plan.rows), tree))

    def run(ts: TrainState, xb, yb, key_data, wb=None):
        key = key_data if key_impl is None else jax.random.wrap_key_data(key_data,
                                                                          impl=key_impl)
        return epoch(ts, xb, yb, key, wb)

    shardings = (state_shardings, plan.batches, plan.batches, plan.replicated)
    return core.jit(run, in_shardings=shardings + ((plan.batches,) if weighted else ()),
                    out_shardings=(state_shardings, plan.replicated), donate_argnums=0)
