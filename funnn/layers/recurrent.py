"""Recurrent layers: Elman RNN, LSTM and GRU, with hand-written backpropagation through time.

Input ``x`` is ``(batch, time, features)``. The state starts at zero. The forward pass is
a ``lax.scan`` over time; the backward pass (BPTT) is a reverse ``lax.scan`` over the
cached residuals that carries ``dL/dh`` (and ``dL/dc`` for the LSTM) back through time and
emits each step's pre-activation gradient ``da_t``; only ``dh_{t-1} = da_t W_h^T`` is a
product inside the loop. The weight gradients and ``dx`` are then one matrix product each
over all (time, batch) rows after the loop: ``dW = X^T dA`` with the steps stacked,
``dx = dA W_x^T``.

Row-vector convention: ``h_t = tanh(x_t W_xh + h_{t-1} W_hh + b)``, weights ``(in, out)``.

Options shared by :func:`rnn`, :func:`lstm`, :func:`gru`:

* ``return_sequences=True`` (the default, as in PyTorch, so layers stack): the output is
  every hidden state, ``(batch, time, hidden)``; ``False``: only the final state
  ``(batch, hidden)``.
* Masks: ``apply``/``forward`` take ``mask=`` (``(batch, time)`` of 0/1 or bool) or
  ``lengths=`` (integer ``(batch,)``), so a recurrent layer reads the mask that flows through
  a ``serial`` stack wherever it sits; or build with
  ``masked=True``: the input is a pair ``(x, mask)``, ``mask`` either ``(batch, time)`` of
  0/1 (or bool), or integer ``lengths`` of shape ``(batch,)`` meaning
  ``mask[b, t] = t < lengths[b]``. A masked step carries the state forward unchanged,
  ``s_t = m_t s'_t + (1 - m_t) s_{t-1}`` (``s'_t`` the cell's update), and outputs
  zeros: ``y_t = m_t h_t``. With ``return_sequences=False`` the output is the final
  carried state, i.e. the state after the last unmasked step. The mask gets no gradient:
  ``backward`` returns ``dx = (dx, None)`` and ``apply`` stops its gradient.
* ``unroll`` (default 1): steps per iteration of the compiled loops, passed to
  ``lax.scan`` (forward and backward; ``True`` unrolls fully); results agree to rounding. On a
  2-core CPU, an LSTM(128) over 28 steps: full unrolling makes the manual engine's step
  about 10% faster and its compile 5x longer, and autodiff's step slower and its compile
  almost 20x longer; 2 to 7 change little (``benchmarks/lstm_cpu.py --unroll``).

Speed notes (measured with ``benchmarks/lstm_cpu.py``, XLA on a 2-core CPU): every op
inside the loop costs microseconds to launch, so a step does few, wide ops (the LSTM's four
activations are one sigmoid, below) and keeps few residuals. The LSTM's step is one matrix
product, ``[x_t, h_{t-1}] @ [W_x; W_h]`` (the weights stacked once, before the loop): against
two products and an add that made the autodiff step 7-9% faster and the manual one 2-3%
(interleaved runs). The input is projected inside the step, not for all steps before the
loop: that ``(time, batch, 4 hidden)`` array (and its gradient) pushed an LSTM(128) training
step's scratch memory to 34-42 MB, past glibc malloc's 32 MiB ``mmap`` ceiling, so every call
page-faulted through fresh memory (about 10 ms of a 20-26 ms step); without the faults
(``MALLOC_MMAP_THRESHOLD_`` raised) it was no faster either. What still separates the step
from PyTorch's fused LSTM is the ops around the product: XLA runs the forward step's
elementwise work as about a dozen separate kernels (~80 us per step against the product's
~85 us), where PyTorch runs one fused cell kernel.

``train`` and ``key`` are accepted for the layer contract and ignored (no dropout here).
The scans run in the wider of ``x``'s and the params' dtypes; ``backward`` returns each
gradient in its own param's dtype and ``dx`` in ``x``'s, as autodiff does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funnn.core import (
    ConfigError,
    DTypeError,
    Layer,
    ShapeError,
    check_floating,
    check_in_shape,
    matmul_wide,
)
from funnn.layers.per_example import outer_sq_norm

__all__ = ["rnn", "lstm", "gru", "bidirectional"]

_sigmoid = jax.nn.sigmoid


def _weights(key, n_in, hidden, gates, dt):
    """``W_x (in, G*H)`` Glorot-uniform and ``W_h (H, G*H)`` of orthogonal ``H x H`` blocks.

    One uniform draw feeds both (a random draw compiles slowly; one per layer is enough);
    each block of ``W_h`` is the ``Q`` of a QR factorisation, signs fixed by ``diag(R)``.
    """
    g = gates * hidden
    u = jax.random.uniform(key, (n_in * g + gates * hidden * hidden,), dt, -1.0, 1.0)
    w_x = jnp.sqrt(6.0 / (n_in + g)).astype(dt) * u[:n_in * g].reshape(n_in, g)
    q, r = jnp.linalg.qr(u[n_in * g:].reshape(gates, hidden, hidden))
    q = q * jnp.where(jnp.diagonal(r, axis1=1, axis2=2) < 0, -1, 1).astype(dt)[:, None, :]
    return w_x, jnp.moveaxis(q, 0, 1).reshape(hidden, g)


def _split(a, n):
    return jnp.split(a, n, axis=-1)


def _contract(x, d):
    """``sum_t x_t^T d_t``: ``x (T, B, m)``, ``d (T, B, n)`` -> ``(m, n)``, one matrix product."""
    return matmul_wide(x.reshape(-1, x.shape[-1]).T, d.reshape(-1, d.shape[-1]))


def _xw(x_t, w):
    """``x_t W`` from the step's input stored transposed, ``x_t^T (in, B)``.

    Both products then read a row-major operand: this one, and the weight gradient
    ``x_t^T dz`` that autodiff accumulates every step (measured: the transposed store makes
    the autodiff LSTM step about 5% faster on a 2-core CPU; see ``benchmarks/lstm_cpu.py``).
    """
    return lax.dot_general(x_t, w, (((0,), (0,)), ((), ())))


def _total(d):
    """A bias gradient: ``d (T, B, n)`` summed over time and batch."""
    return d.sum((0, 1))


# Per-example versions of _contract / _total (time-major inputs, batch-first results), and
# their squared norms, for Layer.per_example / per_example_norms.
def _contract_pe(x, d):
    return jnp.einsum("tbm,tbn->bmn", x, d)


def _total_pe(d):
    return d.sum(0)


def _contract_sq(x, d):
    return outer_sq_norm(jnp.swapaxes(x, 0, 1), jnp.swapaxes(d, 0, 1))


def _total_sq(d):
    return jnp.sum(jnp.square(d.sum(0)), -1)


def _project(x_tm, w):
    """``x_t W`` for all steps at once: ``(T, B, m) @ (n, k)``; the input gradient ``dz W^T``."""
    return (x_tm.reshape(-1, x_tm.shape[-1]) @ w).reshape(x_tm.shape[:-1] + (w.shape[-1],))


class _Cell(NamedTuple):
    """One recurrent cell, time-major, unmasked; :func:`_layer` adds scan, mask and checks.

    ``init(key, n_in, H, dt) -> params``; ``carry`` is a tuple with ``h`` first;
    ``step(p, carry, x_t, keep) -> (carry', res_t)`` (``res_t`` is ``None`` unless ``keep``;
    ``p`` is ``prepare(params)`` when the cell has one, ``x_t`` is ``(in, B)`` unless
    ``x_batch_major``);
    ``back(p, dcarry', h_{t-1}, res_t) -> (dcarry, dpre_t)``;
    ``finish(p, x_tm, h_prev, dpre, contract=None, total=None) -> (dparams, dx_tm)`` with the
    weight gradients as one ``contract`` (default: a matrix product over all (time, batch)
    rows; per example: an einsum, or its squared norm) and the biases as ``total``;
    matrix product each over all (time, batch) rows.

    Each step projects its own input, ``x_t W_x`` (see the module's speed notes).

    ``tangent(p, dp, dcarry, dxw_t, h_{t-1}, res_t) -> dcarry'`` is the forward-mode step
    (``Layer.jvp``): ``dxw_t = dx_t W_x + x_t dW_x + db_x`` comes precomputed for all steps.
    """

    kind: str
    wx: str
    n_carry: int
    init: Callable
    step: Callable
    back: Callable
    finish: Callable
    prepare: Callable | None = None   # params -> what ``step`` reads, once before the loop
    x_batch_major: bool = False       # ``step`` gets ``x_t`` as ``(B, in)``, not ``(in, B)``
    tangent: Callable | None = None   # the forward-mode step (see above)
    bx: str = "b"                     # the bias added to the input projection


# --------------------------------------------------------------------------- Elman RNN
# a_t = x_t W_xh + h_{t-1} W_hh + b,  h_t = tanh(a_t)
# da_t = dh_t (1 - h_t^2),  dh_{t-1} = da_t W_hh^T,  dW_xh = sum x_t^T da_t, ...


def _rnn_init(key, n_in, hidden, dt):
    w_x, w_h = _weights(key, n_in, hidden, 1, dt)
    return {"W_xh": w_x, "W_hh": w_h, "b": jnp.zeros((hidden,), dt)}


def _rnn_step(p, carry, x_t, keep):
    h = jnp.tanh(_xw(x_t, p["W_xh"]) + carry[0] @ p["W_hh"] + p["b"])
    return (h,), ((1 - h * h) if keep else None)       # residual: tanh' = 1 - h^2


def _rnn_back(p, dcarry, h_prev, dtanh):
    da = dcarry[0] * dtanh
    return (da @ p["W_hh"].T,), da


def _rnn_finish(p, x_tm, h_prev, da, contract=None, total=None):
    contract, total = contract or _contract, total or _total
    return ({"W_xh": contract(x_tm, da), "W_hh": contract(h_prev, da),
             "b": total(da)}, _project(da, p["W_xh"].T))


def _rnn_tangent(p, dp, dcarry, dxw, h_prev, dtanh):
    """``dh_t = (1 - h_t^2) (dxw_t + dh_{t-1} W_hh + h_{t-1} dW_hh)``."""
    return (dtanh * (dxw + dcarry[0] @ p["W_hh"] + h_prev @ dp["W_hh"]),)


_RNN = _Cell("rnn", "W_xh", 1, _rnn_init, _rnn_step, _rnn_back, _rnn_finish,
             tangent=_rnn_tangent)


# --------------------------------------------------------------------------- LSTM
# z = x_t W_x + h_{t-1} W_h + b, split in gate order (i, f, g, o);
# i, f, o = sigmoid, g = tanh;  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
#
# All four activations are one sigmoid over z: g = tanh(z_g) = 2 sigmoid(2 z_g) - 1, so
# a = sigmoid(s z) s - (s - 1) with s = 2 on the g block and 1 elsewhere (one fused
# elementwise pass instead of four). The step keeps, for the hand-written backward, the
# factors that multiply the incoming gradients (computed here, where the values are at hand):
#   dc_t += dh_t q,  q = o (1 - tanh^2 c_t)
#   dz = [dc_t, dc_t, dc_t, dh_t] * P,
#   P = [g i(1-i), c_{t-1} f(1-f), i (1-g^2), tanh(c_t) o(1-o)],
#   dc_{t-1} = dc_t f,  dh_{t-1} = dz W_h^T,
# so each reverse step is one elementwise pass and one matrix product.


def _lstm_init(key, n_in, hidden, dt):
    w_x, w_h = _weights(key, n_in, hidden, 4, dt)
    b = jnp.zeros((4 * hidden,), dt).at[hidden:2 * hidden].set(1.0)   # forget bias 1
    return {"W_x": w_x, "W_h": w_h, "b": b}


def _lstm_prepare(p):
    return {**p, "W_cat": jnp.concatenate([p["W_x"], p["W_h"]])}    # (in + H, 4H)


def _lstm_step(p, carry, x_t, keep):
    h, c = carry
    z = jnp.concatenate([x_t, h], axis=-1) @ p["W_cat"] + p["b"]    # one product per step
    s = np.repeat(np.array([1, 1, 2, 1], z.dtype), h.shape[-1])
    i, f, g, o = _split(_sigmoid(z * s) * s - (s - 1), 4)
    c_new = f * c + i * g
    tc = jnp.tanh(c_new)
    if not keep:
        return (o * tc, c_new), None
    pz = jnp.concatenate([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g),
                          tc * o * (1 - o)], axis=-1)
    return (o * tc, c_new), (pz, o * (1 - tc * tc), f)


def _lstm_back(p, dcarry, h_prev, res):
    dh, dc = dcarry
    pz, q, f = res
    dc = dc + dh * q                                    # through h = o tanh(c)
    dz = jnp.concatenate([dc, dc, dc, dh], axis=-1) * pz
    return (dz @ p["W_h"].T, dc * f), dz


def _lstm_finish(p, x_tm, h_prev, dz, contract=None, total=None):
    contract, total = contract or _contract, total or _total
    return ({"W_x": contract(x_tm, dz), "W_h": contract(h_prev, dz),
             "b": total(dz)}, _project(dz, p["W_x"].T))


def _lstm_tangent(p, dp, dcarry, dxw, h_prev, res):
    """``dz = dxw_t + dh W_h + h dW_h``; with the kept factors ``P`` and ``q``: ``dc_t = f dc +
    sum_{i,f,g} P dz``, ``dh_t = P_o dz_o + q dc_t``."""
    dh, dc = dcarry
    pz, q, f = res
    a_i, a_f, a_g, a_o = _split(pz * (dxw + dh @ p["W_h"] + h_prev @ dp["W_h"]), 4)
    dc_new = a_i + a_f + a_g + f * dc
    return (a_o + q * dc_new, dc_new)


_LSTM = _Cell("lstm", "W_x", 2, _lstm_init, _lstm_step, _lstm_back, _lstm_finish,
              prepare=_lstm_prepare, x_batch_major=True, tangent=_lstm_tangent)


# --------------------------------------------------------------------------- GRU
# Gate order (r, z, n), reset applied after the recurrent product (cuDNN / PyTorch):
# xw = x_t W_x + b_x,  hw = h_{t-1} W_h + b_h,  r = sigmoid(xw_r + hw_r),
# z = sigmoid(xw_z + hw_z),  n = tanh(xw_n + r * hw_n),  h_t = (1 - z) n + z h_{t-1}


def _gru_init(key, n_in, hidden, dt):
    w_x, w_h = _weights(key, n_in, hidden, 3, dt)
    return {"W_x": w_x, "W_h": w_h,
            "b_x": jnp.zeros((3 * hidden,), dt), "b_h": jnp.zeros((3 * hidden,), dt)}


def _gru_step(p, carry, x_t, keep):
    h = carry[0]
    xr, xz, xn = _split(_xw(x_t, p["W_x"]) + p["b_x"], 3)
    hr, hz, hn = _split(h @ p["W_h"] + p["b_h"], 3)
    r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return ((1 - z) * n + z * h,), ((r, z, n, hn) if keep else None)


def _gru_back(p, dcarry, h, res):
    dh, (r, z, n, hn) = dcarry[0], res
    dan = dh * (1 - z) * (1 - n * n)                    # pre-activation of n
    dar = dan * hn * r * (1 - r)
    daz = dh * (h - n) * z * (1 - z)
    dxw = jnp.concatenate([dar, daz, dan], axis=-1)
    dhw = jnp.concatenate([dar, daz, dan * r], axis=-1)
    return (dh * z + dhw @ p["W_h"].T,), (dxw, dhw)


def _gru_finish(p, x_tm, h_prev, dpre, contract=None, total=None):
    contract, total = contract or _contract, total or _total
    dxw, dhw = dpre
    return ({"W_x": contract(x_tm, dxw), "W_h": contract(h_prev, dhw),
             "b_x": total(dxw), "b_h": total(dhw)}, _project(dxw, p["W_x"].T))


def _gru_tangent(p, dp, dcarry, dxw, h, res):
    """``dr = r(1-r)(dxw_r + dhw_r)``, ``dz`` likewise, ``dn = (1-n^2)(dxw_n + dr hn + r
    dhw_n)``, ``dh_t = (1-z) dn + dz (h - n) + z dh`` with ``dhw = dh W_h + h dW_h + db_h``."""
    dh, (r, z, n, hn) = dcarry[0], res
    xr, xz, xn = _split(dxw, 3)
    hr, hz, hn_ = _split(dh @ p["W_h"] + h @ dp["W_h"] + dp["b_h"], 3)
    dr, dz = r * (1 - r) * (xr + hr), z * (1 - z) * (xz + hz)
    dn = (1 - n * n) * (xn + dr * hn + r * hn_)
    return ((1 - z) * dn + dz * (h - n) + z * dh,)


_GRU = _Cell("gru", "W_x", 1, _gru_init, _gru_step, _gru_back, _gru_finish,
             tangent=_gru_tangent, bx="b_x")


# --------------------------------------------------------------------------- the layer


@functools.cache
def _jit_init(init):
    """``init`` compiled once per (in, hidden, dtype): one program, not dozens of eager ops."""
    return jax.jit(init, static_argnums=(1, 2, 3))


def _blend(m, new, old):
    """``m new + (1 - m) old`` leaf by leaf; ``new`` when there is no mask."""
    return new if m is None else jax.tree.map(lambda a, b: m * a + (1 - m) * b, new, old)


def _inputs(name: str, cell: _Cell, masked: bool, params, xin, mask_kw=None,
            lengths_kw=None):
    """Validate; returns ``x (B, T, D)`` and ``mask (B, T)`` in x's dtype, or ``None``."""
    if masked:
        if not (isinstance(xin, (tuple, list)) and len(xin) == 2):
            raise ShapeError(f"built with masked=True, so the input must be a pair (x, mask) "
                             f"with x (batch, time, features); got a single input of shape "
                             f"{jnp.shape(xin)}", (name,))
        x, mask = xin
        if mask_kw is not None or lengths_kw is not None:
            raise ConfigError("built with masked=True, the mask comes in the input pair "
                              "(x, mask); do not also pass mask= or lengths=", (name,))
    elif isinstance(xin, (tuple, list)):
        raise ShapeError(f"got a {type(xin).__name__} input; build the layer with "
                         f"masked=True to pass (x, mask), or pass mask= or lengths=",
                         (name,))
    else:
        if mask_kw is not None and lengths_kw is not None:
            raise ConfigError("got both mask= and lengths=; pass one", (name,))
        x = xin
        mask = mask_kw if mask_kw is not None else lengths_kw
        if mask_kw is not None and jnp.ndim(mask_kw) != 2:
            raise ShapeError(f"expected mask of shape (batch, time) = "
                             f"{tuple(jnp.shape(x))[:2]}, got {jnp.shape(mask_kw)}; a "
                             f"recurrent layer reads key-padding masks only", (name,))
    x = jnp.asarray(x)
    shape, n_in = x.shape, params[cell.wx].shape[0]
    if len(shape) != 3:
        raise ShapeError(f"expected input of shape (batch, time, features), got shape "
                         f"{shape} (rank {len(shape)}); for one sequence add a batch "
                         f"axis: x[None]", (name,))
    check_floating(name, x)
    if shape[2] != n_in:
        raise ShapeError(f"expected input features {n_in}, got {shape[2]} (input shape "
                         f"{shape}, expected (batch, time, {n_in}))", (name,))
    if mask is None:
        return x, None
    ms = jnp.shape(mask)
    if ms == shape[:1]:
        if not jnp.issubdtype(jnp.result_type(mask), jnp.integer):
            raise DTypeError(f"a mask of shape (batch,) = {ms} is read as lengths and must "
                             f"be integer, got dtype {jnp.result_type(mask)}", (name,))
        mask = jnp.arange(shape[1]) < jnp.asarray(mask)[:, None]
    elif ms != shape[:2]:
        raise ShapeError(f"expected mask of shape (batch, time) = {shape[:2]} or lengths "
                         f"of shape (batch,) = {shape[:1]}, got {ms} (input shape {shape})",
                         (name,))
    return x, lax.stop_gradient(jnp.asarray(mask).astype(x.dtype))


def _settings(kind: str, hidden, return_sequences, masked, dtype, unroll) -> tuple:
    """The checked ``(hidden, return_sequences, masked, unroll)``."""
    if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden < 1:
        raise ConfigError(f"hidden size must be a positive int, got {hidden!r}", (kind,))
    for opt, v in (("return_sequences", return_sequences), ("masked", masked)):
        if not isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"{opt} must be True or False, got {v!r}", (kind,))
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ConfigError(f"dtype must be a floating dtype, got {dtype!r}", (kind,))
    if not (isinstance(unroll, (bool, np.bool_))
            or (isinstance(unroll, (int, np.integer)) and unroll >= 1)):
        raise ConfigError(f"unroll must be a positive int or True/False, got {unroll!r}",
                          (kind,))
    unroll = bool(unroll) if isinstance(unroll, (bool, np.bool_)) else int(unroll)
    return int(hidden), bool(return_sequences), bool(masked), unroll


def _tangent_rule(cell: _Cell, seq: bool, masked: bool, unroll):
    """A recurrent layer's ``jvp`` (see :func:`_layer`)."""

    def jvp(params, res, dparams, dx):
        """The forward tangent scan: each step's ``cell.tangent`` on the kept residuals, the
        input side ``dx W_x + x dW_x + db`` projected for all steps first; masked steps carry
        the tangent forward as the forward carries the state."""
        x_tm, m_tm, h_prev, cres = res
        tan = cast(Callable, cell.tangent)
        dx = dx[0] if masked else dx
        dt = h_prev.dtype
        dxw = (_project(jnp.swapaxes(dx, 0, 1).astype(dt), params[cell.wx])
               + _project(x_tm.astype(dt), dparams[cell.wx]) + dparams[cell.bx])
        zero = jnp.zeros(h_prev.shape[1:], dt)

        def f(dcarry, inp):
            dxw_t, m_t, h_t, r = inp
            dnew = _blend(m_t, tan(params, dparams, dcarry, dxw_t, h_t, r), dcarry)
            return dnew, (dnew[0] if seq else None)

        last, dhs = lax.scan(f, (zero,) * cell.n_carry, (dxw, m_tm, h_prev, cres),
                             unroll=unroll)
        if not seq:
            return last[0]
        return jnp.swapaxes(dhs if m_tm is None else m_tm * dhs, 0, 1)

    return jvp


def _layer(cell: _Cell, hidden, return_sequences, masked, dtype, unroll) -> Layer:
    kind = cell.kind
    hidden, seq, masked, unroll = _settings(kind, hidden, return_sequences, masked, dtype,
                                            unroll)
    name = f"{kind}({hidden}{'' if seq else ', return_sequences=False'}" \
           f"{', masked=True' if masked else ''})"

    def init(key, in_shape):
        shape = in_shape
        if masked and isinstance(in_shape, (tuple, list)) and in_shape \
                and isinstance(in_shape[0], (tuple, list)):
            shape = in_shape[0]                          # ((batch, time, features), mask shape)
        if not (isinstance(shape, (tuple, list)) and len(shape) == 3):
            raise ShapeError(f"init shape {in_shape!r} is not (batch, time, features); give "
                             f"e.g. (None, None, features) with None for batch and time",
                             (name,))
        # batch and time may be None: the params do not depend on the sequence length
        s = check_in_shape(name, shape, 3, 3, allow_none=(0, 1))
        out = (s[0], s[1], hidden)
        dt = jnp.dtype(dtype if dtype is not None else jnp.zeros(()).dtype)
        p = _jit_init(cell.init)(key, s[2], hidden, dt)
        return (out if seq else (s[0], hidden)), p

    def _scan(params, x, mask, keep):
        """The forward scan; returns ``(y, res)`` (``res`` None unless ``keep``)."""
        x_tm = jnp.swapaxes(x, 0, 1)                     # (T, B, D)
        m_tm = None if mask is None else jnp.swapaxes(mask, 0, 1)[..., None]
        dt = jnp.result_type(x, *jax.tree.leaves(params))
        carry0 = (jnp.zeros((x.shape[0], hidden), dt),) * cell.n_carry

        p = params if cell.prepare is None else cell.prepare(params)

        def f(carry, inp):
            x_t, m_t = inp
            new, r = cell.step(p, carry, x_t, keep)
            new = _blend(m_t, new, carry)
            out = new[0] if seq else None
            return new, ((out, carry[0], r) if keep else out)

        xs = x_tm if cell.x_batch_major else jnp.transpose(x, (1, 2, 0))
        last, outs = lax.scan(f, carry0, (xs, m_tm), unroll=unroll)
        hs = outs[0] if keep else outs
        if seq:
            y = jnp.swapaxes(hs if m_tm is None else m_tm * hs, 0, 1)
        else:
            y = last[0]
        return y, ((x_tm, m_tm, outs[1], outs[2]) if keep else None)

    def apply(params, x, *, key=None, train=False, mask=None, lengths=None):
        x, mask = _inputs(name, cell, masked, params, x, mask, lengths)
        return _scan(params, x, mask, False)[0]

    def forward(params, x, *, key=None, train=False, mask=None, lengths=None):
        x, mask = _inputs(name, cell, masked, params, x, mask, lengths)
        return _scan(params, x, mask, True)

    def _bptt(params, res, dy):
        """The reverse scan: ``(x_tm, h_prev, dpre)`` for a finish (batch or per example)."""
        x_tm, m_tm, h_prev, cres = res
        t, b = x_tm.shape[:2]
        want = (b, t, hidden) if seq else (b, hidden)
        if jnp.shape(dy) != want:
            raise ShapeError(f"expected output gradient dy of shape {want}, got "
                             f"{jnp.shape(dy)}", (name,))
        dt = h_prev.dtype
        dy = jnp.asarray(dy).astype(dt)                  # one dtype for the reverse scan's carry
        zero = jnp.zeros((b, hidden), dt)
        dlast = (zero if seq else dy,) + (zero,) * (cell.n_carry - 1)
        dys = jnp.swapaxes(dy, 0, 1) if seq else None

        def f(dcarry, inp):
            dy_t, m_t, h_t, r = inp
            if seq:                                      # y_t = m_t h_t
                dcarry = (dcarry[0] + (dy_t if m_t is None else m_t * dy_t),) + dcarry[1:]
            dnew = dcarry if m_t is None else jax.tree.map(lambda d: m_t * d, dcarry)
            dprev, dpre = cell.back(params, dnew, h_t, r)
            if m_t is not None:                          # the carried (1 - m) part
                dprev = jax.tree.map(lambda a, d: a + (1 - m_t) * d, dprev, dcarry)
            return dprev, dpre

        _, dpre = lax.scan(f, dlast, (dys, m_tm, h_prev, cres), reverse=True, unroll=unroll)
        return x_tm, h_prev, dpre

    def _dx(x_tm, dx_tm):
        dx = jnp.swapaxes(dx_tm, 0, 1).astype(x_tm.dtype)
        return (dx, None) if masked else dx

    def per_example(params, res, dy):
        """BPTT as in ``backward``; then ``dW_i = sum_t x_it^T da_it`` per example (einsum)."""
        x_tm, h_prev, dpre = _bptt(params, res, dy)
        dparams, dx_tm = cell.finish(params, x_tm, h_prev, dpre, _contract_pe, _total_pe)
        return {k: v.astype(params[k].dtype) for k, v in dparams.items()}, _dx(x_tm, dx_tm)

    def per_example_norms(params, res, dy):
        """BPTT; each weight's norm by the cheaper of the Gram form over time steps and the
        materialised per-example gradient (:mod:`funnn.layers.per_example`)."""
        x_tm, h_prev, dpre = _bptt(params, res, dy)
        sqs, dx_tm = cell.finish(params, x_tm, h_prev, dpre, _contract_sq, _total_sq)
        return sum(sqs.values()), _dx(x_tm, dx_tm)

    def backward(params, res, dy):
        x_tm, h_prev, dpre = _bptt(params, res, dy)
        dparams, dx_tm = cell.finish(params, x_tm, h_prev, dpre)
        # cotangents in their primals' dtypes, as autodiff's (x may be wider than the params)
        dparams = {k: v.astype(params[k].dtype) for k, v in dparams.items()}
        return dparams, _dx(x_tm, dx_tm)

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 context=("mask", "lengths"), per_example=per_example,
                 per_example_norms=per_example_norms, kind=kind,
                 jvp=None if cell.tangent is None else
                 _tangent_rule(cell, seq, masked, unroll))


