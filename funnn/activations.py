"""Activation catalogue: each activation is a value with its function, derivative and range.

The table of the seed notes (identity, binary step, logistic, tanh, arctan,
softsign, ISRU, ReLU, PReLU, ELU, softplus) plus leaky ReLU, GELU (erf and tanh
forms), SiLU/swish, softmax and log-softmax::

    A.tanh(x)                    # f(x), any shape
    A.tanh.df(x)                 # closed-form f'(x), same shape (no autodiff)
    A.tanh.backprop(x, dy)       # hand-written vector-Jacobian product dL/dx
    A.tanh.range                 # (-1.0, 1.0)
    A.elu                        # alpha=1.0, named "elu(alpha=1.0)"
    A.elu.with_params(alpha=0.5) # the same activation with another alpha
    A.get("elu", alpha=0.5)      # by name (configs, the CLI); also A.get("elu(alpha=0.5)")
    A.ALL                        # every activation with default parameters

API choice: one instance per activation at module level, holding its default
parameters, so ``A.elu(x)`` works on arrays like ``A.tanh(x)``. Other parameters
come from ``.with_params(**kw)`` or ``get(name, **kw)``; both build a new frozen
:class:`Activation` (hashable, so it can be a static argument of ``jax.jit``).

Kinks: where f is not differentiable (x = 0 for relu, leaky_relu, prelu, binary
step; elu when alpha != 1) ``df`` returns the LEFT-side derivative (the x < 0
branch): relu'(0) = 0 (what autodiff gives for ``jax.nn.relu`` at 0), leaky_relu'(0) = alpha,
elu'(0) = alpha, binary_step'(x) = 0 everywhere (the true derivative at 0 is a
Dirac delta, undefined as a number). Each ``f`` is written so that autodiff of ``f``
picks the same side, so the autodiff and hand-written paths agree exactly, even at 0.

Ranges: ``range`` is a tuple ``(low, high)`` of the mathematical range, which is
open unless a bound is attained (relu attains 0); in floating point a saturating
function can reach its open bound (sigmoid(40.) == 1.0 in float32), so outputs
satisfy ``low <= f(x) <= high``. The binary step's range is the set
``frozenset({0.0, 1.0})``. GELU's and SiLU's lower bounds are rounded down.

Softmax and log-softmax act on the last axis (``elementwise=False``): their ``df``
returns the Jacobian, shape ``(..., n, n)``, ``J[..., i, j] = d f_i / d x_j``.

Only ``jax.numpy``/``lax`` is used; nothing here calls autodiff.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

from funnn.core import ConfigError, upcast

__all__ = [
    "Activation", "get", "names", "ALL",
    "identity", "binary_step", "sigmoid", "logistic", "tanh", "arctan", "softsign",
    "isru", "relu", "leaky_relu", "prelu", "elu", "softplus", "gelu", "gelu_tanh",
    "silu", "swish", "softmax", "log_softmax",
]

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation: ``f``, its closed-form derivative ``df``, and its ``range``.

    ``elementwise`` activations have ``df(x)`` of ``x``'s shape and
    ``backprop(x, dy) = dy * df(x)``; the others (softmax, log_softmax) return the
    Jacobian ``(..., n, n)`` from ``df`` and carry their own ``vjp``.
    ``params`` holds ``(name, value)`` pairs; ``factory`` rebuilds with new ones.
    """

    name: str
    f: Callable
    df: Callable
    range: tuple | frozenset
    formula: str = ""
    elementwise: bool = True
    vjp: Callable | None = None
    params: tuple = ()
    factory: Callable | None = dataclasses.field(default=None, repr=False)

    def __call__(self, x):
        """f(x), same shape and dtype as ``x``."""
        return self.f(x)

    def backprop(self, x, dy):
        """Hand-written vector-Jacobian product: dL/dx given dy = dL/df(x), both ``x``'s shape."""
        if self.vjp is not None:
            return self.vjp(x, dy)
        return dy * self.df(x)

    def with_params(self, **kw) -> Activation:
        """The same activation with other parameters, e.g. ``A.elu.with_params(alpha=0.5)``."""
        base = self.name.split("(")[0]
        if not kw:
            return self
        if self.factory is None:
            raise ConfigError(f"activation {base!r} has no parameters, got {sorted(kw)}; "
                              f"use it without arguments")
        valid = [k for k, _ in self.params]
        bad = sorted(set(kw) - set(valid))
        if bad:
            raise ConfigError(f"activation {base!r}: unknown parameter(s) {bad}; valid: {valid}")
        return self.factory(**{**dict(self.params), **kw})

    def __repr__(self) -> str:
        return f"Activation({self.name})"


