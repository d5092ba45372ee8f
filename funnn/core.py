"""The layer contract: the :class:`Layer` record, running its functions, side inputs, the
reverse walk that every composite's backward shares, and shape and backward checks.

A :class:`Layer` is plain data: a name, a kind and pure functions.

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

The error types live in :mod:`funnn.errors`, tree helpers in :mod:`funnn.trees`, compiling in
:mod:`funnn.compile`, the model table in :mod:`funnn.summary` and :func:`layer_from_apply` in
:mod:`funnn.layers.derived`; their names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import PyTreeDef

# Re-exported so that ``funnn.core.X`` keeps working for the names that moved out.
from funnn.compile import compiler_options, jit
from funnn.dtypes import matmul_wide, upcast, wide
from funnn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DTypeError,
    FunnnError,
    KeyMissingError,
    ShapeError,
    StateError,
    layer_scope,
)
from funnn.trees import leaf_shapes, param_count, path_str, tree_paths

__all__ = [
    "FunnnError", "ShapeError", "ConfigError", "DTypeError", "KeyMissingError",
    "StateError", "DataError", "CheckpointError",
    "Layer", "run_apply", "run_forward", "merged_context", "check_context",
    "layer_scope",
    "split_key", "children_params",
    "InputSpec", "input_spec", "check_backward",
    "check_in_shape", "check_rank", "check_features", "check_floating",
    "wide", "upcast", "matmul_wide", "compiler_options", "jit",
    "param_count", "tree_paths", "path_str",
]  # summary, derived_layers and layer_from_apply too, through __getattr__ below

# Names that moved into modules built on this one, loaded on first use (importing them here
# would be a cycle).
_MOVED_UP = {"summary": "funnn.summary", "derived_layers": "funnn.summary",
             "layer_from_apply": "funnn.layers.derived"}


def __getattr__(name: str):
    if name in _MOVED_UP:
        return getattr(importlib.import_module(_MOVED_UP[name]), name)
    raise AttributeError(f"module 'funnn.core' has no attribute {name!r}")


# --------------------------------------------------------------------------- layer


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer: a name, a kind and pure functions (see the module docstring).

    ``kind`` says what built the layer: the constructor's family for funnn's layers
    (``"dense"``, ``"conv2d"``, ``"lstm"``, ...), the combinator for composites (``"serial"``,
    ``"parallel"``, ``"residual"``, ``"transformer_block"``, ``"tied_embedding"``,
    ``"bridge"``, ``"policy"``) and ``"custom"`` by default, for layers written elsewhere.
    Tools decide by it (``check_numerics`` descends into ``"serial"`` stacks, interop picks a
    converter), never by parsing ``name``, which is for display.

    ``children`` lists ``(label, layer)`` pairs for combinators, used by
    :func:`summary`: labels ``"[i]"`` index a tuple of params; a single child with
    another label (``"/residual"``) shares its parent's params. Leaves have none.
    ``init_state`` is ``None`` for stateless layers.

    ``context`` names the side inputs the layer reads besides ``x`` (keyword arguments of
    ``apply`` and ``forward``, such as ``("mask", "lengths")`` for attention and the recurrent
    layers); combinators pass each child the ones it names and carry the rest along, so a mask
    flows through a ``serial`` stack. ``derived`` is ``True`` when ``backward`` was derived by
    ``jax.vjp`` (:func:`layer_from_apply`) rather than written by hand.

    Per-example rules (optional; ``None`` where a layer has none, e.g. batch-norm, whose
    output mixes the examples of a batch). Both are batched, hand-written rules (einsums of
    inputs and deltas), never ``vmap`` over single examples; ``dy`` holds each example's own
    output gradient::

        per_example(params, res, dy)       -> (dparams with a leading batch axis, dx)
        per_example_norms(params, res, dy) -> (squared norms (B,) of each example's dparams, dx)

    ``per_example_norms`` need not materialise the per-example gradients (``||x_i^T d_i||^2 =
    ||x_i||^2 ||d_i||^2`` for a dense layer); :mod:`funnn.layers.per_example` holds the helpers
    to write them with. A stateless layer without them still works in the per-example engines,
    which take ``vmap`` of its ``backward`` instead (:mod:`funnn.layers._vmap_rule`).

    ``decoder`` (optional) is the layer's incremental-decoding rule for autoregressive
    generation with a KV cache, a :class:`funnn.layers._decode.Decoder` (``init`` makes the
    cache, ``step`` runs new positions against it); ``None`` for layers that
    :func:`funnn.layers._decode.decoder_of` decodes by kind (position-wise layers and the
    combinators) or cannot decode. Attention and transformer blocks set it.

    Forward mode (optional; ``None`` where a layer has none): the hand-written tangent rule,
    on the residuals of ``forward`` as ``backward`` is, for tangents ``dparams`` (the params'
    tree) and ``dx`` (the input's shape; ``None`` for integer inputs such as embedding ids)::

        jvp(params, res, dparams, dx) -> dy        # the tangent of the output, y's shape

    ``walk`` (composites only; ``None`` for leaves) runs a per-leaf rule through the children
    on the way back, as ``backward`` does, for the curvature quantities of
    :mod:`funnn.curvature`: ``walk(params, res, dy, how) -> (outs, dx)`` with
    ``how(child, dy) -> (out, dx)`` the step of :func:`funnn.layers.walk.walk_back` and
    ``outs`` laid out like the params (one entry per child).

    ``factors`` (dense and ungrouped convolutions; ``None`` elsewhere): the two factors of the
    weight gradient, ``factors(params, res, dy) -> (a (B, T, m), d (B, T, n))`` with ``dW =
    sum_{i,t} a_it^T d_it`` reshaped to ``W``'s shape and ``db = sum_{i,t} d_it``: the layer's
    input rows (dense) or patches (convolution) and its output deltas, over ``T`` positions.
    :mod:`funnn.curvature` builds gradient statistics and Kronecker factors from them.

    ``apply``, ``forward`` and ``backward`` are wrapped once, when the layer is made: a
    params dict without a key the layer reads raises :class:`ShapeError` (``params missing
    key 'b'``) rather than a bare ``KeyError``, ``state=`` given to a stateless layer
    raises :class:`StateError`, and an input ``x`` given to ``apply`` or ``forward`` as a
    (nested) Python list of numbers becomes an array (``jnp.asarray``; a ragged one is a
    ShapeError naming the layer).
    """

    name: str
    init: Callable
    apply: Callable
    forward: Callable
    backward: Callable
    init_state: Callable | None = None
    children: tuple = ()
    context: tuple = ()
    derived: bool = False
    per_example: Callable | None = None
    per_example_norms: Callable | None = None
    kind: str = "custom"
    decoder: Any = None
    jvp: Callable | None = None
    walk: Callable | None = None
    factors: Callable | None = None

    def __post_init__(self):
        # Guard the functions once, here, so every layer (custom ones included) turns the two
        # commonest slips into funnn errors: a params dict without a key the layer reads, and
        # state= given to a stateless layer. Both are Python-level checks: under jit they run
        # while tracing only.
        stateful = self.init_state is not None
        object.__setattr__(self, "context", tuple(self.context))
        for field in ("apply", "forward", "backward", "per_example", "per_example_norms",
                      "jvp", "factors"):
            fn = getattr(self, field)
            if fn is None:
                continue
            object.__setattr__(self, field,
                               _guarded(fn, self.name, stateful, field in ("apply", "forward"),
                                        self.context))

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    def __repr__(self) -> str:
        return f"Layer({self.name})"