def rnn(hidden: int, *, return_sequences: bool = True, masked: bool = False,
        dtype=None, unroll: int | bool = 1) -> Layer:
    """Elman RNN: ``h_t = tanh(x_t W_xh + h_{t-1} W_hh + b)``, ``h_0 = 0``.

    Shapes: ``x (batch, time, in) -> (batch, time, hidden)``, or ``(batch, hidden)`` with
    ``return_sequences=False``. Params: ``{"W_xh": (in, H), "W_hh": (H, H), "b": (H,)}``;
    Glorot-uniform ``W_xh``, orthogonal ``W_hh``, zero ``b``.
    Derivative (BPTT): ``da_t = dh_t (1 - h_t^2)``, ``dh_{t-1} += da_t W_hh^T``,
    ``dW_xh = sum_t x_t^T da_t``, ``dW_hh = sum_t h_{t-1}^T da_t``, ``dx_t = da_t W_xh^T``.
    Options ``return_sequences``, ``masked`` and ``unroll``: see the module docstring.
    """
    return _layer(_RNN, hidden, return_sequences, masked, dtype, unroll)


def lstm(hidden: int, *, return_sequences: bool = True, masked: bool = False,
         dtype=None, unroll: int | bool = 1) -> Layer:
    """LSTM with the four gates concatenated in order ``(i, f, g, o)``; ``h_0 = c_0 = 0``.

    ``z = x_t W_x + h_{t-1} W_h + b``; ``i, f, o = sigmoid``, ``g = tanh`` of its blocks;
    ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``; the output is ``h``.
    Shapes as :func:`rnn`. Params: ``{"W_x": (in, 4H), "W_h": (H, 4H), "b": (4H,)}``;
    Glorot-uniform ``W_x``, orthogonal ``H x H`` blocks in ``W_h``, ``b = 0`` except the
    forget-gate block ``b[H:2H] = 1``. (PyTorch's ``weight_ih_l0`` is ``W_x.T``, same order.)
    Derivative: ``dc_t += dh_t o (1 - tanh^2 c_t)``, ``do = dh_t tanh c_t``, ``di = dc_t g``,
    ``df = dc_t c_{t-1}``, ``dg = dc_t i``, ``dc_{t-1} = dc_t f``, times each gate's
    activation derivative gives ``dz``; ``dh_{t-1} = dz W_h^T``. The forward keeps those
    products' step-local factors, so each reverse step is one elementwise pass and one
    matrix product; ``dW_h = sum_t h_{t-1}^T dz_t`` is one product after the loop.
    """
    return _layer(_LSTM, hidden, return_sequences, masked, dtype, unroll)