def _arr(x):
    return jnp.asarray(x)


def _scalar(act: str, key: str, value, positive: bool = False) -> float:
    """A finite Python float hyper-parameter (``positive``: > 0), else ConfigError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or (positive and v <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ConfigError(f"activation {act!r}: {key} must be {want}, got {value!r}")
    return v


_MADE: dict = {}


def _make(name, f, df, rng, formula, **kw) -> Activation:
    """Wrap ``f``/``df`` so Python scalars and lists work, and build the Activation.

    Built once per name: ``elu.with_params(alpha=0.5)`` twice gives the same object,
    so equal activations compare and hash equal (no recompiles as a jit static arg).
    """
    if name not in _MADE:
        _MADE[name] = Activation(name=name, f=lambda x: f(_arr(x)), df=lambda x: df(_arr(x)),
                                 range=rng, formula=formula, **kw)
    return _MADE[name]


# --------------------------------------------------------------------------- seed table


def _step(x):
    one = jnp.ones_like(x)
    return jnp.where(x >= 0, one, jnp.zeros_like(x))


identity = _make("identity", lambda x: x, jnp.ones_like, (-_INF, _INF),
                 "f = x; f' = 1")

binary_step = _make("binary_step", _step, jnp.zeros_like, frozenset({0.0, 1.0}),
                    "f = 0 for x < 0, 1 for x >= 0; f' = 0 (at x = 0 undefined, we return 0)")


def _sigmoid(x):
    return lax.logistic(x)          # stable for any x: no overflow, no nan


def _dsigmoid(x):
    s = lax.logistic(x)
    return s * (1 - s)


sigmoid = _make("sigmoid", _sigmoid, _dsigmoid, (0.0, 1.0),
                "f = 1 / (1 + exp(-x)); f' = f (1 - f)")
logistic = sigmoid


def _dtanh(x):
    t = jnp.tanh(x)
    return (1 - t) * (1 + t)   # = 1 - t^2, without cancelling away its digits at |x| > ~8


tanh = _make("tanh", jnp.tanh, _dtanh, (-1.0, 1.0), "f = tanh(x); f' = 1 - f^2")

arctan = _make("arctan", jnp.arctan, lambda x: 1 / (1 + x * x), (-math.pi / 2, math.pi / 2),
               "f = arctan(x); f' = 1 / (1 + x^2)")


def _dsoftsign(x):
    d = 1 + jnp.abs(x)
    return 1 / (d * d)


softsign = _make("softsign", lambda x: x / (1 + jnp.abs(x)), _dsoftsign, (-1.0, 1.0),
                 "f = x / (1 + |x|); f' = 1 / (1 + |x|)^2")


def _isru(alpha: float = 1.0) -> Activation:
    """ISRU: f = x / sqrt(1 + a x^2); f' = (1 / sqrt(1 + a x^2))^3.

    Range (-1/sqrt(a), 1/sqrt(a)).
    """
    a = _scalar("isru", "alpha", alpha, positive=True)
    bound = 1 / math.sqrt(a)
    return _make(f"isru(alpha={a!r})", lambda x: x * lax.rsqrt(1 + a * x * x),
                 lambda x: lax.rsqrt(1 + a * x * x) ** 3, (-bound, bound),
                 "f = x / sqrt(1 + alpha x^2); f' = (1 / sqrt(1 + alpha x^2))^3",
                 params=(("alpha", a),), factory=_isru)


def _relu_f(x):
    return jnp.where(x > 0, x, jnp.zeros_like(x))


def _relu_df(x):
    return jnp.where(x > 0, jnp.ones_like(x), jnp.zeros_like(x))


relu = _make("relu", _relu_f, _relu_df, (0.0, _INF),
             "f = max(x, 0); f' = 1 for x > 0, 0 for x <= 0 (left side at the kink)")


def _leaky(kind: str, alpha: float) -> Activation:
    a = _scalar(kind, "alpha", alpha)
    factory = _leaky_relu if kind == "leaky_relu" else _prelu
    return _make(f"{kind}(alpha={a!r})",
                 lambda x: jnp.where(x > 0, x, a * x),
                 lambda x: jnp.where(x > 0, jnp.ones_like(x), jnp.full_like(x, a)),
                 (-_INF, _INF),
                 "f = x for x > 0, alpha x for x <= 0; f' = 1 for x > 0, alpha for x <= 0",
                 params=(("alpha", a),), factory=factory)


def _leaky_relu(alpha: float = 0.01) -> Activation:
    """Leaky ReLU: f = x (x > 0), alpha x (x <= 0); f' = 1 or alpha (alpha at 0)."""
    return _leaky("leaky_relu", alpha)


