"""Attention, transformer block, positional and tied embeddings.

Manual vs autodiff vs finite differences in float64; the two residual strategies agree; an
independent numpy oracle (and PyTorch's nn.MultiheadAttention where installed).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funnn import core, gradcheck, losses, manual
from funnn import layers as L

B, T, F, H = 2, 5, 8, 2
LENGTHS = np.array([5, 3])


def _x(shape=(B, T, F), seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _params(layer, in_shape=(None, T, F), seed=0):
    """Init, then jitter the zero biases so every parameter matters."""
    _, p = layer.init(jax.random.key(seed), in_shape)
    rng = np.random.default_rng(seed + 100)
    return jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape)), p)


def _np_rope(a, d, base=10000.0):
    """Rotary embedding by complex numbers: feature pair (a_i, a_{i+d/2}) of each head, as
    a_i + 1j a_{i+d/2}, times exp(1j t base^(-2i/d)) at position t."""
    a = a.reshape(a.shape[:2] + (-1, d))
    z = a[..., :d // 2] + 1j * a[..., d // 2:]
    theta = base ** (-np.arange(d // 2) * 2.0 / d)
    z = z * np.exp(1j * np.arange(a.shape[1])[:, None, None] * theta)
    return np.concatenate([z.real, z.imag], -1).reshape(a.shape[:2] + (-1,))


def _np_attention(p, x, c, heads, kv_heads, causal=False, valid=None, full=None, rope=False):
    """Plain numpy: per example and head, softmax(q k^T / sqrt(d)) v; no valid key -> 0."""
    p = {k: np.asarray(v) for k, v in p.items()}
    x, c = np.asarray(x), np.asarray(c)
    q, k, v = x @ p["W_q"] + p["b_q"], c @ p["W_k"] + p["b_k"], c @ p["W_v"] + p["b_v"]
    d = q.shape[-1] // heads
    if rope:
        q, k = _np_rope(q, d), _np_rope(k, d)
    o = np.zeros(q.shape)
    for b in range(x.shape[0]):
        for h in range(heads):
            g = h // (heads // kv_heads)
            qh = q[b, :, h * d:(h + 1) * d]
            kh, vh = k[b, :, g * d:(g + 1) * d], v[b, :, g * d:(g + 1) * d]
            s = qh @ kh.T / np.sqrt(d)
            ok = np.ones(s.shape, bool)
            if causal:
                ok &= np.tril(ok)
            if valid is not None:
                ok &= np.asarray(valid[b])[None, :]
            if full is not None:
                ok &= np.asarray(full[b])
            for t in range(s.shape[0]):
                if ok[t].any():
                    e = np.exp(s[t, ok[t]] - s[t, ok[t]].max())
                    o[b, t, h * d:(h + 1) * d] = (e / e.sum()) @ vh[ok[t]]
    return o @ p["W_o"] + p["b_o"]


def _vjp_check(layer, params, x, dy, rtol=1e-10, **kw):
    """forward == apply and backward == jax.vjp(apply), in one compiled program."""

    @jax.jit
    def both(params, x, dy):
        y, res = layer.forward(params, x, **kw)
        y_ref, vjp = jax.vjp(lambda p, xx: layer.apply(p, xx, **kw), params, x)
        return y, y_ref, layer.backward(params, res, dy), vjp(dy), res

    y, y_ref, got, want, res = both(params, x, dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-13)
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=1e-12)
    return y, got, res


def _manual(layer, params, x, dy, **kw):
    """``(y, res, (dparams, dx))`` of the manual path."""
    y, res = layer.forward(params, x, **kw)
    return y, res, layer.backward(params, res, dy)


def _fwd_bwd(layer, params, x, dy, **kw):
    """:func:`_manual` in one compiled program."""
    return jax.jit(lambda p, x, dy: _manual(layer, p, x, dy, **kw))(params, x, dy)


# (implementation, causal, mask kind, kv heads): each case one compile of forward+backward
CASES = [("materialized", False, None, None), ("chunked", False, None, None),
         ("materialized", True, "lengths", None), ("chunked", True, "lengths", 1),
         ("materialized", False, "mask", 1), ("chunked", False, "full", None)]


def _mask_kw(kind):
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    if kind == "lengths":
        return {"lengths": jnp.asarray(LENGTHS)}, valid, None
    if kind == "mask":
        return {"mask": jnp.asarray(valid)}, valid, None
    if kind == "full":                      # a (batch, T, S) mask; row 0 of example 1 is empty
        full = np.random.default_rng(3).random((B, T, T)) < 0.6
        full[1, 0] = False
        return {"mask": jnp.asarray(full)}, None, full
    return {}, None, None


@pytest.mark.parametrize("impl,causal,kind,kv", [   # the chunked cases: ~2.5-3 s each
    pytest.param(*c, marks=pytest.mark.slow) if c[0] == "chunked" else c for c in CASES],
    ids=str)
def test_values_oracle_and_manual_equals_autodiff(impl, causal, kind, kv):
    layer = L.multi_head_attention(H, causal=causal, implementation=impl, num_kv_heads=kv,
                                   block_size=2)
    p = _params(layer)
    x = _x()
    kw, valid, full = _mask_kw(kind)
    dy = _x(seed=2)
    y, _, _ = _vjp_check(layer, p, x, dy, **kw)
    np.testing.assert_allclose(y, _np_attention(p, x, x, H, kv or H, causal, valid, full),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_gradcheck_finite_differences_both_implementations():
    x, y = _x(), _x(seed=2)
    for impl in ("materialized", "chunked"):
        layer = L.multi_head_attention(H, causal=True, implementation=impl, block_size=3)
        report = gradcheck.compare(layer, losses.squared_error, _params(layer), x, y)
        assert report.ok, str(report)


@pytest.mark.slow
def test_materialized_and_chunked_agree():
    x, dy = _x((B, 7, F)), _x((B, 7, F), seed=2)
    full = jnp.asarray(np.random.default_rng(4).random((B, 7, 7)) < 0.5)
    layers = [L.multi_head_attention(H, causal=True, implementation=impl, block_size=bs)
              for impl, bs in (("materialized", 128), ("chunked", 3), ("chunked", 7))]
    p = _params(layers[0], (None, 7, F))
    for kw in ({}, {"lengths": jnp.array([7, 0])}, {"mask": full}):
        outs = jax.jit(lambda p, x, dy, kw=kw: [_manual(l, p, x, dy, **kw)
                                                for l in layers])(p, x, dy)
        outs = [(y, grads) for y, _, grads in outs]
        for other in outs[1:]:
            chex.assert_trees_all_close(other, outs[0], rtol=1e-10, atol=1e-12)
        assert np.isfinite(np.asarray(outs[0][0])).all()
        if "lengths" in kw:              # example 1 has no valid key: zero attention, y = b_o
            np.testing.assert_allclose(outs[0][0][1], jnp.broadcast_to(p["b_o"], (7, F)))


@pytest.mark.slow
def test_masked_keys_get_zero_weight_and_zero_gradient():
    layer = L.multi_head_attention(H, implementation="materialized")
    p, x = _params(layer), _x()
    kw = {"lengths": jnp.asarray(LENGTHS)}
    apply = jax.jit(lambda x: layer.apply(p, x, **kw))
    y, y2 = apply(x), apply(x.at[1, 3:].add(5.0))   # change example 1's padded positions only
    np.testing.assert_allclose(y2[1, :3], y[1, :3], rtol=1e-12)   # valid queries unchanged
    dy = _x(seed=2).at[1, 3:].set(0.0)           # no loss on the padded queries
    for impl in ("materialized", "chunked"):
        lay = L.multi_head_attention(H, implementation=impl, block_size=2)
        _, res, (_, dx) = _fwd_bwd(lay, p, x, dy, **kw)
        assert float(jnp.abs(dx[1, 3:]).max()) == 0.0
        if impl == "materialized":
            assert float(jnp.abs(res.p[1, ..., 3:]).max()) == 0.0   # exactly zero weight


def test_causal_output_ignores_the_future():
    layer = L.multi_head_attention(H, causal=True, implementation="chunked", block_size=2)
    p, x = _params(layer), _x()
    apply = jax.jit(lambda x: layer.apply(p, x))
    y, y2 = apply(x), apply(x.at[:, 3:].add(1.0))
    np.testing.assert_allclose(y2[:, :3], y[:, :3], rtol=1e-12)
    assert not np.allclose(y2[:, 3:], y[:, 3:])


@pytest.mark.slow
def test_grouped_kv_heads_equal_repeated_heads():
    gqa = L.multi_head_attention(4, num_kv_heads=2, head_dim=3)
    mha = L.multi_head_attention(4, head_dim=3)
    p = _params(gqa)
    assert p["W_k"].shape == (F, 6) and p["W_q"].shape == (F, 12)
    rep = dict(p)
    for n in ("W_k", "W_v", "b_k", "b_v"):    # kv head g serves query heads 2g and 2g+1
        a = p[n].reshape(p[n].shape[:-1] + (2, 1, 3))
        rep[n] = jnp.broadcast_to(a, a.shape[:-2] + (2, 3)).reshape(p[n].shape[:-1] + (12,))
    x = _x()
    np.testing.assert_allclose(jax.jit(gqa.apply)(p, x), jax.jit(mha.apply)(rep, x), rtol=1e-12)
    _vjp_check(gqa, p, x, _x(seed=2), lengths=jnp.asarray(LENGTHS))


@pytest.mark.slow
def test_cross_attention_values_gradients_and_gradcheck():
    s_len, fc = 4, 6
    x, c, dy = _x(), _x((B, s_len, fc), seed=3), _x(seed=2)
    valid = np.arange(s_len)[None] < np.array([4, 2])[:, None]
    for impl in ("materialized", "chunked"):
        layer = L.cross_attention(H, implementation=impl, block_size=3, num_kv_heads=1)
        shape, p = layer.init(jax.random.key(0), ((None, T, F), (None, s_len, fc)))
        assert shape == (None, T, F) and p["W_k"].shape == (fc, F // H)
        p = _params(layer, ((None, T, F), (None, s_len, fc)))
        if impl == "materialized":       # masked: manual == autodiff, dx is a pair
            y, (_, (dx, dc)), _ = _vjp_check(layer, p, (x, c), dy, lengths=jnp.array([4, 2]))
            assert dx.shape == x.shape and dc.shape == c.shape
            np.testing.assert_allclose(y, _np_attention(p, x, c, H, 1, valid=valid), rtol=1e-10)
        else:                            # manual == autodiff == finite differences
            report = gradcheck.compare(layer, losses.squared_error, p, (x, c), dy)
            assert report.ok, str(report)
            np.testing.assert_allclose(jax.jit(layer.apply)(p, (x, c)),
                                       _np_attention(p, x, c, H, 1), rtol=1e-10)


@pytest.mark.slow
def test_jit_equals_eager_and_vmap_over_a_batch_of_one():
    layer = L.multi_head_attention(H, causal=True)
    p, x, y = _params(layer), _x(), _x(seed=2)
    np.testing.assert_allclose(jax.jit(layer.apply)(p, x), layer.apply(p, x), rtol=1e-12)
    batched = jax.vmap(layer.apply, in_axes=(None, 0))(p, x[:, None])
    np.testing.assert_allclose(batched[:, 0], layer.apply(p, x), rtol=1e-12)
    # per-example gradients by vmap of the manual engine == one example at a time
    vg = jax.jit(manual.value_and_grad(layer, losses.squared_error))
    per = jax.jit(jax.vmap(vg, in_axes=(None, 0, 0)))(p, x[:, None], y[:, None])
    for i in range(B):
        li, gi = vg(p, x[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(per[0][i], li, rtol=1e-10)
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], per[1]), gi, rtol=1e-9)


@pytest.mark.slow
def test_dropout_on_attention_weights():
    for impl in ("materialized", "chunked"):
        layer = L.multi_head_attention(H, dropout=0.5, implementation=impl, block_size=2)
        p, x = _params(layer), _x()
        key = jax.random.key(5, impl="rbg")    # any key works; rbg compiles faster than threefry
        with pytest.raises(core.KeyMissingError, match=r"multi_head_attention\(2, dropout=0.5"):
            layer.apply(p, x, train=True)
        y, _, res = _vjp_check(layer, p, x, _x(seed=2), key=key, train=True)
        y_inf = jax.jit(layer.apply)(p, x)                 # inference: no dropout
        assert not np.allclose(y, y_inf)
        np.testing.assert_allclose(y_inf, _np_attention(p, x, x, H, H), rtol=1e-10)
        if impl == "materialized":                         # inverted scaling 1 / (1 - rate)
            assert set(np.unique(np.asarray(res.drop))) == {0.0, 2.0}


def test_key_bias_changes_nothing_and_gets_a_zero_gradient():
    """q . b_k is the same for every key of a query row: softmax ignores it (kept on by default
    for PyTorch parity, documented and noted by summary)."""
    layer = L.multi_head_attention(H, causal=True, implementation="materialized")
    p, x, dy = _params(layer), _x(), _x(seed=2)

    @jax.jit
    def run(p):
        shifted = dict(p, b_k=p["b_k"] + 5.0)
        y, res = layer.forward(p, x)
        return y, layer.apply(shifted, x), layer.backward(p, res, dy)[0], jax.vjp(
            layer.apply, p, x)[1](dy)[0]

    y, y_shifted, g, g_auto = run(p)
    np.testing.assert_allclose(y_shifted, y, rtol=1e-12, atol=1e-12)
    scale = float(jnp.abs(g["b_q"]).max())
    assert scale > 1e-2
    assert float(jnp.abs(g["b_k"]).max()) < 1e-12 * scale
    assert float(jnp.abs(g_auto["b_k"]).max()) < 1e-12 * scale

# --------------------------------------------------------------------------- rotary positions


def test_rotary_values_oracle_and_manual_equals_autodiff_materialized():
    layer = L.multi_head_attention(H, causal=True, implementation="materialized", rotary=True,
                                   num_kv_heads=1)
    assert layer.name == "multi_head_attention(2, num_kv_heads=1, causal, materialized, rotary)"
    p, x = _params(layer), _x()
    y, _, _ = _vjp_check(layer, p, x, _x(seed=2), lengths=jnp.asarray(LENGTHS))
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    np.testing.assert_allclose(y, _np_attention(p, x, x, H, 1, True, valid, rope=True),
                               rtol=1e-10, atol=1e-12)
    plain = L.multi_head_attention(H, causal=True, implementation="materialized", num_kv_heads=1)
    assert not np.allclose(y, jax.jit(plain.apply)(p, x, lengths=jnp.asarray(LENGTHS)))


def test_rotary_scores_depend_on_the_offset_only():
    """Shifting every position by 3 leaves rotated dot products unchanged; rotate back inverts."""
    from funnn.layers.attention import rotary_angles, rotate
    a, b = _x((2, 4, 6), seed=5), _x((2, 4, 6), seed=6)

    @jax.jit
    def run(a, b):
        def dots(shift):
            c, s = rotary_angles(jnp.arange(4) + shift, 6)
            return jnp.einsum("btd,bsd->bts", rotate(a, c, s), rotate(b, c, s))

        c, s = rotary_angles(jnp.arange(4), 6)
        return dots(3), dots(0), rotate(rotate(a, c, s), c, s, inverse=True)

    shifted, plain, back = run(a, b)
    np.testing.assert_allclose(shifted, plain, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(back, a, atol=1e-14)
    with pytest.raises(core.ShapeError, match=r"rotary.*even head_dim, got 3"):
        odd = L.multi_head_attention(2, head_dim=3, rotary=True)
        odd.apply(_params(odd), _x())
    for bad in ({"rotary": 1}, {"rotary": True, "rotary_base": 1.0}):
        with pytest.raises(core.ConfigError, match="rotary"):
            L.multi_head_attention(2, **bad)


@pytest.mark.slow   # ~3 CPU-s: the tiled kernels (manual) and the scan (apply) in a block
def test_rotary_block_chunked_tiled_equals_autodiff():
    """The default implementation: the manual path's tiled kernels, apply's key-block scan."""
    x, dy, lengths = _x(), _x(seed=2), jnp.asarray(LENGTHS)
    block = L.transformer_block(H, 16, causal=True, rotary=True, num_kv_heads=1)
    assert "rotary" in block.name
    p = _params(block)
    y, _, _ = _vjp_check(block, p, x, dy, lengths=lengths)
    plain = L.transformer_block(H, 16, causal=True, num_kv_heads=1)
    assert not np.allclose(y, jax.jit(plain.apply)(p, x, lengths=lengths))

@pytest.mark.slow
def test_pytorch_multihead_attention_oracle():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(F, H, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    w, bias = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    p = {"W_q": w[:F].T, "W_k": w[F:2 * F].T, "W_v": w[2 * F:].T,
         "W_o": mha.out_proj.weight.detach().numpy().T, "b_q": bias[:F], "b_k": bias[F:2 * F],
         "b_v": bias[2 * F:], "b_o": mha.out_proj.bias.detach().numpy()}
    p = {k: jnp.asarray(v) for k, v in p.items()}
    x, dy = _x(), _x(seed=2)
    pad = np.arange(T)[None] >= LENGTHS[:, None]              # torch: True = padding
    causal = np.triu(np.ones((T, T), bool), 1)                # torch: True = not allowed
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    yt, _ = mha(xt, xt, xt, key_padding_mask=torch.tensor(pad), attn_mask=torch.tensor(causal))
    yt.backward(torch.tensor(np.asarray(dy)))
    for impl in ("materialized", "chunked"):
        layer = L.multi_head_attention(H, causal=True, implementation=impl, block_size=2)
        y, _, (g, dx) = _fwd_bwd(layer, p, x, dy, mask=jnp.asarray(~pad))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g["W_o"], mha.out_proj.weight.grad.numpy().T, rtol=1e-9)
        np.testing.assert_allclose(g["W_q"], mha.in_proj_weight.grad.numpy()[:F].T, rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(g["b_v"], mha.in_proj_bias.grad.numpy()[2 * F:], rtol=1e-9)


@pytest.mark.slow
def test_transformer_block_gradcheck_and_masks():
    block = L.transformer_block(H, 16, causal=True)
    shape, p = block.init(jax.random.key(0), (None, T, F))
    assert shape == (None, T, F)
    x, y = _x(), _x(seed=2)
    report = gradcheck.compare(block, losses.squared_error, p, x, y)
    assert report.ok, str(report)
    drop = L.transformer_block(H, 16, causal=True, dropout=0.2)    # same params as block
    _vjp_check(drop, p, x, y, lengths=jnp.asarray(LENGTHS), key=jax.random.key(1, impl="rbg"),
               train=True)


@pytest.mark.slow
def test_positional_embeddings_and_tied_output():
    x, y = _x(), _x(seed=2)
    for kind in ("learned", "sinusoidal"):
        pe = L.positional_embedding(6, kind)
        _, p = pe.init(jax.random.key(0), (None, T, F))
        if kind == "learned":
            assert p["pos"].shape == (6, F)
            report = gradcheck.compare(pe, losses.squared_error, p, x, y)
            assert report.ok, str(report)
        else:                                    # no params: gradcheck has nothing to compare
            assert p == {}
            np.testing.assert_allclose(_vjp_check(pe, p, x, y)[1][1], y)   # dx = dy
    table = L.positional_embedding(6, "sinusoidal").apply({}, jnp.zeros((1, T, F)))[0]
    np.testing.assert_allclose(table[3, 2], np.sin(3 / 10000 ** (2 / F)), rtol=1e-12)
    np.testing.assert_allclose(table[3, 3], np.cos(3 / 10000 ** (2 / F)), rtol=1e-12)
    with pytest.raises(core.ShapeError, match=r"positional_embedding\(4, learned\).*exceeds"):
        L.positional_embedding(4).init(jax.random.key(0), (None, T, F))

    model = L.tied_embedding(11, F, L.serial(L.positional_embedding(T), L.dense(F),
                                             L.layer_norm()))
    shape, p = model.init(jax.random.key(0), (None, T))
    assert shape == (None, T, 11) and p[0]["table"].shape == (11, F)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (B, T)))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 11, (B, T)))
    report = gradcheck.compare(model, losses.softmax_cross_entropy, p, ids, labels)
    assert report.ok, str(report)
    text = core.summary(model, p)
    assert "[0]     embedding(11, 8)" in text and "[1][1]  dense(8)" in text


def test_errors_name_the_layer():
    with pytest.raises(core.ShapeError, match=r"^multi_head_attention\(3\): input features 8 "
                                              r"are not divisible by num_heads 3"):
        L.multi_head_attention(3).init(jax.random.key(0), (None, T, F))
    assert L.multi_head_attention(3, head_dim=4).init(jax.random.key(0),
                                                      (None, T, F))[1]["W_q"].shape == (F, 12)
    with pytest.raises(core.ConfigError, match="num_kv_heads 3 must divide num_heads 4"):
        L.multi_head_attention(4, num_kv_heads=3)
    with pytest.raises(core.ConfigError, match="implementation must be one of"):
        L.multi_head_attention(2, implementation="flash")
    layer = L.multi_head_attention(H)
    p, x = _params(layer), _x()
    model = L.serial(L.dense(6), layer)
    _, pm = model.init(jax.random.key(0), (None, T, F))
    with pytest.raises(core.ShapeError, match=r"^serial\[1\] multi_head_attention\(2\): expected "
                                              r"input features 8, got 6"):
        model.apply((pm[0], p), x)
    with pytest.raises(core.ShapeError, match=r"expected input features 8, got 6"):
        layer.apply(p, _x((B, T, 6)))
    with pytest.raises(core.ShapeError, match=r"^multi_head_attention\(2\): expected mask of "
                                              r"shape \(batch, keys\) = \(2, 5\)"):
        layer.apply(p, x, mask=jnp.ones((B, 4), bool))
    with pytest.raises(core.ShapeError, match=r"lengths must lie in 0\.\.5.*got lengths in 2\.\.6"):
        layer.forward(p, x, lengths=jnp.array([2, 6]))
    with pytest.raises(core.DTypeError, match="mask must be boolean"):
        layer.apply(p, x, mask=jnp.ones((B, T)))
    with pytest.raises(core.ShapeError, match=r"expected lengths of shape \(batch,\) = \(2,\)"):
        jax.jit(lambda p, x: layer.apply(p, x, lengths=jnp.array([1, 2, 3])))(p, x)
    with pytest.raises(core.ShapeError, match="rank 3"):
        layer.apply(p, x[0])
    with pytest.raises(core.ShapeError, match=r"cross_attention\(2\): expected the input as a "):
        L.cross_attention(H).apply(p, x)
    with pytest.raises(core.ShapeError, match="params do not fit 2 heads"):
        layer.apply({**p, "b_o": jnp.zeros(3)}, x)


@pytest.mark.slow
def test_compiled_memory_chunked_linear_materialized_quadratic():
    """XLA's temp bytes for forward + backward at seq 256 and 1024 (4x longer)."""
    def temp(impl, seq):
        layer = L.multi_head_attention(2, head_dim=16, implementation=impl, block_size=128)
        _, p = layer.init(jax.random.key(0), (None, seq, 32))

        def step(p, x):
            y, res = layer.forward(p, x)
            return layer.backward(p, res, y)

        x = jax.ShapeDtypeStruct((1, seq, 32), jnp.float32)
        p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), p)
        return jax.jit(step).lower(p, x).compile().memory_analysis().temp_size_in_bytes

    mat = temp("materialized", 1024) / temp("materialized", 256)
    chk = temp("chunked", 1024) / temp("chunked", 256)
    assert mat > 10, mat               # ~16x: P is seq^2
    assert chk < 6, chk                # ~4x: row statistics and one block of keys


@pytest.mark.slow
@settings(max_examples=3)
@given(b=st.integers(1, 2), t=st.integers(1, 6), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
       d=st.integers(1, 3), block=st.integers(1, 4), causal=st.booleans())
def test_property_chunked_equals_materialized(b, t, heads, d, block, causal):
    h, hk = heads
    rng = np.random.default_rng(t * 7 + d)
    x, dy = jnp.asarray(rng.normal(size=(b, t, 5))), jnp.asarray(rng.normal(size=(b, t, 3)))
    lengths = jnp.asarray(rng.integers(0, t + 1, b))
    layers = [L.multi_head_attention(h, head_dim=d, num_kv_heads=hk, out_features=3,
                                     causal=causal, implementation=impl, block_size=block)
              for impl in ("materialized", "chunked")]
    p = _params(layers[0], (None, t, 5))

    @jax.jit
    def both(p, x, dy, lengths):
        outs = []
        for layer in layers:
            y, res = layer.forward(p, x, lengths=lengths)
            outs.append((y, layer.backward(p, res, dy)))
        return outs

    outs = both(p, x, dy, lengths)
    chex.assert_trees_all_close(outs[1], outs[0], rtol=1e-9, atol=1e-12)