def _reject_state(name: str, state) -> None:
    """A stateless layer given a state: say so (``state=None`` means "no state" and is fine)."""
    if state is not None:
        raise StateError(f"this model is stateless (no batch_norm or other stateful layer) and "
                         f"takes no state=, got a {type(state).__name__}; call it without "
                         f"state=, or pass the state to the model it belongs to", (name,))


def _missing_key(params, err: KeyError):
    """The key of ``err`` when it is a key the params dict lacks, else ``None``."""
    key = err.args[0] if len(err.args) == 1 else None
    if isinstance(params, Mapping) and isinstance(key, str) and key not in params:
        return key
    return None


_CALL_KEYWORDS = frozenset({"state", "key", "train"})


def _reject_context(name: str, kwargs, context: tuple) -> None:
    """A side input (``mask=``, ``lengths=``) that no layer of this model reads: say so, rather
    than let it vanish."""
    unknown = sorted(k for k in kwargs if k not in _CALL_KEYWORDS and k not in context)
    if unknown:
        reads = (f"this model reads only {', '.join(f'{k}=' for k in context)}" if context
                 else "no layer of this model reads side inputs")
        raise ConfigError(f"got {', '.join(f'{k}=' for k in unknown)}, but {reads} (masks are "
                          f"read by attention, transformer blocks and the recurrent layers)",
                          (name,))


