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
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import PyTreeDef

__all__ = [
    "FunnnError", "ShapeError", "ConfigError", "DTypeError", "KeyMissingError",
    "StateError", "DataError", "CheckpointError",
    "Layer", "run_apply", "run_forward", "merged_context", "check_context",
    "layer_from_apply", "layer_scope",
    "split_key",
    "InputSpec", "input_spec", "check_backward",
    "check_in_shape", "check_rank", "check_features", "check_floating",
    "wide", "upcast", "matmul_wide", "compiler_options", "jit",
    "param_count", "tree_paths", "path_str", "summary", "derived_layers",
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

    def under(self, prefix: str) -> FunnnError:
        """The same error with ``prefix`` prepended to its layer path."""
        err = type(self).__new__(type(self))
        FunnnError.__init__(err, self.message, (prefix, *self.path))
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
    ||x_i||^2 ||d_i||^2`` for a dense layer); see :mod:`funnn.layers._per_example`.

    ``apply``, ``forward`` and ``backward`` are wrapped once, when the layer is made: a
    params dict without a key the layer reads raises :class:`ShapeError` (``params missing
    key 'b'``) rather than a bare ``KeyError``, and ``state=`` given to a stateless layer
    raises :class:`StateError`.
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

    def __post_init__(self):
        # Guard the functions once, here, so every layer (custom ones included) turns the two
        # commonest slips into funnn errors: a params dict without a key the layer reads, and
        # state= given to a stateless layer. Both are Python-level checks: under jit they run
        # while tracing only.
        stateful = self.init_state is not None
        object.__setattr__(self, "context", tuple(self.context))
        for field in ("apply", "forward", "backward", "per_example", "per_example_norms"):
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


def _guarded(fn, name: str, stateful: bool, takes_state: bool, context: tuple = ()):
    if not callable(fn) or getattr(fn, "_funnn_guarded", False):
        return fn

    def guarded(params, *args, **kwargs):
        if takes_state:
            _reject_context(name, kwargs, context)
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


# --------------------------------------------------------------------------- backward checks


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The static shape of a layer's input, kept in residuals (a pytree with no leaves, so it
    costs nothing under ``jit``, ``vmap`` and ``custom_vjp``).

    ``shape`` is the array's shape, or for a tuple input a tuple of specs (``None`` where an
    entry is not an array).
    """

    shape: tuple | None
    is_tuple: bool = False


def input_spec(x) -> InputSpec:
    """The :class:`InputSpec` of ``x`` (an array, or a tuple such as ``(x, mask)``)."""
    if isinstance(x, (tuple, list)):
        return InputSpec(tuple(input_spec(e) for e in x), True)
    try:
        return InputSpec(tuple(jnp.shape(x)))
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


def _leaf_shapes(tree, prefix: str = "") -> dict:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = path_str(path)
        out[prefix + p if path else prefix.rstrip(".") or p] = tuple(jnp.shape(leaf))
    return out


def _dparams_problem(params, grads, prefix: str) -> str | None:
    tdef: Callable[[Any], PyTreeDef] = jax.tree_util.tree_structure
    want, got = _leaf_shapes(params, prefix), _leaf_shapes(grads, prefix)
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


# --------------------------------------------------------------------------- dtypes

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def wide(dtype) -> jnp.dtype:
    """The dtype to accumulate, normalise or take a softmax in: float32 for bfloat16 and
    float16 (mixed precision, :mod:`funnn.precision`), else ``dtype`` itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in _LOW_PRECISION else dtype


def upcast(x):
    """``x`` in :func:`wide` of its dtype: unchanged for float32, float64 and integers."""
    dt = jnp.result_type(x)
    return x.astype(wide(dt)) if jnp.issubdtype(dt, jnp.floating) else x


def matmul_wide(a, b):
    """``a @ b`` accumulated in :func:`wide` of the operands' dtype (float32 for bfloat16), as
    the hand-written weight gradients ``x^T dy`` need; the result is in that wide dtype."""
    return jnp.matmul(a, b, preferred_element_type=wide(jnp.result_type(a, b)))


