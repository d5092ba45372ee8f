"""The printed model table: :func:`summary` (layer paths, parameter shapes and counts),
:func:`derived_layers` (the layers whose backward is autodiff's) and :func:`vmapped_layers`
(the layers without a per-example rule, whose per-example gradients come from ``vmap`` of
their backward), both marked in the table."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import PyTreeDef

from funnn.core import Layer, children_params
from funnn.errors import ConfigError, ShapeError
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


def summary(model: Layer, params, in_shape=None, width: int | None = 100) -> str:
    """A printable table: layer path, layer, parameter shapes, parameter count, and a total.

    A layer whose backward is derived by ``jax.vjp`` (:func:`layer_from_apply`) is marked
    ``[derived]``, and a footnote says so: its "manual" gradient is autodiff's. A layer without
    a per-example rule is marked ``[vmap]``: the per-example engines (and DP) use ``vmap`` of
    its own backward (:mod:`funnn.layers._vmap_rule`), materialising its per-example
    gradients. A model with
    attention's key bias ``b_k`` gets a footnote that its gradient is exactly zero.

    No line is longer than ``width`` characters (``None``: no limit). A table too wide for it
    keeps the counts whole and wraps the other cells onto continuation lines, between
    parameters, at a space, or before a ``[``, ``/`` or ``(`` where it can: nothing is cut off
    or abbreviated, only broken, so every parameter's name and shape is still printed.

    The params must match the model: a combinator needs one entry per child and each layer
    the params tree its ``init`` makes; with ``in_shape`` (what ``model.init`` was given) the
    shapes are checked as well. A mismatch raises :class:`ShapeError` naming the first layer
    whose params do not fit, rather than printing another model's table.
    """
    if width is not None and (not isinstance(width, int) or width < _MIN_WIDTH):
        raise ConfigError(f"summary: width must be an int >= {_MIN_WIDTH} or None, got {width!r}")
    want = None
    if in_shape is not None:
        want = jax.eval_shape(lambda k: model.init(k, in_shape)[1], jax.random.key(0))
    rows: list = []
    _summary_rows(model, params, "", rows, want, ())
    body = [(p, n, s, f"{c:,}") for p, n, s, c in rows]
    lines = _table(("path", "layer", "parameters", "count"), body,
                   ("", "total", "", f"{param_count(params):,}"), width)
    if derived_layers(model):
        lines += _fit_note(DERIVED_NOTE, width)
    if vmapped_layers(model):
        lines += _fit_note(VMAP_NOTE, width)
    if _has_key_bias(model, params):
        lines += _fit_note(KEY_BIAS_NOTE, width)
    return "\n".join(lines)


_MIN_WIDTH = 40
_GAP = "  "
DERIVED_NOTE = "[derived]: backward derived by jax.vjp (layer_from_apply), not hand-written"


def _column_widths(rows: list[tuple[str, ...]], width: int | None) -> list[int]:
    """Each column's natural width; over ``width`` in all, the count column stays whole, the
    parameters column keeps at least two fifths of the rest, and path and layer share the
    remainder (the narrower keeping its natural width if it fits in half)."""
    natural = [max(len(r[i]) for r in rows) for i in range(4)]
    avail = None if width is None else width - natural[3] - 3 * len(_GAP)
    if avail is None or sum(natural[:3]) <= avail:
        return natural
    params = min(natural[2], max(avail * 2 // 5, avail - natural[0] - natural[1]))
    rest = avail - params
    narrow, wide = sorted((0, 1), key=lambda i: natural[i])
    widths = list(natural)
    widths[narrow] = max(1, min(natural[narrow], rest // 2))
    widths[wide] = max(1, min(natural[wide], rest - widths[narrow]))
    widths[2] = max(1, avail - widths[0] - widths[1])
    return widths


def _break_at(text: str, width: int) -> tuple[int, int]:
    """Where to break ``text`` to fit ``width``: ``(end of the piece, start of the rest)``.

    At the last space outside brackets (``W(8, 4)`` stays whole), else any last space, else
    before the last ``[``, ``/`` or ``(`` (of a path, a layer's arguments), else hard at
    ``width``; a space is dropped."""
    depth, outside = 0, -1
    for i, ch in enumerate(text[:width + 1]):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == " " and depth == 0 and i > 0:
            outside = i
    cut = outside if outside > 0 else text.rfind(" ", 1, width + 1)
    if cut > 0:
        return cut, cut + 1
    cut = max(text.rfind(ch, 1, width + 1) for ch in "[/(")
    cut = cut if cut > 0 else width
    return cut, cut


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width`` characters (see :func:`_break_at`)."""
    pieces = []
    while len(text) > width:
        end, start = _break_at(text, width)
        pieces.append(text[:end])
        text = text[start:]
    return [*pieces, text]


def _table(head: tuple, body: list[tuple], total: tuple, width: int | None) -> list[str]:
    """The table's lines: head, rule, a row (or its continuation lines) per layer, rule, total."""
    widths = _column_widths([head, *body, total], width)

    def fmt(r) -> list[str]:
        cells = [_wrap(r[i], widths[i]) for i in range(3)] + [[r[3]]]
        n = max(map(len, cells))
        cells = [c + [""] * (n - len(c)) for c in cells]
        return [_GAP.join([*(cells[i][k].ljust(widths[i]) for i in range(3)),
                           cells[3][k].rjust(widths[3])]).rstrip() for k in range(n)]

    sep = _GAP.join("-" * w for w in widths)
    return [*fmt(head), sep, *[line for r in body for line in fmt(r)], sep, *fmt(total)]


def _fit_note(note: str, width: int | None) -> list[str]:
    """A footnote's lines; if one is longer than ``width``, the note re-wrapped to it (its
    continuation lines under a five-space indent)."""
    lines = note.splitlines()
    if width is None or all(len(line) <= width for line in lines):
        return lines
    return textwrap.wrap(" ".join(line.strip() for line in lines), width,
                         subsequent_indent=" " * 5, break_on_hyphens=False)

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
