"""Combinators: build a layer from layers, including its hand-written backward.

``serial`` chains, ``parallel`` fans out and merges, ``residual`` adds a skip
connection. Each composes its children's ``forward``/``backward``, so any network
built from them has a manual backward pass, and checks each child's backward: its dparams
must have the child's params tree and shapes, its dx the child's input shape (kept in the
residuals as a static :class:`~funnn.core.InputSpec`), else a :class:`ShapeError` names the
child. PRNG keys are split once per child;
state (batch-norm statistics) is a tuple with one entry per child (``None`` for
stateless children). Whether a combinator is stateful is decided when it is built.

Side inputs (``mask=``, ``lengths=``) given to a combinator reach every child that names them
in its ``context`` (attention, transformer blocks, recurrent layers); the others pass them by.
A combinator reads the union of its children's side inputs, so a padded batch runs through
``serial(embedding, transformer_block, lstm, dense)`` with one ``lengths=`` argument. Layers
that change the sequence length (strided conv1d, pooling over time) do not adjust a mask: put
them after the last masked layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from funnn.core import (
    ConfigError,
    Layer,
    ShapeError,
    StateError,
    input_spec,
    layer_scope,
    merged_context,
    run_apply,
    run_forward,
    split_key,
)
from funnn.layers.walk import Child, rule, sum_norms, tangent, walk_back

__all__ = ["serial", "parallel", "residual", "out_shape", "rule"]


def out_shape(layer: Layer, in_shape) -> tuple:
    """The output shape ``layer.init`` would report, computed without allocating params."""
    box = []

    def f(key):
        shape, params = layer.init(key, in_shape)
        box.append(shape)
        return params

    jax.eval_shape(f, jax.random.key(0))
    return box[0]


def _check_layers(kind: str, layers) -> tuple:
    if not layers:
        raise ConfigError(f"{kind} needs at least one layer", (kind,))
    for i, l in enumerate(layers):
        if not isinstance(l, Layer):
            raise ConfigError(f"argument {i} is a {type(l).__name__}, not a Layer; "
                              f"did you forget to call it, e.g. dense(10) rather than dense?",
                              (kind,))
    return tuple(layers)


def _states(name: str, layers, state) -> tuple:
    if state is None:
        raise StateError("this network has stateful layers (batch_norm) and needs state=...; "
                         "make it with model.init_state(in_shape)", (name,))
    if not isinstance(state, (tuple, list)) or len(state) != len(layers):
        raise StateError(f"expected a state tuple of {len(layers)} entries (one per layer), "
                         f"got {type(state).__name__}", (name,))
    return tuple(state)


def _params(name: str, layers, params) -> tuple | list:
    """The per-child params tuple, or a clear error when it does not match the children."""
    if not isinstance(params, (tuple, list)) or len(params) != len(layers):
        got = f"a {type(params).__name__} of {len(params)}" if isinstance(
            params, (tuple, list)) else f"a {type(params).__name__}"
        raise ShapeError(f"expected params as a tuple of {len(layers)} entries (one per layer), "
                         f"got {got}; use the params that this model's init returned", (name,))
    return params


def _stateful(layers) -> bool:
    return any(l.stateful for l in layers)


def serial(*layers: Layer) -> Layer:
    """Compose layers in order: ``y = f_n(... f_2(f_1(x)))``.

    Params and state are tuples with one entry per layer; residuals are the children's and
    their input specs.
    Backward runs the children's backward in reverse: ``dx_{i} = backward_i(dx_{i+1})``.
    """
    layers = _check_layers("serial", layers)
    n = len(layers)
    name = "serial"
    labels = [f"serial[{i}]" for i in range(n)]
    stateful = _stateful(layers)

    def init(key, in_shape):
        params = []
        shape = in_shape
        for label, layer, k in zip(labels, layers, jax.random.split(key, n)):
            with layer_scope(label):
                shape, p = layer.init(k, shape)
            params.append(p)
        return shape, tuple(params)

    def init_state(in_shape):
        states, shape = [], in_shape
        for label, layer in zip(labels, layers):
            with layer_scope(label):
                states.append(layer.init_state(shape) if layer.init_state is not None else None)
                shape = out_shape(layer, shape)
        return tuple(states)

    def _run(params, x, state, key, train, ctx):
        params = _params(name, layers, params)
        states = _states(name, layers, state) if stateful else (None,) * n
        new_states = []
        for label, layer, p, s, k in zip(labels, layers, params, states, split_key(key, n)):
            with layer_scope(label):
                x, s = run_apply(layer, p, x, state=s, key=k, train=train, **ctx)
            new_states.append(s)
        return x, tuple(new_states)

    def _run_forward(params, x, state, key, train, ctx):
        params = _params(name, layers, params)
        states = _states(name, layers, state) if stateful else (None,) * n
        res, specs, new_states = [], [], []
        for label, layer, p, s, k in zip(labels, layers, params, states, split_key(key, n)):
            specs.append(input_spec(x))
            with layer_scope(label):
                x, r, s = run_forward(layer, p, x, state=s, key=k, train=train, **ctx)
            res.append(r)
            new_states.append(s)
        return x, (tuple(res), tuple(specs)), tuple(new_states)

    def _children(params, res):
        params = _params(name, layers, params)
        res, specs = res
        return [Child(labels[i], layers[i], params[i], res[i], specs[i], f"{i}.")
                for i in range(n)]

    def backward(params, res, dy):
        grads, dx = walk_back(_children(params, res), dy)
        return tuple(grads), dx

    def per_example(params, res, dy):
        grads, dx = walk_back(_children(params, res), dy, "per_example")
        return tuple(grads), dx

    def per_example_norms(params, res, dy):
        sqs, dx = walk_back(_children(params, res), dy, "per_example_norms")
        return sum_norms(sqs), dx

    def jvp(params, res, dparams, dx):
        """The children's tangent rules first to last: ``dx_{i+1} = jvp_i(dp_i, dx_i)``."""
        dparams = _params(name, layers, dparams)
        for c, dp in zip(_children(params, res), dparams):
            with layer_scope(c.scope):
                dx = tangent(c.layer)(c.params, c.res, dp, dx)
        return dx

    def walk(params, res, dy, how):
        outs, dx = walk_back(_children(params, res), dy, how)
        return tuple(outs), dx

    return _assemble(name, init, _run, _run_forward, backward, stateful, init_state,
                     tuple(zip([f"[{i}]" for i in range(n)], layers)), merged_context(layers),
                     per_example, per_example_norms, kind="serial", jvp=jvp, walk=walk)