def _scalars(x: list) -> bool:
    """Whether ``x`` is a (nested) list of numbers only: Python or NumPy scalars, or 0-d arrays
    (what ``jit`` makes of such a list), not a pair of arrays such as ``[x, mask]``."""
    return all(_scalars(e) if type(e) is list else
               isinstance(e, (int, float, complex, np.number, np.bool_))
               or getattr(e, "ndim", None) == 0 for e in x)


def _list_input(name: str, x: list):
    """A nested list of numbers given as a layer's input, as an array (``jnp.asarray``); a
    ragged one is a :class:`ShapeError` naming the layer. A list of arrays (an ``[x, mask]``
    pair) is left to the layer."""
    if not _scalars(x):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError):
        raise ShapeError("input x is a nested list whose rows differ in length (ragged); give "
                         "an array of one shape, e.g. jnp.asarray(x) of padded rows",
                         (name,)) from None


def _guarded(fn, name: str, stateful: bool, takes_state: bool, context: tuple = ()):
    if not callable(fn) or getattr(fn, "_funnn_guarded", False):
        return fn

    def guarded(params, *args, **kwargs):
        if takes_state:
            _reject_context(name, kwargs, context)
            if args and type(args[0]) is list:      # one type check: arrays pay nothing more
                args = (_list_input(name, args[0]), *args[1:])
        if takes_state and not stateful and "state" in kwargs:
            _reject_state(name, kwargs.pop("state"))
        try:
            return fn(params, *args, **kwargs)
        except KeyError as err:
            key = _missing_key(params, err)
            if key is None:
                raise
            raise ShapeError(f"params missing key {key!r} (got keys {sorted(map(str, params))}); "
                             f"were these params made by this model's init?", (name,)) from None

    wrapper: Any = functools.update_wrapper(guarded, fn)   # Any: gets attributes set below
    del wrapper.__wrapped__         # inspect.signature shows the guard's, which takes state=
    wrapper._funnn_guarded = True
    return wrapper


def _read(layer: Layer, context) -> dict:
    """The side inputs of ``context`` that ``layer`` reads (``None`` values dropped)."""
    return {k: v for k, v in context.items() if v is not None and k in layer.context}


def run_apply(layer: Layer, params, x, *, state=None, key=None, train=False, **context):
    """Call ``layer.apply`` uniformly: returns ``(y, new_state)`` (state ``None`` if stateless).

    ``context`` holds side inputs such as ``mask=`` and ``lengths=``; the layer gets those it
    names in ``layer.context`` and no others, so a combinator can hand every child the same
    context. A stateless layer given a state (other than ``None``) raises :class:`StateError`.
    """
    ctx = _read(layer, context)
    if layer.init_state is None:
        _reject_state(layer.name, state)
        return layer.apply(params, x, key=key, train=train, **ctx), None
    return layer.apply(params, x, state=state, key=key, train=train, **ctx)


def run_forward(layer: Layer, params, x, *, state=None, key=None, train=False, **context):
    """Call ``layer.forward`` uniformly: returns ``(y, res, new_state)``; ``context`` as in
    :func:`run_apply`."""
    ctx = _read(layer, context)
    if layer.init_state is None:
        _reject_state(layer.name, state)
        y, res = layer.forward(params, x, key=key, train=train, **ctx)
        return y, res, None
    return layer.forward(params, x, state=state, key=key, train=train, **ctx)


def check_context(layer: Layer, context) -> None:
    """Raise :class:`ConfigError` for a side input that no layer of ``layer`` reads (the engines
    call this once, at the top of a model, where nothing should be dropped silently)."""
    _reject_context(layer.name, {k: v for k, v in context.items() if v is not None},
                    layer.context)