# --------------------------------------------------------------------------- compiling

# XLA options funnn compiles its steps with, per backend, each chosen by measurement.
#
# CPU: XLA (jaxlib 0.10) hands convolutions, matrix products and reductions to the YNNPACK
# library by default. Its convolutions are the slow ones on a 2-core x86 CPU: the 32->64 3x3
# convolution of the digits CNN (batch 128, 14x14) takes 4.6 ms forward and 9.3 ms for the
# kernel gradient, against 2.6 and 3.6 ms in XLA's own (Eigen) convolution; a 64->64 layer at
# 32x32 is 23 / 66 ms against 13 / 33 ms. Of eleven shapes measured (1-3 spatial dims,
# stride, dilation, groups, bfloat16), YNNPACK won only the 1-channel forward (0.7 vs 2.0 ms)
# and the depthwise one (10 vs 14 ms). So funnn keeps YNNPACK for matrix products and
# reductions and lets XLA run convolutions (figures and commands: README, "CPU"). The value
# is jaxlib 0.10's default list less convolutions (the option replaces the whole list), so
# it applies to the jaxlib series it was measured on; other versions compile with XLA's
# defaults until measured (``benchmarks/cnn_cpu.py`` shows the difference).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
_CPU_OPTIONS_JAXLIB = ((0, 10),)                 # (major, minor) series measured


@functools.cache
def _jaxlib_series() -> tuple:
    import jaxlib

    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2])


@functools.cache
def _accepted(options: tuple) -> bool:
    """Whether this jaxlib compiles with ``options`` (an older or newer XLA may not know them)."""
    import inspect

    if "compiler_options" not in inspect.signature(jax.jit).parameters:
        return False
    try:
        jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception:        # an unknown option or value: compile with XLA's defaults instead
        return False
    return True


def compiler_options(backend: str | None = None) -> dict:
    """The XLA options funnn compiles its jitted steps with on ``backend`` (default: JAX's
    default backend): on CPU, convolutions run in XLA's own kernels rather than YNNPACK's
    (measured above); elsewhere none. Empty on a jaxlib series not yet measured (0.10 is),
    where this jaxlib does not accept the option, or where ``XLA_FLAGS`` already sets it
    (the user's choice wins). Pass it to ``jax.jit`` as
    ``compiler_options=`` for functions you jit yourself, or use :func:`jit`.
    """
    import os

    backend = backend or jax.default_backend()
    if (backend != "cpu" or "ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
            or _jaxlib_series() not in _CPU_OPTIONS_JAXLIB):
        return {}
    return dict(_CPU_OPTIONS) if _accepted(tuple(sorted(_CPU_OPTIONS.items()))) else {}


