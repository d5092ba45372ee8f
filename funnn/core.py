"""The layer contract, shape helpers, tree utilities and error types.

A :class:`Layer` is plain data: a name and pure functions.

Stateless layers (most of them)::

    init(key, in_shape)                           -> (out_shape, params)
    apply(params, x, *, key=None, train=False)    -> y                      # autodiff path
    forward(params, x, *, key=None, train=False)  -> (y, res)               # manual path
    backward(params, res, dy)                     -> (dparams, dx)          # hand-written

Stateful layers (batch-norm running statistics) also have ``init_state`` and take
and return their state explicitly; nothing is mutated::

    init_state(in_shape)                                  -> state
    apply(params, x, *, state, key=None, train=False)     -> (y, new_state)
    forward(params, x, *, state, key=None, train=False)   -> (y, res, new_state)
    backward(params, res, dy)                             -> (dparams, dx)

Whether a layer is stateful is a static fact (``layer.stateful``), fixed when the
layer is built, so combinators and engines decide it once, not per call.
:func:`run_apply` and :func:`run_forward` call either kind with one signature.

Shapes: the leading axis is the batch axis. ``in_shape`` given to ``init`` may use
``None`` or ``-1`` for the batch; ``out_shape`` keeps the same placeholder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FunnnError", "ShapeError", "ConfigError", "DTypeError", "KeyMissingError",
    "StateError", "DataError", "CheckpointError",
    "Layer", "run_apply", "run_forward", "layer_scope", "split_key",
    "check_in_shape", "check_rank", "check_features", "check_floating",
    "param_count", "tree_paths", "path_str", "summary",
]


# --------------------------------------------------------------------------- errors


class FunnnError(Exception):
    """Base of funnn's errors: a message and the path of the layer that raised it.

    The path grows as the error travels up through combinators, so the final
    message reads ``serial[2] dense(10): expected input features 30, got 20 ...``.
    """

    def __init__(self, message: str, path: Sequence[str] = ()):
        self.message = message
        self.path = tuple(path)
        super().__init__(self._text())

    def _text(self) -> str:
        where = " ".join(self.path)
        return f"{where}: {self.message}" if where else self.message

    def __str__(self) -> str:
        return self._text()

    def under(self, prefix: str) -> "FunnnError":
        """The same error with ``prefix`` prepended to its layer path."""
        err = type(self).__new__(type(self))
        FunnnError.__init__(err, self.message, (prefix,) + self.path)
        return err


class ShapeError(FunnnError, ValueError):
    """An input, parameter or init shape does not fit the layer."""


class ConfigError(FunnnError, ValueError):
    """A hyper-parameter or name is invalid (unknown activation, stride < 1, ...)."""


class DTypeError(FunnnError, TypeError):
    """An array has a dtype the layer cannot use."""


class KeyMissingError(FunnnError, ValueError):
    """A layer needs a PRNG key (dropout in training mode) and got none."""


class StateError(FunnnError, ValueError):
    """A stateful layer's state is missing or does not match its shape."""


class DataError(FunnnError, ValueError):
    """A data file or directory is missing, corrupt or inconsistent."""


class CheckpointError(FunnnError, ValueError):
    """A checkpoint is missing, truncated, tampered with or does not match."""


@contextlib.contextmanager
def layer_scope(name: str) -> Iterator[None]:
    """Prefix ``name`` to the path of any funnn error raised inside the block.

    Shape checks run while tracing, so under ``jit`` this costs nothing per step.
    """
    try:
        yield
    except FunnnError as err:
        raise err.under(name) from None