def gru(hidden: int, *, return_sequences: bool = True, masked: bool = False,
        dtype=None, unroll: int | bool = 1) -> Layer:
    """GRU, gates ``(r, z, n)``, reset applied as in cuDNN / PyTorch; ``h_0 = 0``.

    ``r = sigmoid(x W_xr + b_xr + h W_hr + b_hr)``, ``z`` likewise,
    ``n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``.
    Shapes as :func:`rnn`. Params: ``{"W_x": (in, 3H), "W_h": (H, 3H), "b_x": (3H,),
    "b_h": (3H,)}``; Glorot-uniform ``W_x``, orthogonal ``H x H`` blocks in ``W_h``, zero
    biases. (PyTorch's ``weight_ih_l0`` is ``W_x.T``, same gate order.)
    Derivative: ``dn = dh (1 - z)``, ``dz = dh (h_{t-1} - n)``, ``dh_{t-1} = dh z + ...``;
    through ``n``: ``d(hW_hn + b_hn) = dn (1 - n^2) r``, ``dr = dn (1 - n^2) (h W_hn + b_hn)``.
    """
    return _layer(_GRU, hidden, return_sequences, masked, dtype, unroll)


# --------------------------------------------------------------------------- bidirectional


def _reverse_time(a, lengths):
    """Reverse ``a (batch, time, ...)`` in time within each example's first ``lengths[b]``
    steps (the padding after them stays in place); all steps when ``lengths`` is ``None``.
    A permutation that is its own inverse, so its backward is itself."""
    if lengths is None:
        return a[:, ::-1]
    t = jnp.arange(a.shape[1])[None, :]
    n = jnp.asarray(lengths)[:, None]
    idx = jnp.where(t < n, n - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, jnp.broadcast_to(idx, a.shape[:2] + (1,) * (a.ndim - 2)),
                               axis=1)