def _prelu(alpha: float = 0.25) -> Activation:
    """PReLU with a fixed alpha (the learnable one is ``layers.prelu``); as leaky ReLU."""
    return _leaky("prelu", alpha)


def _elu(alpha: float = 1.0) -> Activation:
    """ELU: f = x (x > 0), alpha (e^x - 1) (x <= 0); f' = 1, or alpha e^x = f + alpha.

    exp only ever sees min(x, 0) (through ``where``, not ``minimum``, whose gradient
    splits ties), so large positive x gives neither inf nor a nan gradient. The
    derivative is computed as alpha e^x rather than f + alpha, which would lose all
    digits for very negative x.
    """
    a = _scalar("elu", "alpha", alpha)

    def f(x):
        xn = jnp.where(x > 0, jnp.zeros_like(x), x)
        return jnp.where(x > 0, x, a * jnp.expm1(xn))

    def df(x):
        xn = jnp.where(x > 0, jnp.zeros_like(x), x)
        return jnp.where(x > 0, jnp.ones_like(x), a * jnp.exp(xn))

    return _make(f"elu(alpha={a!r})", f, df, (-abs(a), _INF),
                 "f = x for x > 0, alpha (e^x - 1) for x <= 0; f' = 1, or f + alpha = alpha e^x",
                 params=(("alpha", a),), factory=_elu)


def _softplus(x):
    # max(x, 0) + log(1 + exp(-|x|)), written with where so the gradient is exact at 0
    neg = jnp.where(x > 0, -x, x)                  # -|x| <= 0: exp never overflows
    return jnp.where(x > 0, x, jnp.zeros_like(x)) + jnp.log1p(jnp.exp(neg))


softplus = _make("softplus", _softplus, _sigmoid, (0.0, _INF),
                 "f = log(1 + e^x); f' = 1 / (1 + e^-x) = sigmoid(x)")

isru = _isru()
leaky_relu = _leaky_relu()
prelu = _prelu()
elu = _elu()


# --------------------------------------------------------------------------- modern ones

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _gelu(x):
    return 0.5 * x * lax.erfc(-x * _SQRT_HALF)      # x Phi(x); erfc keeps x << 0 accurate


def _dgelu(x):
    return 0.5 * lax.erfc(-x * _SQRT_HALF) + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


gelu = _make("gelu", _gelu, _dgelu, (-0.17, _INF),
             "f = x Phi(x) = x/2 (1 + erf(x / sqrt 2)); f' = Phi(x) + x phi(x)")

_C = math.sqrt(2 / math.pi)
_K = 0.044715


def _gelu_tanh(x):
    # x/2 (1 + tanh(u)) = x sigmoid(2u): no cancellation in 1 + tanh(u) for x << 0
    return x * lax.logistic(2 * _C * (x + _K * x * x * x))


def _dgelu_tanh(x):
    s = lax.logistic(2 * _C * (x + _K * x * x * x))
    return s + x * s * (1 - s) * 2 * _C * (1 + 3 * _K * x * x)


gelu_tanh = _make("gelu_tanh", _gelu_tanh, _dgelu_tanh, (-0.171, _INF),
                  "f = x/2 (1 + tanh(u)) = x s, s = sigmoid(2u), "
                  "u = sqrt(2/pi) (x + 0.044715 x^3); f' = s + 2 x s (1 - s) u'")


def _dsilu(x):
    s = lax.logistic(x)
    return s * (1 + x * (1 - s))


