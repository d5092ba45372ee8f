"""The printed model table: :func:`summary` (layer paths, parameter shapes and counts),
:func:`derived_layers` (the layers whose backward is autodiff's) and :func:`vmapped_layers`
(the layers without a per-example rule, whose per-example gradients come from ``vmap`` of
their backward), both marked in the table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from funnn.core import Layer, children_params
from funnn.errors import ShapeError
from funnn.trees import leaf_shapes, param_count, tree_paths

__all__ = ["summary", "derived_layers", "vmapped_layers"]


_PROBE_SHAPES = ((None, 8), (None, 8, 8), (None, 8, 8, 8), (None, 8, 8, 8, 8))


def _probe_structure(layer: Layer):
    """The tree structure of ``layer``'s params for some input it accepts, or ``None``.

    Without the model's input shape only the structure can be checked; a leaf layer's params
    structure (its keys) does not depend on the input's sizes.
    """
    for shape in _PROBE_SHAPES:
        try:
            out = jax.eval_shape(lambda k, shape=shape: layer.init(k, shape)[1], jax.random.key(0))
        except Exception:
            continue
        return jax.tree_util.tree_structure(out)
    return None


def _describe_params(tree, shapes: bool = True) -> str:
    leaves = leaf_shapes(tree)
    if not leaves:
        return "no params"
    return ", ".join(f"{k} {v}" if shapes else k for k, v in leaves.items())


def child_label(layer: Layer, label: str, child: Layer) -> str:
    """The label a composite's errors use for a child: ``serial[2]``, ``residual(dense(3))``."""
    if label.startswith("["):
        return layer.kind + label
    return f"{label.lstrip('/')}({child.name})"


def _mismatch(what: str, where: tuple) -> ShapeError:
    return ShapeError(f"params do not match the model: {what}; were these params made by this "
                      f"model's init?", where)


def _summary_rows(layer: Layer, params, path: str, rows: list, want, where: tuple) -> None:
    """Walk model and params together; ``want`` is init's params (shapes only) or ``None``."""
    if layer.children:
        pairs = children_params(layer, params)
        if pairs is None:
            seq = isinstance(params, (tuple, list))
            got = f"a {type(params).__name__} of {len(params)}" if seq else _describe_params(params)
            raise _mismatch(f"expected a tuple of {len(layer.children)} entries (one per layer), "
                            f"got {got}", (*where, layer.name))
        wants = None if want is None else children_params(layer, want)
        for i, (label, child, p) in enumerate(pairs):
            _summary_rows(child, p, f"{path}{label}", rows, None if wants is None else wants[i][2],
                          (*where, child_label(layer, label, child)))
        return
    tdef: Callable[[Any], PyTreeDef] = jax.tree_util.tree_structure
    if want is not None:
        ok = tdef(params) == tdef(want) and leaf_shapes(params) == leaf_shapes(want)
        expected = _describe_params(want)
    else:
        probe = _probe_structure(layer)
        ok = probe is None or probe == tdef(params)
        expected = "no params" if probe is None or probe.num_leaves == 0 else _describe_params(
            jax.tree_util.tree_unflatten(probe, [0] * probe.num_leaves), shapes=False)
    if not ok:
        raise _mismatch(f"expected {expected}, got {_describe_params(params)}",
                        (*where, layer.name))
    leaves = tree_paths(params)
    shapes = ", ".join(f"{k}{tuple(jnp.shape(v))}" for k, v in leaves) if leaves else "-"
    shown = layer.name + (" [derived]" if layer.derived else "") + (
        " [vmap]" if _vmapped(layer) else "")
    rows.append((path or "<root>", shown, shapes, param_count(params)))


def summary(model: Layer, params, in_shape=None) -> str:
    """A printable table: layer path, layer, parameter shapes, parameter count, and a total.

    A layer whose backward is derived by ``jax.vjp`` (:func:`layer_from_apply`) is marked
    ``[derived]``, and a footnote says so: its "manual" gradient is autodiff's. A layer without
    a per-example rule is marked ``[vmap]``: the per-example engines (and DP) use ``vmap`` of
    its own backward (:mod:`funnn.layers._vmap_rule`), materialising its per-example
    gradients. A model with
    attention's key bias ``b_k`` gets a footnote that its gradient is exactly zero.

    The params must match the model: a combinator needs one entry per child and each layer
    the params tree its ``init`` makes; with ``in_shape`` (what ``model.init`` was given) the
    shapes are checked as well. A mismatch raises :class:`ShapeError` naming the first layer
    whose params do not fit, rather than printing another model's table.
    """
    want = None
    if in_shape is not None:
        want = jax.eval_shape(lambda k: model.init(k, in_shape)[1], jax.random.key(0))
    rows: list = []
    _summary_rows(model, params, "", rows, want, ())
    head = ("path", "layer", "parameters", "count")
    body = [(p, n, s, f"{c:,}") for p, n, s, c in rows]
    body.append(("", "total", "", f"{param_count(params):,}"))
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]

    def fmt(r):
        return "  ".join(r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i])
                         for i in range(4))

    sep = "  ".join("-" * w for w in widths)
    lines = [fmt(head), sep] + [fmt(r) for r in body[:-1]] + [sep, fmt(body[-1])]
    if derived_layers(model):
        lines.append("[derived]: backward derived by jax.vjp (layer_from_apply), not hand-written")
    if vmapped_layers(model):
        lines.append(VMAP_NOTE)
    if _has_key_bias(model, params):
        lines.append(KEY_BIAS_NOTE)
    return "\n".join(lines)


VMAP_NOTE = ("[vmap]: no per-example rule: per-example gradients, norms and DP clipping use "
             "vmap of its own\n        backward (its per-example gradients materialised)")

KEY_BIAS_NOTE = ("b_k: attention's key bias gets an exactly-zero gradient: q . b_k shifts every "
                 "key's score\n     alike and softmax ignores it; kept for PyTorch parity "
                 "(in_proj_bias), use_bias=False drops it")

_ATTENTION_KINDS = frozenset({"multi_head_attention", "cross_attention", "transformer_block"})


def _has_key_bias(model: Layer, params) -> bool:
    """Whether an attention layer (or a transformer block) of ``model`` holds a key bias."""
    if model.kind in _ATTENTION_KINDS:
        return any(path.endswith("b_k") for path, _ in tree_paths(params))
    pairs = children_params(model, params) if model.children else None
    return any(_has_key_bias(child, p) for _, child, p in pairs or ())


def derived_layers(model: Layer, path: str = "") -> list[str]:
    """Paths (as in :func:`summary`) of the layers in ``model`` whose backward is derived by
    ``jax.vjp`` rather than written by hand; empty for a fully hand-written model."""
    if model.derived:
        return [f"{path or '<root>'} {model.name}"]
    return [p for label, child in model.children for p in derived_layers(child, path + label)]


def _vmapped(layer: Layer) -> bool:
    return layer.per_example is None and not layer.stateful


def vmapped_layers(model: Layer, path: str = "") -> list[str]:
    """Paths (as in :func:`summary`) of the layers in ``model`` without a per-example rule,
    whose per-example gradients the engines take by ``vmap`` of their own backward; empty
    when every layer has rules. A stateful layer (batch-norm) has neither and is not listed."""
    if model.per_example is None or not model.children:
        return [f"{path or '<root>'} {model.name}"] if _vmapped(model) else []
    return [p for label, child in model.children for p in vmapped_layers(child, path + label)]
