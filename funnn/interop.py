"""Loading PyTorch-layout weights: a ``state_dict`` of numpy arrays in, funnn params out.

No torch import: give the arrays as numpy (``{k: v.numpy() for k, v in
module.state_dict().items()}``, or read them from a ``.safetensors`` or ``.npz`` file).

Two levels:

* one converter per layer family, ``dense``, ``conv``, ``layer_norm``, ``batch_norm``,
  ``embedding``, ``rnn``, ``lstm``, ``gru`` and ``multi_head_attention``: each takes the
  state dict and the PyTorch module's key prefix and returns that layer's funnn params;
* :func:`load`, which walks a funnn model, converts the layers named in a mapping
  ``{funnn path: PyTorch prefix}`` and checks every array against the shapes the model's own
  ``init`` made, so a wrong model, a missing key or a transposed array is an error naming
  the key and the layer path, never a silent broadcast later.

The layout rules (PyTorch → funnn; funnn keeps row vectors, ``y = x @ W + b``, and
channels last):

- `Linear`: `weight (out, in)`, `bias` → `W = weight.T`, `b = bias`.
- `Conv1d` / `Conv2d`: `weight (O, I/groups, K)` / OIHW `(O, I/groups, KH, KW)` →
  WIO `weight.transpose(2, 1, 0)` / HWIO `weight.transpose(2, 3, 1, 0)`; `b = bias`.
- `LayerNorm`: `weight`, `bias` → `gamma`, `beta`.
- `BatchNorm1d/2d`: `weight`, `bias` → `gamma`, `beta`; `running_mean`, `running_var` →
  the state `{"mean", "var"}`.
- `Embedding`: `weight (n, F)` → `table` (same layout).
- `RNN`: `weight_ih_l0 (H, in)`, `weight_hh_l0 (H, H)` → `W_xh`, `W_hh` transposed;
  `b = bias_ih_l0 + bias_hh_l0`.
- `LSTM`: the same with 4 gate blocks stacked in the order `(i, f, g, o)`, which funnn
  shares; `W_x`, `W_h` transposed, `b = b_ih + b_hh`.
- `GRU`: 3 gate blocks `(r, z, n)`, shared order; `W_x`, `W_h` transposed, `b_x = b_ih`,
  `b_h = b_hh`.
- `MultiheadAttention`: `in_proj_weight (3E, E)` is `[W_q; W_k; W_v]` row blocks, each
  transposed; `in_proj_bias` likewise; `out_proj.weight.T` → `W_o`, `out_proj.bias` → `b_o`.

The GRU keeps its two biases apart because its candidate gate multiplies the recurrent
part, bias included, by the reset gate: ``n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn))``.
The LSTM's and the RNN's biases are only ever added, so one sum is exact.

A dense layer after a flatten needs one more step: PyTorch flattens ``(C, H, W)`` per example
(NCHW), funnn ``(H, W, C)`` (NHWC), so the rows of ``W`` come in another order.
``dense(sd, prefix, flatten_from=(C, H, W))`` (or ``(C, W)`` after a 1-D conv) reorders them.

What :func:`load` refuses unless told to allow it: a bias the layer has and the state dict
lacks (``allow_missing_bias=True`` loads zeros; a bias-free module fits a layer built with
``use_bias=False``), state-dict keys that no mapped layer reads (``allow_unused=True`` loads
part of a checkpoint), NaN or infinite values (``allow_nonfinite=True``) and a negative
running variance (``allow_negative_variance=True``). An array of the transposed shape is
named as such, by its key. The converters alone re-lay arrays and check their shapes; a bias
the module lacks is left out of their result (zeros with ``allow_missing_bias=True``).

BatchNorm: PyTorch's ``momentum=0.1`` is funnn's ``momentum=0.9`` (the weight of the old
statistic). PyTorch stores the unbiased running variance; inference uses the stored value in
both libraries, so the loaded model predicts exactly as PyTorch's does in ``eval()``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.tree_util import PyTreeDef

from funnn.core import ConfigError, FunnnError, Layer

__all__ = [
    "StateDictError", "load", "dense", "conv", "layer_norm", "batch_norm", "embedding",
    "rnn", "lstm", "gru", "multi_head_attention", "CONVERTERS", "transformer_encoder_layer",
    "transformer_block", "transformer_decoder_layer", "bidirectional", "rms_norm",
]


class StateDictError(FunnnError, ValueError):
    """A state dict lacks a key, or holds an array of the wrong shape or rank."""


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _get(sd: Mapping[str, Any], prefix: str, name: str, ndim: int, what: str,
         optional: bool = False):
    """``sd[prefix.name]`` as a numpy array of rank ``ndim``; a clear error otherwise."""
    k = _key(prefix, name)
    if k not in sd:
        if optional:
            return None
        near = sorted(s for s in sd if s.startswith(_key(prefix, "")) or not prefix)[:8]
        raise StateDictError(f"state_dict has no key {k!r} ({what}); keys under "
                             f"{(prefix or '<root>')!r}: {near or 'none'}")
    a = np.asarray(sd[k])
    if a.ndim != ndim:
        raise StateDictError(f"state_dict key {k!r} ({what}) has shape {a.shape}, expected "
                             f"rank {ndim}")
    return a


def _swapped(got: tuple, want: tuple) -> bool:
    """Whether ``got`` is ``want`` with its first two axes swapped (a transposed weight)."""
    return (len(got) == len(want) >= 2 and got != want and got[:2] == want[1::-1]
            and got[2:] == want[2:])


def _transposed(k: str, got: tuple, want: tuple) -> str:
    """``"; it looks transposed ..."`` when ``got`` is ``want`` with two axes swapped."""
    if not _swapped(tuple(got), tuple(want)):
        return ""
    how = ".T" if len(want) == 2 else ".swapaxes(0, 1) (its out and in axes swapped)"
    return f"; it looks transposed: load {k!r} as {how}"


def _expect(k: str, a, shape: tuple, what: str) -> None:
    if tuple(a.shape) != tuple(shape):
        raise StateDictError(f"state_dict key {k!r} ({what}) has shape {tuple(a.shape)}, "
                             f"expected {tuple(shape)}"
                             f"{_transposed(k, tuple(a.shape), tuple(shape))}")


def _bias_fits(prefix: str, w, b, what: str) -> None:
    """A bias whose length is the weight's second axis, not its first: the weight is the one
    that is transposed (its in and out axes swapped), so name it, not the bias."""
    if b.shape != (w.shape[0],) and b.shape == (w.shape[1],):
        kw, want = _key(prefix, "weight"), (w.shape[1], w.shape[0], *w.shape[2:])
        raise StateDictError(f"state_dict key {kw!r} ({what}) has shape {w.shape}, expected "
                             f"{want} to match {_key(prefix, 'bias')!r} of shape {b.shape}"
                             f"{_transposed(kw, w.shape, want)}")


def _no_bias(shape: tuple, dtype, allow: bool):
    """Zeros for a bias the module lacks with ``allow_missing_bias=True``, else None."""
    return np.zeros(shape, dtype) if allow else None


# --------------------------------------------------------------------------- converters


def dense(sd: Mapping[str, Any], prefix: str = "", *, flatten_from: tuple | None = None,
          allow_missing_bias: bool = False) -> dict:
    """``nn.Linear``: ``{"W": weight.T, "b": bias}``; no ``"b"`` for a module without a bias
    (``nn.Linear(bias=False)``, for ``dense(use_bias=False)``), zeros with
    ``allow_missing_bias=True``.

    ``flatten_from=(C, H, W)`` (or ``(C, W)``): the layer follows a flatten of a
    channels-first feature map in PyTorch; its input rows are reordered to funnn's
    channels-last flatten order ``(H, W, C)``.
    """
    w = _get(sd, prefix, "weight", 2, "Linear weight (out, in)")
    out, n_in = w.shape
    b = _get(sd, prefix, "bias", 1, "Linear bias (out,)", optional=True)
    if b is None:
        b = _no_bias((out,), w.dtype, allow_missing_bias)
    else:
        _bias_fits(prefix, w, b, "Linear weight (out, in)")
        _expect(_key(prefix, "bias"), b, (out,), "Linear bias (out,)")
    W = w.T
    if flatten_from is not None:
        cf = tuple(int(d) for d in flatten_from)
        if int(np.prod(cf)) != n_in:
            raise StateDictError(f"state_dict key {_key(prefix, 'weight')!r} has shape "
                                 f"{w.shape}: {n_in} inputs, but flatten_from={cf} has "
                                 f"{int(np.prod(cf))}" + (
                                     "; it looks transposed: load it as .T" if out == int(
                                         np.prod(cf)) else ""))
        # rows are (C, *spatial) in PyTorch order; move C last
        W = W.reshape(cf + (out,))
        W = np.moveaxis(W, 0, -2).reshape(n_in, out)
    return {"W": np.ascontiguousarray(W), **({} if b is None else {"b": b})}


def conv(sd: Mapping[str, Any], prefix: str = "", *, allow_missing_bias: bool = False) -> dict:
    """``nn.Conv1d`` / ``nn.Conv2d``: OIW / OIHW weights to WIO / HWIO, ``b = bias``; no
    ``"b"`` for a module without a bias, zeros with ``allow_missing_bias=True``."""
    k = _key(prefix, "weight")
    if k not in sd:
        _get(sd, prefix, "weight", 4, "Conv weight (O, I/groups, *kernel)")
    w = np.asarray(sd[k])
    if w.ndim not in (3, 4):
        raise StateDictError(f"state_dict key {k!r} (Conv weight) has shape {w.shape}, expected "
                             f"rank 3 (Conv1d: O, I/groups, K) or 4 (Conv2d: O, I/groups, KH, KW)")
    W = np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))
    out: dict = {"W": np.ascontiguousarray(W)}
    b = _get(sd, prefix, "bias", 1, "Conv bias (O,)", optional=True)
    if b is not None:
        _bias_fits(prefix, w, b, "Conv weight (O, I/groups, *kernel)")
        _expect(_key(prefix, "bias"), b, (w.shape[0],), "Conv bias (O,)")
    else:
        b = _no_bias((w.shape[0],), w.dtype, allow_missing_bias)
    return out if b is None else {**out, "b": b}


def layer_norm(sd: Mapping[str, Any], prefix: str = "", *,
               allow_missing_bias: bool = False) -> dict:
    """``nn.LayerNorm`` over the last axis: ``{"gamma": weight, "beta": bias}``; no
    ``"beta"`` for ``LayerNorm(bias=False)``, zeros with ``allow_missing_bias=True``."""
    g = _get(sd, prefix, "weight", 1, "LayerNorm weight (F,)")
    b = _get(sd, prefix, "bias", 1, "LayerNorm bias (F,)", optional=True)
    if b is None:
        b = _no_bias(g.shape, g.dtype, allow_missing_bias)
        return {"gamma": g} if b is None else {"gamma": g, "beta": b}
    _expect(_key(prefix, "bias"), b, g.shape, "LayerNorm bias (F,)")
    return {"gamma": g, "beta": b}


def batch_norm(sd: Mapping[str, Any], prefix: str = "", *,
               allow_negative_variance: bool = False) -> tuple[dict, dict]:
    """``nn.BatchNorm1d/2d``: ``({"gamma", "beta"}, {"mean", "var"})`` (params, state).

    ``num_batches_tracked`` is read and ignored (funnn's momentum is fixed). A negative
    ``running_var`` (never a variance: a corrupt or hand-edited checkpoint) is refused
    unless ``allow_negative_variance=True``.
    """
    g = _get(sd, prefix, "weight", 1, "BatchNorm weight (C,)")
    c = g.shape
    parts = []
    for name in ("bias", "running_mean", "running_var"):
        a = _get(sd, prefix, name, 1, f"BatchNorm {name} (C,)")
        _expect(_key(prefix, name), a, c, f"BatchNorm {name} (C,)")
        parts.append(a)
    b, mean, var = parts
    if _key(prefix, "num_batches_tracked") in sd:
        sd[_key(prefix, "num_batches_tracked")]        # read: it belongs to this module
    if not allow_negative_variance and np.any(var < 0):
        raise StateDictError(f"state_dict key {_key(prefix, 'running_var')!r} holds "
                             f"{int(np.sum(var < 0))} negative values (the lowest "
                             f"{float(np.min(var)):.3g}), and a variance is never negative; "
                             f"pass allow_negative_variance=True to load it anyway")
    return {"gamma": g, "beta": b}, {"mean": mean, "var": var}


def embedding(sd: Mapping[str, Any], prefix: str = "") -> dict:
    """``nn.Embedding``: ``{"table": weight}`` (the same ``(num_embeddings, features)``)."""
    return {"table": _get(sd, prefix, "weight", 2, "Embedding weight (num_embeddings, F)")}


def _recurrent(sd, prefix: str, gates: int, kind: str, layer: int, allow_missing_bias: bool):
    """``(W_x, W_h, b_ih, b_hh)``: ``weight_hh (gates*H, H)`` gives ``H``, so a transposed
    ``weight_ih`` or ``weight_hh`` is named by its own key. Biases: both or neither (then
    ``None``, or zeros with ``allow_missing_bias=True``)."""
    k_ih, k_hh = _key(prefix, f"weight_ih_l{layer}"), _key(prefix, f"weight_hh_l{layer}")
    wi = _get(sd, prefix, f"weight_ih_l{layer}", 2, f"{kind} weight_ih ({gates}*H, in)")
    if wi.shape[0] % gates:
        raise StateDictError(f"state_dict key {k_ih!r} has shape {wi.shape}; its first axis "
                             f"must be {gates}*hidden" + ("; it looks transposed: load it as .T"
                                                          if wi.shape[1] % gates == 0 else ""))
    wh = _get(sd, prefix, f"weight_hh_l{layer}", 2, f"{kind} weight_hh ({gates}*H, H)")
    r, c = wh.shape
    h = r if c == gates * r and r != c else c   # (H, gates*H): transposed, said below
    _expect(k_hh, wh, (gates * h, h), f"{kind} weight_hh ({gates}*H, H)")
    if wi.shape[0] != gates * h:
        raise StateDictError(f"state_dict key {k_ih!r} ({kind} weight_ih ({gates}*H, in)) has "
                             f"shape {wi.shape}, expected ({gates * h}, in) for hidden size {h} "
                             f"(from {k_hh!r})" + ("; it looks transposed: load it as .T"
                                                   if wi.shape[1] == gates * h else ""))
    names = (f"bias_ih_l{layer}", f"bias_hh_l{layer}")
    biases = [_get(sd, prefix, n, 1, f"{kind} {n} ({gates}*H,)", optional=True) for n in names]
    for n, b in zip(names, biases):
        if b is not None:
            _expect(_key(prefix, n), b, (gates * h,), f"{kind} {n} ({gates}*H,)")
    if (biases[0] is None) != (biases[1] is None) and not allow_missing_bias:
        gone = 0 if biases[0] is None else 1
        raise StateDictError(f"state_dict has {_key(prefix, names[1 - gone])!r} but not "
                             f"{_key(prefix, names[gone])!r} ({kind} biases come in pairs); "
                             f"pass allow_missing_bias=True to load zeros for it")
    biases = [_no_bias((gates * h,), wi.dtype, allow_missing_bias) if b is None else b
              for b in biases]
    return np.ascontiguousarray(wi.T), np.ascontiguousarray(wh.T), biases[0], biases[1]


def _bias_sum(bi, bh) -> dict:
    """``{"b": b_ih + b_hh}``, or nothing for a bias-free module."""
    return {} if bi is None or bh is None else {"b": bi + bh}


def rnn(sd: Mapping[str, Any], prefix: str = "", *, layer: int = 0,
        allow_missing_bias: bool = False) -> dict:
    """``nn.RNN`` (tanh), one layer: ``{"W_xh", "W_hh", "b": bias_ih + bias_hh}`` (no ``"b"``
    for ``bias=False``, zeros with ``allow_missing_bias=True``)."""
    wx, wh, bi, bh = _recurrent(sd, prefix, 1, "RNN", layer, allow_missing_bias)
    return {"W_xh": wx, "W_hh": wh, **_bias_sum(bi, bh)}


def lstm(sd: Mapping[str, Any], prefix: str = "", *, layer: int = 0,
         allow_missing_bias: bool = False) -> dict:
    """``nn.LSTM``, one layer: gate order ``(i, f, g, o)`` in both; ``b = bias_ih + bias_hh``
    (no ``"b"`` for ``bias=False``, zeros with ``allow_missing_bias=True``)."""
    wx, wh, bi, bh = _recurrent(sd, prefix, 4, "LSTM", layer, allow_missing_bias)
    return {"W_x": wx, "W_h": wh, **_bias_sum(bi, bh)}


def gru(sd: Mapping[str, Any], prefix: str = "", *, layer: int = 0,
        allow_missing_bias: bool = False) -> dict:
    """``nn.GRU``, one layer: gate order ``(r, z, n)`` in both; the biases stay apart (none
    for ``bias=False``, zeros with ``allow_missing_bias=True``)."""
    wx, wh, bi, bh = _recurrent(sd, prefix, 3, "GRU", layer, allow_missing_bias)
    return {"W_x": wx, "W_h": wh, **({} if bi is None else {"b_x": bi, "b_h": bh})}


def multi_head_attention(sd: Mapping[str, Any], prefix: str = "", *,
                         allow_missing_bias: bool = False) -> dict:
    """``nn.MultiheadAttention``: ``W_q, W_k, W_v`` from the row blocks of ``in_proj_weight``
    (or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ), transposed; ``W_o`` from
    ``out_proj``. Bias-free modules give params without ``b_*`` (``use_bias=False``); zeros
    with ``allow_missing_bias=True``.
    """
    if _key(prefix, "in_proj_weight") in sd:
        w = _get(sd, prefix, "in_proj_weight", 2, "in_proj_weight (3E, E)")
        if w.shape[0] % 3:
            raise StateDictError(f"state_dict key {_key(prefix, 'in_proj_weight')!r} has shape "
                                 f"{w.shape}; its first axis must be 3*E")
        e = w.shape[0] // 3
        wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
    else:
        wq, wk, wv = (_get(sd, prefix, f"{n}_proj_weight", 2, f"{n}_proj_weight (E, {n}dim)")
                      for n in ("q", "k", "v"))
        e = wq.shape[0]
    wo = _get(sd, prefix, "out_proj.weight", 2, "out_proj.weight (E, E)")
    out = {"W_q": wq.T, "W_k": wk.T, "W_v": wv.T, "W_o": wo.T}
    bias = _get(sd, prefix, "in_proj_bias", 1, "in_proj_bias (3E,)", optional=True)
    if bias is None and allow_missing_bias:
        bias = np.zeros((3 * e,), wq.dtype)
        if _key(prefix, "out_proj.bias") not in sd:
            out.update(b_o=np.zeros((wo.shape[0],), wo.dtype))
    if bias is not None:
        _expect(_key(prefix, "in_proj_bias"), bias, (3 * e,), "in_proj_bias (3E,)")
        if "b_o" not in out:
            out["b_o"] = _get(sd, prefix, "out_proj.bias", 1, "out_proj.bias (E,)")
        out.update(b_q=bias[:e], b_k=bias[e:2 * e], b_v=bias[2 * e:])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


#: funnn layer kind (the layer name up to its first parenthesis) -> converter.
CONVERTERS = {
    "dense": dense, "conv1d": conv, "conv2d": conv, "layer_norm": layer_norm,
    "batch_norm": batch_norm, "embedding": embedding, "rnn": rnn, "lstm": lstm, "gru": gru,
    "multi_head_attention": multi_head_attention,
}


# --------------------------------------------------------------------------- whole models


def _find(model: Layer, params, state, path: str):
    """The layer at ``path`` ("0", "2.1"), with a setter for its params and state."""
    parts = [p for p in path.split(".") if p] if path not in ("", "<root>") else []
    layer, where = model, [model.name]
    trail: list = []          # (index) steps into params/state tuples

    def unwrap(l: Layer) -> Layer:
        while len(l.children) == 1 and not l.children[0][0].startswith("["):
            l = l.children[0][1]
        return l

    layer = unwrap(layer)
    for p in parts:
        kids = [c for lab, c in layer.children if lab.startswith("[")]
        if not kids:
            raise ConfigError(f"path {path!r}: {layer.name} has no sub-layers", tuple(where))
        if not p.isdigit() or int(p) >= len(kids):
            raise ConfigError(f"path {path!r}: {layer.name} has sub-layers 0..{len(kids) - 1}, "
                              f"got {p!r}", tuple(where))
        trail.append(int(p))
        layer = unwrap(kids[int(p)])
        where.append(f"[{p}] {layer.name}")
    return layer, trail


def _at(tree, trail):
    for i in trail:
        tree = tree[i]
    return tree


def _replace(tree, trail, value):
    if not trail:
        return value
    items = list(tree)
    items[trail[0]] = _replace(items[trail[0]], trail[1:], value)
    return type(tree)(items) if isinstance(tree, tuple) else items


#: where each funnn param comes from, per layer kind: the state-dict key under the prefix.
_SOURCES: dict[str, dict[str, str]] = {
    "dense": {"W": "weight", "b": "bias"}, "conv1d": {"W": "weight", "b": "bias"},
    "conv2d": {"W": "weight", "b": "bias"}, "layer_norm": {"gamma": "weight", "beta": "bias"},
    "batch_norm": {"gamma": "weight", "beta": "bias", "mean": "running_mean",
                   "var": "running_var"},
    "embedding": {"table": "weight"},
    "rnn": {"W_xh": "weight_ih_l0", "W_hh": "weight_hh_l0", "b": "bias_ih_l0 + bias_hh_l0"},
    "lstm": {"W_x": "weight_ih_l0", "W_h": "weight_hh_l0", "b": "bias_ih_l0 + bias_hh_l0"},
    "gru": {"W_x": "weight_ih_l0", "W_h": "weight_hh_l0", "b_x": "bias_ih_l0",
            "b_h": "bias_hh_l0"},
    "multi_head_attention": {"W_q": "in_proj_weight", "W_k": "in_proj_weight",
                             "W_v": "in_proj_weight", "W_o": "out_proj.weight",
                             "b_q": "in_proj_bias", "b_k": "in_proj_bias",
                             "b_v": "in_proj_bias", "b_o": "out_proj.bias"},
}


_BIASES = frozenset({"b", "b_x", "b_h", "b_q", "b_k", "b_v", "b_o", "beta"})


class _Reads(Mapping):
    """A state dict that records the keys read through it (``in`` is not a read)."""

    def __init__(self, sd: Mapping[str, Any]):
        self.sd, self.read = sd, set[str]()

    def __getitem__(self, k):
        value = self.sd[k]
        self.read.add(k)
        return value

    def __contains__(self, k) -> bool:
        return k in self.sd

    def __iter__(self):
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)


def _source(kind: str, k: str, prefix: str, options: Mapping) -> str:
    """The state-dict key (or keys) a layer's param ``k`` comes from, for messages."""
    src = _SOURCES.get(kind, {}).get(k) or k
    src = src.replace("_l0", f"_l{options.get('layer', 0)}")
    return " + ".join(_key(prefix, part) for part in src.split(" + "))


def _check_like(new, like, prefix: str, where: tuple, kind: str, sd: Mapping[str, Any],
                options: Mapping, allow_missing_bias: bool) -> dict:
    """Check converted arrays against init's (a bias the module lacks is zeros only when
    allowed), cast to init's dtypes."""
    if not isinstance(like, Mapping):
        raise ConfigError(f"{kind} params are not a dict; cannot load into them", where)
    new = dict(new)
    for k in sorted(set(like) - set(new)):
        if k not in _BIASES:
            raise StateDictError(f"PyTorch module {prefix!r} gives params {sorted(new)}, the "
                                 f"layer has {sorted(like)}", where)
        if not allow_missing_bias:
            raise StateDictError(
                f"state_dict has no {_source(kind, k, prefix, options)!r} for the layer's {k} "
                f"{tuple(np.shape(like[k]))}: a module without a bias fits a layer built with "
                f"use_bias=False; pass allow_missing_bias=True to load zeros", where)
        new[k] = np.zeros(np.shape(like[k]))
    extra = sorted(set(new) - set(like))
    if extra:
        raise StateDictError(f"PyTorch module {prefix!r} gives params {sorted(new)}, the layer "
                             f"has {sorted(like)} (a bias the layer lacks: build it with a "
                             f"bias, or leave it out of the state dict)", where)
    out = {}
    for k, ref in like.items():
        a, want = np.asarray(new[k]), tuple(np.shape(ref))
        if a.shape != want:
            src = _source(kind, k, prefix, options)
            raw = tuple(np.shape(sd[src])) if src in sd else None
            if raw is not None and a.size == int(np.prod(raw)) and _swapped(a.shape, want):
                raise StateDictError(
                    f"state_dict key {src!r} has shape {raw}, expected "
                    f"{(raw[1], raw[0], *raw[2:])} for the layer's {k} {want}"
                    f"{_transposed(src, raw, (raw[1], raw[0], *raw[2:]))}", where)
            raise StateDictError(f"state_dict key {src!r} gives {k} of shape "
                                 f"{a.shape} (in funnn's layout), the layer's {k} is "
                                 f"{want}; is this the right module?", where)
        out[k] = jax.numpy.asarray(a, dtype=jax.numpy.result_type(ref))
    return out


def _check_finite(sd: Mapping[str, Any], keys, where: tuple) -> None:
    """Refuse a key read for this layer that holds NaN or infinite values."""
    for k in sorted(keys):
        a = np.asarray(sd[k])
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            bad = int(a.size - np.sum(np.isfinite(a)))
            raise StateDictError(f"state_dict key {k!r} holds {bad} non-finite value"
                                 f"{'s' if bad > 1 else ''} (NaN or inf) of {a.size}; pass "
                                 f"allow_nonfinite=True to load them anyway", where)


def load(model: Layer, params, state_dict: Mapping[str, Any], mapping: Mapping[str, Any], *,
         state=None, allow_unused: bool = False, allow_missing_bias: bool = False,
         allow_nonfinite: bool = False, allow_negative_variance: bool = False):
    """Load PyTorch weights into the layers of ``model`` named by ``mapping``.

    ``params`` (and ``state`` for a model with batch-norm) come from ``model.init`` /
    ``model.init_state``: they give the shapes every array must have and the dtypes to cast
    to; layers not in ``mapping`` keep theirs. ``mapping`` sends a funnn layer path (indices
    into combinators joined by dots, ``"0"``, ``"2.1"``; ``""`` for the model itself) to
    the PyTorch module's key prefix (``"fc1"``), or to ``(prefix, options)`` with options for
    the converter (``("fc", {"flatten_from": (8, 4, 4)})``).

    Refused unless allowed: a state-dict key that no mapped layer reads (``allow_unused``:
    load part of a checkpoint), a bias the layer has and the module lacks
    (``allow_missing_bias``: zeros), NaN or infinite values (``allow_nonfinite``), a
    negative batch-norm running variance (``allow_negative_variance``).

    Returns the new params, or ``(params, state)`` when ``state`` is given. Errors
    (:class:`StateDictError`, :class:`~funnn.core.ConfigError`) name the state-dict key, the
    layer path and both shapes: a missing key, a wrong or transposed shape, a layer kind with
    no converter.
    """
    reads = _Reads(state_dict)
    for path, target in mapping.items():
        prefix, options = (target, {}) if isinstance(target, str) else target
        layer, trail = _find(model, params, state, path)
        kind = layer.kind
        where = (f"{model.name}[{path}] {layer.name}" if path else layer.name,)
        if kind not in CONVERTERS:
            raise ConfigError(f"no PyTorch converter for layer {layer.name!r} (kinds: "
                              f"{', '.join(CONVERTERS)})", where)
        before = set(reads.read)
        extra = ({"allow_negative_variance": allow_negative_variance} if kind == "batch_norm"
                 else {})
        try:
            convert: Any = CONVERTERS[kind]
            converted = convert(reads, prefix, **{**extra, **options})
        except FunnnError as err:
            raise err.under(where[0]) from None
        if not allow_nonfinite:
            _check_finite(state_dict, reads.read - before, where)
        check = functools.partial(_check_like, prefix=prefix, where=where, kind=kind,
                                  sd=state_dict, options=options,
                                  allow_missing_bias=allow_missing_bias)
        if kind == "batch_norm":
            new_p, new_s = converted
            if state is None:
                raise ConfigError("a batch_norm layer needs state=model.init_state(in_shape) "
                                  "to receive its running statistics", where)
            state = _replace(state, trail, check(new_s, _at(state, trail)))
        else:
            new_p = converted
        params = _replace(params, trail, check(new_p, _at(params, trail)))
    unused = sorted(set(state_dict) - reads.read, key=str)
    if unused and not allow_unused:
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        raise StateDictError(f"state_dict keys that no layer of the mapping reads: "
                             f"{unused[:8]}{more}; map their modules to layers, or pass "
                             f"allow_unused=True to load part of the state dict")
    return params if state is None else (params, state)


# --------------------------------------------------------------------------- rms norm


def rms_norm(sd: Mapping[str, Any], prefix: str = "") -> dict:
    """``nn.RMSNorm`` over the last axis: ``{"gamma": weight}`` (give funnn's ``rms_norm`` the
    module's ``eps``; PyTorch's default ``eps=None`` is the dtype's machine epsilon)."""
    return {"gamma": _get(sd, prefix, "weight", 1, "RMSNorm weight (F,)")}


CONVERTERS["rms_norm"] = rms_norm
_SOURCES["rms_norm"] = {"gamma": "weight"}

# --------------------------------------------------------------------------- transformer blocks


def _fit_tree(new, like, prefix: str):
    """``new`` (numpy leaves) checked against ``like`` (init's params): the same tree and
    shapes, cast to ``like``'s dtypes; ``like=None`` returns ``new`` as it is."""
    if like is None:
        return new
    t_new: PyTreeDef = jax.tree_util.tree_structure(new)
    t_like: PyTreeDef = jax.tree_util.tree_structure(like)
    if t_new != t_like:
        raise StateDictError(f"PyTorch module {prefix!r} gives params of structure {t_new}, "
                             f"the layer's are {t_like} (norm_first or bias setting differs?)")
    paths = jax.tree_util.tree_flatten_with_path(like)[0]
    out = []
    for (path, ref), a in zip(paths, jax.tree_util.tree_leaves(new)):
        if np.shape(a) != np.shape(ref):
            raise StateDictError(f"PyTorch module {prefix!r} gives "
                                 f"{jax.tree_util.keystr(path)} of shape {np.shape(a)}, the "
                                 f"layer's is {np.shape(ref)}; is this the right module?")
        out.append(jax.numpy.asarray(a, dtype=jax.numpy.result_type(ref)))
    return jax.tree_util.tree_unflatten(t_like, out)


def _encoder_parts(sd: Mapping[str, Any], prefix: str):
    """The pieces of an ``nn.TransformerEncoderLayer``: attention, two linears, two norms."""
    def sub(name):
        return _key(prefix, name)

    attn = multi_head_attention(sd, sub("self_attn"))
    return (attn, dense(sd, sub("linear1")), dense(sd, sub("linear2")),
            layer_norm(sd, sub("norm1")), layer_norm(sd, sub("norm2")))


def transformer_encoder_layer(sd: Mapping[str, Any], prefix: str = "", *,
                              norm_first: bool = False, like=None):
    """``nn.TransformerEncoderLayer`` (``batch_first=True``) to the params of
    :func:`funnn.layers.transformer_encoder_layer` with the same ``norm_first``.

    Keys under ``prefix``: ``self_attn.{in_proj_weight, in_proj_bias, out_proj.*}``,
    ``linear1.*``, ``linear2.*``, ``norm1.*``, ``norm2.*`` (each converted as its layer's
    converter does). Post-norm: ``((attention, {}), norm1, (linear1, {}, {}, linear2, {}),
    norm2)``; pre-norm: ``((norm1, attention, {}), (norm2, linear1, {}, {}, linear2, {}))``.
    ``like`` (the layer's ``init`` params) checks the tree and the shapes and casts to its
    dtypes, naming the first leaf that differs.
    """
    attn, lin1, lin2, n1, n2 = _encoder_parts(sd, prefix)
    if norm_first:
        new: Any = ((n1, attn, {}), (n2, lin1, {}, {}, lin2, {}))
    else:
        new = ((attn, {}), n1, (lin1, {}, {}, lin2, {}), n2)
    return _fit_tree(new, like, prefix)


def transformer_block(sd: Mapping[str, Any], prefix: str = "", *, like=None) -> dict:
    """``nn.TransformerEncoderLayer(norm_first=True, activation="gelu", batch_first=True)``
    to :func:`funnn.layers.transformer_block` params (the same pre-norm block with exact
    GELU): ``{"attn": (norm1, self_attn), "mlp": (norm2, linear1, {}, linear2, {})}``."""
    attn, lin1, lin2, n1, n2 = _encoder_parts(sd, prefix)
    return _fit_tree({"attn": (n1, attn), "mlp": (n2, lin1, {}, lin2, {})}, like, prefix)


def transformer_decoder_layer(sd: Mapping[str, Any], prefix: str = "", *, like=None) -> dict:
    """``nn.TransformerDecoderLayer`` (``batch_first=True``, either ``norm_first``) to the params
    of :func:`funnn.layers.transformer_decoder_layer`: ``{"self_attn", "norm1", "cross_attn"
    (from multihead_attn), "norm2", "ff": (linear1, {}, {}, linear2, {}), "norm3"}``."""
    def sub(name):
        return _key(prefix, name)

    new = {"self_attn": multi_head_attention(sd, sub("self_attn")),
           "norm1": layer_norm(sd, sub("norm1")),
           "cross_attn": multi_head_attention(sd, sub("multihead_attn")),
           "norm2": layer_norm(sd, sub("norm2")),
           "ff": (dense(sd, sub("linear1")), {}, {}, dense(sd, sub("linear2")), {}),
           "norm3": layer_norm(sd, sub("norm3"))}
    return _fit_tree(new, like, prefix)

# --------------------------------------------------------------------------- bidirectional RNNs


def bidirectional(sd: Mapping[str, Any], prefix: str = "", *, kind: str = "lstm",
                  layer: int = 0, like=None) -> tuple:
    """``nn.RNN/LSTM/GRU(bidirectional=True)`` to :func:`funnn.layers.bidirectional` params
    ``(p_fwd, p_bwd)``: the forward direction from ``weight_ih_l{layer}`` & co., the backward
    one from the ``..._reverse`` keys, each converted as ``kind`` (``"rnn"``, ``"lstm"``,
    ``"gru"``) converts one direction. ``like`` (init's params) checks the shapes and casts.
    """
    if kind not in ("rnn", "lstm", "gru"):
        raise ConfigError(f"kind must be 'rnn', 'lstm' or 'gru', got {kind!r}",
                          ("interop.bidirectional",))
    convert = {"rnn": rnn, "lstm": lstm, "gru": gru}[kind]
    fwd = convert(sd, prefix, layer=layer)
    suffix = f"_l{layer}_reverse"
    rev = {k[: -len("_reverse")]: v for k, v in sd.items()
           if k.startswith(_key(prefix, "")) and k.endswith(suffix)}
    if not rev:
        raise StateDictError(f"state_dict has no key ending in {suffix!r} under "
                             f"{(prefix or '<root>')!r}: is the module bidirectional=True?")
    try:
        bwd = convert(rev, prefix, layer=layer)
    except StateDictError as err:
        raise StateDictError(f"{err} (the reverse direction's '{suffix}' keys)") from None
    return _fit_tree((fwd, bwd), like, prefix)