def _assemble(name, init, run, run_forward_, backward, stateful, init_state, children,
              context, per_example=None, per_example_norms=None, *, kind: str, jvp=None,
              walk=None) -> Layer:
    """Turn uniform ``run``/``run_forward`` functions into a Layer of the right kind.

    ``context`` (the side inputs some child reads, such as ``mask``) arrives as keyword
    arguments and is handed to every child, each taking what it names.
    """
    # The two kinds differ in signature on purpose: a stateless layer takes no state=.
    apply: Callable[..., Any]
    forward: Callable[..., Any]
    if stateful:
        def apply(params, x, *, state=None, key=None, train=False, **ctx):
            return run(params, x, state, key, train, ctx)

        def forward(params, x, *, state=None, key=None, train=False, **ctx):
            return run_forward_(params, x, state, key, train, ctx)
    else:
        def apply(params, x, *, key=None, train=False, **ctx):
            return run(params, x, None, key, train, ctx)[0]

        def forward(params, x, *, key=None, train=False, **ctx):
            y, res, _ = run_forward_(params, x, None, key, train, ctx)
            return y, res

    return Layer(name=name, init=init, apply=apply, forward=forward, backward=backward,
                 init_state=init_state if stateful else None, children=children,
                 context=context, per_example=per_example,
                 per_example_norms=per_example_norms, kind=kind, jvp=jvp, walk=walk)