def merged_context(layers) -> tuple:
    """The side inputs any of ``layers`` reads, in first-seen order (a combinator's context)."""
    return tuple(dict.fromkeys(k for l in layers for k in l.context))


# --------------------------------------------------------------------------- composites


def children_params(layer: Layer, params) -> list | None:
    """``[(label, child, child_params), ...]`` for a composite's children, or ``None`` when
    ``params`` does not have one entry per child.

    Labels ``"[i]"`` index a tuple of params; a single child with another label (a residual's
    ``"/residual"``) shares its parent's params.
    """
    kids = layer.children
    if len(kids) == 1 and not kids[0][0].startswith("["):
        return [(kids[0][0], kids[0][1], params)]
    if not isinstance(params, (tuple, list)) or len(params) != len(kids):
        return None
    return [(label, child, p) for (label, child), p in zip(kids, params)]


# --------------------------------------------------------------------------- backward checks


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The static shape of a layer's input, kept in residuals (a pytree with no leaves, so it
    costs nothing under ``jit``, ``vmap`` and ``custom_vjp``).

    ``shape`` is the array's shape, or for a tuple input a tuple of specs (``None`` where an
    entry is not an array); ``dtype`` the array's dtype (``None`` for a tuple or a non-array).
    """

    shape: tuple | None
    is_tuple: bool = False
    dtype: Any = None


def input_spec(x) -> InputSpec:
    """The :class:`InputSpec` of ``x`` (an array, or a tuple such as ``(x, mask)``)."""
    if isinstance(x, (tuple, list)):
        return InputSpec(tuple(input_spec(e) for e in x), True)
    try:
        return InputSpec(tuple(jnp.shape(x)), dtype=jnp.result_type(x))
    except TypeError:
        return InputSpec(None)


def _dx_problem(spec: InputSpec, dx, what: str = "dx") -> str | None:
    if dx is None or spec.shape is None:         # no input gradient (integer ids, a mask)
        return None
    if spec.is_tuple:
        if not isinstance(dx, (tuple, list)) or len(dx) != len(spec.shape):
            return (f"backward returned {what} as a {type(dx).__name__}, expected a tuple of "
                    f"{len(spec.shape)} like the input")
        for i, (s, d) in enumerate(zip(spec.shape, dx)):
            problem = _dx_problem(s, d, f"{what}[{i}]")
            if problem:
                return problem
        return None
    try:
        got = tuple(jnp.shape(dx))
    except TypeError:
        return f"backward returned {what} of type {type(dx).__name__}, expected an array"
    if got != spec.shape:
        return f"backward returned {what} of shape {got}, expected the input's shape {spec.shape}"
    return None


def _dparams_problem(params, grads, prefix: str) -> str | None:
    tdef: Callable[[Any], PyTreeDef] = jax.tree_util.tree_structure
    want, got = leaf_shapes(params, prefix), leaf_shapes(grads, prefix)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    parts = ([f"missing leaves {missing}"] if missing else []) + (
        [f"unexpected leaves {extra}"] if extra else []) + [
        f"leaf {k} has shape {got[k]}, the param {want[k]}" for k in want if k in got
        and got[k] != want[k]]
    if not parts and tdef(params) != tdef(grads):
        parts = [f"different tree structure ({tdef(grads)}, the params {tdef(params)})"]
    if parts:
        return "backward returned dparams that do not match the params: " + "; ".join(parts)
    return None


def check_backward(name: str, params, grads, spec: InputSpec | None, dx, prefix: str = "") -> None:
    """Raise :class:`ShapeError` (path ``name``) unless ``backward``'s ``grads`` have the tree
    and shapes of ``params`` and ``dx`` has the input's shape (``spec``; ``None``: unknown).

    ``prefix`` is put before each leaf path in the message (``"0."`` for ``serial[0]``, so the
    paths read as in the combinator's params). Shapes are static: this runs while tracing.
    """
    problem = _dparams_problem(params, grads, prefix) or (
        _dx_problem(spec, dx) if spec is not None else None)
    if problem:
        raise ShapeError(problem, (name,))


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
    out: list[int | None] = []
    for i, d in enumerate(shape):
        if (d is None and i in free) or (i == 0 and d == -1 and 0 in free):
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


def check_features(name: str, x, expected: int, axis: int = -1,
                   what: str = "input features") -> None:
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