def jit(fun: Callable, **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` for the default backend
    (``compiler_options=`` given here are added to them and win). funnn's training epochs,
    evaluation and benchmarks compile through this; the result is an ordinary jitted function
    (``.lower``, donation and shardings as ``jax.jit``)."""
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    if options:
        kwargs["compiler_options"] = options
    return jax.jit(fun, **kwargs)


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
    leaves = _leaf_shapes(tree)
    if not leaves:
        return "no params"
    return ", ".join(f"{k} {v}" if shapes else k for k, v in leaves.items())


def _child_label(layer: Layer, label: str, child: Layer) -> str:
    """The label a combinator's errors use for a child: ``serial[2]``, ``residual(dense(3))``."""
    if label.startswith("["):
        return layer.name.split("(")[0] + label
    return f"{label.lstrip('/')}({child.name})"


def _mismatch(what: str, where: tuple) -> ShapeError:
    return ShapeError(f"params do not match the model: {what}; were these params made by this "
                      f"model's init?", where)


def _summary_rows(layer: Layer, params, path: str, rows: list, want, where: tuple) -> None:
    """Walk model and params together; ``want`` is init's params (shapes only) or ``None``."""
    kids = layer.children
    if len(kids) == 1 and not kids[0][0].startswith("["):
        # a wrapper (residual) whose params are its body's
        label, child = kids[0]
        _summary_rows(child, params, f"{path}{label}", rows, want,
                      (*where, _child_label(layer, label, child)))
        return
    if kids:
        if not isinstance(params, (tuple, list)) or len(params) != len(kids):
            seq = isinstance(params, (tuple, list))
            got = f"a {type(params).__name__} of {len(params)}" if seq else _describe_params(params)
            raise _mismatch(f"expected a tuple of {len(kids)} entries (one per layer), got {got}",
                            (*where, layer.name))
        for i, ((label, child), p) in enumerate(zip(kids, params)):
            _summary_rows(child, p, f"{path}{label}", rows, None if want is None else want[i],
                          (*where, _child_label(layer, label, child)))
        return
    tdef: Callable[[Any], PyTreeDef] = jax.tree_util.tree_structure
    if want is not None:
        ok = tdef(params) == tdef(want) and _leaf_shapes(params) == _leaf_shapes(want)
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
    shown = f"{layer.name} [derived]" if layer.derived else layer.name
    rows.append((path or "<root>", shown, shapes, param_count(params)))


def summary(model: Layer, params, in_shape=None) -> str:
    """A printable table: layer path, layer, parameter shapes, parameter count, and a total.

    A layer whose backward is derived by ``jax.vjp`` (:func:`layer_from_apply`) is marked
    ``[derived]``, and a footnote says so: its "manual" gradient is autodiff's.

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
    return "\n".join(lines)


def derived_layers(model: Layer, path: str = "") -> list[str]:
    """Paths (as in :func:`summary`) of the layers in ``model`` whose backward is derived by
    ``jax.vjp`` rather than written by hand; empty for a fully hand-written model."""
    if model.derived:
        return [f"{path or '<root>'} {model.name}"]
    return [p for label, child in model.children for p in derived_layers(child, path + label)]


def layer_from_apply(init: Callable, apply: Callable, *, name: str = "custom",
                     context: Sequence[str] = ()) -> Layer:
    """A layer from ``init`` and ``apply`` alone: ``forward``/``backward`` come from ``jax.vjp``.

    For a layer one has no hand-written backward for (yet). ``init(key, in_shape) ->
    (out_shape, params)``; ``apply(params, x, *, key=None, train=False, **side_inputs) -> y``
    written with ``jax.numpy``/``lax``. ``forward`` runs ``jax.vjp`` of ``apply`` and keeps the
    returned pullback (a pytree of the residual arrays autodiff chose) as the residuals;
    ``backward`` calls it. The dx of an integer input is ``None``. Such a layer works with
    every engine and combinator, but its "manual" gradient is autodiff's: ``gradcheck`` and
    :func:`summary` mark it derived, so a comparison never passes it off as hand-written.
    ``context`` names side inputs (``"mask"``) that ``apply`` reads as keyword arguments.
    Stateless only.
    """
    if not (callable(init) and callable(apply)):
        raise ConfigError(f"layer_from_apply needs callables init and apply, got "
                          f"{type(init).__name__} and {type(apply).__name__}", (str(name),))

    def forward(params, x, *, key=None, train=False, **ctx):
        floating = jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        if floating:
            y, pullback = jax.vjp(lambda p, v: apply(p, v, key=key, train=train, **ctx),
                                  params, x)
        else:                                   # integer ids: no input gradient
            y, pullback = jax.vjp(lambda p: (apply(p, x, key=key, train=train, **ctx)),
                                  params)
        return y, pullback

    def backward(params, pullback, dy):
        grads = pullback(dy)
        return grads[0], (grads[1] if len(grads) == 2 else None)

    def apply_(params, x, *, key=None, train=False, **ctx):
        return apply(params, x, key=key, train=train, **ctx)

    return Layer(name=str(name), init=init, apply=apply_, forward=forward, backward=backward,
                 context=tuple(context), derived=True)