def _bi_lengths(name: str, x, mask, lengths):
    """The valid lengths from ``lengths=`` or a prefix ``mask=`` (padding at the end only)."""
    if mask is not None and lengths is not None:
        raise ConfigError("got both mask= and lengths=; pass one", (name,))
    if mask is None:
        return lengths
    if jnp.shape(mask) != tuple(jnp.shape(x))[:2]:
        raise ShapeError(f"expected mask of shape (batch, time) = {tuple(jnp.shape(x))[:2]}, got "
                         f"{jnp.shape(mask)}", (name,))
    return jnp.sum(jnp.asarray(mask).astype(jnp.int32), axis=1)


def bidirectional(layer: Layer) -> Layer:
    """A bidirectional recurrent layer: ``layer`` run forward in time and, with its own
    params, backward in time; features concatenated (PyTorch's ``bidirectional=True``)::

        y = concat(layer(p_fwd, x), rev(layer(p_bwd, rev(x))))     # rev: reverse time

    With ``lengths=`` (or a ``mask=`` whose valid steps come first, as packed sequences),
    ``rev`` reverses each example's first ``lengths[b]`` steps only, so the backward
    direction starts at each sequence's last real step. With ``return_sequences=False`` the
    output is ``concat(h_fwd_final, h_bwd_final)`` (PyTorch's ``h_n`` of both directions), not
    reversed. Shapes: ``x (batch, time, in) -> (batch, time, 2H)`` or ``(batch, 2H)``.
    Params: ``(p_fwd, p_bwd)``, each ``layer``'s. Backward: ``rev`` is a permutation and its
    own inverse: ``dx = dx_fwd + rev(backward_bwd(rev(dy_bwd)))``; per-example rules alike.
    ``layer`` takes ``x (batch, time, in)`` (not ``masked=True``'s pair).
    """
    if not isinstance(layer, Layer):
        raise ConfigError(f"bidirectional needs a Layer, got {type(layer).__name__}",
                          ("bidirectional",))
    name = f"bidirectional({layer.name})"
    reads = "lengths" in layer.context

    def init(key, in_shape):
        k1, k2 = jax.random.split(key)
        out, p_f = layer.init(k1, in_shape)
        _, p_b = layer.init(k2, in_shape)
        return tuple(out)[:-1] + (2 * out[-1],), (p_f, p_b)

    def _ctx(n):
        return {"lengths": n} if reads and n is not None else {}

    def _run(params, x, mask, lengths, fwd: bool):
        if isinstance(x, (tuple, list)) or jnp.ndim(x) != 3:
            raise ShapeError(f"expected input of shape (batch, time, features), got "
                             f"{jnp.shape(x) if not isinstance(x, (tuple, list)) else 'a pair'}"
                             f"; build the inner layer without masked=True and pass lengths=",
                             (name,))
        n = _bi_lengths(name, x, mask, lengths)
        if n is not None and not reads:
            raise ConfigError(f"{layer.name} reads no lengths=; cannot mask it", (name,))
        p_f, p_b = params
        call = layer.forward if fwd else (lambda p, a, **kw: (layer.apply(p, a, **kw), None))
        y_f, r_f = call(p_f, x, **_ctx(n))
        y_b, r_b = call(p_b, _reverse_time(x, n), **_ctx(n))
        seq = y_b.ndim == 3
        y = jnp.concatenate([y_f, _reverse_time(y_b, n) if seq else y_b], axis=-1)
        return y, (r_f, r_b, n)

    def apply(params, x, *, key=None, train=False, mask=None, lengths=None):
        return _run(params, x, mask, lengths, False)[0]

    def forward(params, x, *, key=None, train=False, mask=None, lengths=None):
        return _run(params, x, mask, lengths, True)

    def _walk(params, res, dy, how):
        r_f, r_b, n = res
        h = dy.shape[-1] // 2                    # both directions are the same layer
        rule = getattr(layer, how)
        if rule is None:
            raise ConfigError(f"{layer.name} has no {how} rule", (name,))
        seq = dy.ndim == 3
        dy_b = dy[..., h:]
        g_f, dx_f = rule(params[0], r_f, dy[..., :h])
        g_b, dx_b = rule(params[1], r_b, _reverse_time(dy_b, n) if seq else dy_b)
        return (g_f, g_b), dx_f + _reverse_time(dx_b, n)

    def backward(params, res, dy):
        return _walk(params, res, dy, "backward")

    def per_example(params, res, dy):
        return _walk(params, res, dy, "per_example")

    def per_example_norms(params, res, dy):
        (s_f, s_b), dx = _walk(params, res, dy, "per_example_norms")
        return s_f + s_b, dx

    def jvp(params, res, dparams, dx):
        """Tangent: ``concat(jvp_fwd(dx), rev(jvp_bwd(rev(dx))))`` (the final states unreversed)."""
        r_f, r_b, n = res
        tan = cast(Callable, layer.jvp)
        dy_f = tan(params[0], r_f, dparams[0], dx)
        dy_b = tan(params[1], r_b, dparams[1], _reverse_time(dx, n))
        return jnp.concatenate([dy_f, _reverse_time(dy_b, n) if dy_b.ndim == 3 else dy_b], -1)

    has_rules = layer.per_example is not None and layer.per_example_norms is not None
    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 children=(("[0]", layer), ("[1]", layer)),
                 context=("mask", "lengths") if reads else (),
                 per_example=per_example if has_rules else None,
                 per_example_norms=per_example_norms if has_rules else None,
                 kind="bidirectional", jvp=jvp if layer.jvp is not None else None)