silu = _make("silu", lambda x: x * lax.logistic(x), _dsilu, (-0.279, _INF),
             "f = x sigmoid(x); f' = s (1 + x (1 - s)), s = sigmoid(x)")
swish = silu


# --------------------------------------------------------------------------- last-axis ones


def _softmax(x):
    # bfloat16/float16 inputs: exponentials and the sum in float32, the result in x's dtype
    x = jnp.asarray(x)
    xw = upcast(x)
    z = xw - lax.stop_gradient(jnp.max(xw, axis=-1, keepdims=True))   # stable: z <= 0
    e = jnp.exp(z)
    return (e / jnp.sum(e, axis=-1, keepdims=True)).astype(x.dtype)


def _log_softmax(x):
    x = jnp.asarray(x)
    xw = upcast(x)
    z = xw - lax.stop_gradient(jnp.max(xw, axis=-1, keepdims=True))
    return (z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))).astype(x.dtype)


def _softmax_jac(x):
    s = _softmax(x)
    eye = jnp.eye(x.shape[-1], dtype=s.dtype)
    return s[..., :, None] * (eye - s[..., None, :])          # s_i (delta_ij - s_j)


def _log_softmax_jac(x):
    s = _softmax(x)
    eye = jnp.eye(x.shape[-1], dtype=s.dtype)
    return eye - s[..., None, :]                              # delta_ij - s_j


def _softmax_vjp(x, dy):
    dt = jnp.result_type(dy)
    s, dy = upcast(_softmax(upcast(_arr(x)))), upcast(dy)
    return (s * (dy - jnp.sum(dy * s, axis=-1, keepdims=True))).astype(dt)


def _log_softmax_vjp(x, dy):
    dt = jnp.result_type(dy)
    s, dy = _softmax(upcast(_arr(x))), upcast(dy)
    return (dy - s * jnp.sum(dy, axis=-1, keepdims=True)).astype(dt)


softmax = _make("softmax", _softmax, _softmax_jac, (0.0, 1.0),
                "f_i = e^x_i / sum_j e^x_j (last axis); J_ij = f_i (delta_ij - f_j)",
                elementwise=False, vjp=_softmax_vjp)

log_softmax = _make("log_softmax", _log_softmax, _log_softmax_jac, (-_INF, 0.0),
                    "f_i = x_i - log sum_j e^x_j (last axis); J_ij = delta_ij - softmax_j",
                    elementwise=False, vjp=_log_softmax_vjp)


# --------------------------------------------------------------------------- lookup

ALL: tuple = (identity, binary_step, sigmoid, tanh, arctan, softsign, isru, relu, leaky_relu,
              prelu, elu, softplus, gelu, gelu_tanh, silu, softmax, log_softmax)

_BY_NAME = {a.name.split("(")[0]: a for a in ALL}
_ALIASES = {"logistic": "sigmoid", "swish": "silu", "linear": "identity", "step": "binary_step"}
_SPEC = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$")


def names() -> tuple:
    """Every name ``get`` accepts (canonical names, then aliases)."""
    return tuple(_BY_NAME) + tuple(_ALIASES)


def get(name, **kw) -> Activation:
    """Look an activation up by name, e.g. ``get("tanh")``, ``get("elu", alpha=0.5)``.

    ``name`` may carry parameters, ``"elu(alpha=0.5)"`` (as in ``Activation.name``),
    and may be an :class:`Activation` (returned, with ``kw`` applied). Unknown names
    or parameters raise :class:`funnn.core.ConfigError` listing the valid ones.
    """
    if isinstance(name, Activation):
        return name.with_params(**kw)
    m = _SPEC.match(name) if isinstance(name, str) else None
    if m is None:
        raise ConfigError(f"activation must be a name like 'tanh' or 'elu(alpha=0.5)' or an "
                          f"Activation, got {name!r}; valid names: {', '.join(names())}")
    base = m.group(1).lower().replace("-", "_")
    base = _ALIASES.get(base, base)
    if base not in _BY_NAME:
        raise ConfigError(f"unknown activation {name!r}; valid names: {', '.join(names())}")
    spec = {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"activation {name!r}: parameters are written key=value, "
                              f"got {part!r}")
        spec[key.strip()] = value.strip()
    return _BY_NAME[base].with_params(**{**spec, **kw})
