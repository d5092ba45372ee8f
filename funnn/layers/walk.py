"""The one reverse walk of composites: ``serial``, ``parallel``, ``residual``, the transformer
block and ``check_numerics``' replay run their children's backward (or per-example rules) last
to first through :func:`walk_back`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from funnn.core import InputSpec, Layer, check_backward
from funnn.errors import ConfigError, layer_scope
from funnn.layers._vmap_rule import vmap_rule

__all__ = ["rule", "tangent", "Child", "walk_back", "sum_norms"]


def rule(layer: Layer, field: str, spec: InputSpec | None = None) -> Callable:
    """``layer.per_example`` or ``layer.per_example_norms``; for a layer without one, ``vmap``
    of its own backward (:func:`funnn.layers._vmap_rule.vmap_rule`, which needs ``spec``, the
    layer's input); a stateful layer has neither and raises a clear error."""
    fn = getattr(layer, field)
    if fn is not None:
        return fn
    if layer.stateful:
        raise ConfigError(f"layer {layer.name} has no per-example gradient rule (a stateful "
                          f"layer: its output mixes the examples of a batch through the batch "
                          f"statistics, so one example's gradient is not defined by that "
                          f"example alone); per-example gradients, norms and clipping need "
                          f"every example's gradient to be its own", (layer.name,))
    return vmap_rule(layer, field, spec)


def tangent(layer: Layer) -> Callable:
    """``layer.jvp``, or a clear error naming the layer when it has no tangent rule."""
    if layer.jvp is None:
        why = (" (its backward was derived by jax.vjp: use jax.jvp of its apply)"
               if layer.derived else
               " (a stateful layer: its training-mode output mixes the examples of a batch)"
               if layer.stateful else "")
        raise ConfigError(f"layer {layer.name} has no hand-written tangent (jvp) rule{why}; "
                          f"forward mode (funnn.manual.jvp) and the curvature products of "
                          f"funnn.curvature need one in every layer", (layer.name,))
    return layer.jvp


class Child(NamedTuple):
    """One child of a composite on the way back: what :func:`walk_back` needs of it.

    ``scope`` is the label its errors get (``"serial[2]"``; ``None``: none of its own),
    ``spec`` its input's :class:`InputSpec` to check ``dx`` against (``None``: dparams only)
    and ``prefix`` the leaf-path prefix of that check's messages (``"2."``).
    """

    scope: str | None
    layer: Layer
    params: Any
    res: Any
    spec: InputSpec | None = None
    prefix: str = ""


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def sum_norms(sqs) -> Any:
    """The sum of the children's squared per-example norms (``None`` entries skipped)."""
    total = None
    for s in sqs:
        total = _add(total, s)
    return total


def _step(child: Child, dy, how: str | Callable):
    if callable(how):
        return how(child, dy)
    if how == "backward":
        g, dx = child.layer.backward(child.params, child.res, dy)
        check_backward(child.layer.name, child.params, g, child.spec, dx, child.prefix)
        return g, dx
    return rule(child.layer, how, child.spec)(child.params, child.res, dy)


def walk_back(children: Sequence[Child], dy, how: str | Callable = "backward", *,
              fan_out: bool = False) -> tuple[list, Any]:
    """The reverse walk every composite's backward shares: ``(outs, dx)``.

    Runs each child's step last to first, under its ``scope``. ``how`` is ``"backward"`` (the
    hand-written backward, checked by :func:`check_backward`), ``"per_example"`` or
    ``"per_example_norms"`` (the child's rule, or vmap of its backward: :func:`rule`), or a
    function ``how(child, dy) -> (out, dx)``. Chained (``serial``, a residual's body, a block's
    halves): each child's ``dx`` is the ``dy`` of the one before it, and ``dx`` is the first
    child's. ``fan_out`` (``parallel``): ``dy`` holds one gradient per child, and ``dx`` is
    the sum of the children's. ``outs`` lists each child's dparams (or squared norms) in the
    children's order.
    """
    outs: list = [None] * len(children)
    dys = list(dy) if fan_out else None
    total = None
    for i in reversed(range(len(children))):
        child = children[i]
        d = dys[i] if dys is not None else dy
        if child.scope is None:
            outs[i], dx = _step(child, d, how)
        else:
            with layer_scope(child.scope):
                outs[i], dx = _step(child, d, how)
        if fan_out:
            total = _add(total, dx)
        else:
            dy = dx
    return outs, (total if fan_out else dy)