# --------------------------------------------------------------------------- layer


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer: a name and pure functions (see the module docstring).

    ``children`` lists ``(label, layer)`` pairs for combinators, used by
    :func:`summary`: labels ``"[i]"`` index a tuple of params; a single child with
    another label (``"/residual"``) shares its parent's params. Leaves have none. ``init_state`` is ``None`` for stateless
    layers.
    """

    name: str
    init: Callable
    apply: Callable
    forward: Callable
    backward: Callable
    init_state: Callable | None = None
    children: tuple = ()

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    def __repr__(self) -> str:
        return f"Layer({self.name})"


def run_apply(layer: Layer, params, x, *, state=None, key=None, train=False):
    """Call ``layer.apply`` uniformly: returns ``(y, new_state)`` (state ``None`` if stateless)."""
    if layer.init_state is None:
        return layer.apply(params, x, key=key, train=train), None
    return layer.apply(params, x, state=state, key=key, train=train)


def run_forward(layer: Layer, params, x, *, state=None, key=None, train=False):
    """Call ``layer.forward`` uniformly: returns ``(y, res, new_state)``."""
    if layer.init_state is None:
        y, res = layer.forward(params, x, key=key, train=train)
        return y, res, None
    return layer.forward(params, x, state=state, key=key, train=train)


def split_key(key, n: int) -> tuple:
    """``n`` independent keys from ``key``, or ``n`` times ``None`` when ``key`` is ``None``."""
    if key is None:
        return (None,) * n
    if n == 1:
        return (key,)
    return tuple(jax.random.split(key, n))


# --------------------------------------------------------------------------- shapes


def check_in_shape(name: str, in_shape, min_rank: int = 2, max_rank: int | None = None, *,
                   allow_none: Sequence[int] | bool = (0,)) -> tuple:
    """Validate an ``init`` shape: a tuple of positive ints, ``None`` where a size is free.

    Returns the shape as a tuple with a ``-1`` batch entry turned into ``None``.
    ``min_rank`` counts the batch axis: dense layers need ``(batch, features)``.
    ``allow_none`` lists the axes that may be ``None`` (negative ones count from the end;
    default only the batch axis 0, where ``-1`` also means ``None``); ``True`` allows every
    axis, for layers whose params do not depend on the free sizes (they check the axes they
    do need themselves).
    """
    try:
        shape = tuple(in_shape)
    except TypeError:
        raise ShapeError(f"init shape must be a tuple like (None, features), got {in_shape!r}",
                         (name,)) from None
    if len(shape) < min_rank or (max_rank is not None and len(shape) > max_rank):
        want = f"rank {min_rank}" if max_rank == min_rank else (
            f"rank >= {min_rank}" if max_rank is None else f"rank {min_rank}..{max_rank}")
        raise ShapeError(
            f"init shape {shape} has rank {len(shape)}, expected {want} including the batch "
            f"axis; give e.g. (None, features) with None for the batch", (name,))
    if allow_none is True:
        free = set(range(len(shape)))
    elif allow_none is False:
        free = set()
    else:
        free = {a % len(shape) for a in allow_none if -len(shape) <= a < len(shape)}
    out = []
    for i, d in enumerate(shape):
        if d is None and i in free or (i == 0 and d == -1 and 0 in free):
            out.append(None)
        elif d is None:
            only = ("only the batch axis may be None" if free == {0} else
                    "no axis may be None" if not free else
                    f"only axes {', '.join(map(str, sorted(free)))} may be None")
            raise ShapeError(f"init shape {shape} has no size on axis {i}; {only}; give that "
                             f"axis its size", (name,))
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0:
            out.append(int(d))
        else:
            raise ShapeError(f"init shape {shape}: axis {i} must be a positive int"
                             f"{' or None' if i in free else ''}, got {d!r}", (name,))
    return tuple(out)


def check_rank(name: str, x, min_rank: int, max_rank: int | None = None, what: str = "") -> None:
    """Raise :class:`ShapeError` unless ``min_rank <= x.ndim <= max_rank``."""
    nd = jnp.ndim(x)
    if nd < min_rank or (max_rank is not None and nd > max_rank):
        want = (f"rank {min_rank}" if max_rank == min_rank else
                f"rank >= {min_rank}" if max_rank is None else f"rank {min_rank}..{max_rank}")
        hint = f" {what}" if what else ""
        raise ShapeError(f"expected input of {want}{hint}, got shape {jnp.shape(x)}", (name,))


def check_features(name: str, x, expected: int, axis: int = -1, what: str = "input features") -> None:
    """Raise :class:`ShapeError` unless ``x.shape[axis] == expected``."""
    shape = jnp.shape(x)
    if not shape:
        raise ShapeError(f"expected {what} {expected} on axis {axis}, got a scalar", (name,))
    if shape[axis] != expected:
        raise ShapeError(f"expected {what} {expected}, got {shape[axis]} (input shape {shape})",
                         (name,))


def check_floating(name: str, x, what: str = "input") -> None:
    """Raise :class:`DTypeError` unless ``x`` has a floating dtype."""
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise DTypeError(f"expected a floating-point {what}, got dtype {dt}", (name,))


# --------------------------------------------------------------------------- trees


def path_str(path) -> str:
    """A compact, readable tree path: ``[0]['W']`` becomes ``0.W``."""
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(p.name)
        else:
            parts.append(str(p))
    return ".".join(parts) if parts else "<root>"


def tree_paths(tree) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` for every leaf of ``tree``, paths as in :func:`path_str`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def param_count(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def _summary_rows(layer: Layer, params, path: str, rows: list) -> None:
    kids = layer.children
    if len(kids) == 1 and not kids[0][0].startswith("["):
        # a wrapper (residual) whose params are its body's
        label, child = kids[0]
        _summary_rows(child, params, f"{path}{label}", rows)
        return
    if kids and isinstance(params, (tuple, list)) and len(params) == len(kids):
        for (label, child), p in zip(kids, params):
            _summary_rows(child, p, f"{path}{label}", rows)
        return
    leaves = tree_paths(params)
    shapes = ", ".join(f"{k}{tuple(jnp.shape(v))}" for k, v in leaves) if leaves else "-"
    rows.append((path or "<root>", layer.name, shapes, param_count(params)))


def summary(model: Layer, params) -> str:
    """A printable table: layer path, layer, parameter shapes, parameter count, and a total."""
    rows: list = []
    _summary_rows(model, params, "", rows)
    head = ("path", "layer", "parameters", "count")
    body = [(p, n, s, f"{c:,}") for p, n, s, c in rows]
    body.append(("", "total", "", f"{param_count(params):,}"))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(4)]

    def fmt(r):
        return "  ".join(r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in range(4))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep] + [fmt(r) for r in body[:-1]] + [sep, fmt(body[-1])])