def parallel(*branches: Layer, combine: str = "concat") -> Layer:
    """Fan the same input out to every branch and merge: ``concat`` (last axis) or ``sum``.

    Backward: each branch gets its slice of ``dy`` (concat) or all of it (sum); the input
    gradient is the sum of the branches' input gradients.
    """
    branches = _check_layers("parallel", branches)
    if combine not in ("concat", "sum"):
        raise ConfigError(f"combine must be 'concat' or 'sum', got {combine!r}", ("parallel",))
    n = len(branches)
    name = f"parallel({combine})"
    labels = [f"parallel[{i}]" for i in range(n)]
    stateful = _stateful(branches)

    def init(key, in_shape):
        shapes, params = [], []
        for label, b, k in zip(labels, branches, jax.random.split(key, n)):
            with layer_scope(label):
                s, p = b.init(k, in_shape)
            shapes.append(tuple(s))
            params.append(p)
        lead = {s[:-1] for s in shapes}
        if (combine == "sum" and len(set(shapes)) != 1) or (combine == "concat" and len(lead) != 1):
            raise ShapeError(f"branch output shapes {shapes} cannot be merged by {combine}",
                             (name,))
        out = shapes[0] if combine == "sum" else (*shapes[0][:-1], sum(s[-1] for s in shapes))
        return out, tuple(params)

    def init_state(in_shape):
        return tuple(b.init_state(in_shape) if b.init_state is not None else None
                     for b in branches)

    def merge(ys):
        return jnp.concatenate(ys, axis=-1) if combine == "concat" else sum(ys[1:], ys[0])

    def run(params, x, state, key, train, ctx):
        params = _params(name, branches, params)
        states = _states(name, branches, state) if stateful else (None,) * n
        ys, new = [], []
        for label, b, p, s, k in zip(labels, branches, params, states, split_key(key, n)):
            with layer_scope(label):
                y, s = run_apply(b, p, x, state=s, key=k, train=train, **ctx)
            ys.append(y)
            new.append(s)
        return merge(ys), tuple(new)

    def run_fwd(params, x, state, key, train, ctx):
        params = _params(name, branches, params)
        states = _states(name, branches, state) if stateful else (None,) * n
        ys, res, new = [], [], []
        for label, b, p, s, k in zip(labels, branches, params, states, split_key(key, n)):
            with layer_scope(label):
                y, r, s = run_forward(b, p, x, state=s, key=k, train=train, **ctx)
            ys.append(y)
            res.append(r)
            new.append(s)
        sizes = tuple(y.shape[-1] for y in ys)
        return merge(ys), (tuple(res), sizes, input_spec(x)), tuple(new)

    def _walk(params, res, dy, how):
        params = _params(name, branches, params)
        res, sizes, spec = res
        if combine == "concat":
            dys = jnp.split(dy, [sum(sizes[:i]) for i in range(1, n)], axis=-1)
        else:
            dys = [dy] * n
        children = [Child(labels[i], branches[i], params[i], res[i], spec, f"{i}.")
                    for i in range(n)]
        return walk_back(children, dys, how, fan_out=True)

    def backward(params, res, dy):
        grads, dx = _walk(params, res, dy, "backward")
        return tuple(grads), dx

    def per_example(params, res, dy):
        grads, dx = _walk(params, res, dy, "per_example")
        return tuple(grads), dx

    def per_example_norms(params, res, dy):
        sqs, dx = _walk(params, res, dy, "per_example_norms")
        return sum_norms(sqs), dx

    def jvp(params, res, dparams, dx):
        """Every branch's tangent of the same ``dx``, merged as the outputs are."""
        params, dparams = _params(name, branches, params), _params(name, branches, dparams)
        dys = []
        for i, (b, p, dp) in enumerate(zip(branches, params, dparams)):
            with layer_scope(labels[i]):
                dys.append(tangent(b)(p, res[0][i], dp, dx))
        return merge(dys)

    def walk(params, res, dy, how):
        outs, dx = _walk(params, res, dy, how)
        return tuple(outs), dx

    return _assemble(name, init, run, run_fwd, backward, stateful, init_state,
                     tuple(zip([f"[{i}]" for i in range(n)], branches)),
                     merged_context(branches), per_example, per_example_norms, kind="parallel",
                     jvp=jvp, walk=walk)


def residual(body: Layer) -> Layer:
    """A skip connection ``y = x + f(x)``; ``f`` must keep the shape.

    Params and state are the body's. Backward: ``dx = dy + backward_f(dy)``.
    """
    (body,) = _check_layers("residual", (body,))
    name = "residual"
    label = f"residual({body.name})"

    def init(key, in_shape):
        with layer_scope(label):
            s, p = body.init(key, in_shape)
        if tuple(s) != tuple(in_shape) and tuple(s)[1:] != tuple(in_shape)[1:]:
            raise ShapeError(f"the body maps {tuple(in_shape)} to {tuple(s)}; a residual body "
                             f"must keep the shape", (name,))
        return in_shape, p

    def run(params, x, state, key, train, ctx):
        with layer_scope(label):
            y, s = run_apply(body, params, x, state=state, key=key, train=train, **ctx)
        return x + y, s

    def run_fwd(params, x, state, key, train, ctx):
        with layer_scope(label):
            y, r, s = run_forward(body, params, x, state=state, key=key, train=train, **ctx)
        return x + y, r, s

    def _walk(params, res, dy, how):
        # the body's input is x, whose shape dy has
        (g,), dx = walk_back([Child(label, body, params, res, input_spec(dy))], dy, how)
        return g, dy + dx if dx is not None else dy

    def backward(params, res, dy):
        return _walk(params, res, dy, "backward")

    def per_example(params, res, dy):
        return _walk(params, res, dy, "per_example")

    def per_example_norms(params, res, dy):
        return _walk(params, res, dy, "per_example_norms")

    def jvp(params, res, dparams, dx):
        """``dy = dx + jvp_f(dparams, dx)``."""
        with layer_scope(label):
            return dx + tangent(body)(params, res, dparams, dx)

    return _assemble(name, init, run, run_fwd, backward, body.stateful, body.init_state,
                     (("/residual", body),), body.context, per_example, per_example_norms,
                     kind="residual", jvp=jvp, walk=_walk)
