"""The data form ``fit`` and the tools take: ``(x, y)`` or ``(x, y, side)``.

``x`` is an array or a tuple of arrays (a multi-part input: ``(x, context)`` for
``cross_attention``, ``(x, mask)`` for ``lstm(masked=True)``); ``y`` an array; ``side`` a
dict of arrays with the batch axis first, passed to the model as keyword side inputs
(``{"mask": mask}``, ``{"lengths": lengths}``), except ``"weights"``, which weigh the loss's
terms (:func:`funnn.losses.split_side`). Every part holds the same number of examples, and
a batch takes the same rows of every part. Anything else is one
:class:`~funnn.core.DataError` naming this form; a side input no layer reads is a
:class:`~funnn.core.ConfigError`.

The loss sees a padding mask in one of two ways: integer targets equal to the loss's
``ignore_index`` (``losses.softmax_cross_entropy.with_ignore_index(-100)``, PyTorch's
convention: set the padded positions' targets to -100), or ``side["weights"]`` (per example
``(batch,)`` or per token ``(batch, time)``, e.g. the 0/1 mask). Either way a "mean" loss
averages over the batch's valid tokens, and DP-SGD clips each example's gradient of the mean
over its own valid tokens.

Inside the training loop the model's inputs travel as one pytree, :class:`Inputs` ``(x,
side)``, so an order, a shuffle or a mesh feed that maps over ``x`` maps over the side
inputs and every part of a tuple ``x`` alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from funnn.core import DataError

__all__ = ["Inputs", "EXPECTED", "split", "count", "in_shape", "leaves_named", "first"]

EXPECTED = ("data as (x, y) or (x, y, side): x an array or a tuple of arrays, y an array, "
            "side a dict of arrays, each with the batch axis first")


class Inputs(NamedTuple):
    """The model's inputs of a batch: ``x`` (an array or a tuple of arrays) and ``side`` (a
    dict of side inputs, ``{}`` without); a pytree, so ``tree_map`` takes rows of both."""

    x: Any
    side: dict


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_describe(o) for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a {type(obj).__name__} of {len(obj)} ({inner})"
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))}"
    shape = getattr(obj, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else type(obj).__name__


def _array(a, what: str, part: str, where: str):
    """``a`` as an array of rank >= 1, or a DataError naming the part and the data form."""
    if isinstance(a, (dict, tuple)) or a is None:
        raise DataError(f"{what} data: {part} is {_describe(a)}; {where} expected {EXPECTED}",
                        (where,))
    try:
        a = jnp.asarray(a)
    except (TypeError, ValueError) as err:
        raise DataError(f"{what} data: {part} is not an array ({_describe(a)}: {err}); "
                        f"{where} expected {EXPECTED}", (where,)) from None
    if a.ndim == 0:
        raise DataError(f"{what} data: {part} is a scalar; every part needs the batch axis "
                        f"first ({where} expected {EXPECTED})", (where,))
    return a


def split(data, what: str = "training", where: str = "fit") -> tuple:
    """``(x, y, side)`` of ``data`` (``(x, y)``, ``(x, y, side)`` or a Dataset with ``.x``
    and ``.y``), every part an array and every part holding the same number of examples;
    anything else raises one :class:`~funnn.core.DataError` naming the expected form."""
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y, side = data.x, data.y, getattr(data, "side", None)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
        x, y, side = (*data, None) if len(data) == 2 else data
    else:
        raise DataError(f"{what} data is {_describe(data)}; {where} expected {EXPECTED}",
                        (where,))
    if isinstance(x, tuple):
        if not x:
            raise DataError(f"{what} data: x is an empty tuple; {where} expected {EXPECTED}",
                            (where,))
        x = tuple(_array(a, what, f"x[{i}]", where) for i, a in enumerate(x))
    else:
        x = _array(x, what, "x", where)
    y = _array(y, what, "y", where)
    if side is None:
        side = {}
    if not isinstance(side, dict) or not all(isinstance(k, str) for k in side):
        raise DataError(f"{what} data: side is {_describe(side)}, expected a dict of named "
                        f"arrays such as {{'mask': mask}}; {where} expected {EXPECTED}",
                        (where,))
    side = {k: _array(v, what, f"side[{k!r}]", where) for k, v in side.items()}
    count(Inputs(x, side), y, what, where)
    return x, y, side


def leaves_named(inputs: Inputs, y=None) -> list:
    """``[(name, array), ...]``: ``x`` (or ``x[i]``), ``side['k']`` and ``y``."""
    x, side = inputs
    parts = [(f"x[{i}]", a) for i, a in enumerate(x)] if isinstance(x, tuple) else [("x", x)]
    parts += [(f"side[{k!r}]", a) for k, a in side.items()]
    return parts + ([("y", y)] if y is not None else [])


def count(inputs: Inputs, y, what: str = "training", where: str = "fit") -> int:
    """The number of examples, the same along the first axis of every part (else a
    DataError listing each part's count)."""
    parts = leaves_named(inputs, y)
    counts = {name: int(jnp.shape(a)[0]) for name, a in parts}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in counts.items())
        raise DataError(f"{what} data: every part needs the same number of examples (batch "
                        f"axis first), but {listed}", (where,))
    return next(iter(counts.values()))


def in_shape(x) -> Any:
    """The model's ``in_shape`` for ``x`` with the batch axis unknown: ``(None, ...)``, or a
    tuple of them for a tuple ``x``."""
    if isinstance(x, tuple):
        return tuple((None,) + tuple(a.shape[1:]) for a in x)
    return (None,) + tuple(x.shape[1:])


def first(inputs) -> jax.Array:
    """The first array of a pytree of inputs (for its batch size and dtype)."""
    return jax.tree_util.tree_leaves(inputs)[0]
