"""Where a run lives: one device, or a mesh of devices over one or several processes.

A placement answers the questions ``fit`` asks, so ``fit`` never tests for a mesh: it
``place``s the training state, ``feed``s each epoch (builds the jitted epoch runner),
``gather``s the state for a checkpoint, ``agree``s with the other processes before and
after touching the run directory, and says whether this process ``is_main`` (writes
files).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from funnn import core
from funnn.train.epoch import Order, checked_epoch_fn, epoch_fn, sharded_epoch
from funnn.train.step import TrainState

__all__ = ["OneDevice", "OnMesh", "placement"]


class OneDevice:
    """The whole run on the default device, in this one process."""

    is_main = True

    def place(self, ts: TrainState) -> TrainState:
        return ts

    def place_eval(self, ex, ey):
        return ex, ey

    def feed(self, update, order: Order, ts: TrainState, key, *, checked: bool = False):
        """``run(ts, x, y, epoch_key) -> (ts, batch_losses)``: the jitted epoch (donating
        ``ts``), or with ``checked`` the one-step-at-a-time runner."""
        if checked:
            return checked_epoch_fn(update, order)
        return core.jit(epoch_fn(update, order), donate_argnums=0)

    def gather(self, tree):
        return tree

    def agree(self, error=None, value: int = 0) -> None:
        """Nothing to agree with: one process."""

    def agree_settings(self, settings: dict) -> None:
        """Nothing to compare with: one process."""


class OnMesh:
    """Data parallel on a mesh (``parallel.Plan``): each batch split over ``data``, the
    parameters and optimizer state laid out by the plan, every process feeding its rows."""

    def __init__(self, plan):
        from funnn import parallel

        self.plan, self._parallel = plan, parallel
        self.is_main = parallel.is_main()

    def shardings(self, ts: TrainState) -> TrainState:
        p = self.plan
        return TrainState(p.params, p.like(ts.opt_state),
                          jax.tree_util.tree_map(lambda _: p.replicated, ts.model_state))

    def place(self, ts: TrainState) -> TrainState:
        return TrainState(*(self.plan.place(t, s) for t, s in zip(ts, self.shardings(ts))))

    def place_eval(self, ex, ey):
        p = self.plan       # split over data when it divides the split, else replicated
        n = int(jax.tree_util.tree_leaves(ex)[0].shape[0])
        split = p.rows if n % p.data_size == 0 else p.replicated
        return jax.tree_util.tree_map(lambda a: p.place(a, split), (ex, ey))

    def feed(self, update, order: Order, ts: TrainState, key, *, checked: bool = False):
        """``run(ts, x, y, epoch_key)``: the epoch's order drawn on the host (the same as on
        one device), each process feeding its own rows of every batch (and of the row
        weights DP's Poisson batches carry)."""
        assert not checked, "settings refuse check_numerics on a mesh"
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        draw = jax.jit(order.draw)
        weighted = jax.eval_shape(draw, key)[1] is not None      # DP's Poisson padding
        epoch = sharded_epoch(update, self.plan, self.shardings(ts),
                              jax.random.key_impl(key) if typed else None, weighted)
        host: dict = {}

        def run(ts, x, y, k):
            if not host:        # x: a pytree of inputs (side inputs, tuple parts) fed alike
                host.update(x=jax.tree_util.tree_map(np.asarray, x), y=np.asarray(y))
            idx, w = jax.tree_util.tree_map(np.asarray, draw(k))
            kd = self.plan.place(jax.random.key_data(k) if typed else k, self.plan.replicated)
            xb = jax.tree_util.tree_map(lambda a: self.plan.feed(a, idx), host["x"])
            yb = self.plan.feed(host["y"], idx)
            if not weighted:
                return epoch(ts, xb, yb, kd)
            rows = np.arange(idx.size).reshape(idx.shape)       # w's own rows, fed alike
            return epoch(ts, xb, yb, kd, self.plan.feed(w.reshape(-1), rows))

        return run

    def gather(self, tree):
        return self._parallel.gather(tree)     # a collective: every process takes part

    def agree(self, error=None, value: int = 0) -> None:
        self._parallel.agree(error, value, "the epoch to start from")

    def agree_settings(self, settings: dict) -> None:
        """Every process runs the same settings (a collective, before any file)."""
        from funnn import distributed

        distributed.agree_settings(settings)


def placement(plan) -> OneDevice | OnMesh:
    """The placement a resolved plan asks for (None: one device)."""
    return OneDevice() if plan is None else OnMesh(plan)
