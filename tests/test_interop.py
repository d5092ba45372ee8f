"""funnn.interop: PyTorch-layout arrays in, the PyTorch layer's outputs out.

Two oracles: a numpy transcription of each PyTorch layer written from PyTorch's documented
formulas on PyTorch's own layouts (NCHW, ``weight (out, in)``, gates stacked ``i, f, g, o``),
which runs everywhere; and PyTorch itself where it is installed (``importorskip``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import interop
from funnn import layers as L
from funnn.core import ConfigError

RNG = np.random.default_rng(0)


def _r(*shape):
    return RNG.normal(size=shape)


def _sig(z):
    return 1 / (1 + np.exp(-z))


# --------------------------------------------------------------------------- numpy references


def np_linear(sd, p, x):
    return x @ sd[f"{p}weight"].T + sd[f"{p}bias"]


def np_conv2d_nchw(w, b, x, pad):
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            y[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, i:i + kh, j:j + kw], w)
    return y + b[None, :, None, None]


def np_conv1d_ncw(w, b, x):
    _, _, k = w.shape
    wo = x.shape[2] - k + 1
    y = np.stack([np.einsum("ncw,ocw->no", x[:, :, i:i + k], w) for i in range(wo)], -1)
    return y + b[None, :, None]


def np_recurrent(kind, sd, x):
    """PyTorch's RNN / LSTM / GRU, batch_first, one layer, from zero state."""
    wi, wh = sd["weight_ih_l0"], sd["weight_hh_l0"]
    bi, bh = sd["bias_ih_l0"], sd["bias_hh_l0"]
    hid = wh.shape[1]
    h, c = np.zeros((x.shape[0], hid)), np.zeros((x.shape[0], hid))
    out = []
    for t in range(x.shape[1]):
        gi, gh = x[:, t] @ wi.T + bi, h @ wh.T + bh
        if kind == "rnn":
            h = np.tanh(gi + gh)
        elif kind == "lstm":
            i, f, g, o = np.split(gi + gh, 4, axis=-1)
            c = _sig(f) * c + _sig(i) * np.tanh(g)
            h = _sig(o) * np.tanh(c)
        else:
            ir, iz, in_ = np.split(gi, 3, axis=-1)
            hr, hz, hn = np.split(gh, 3, axis=-1)
            r, z = _sig(ir + hr), _sig(iz + hz)
            n = np.tanh(in_ + r * hn)
            h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out, 1)


def np_mha(sd, x, heads):
    e = x.shape[-1]
    w, b = sd["in_proj_weight"], sd["in_proj_bias"]
    q, k, v = (x @ w[i * e:(i + 1) * e].T + b[i * e:(i + 1) * e] for i in range(3))
    d = e // heads
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    return o @ sd["out_proj.weight"].T + sd["out_proj.bias"]


# --------------------------------------------------------------------------- state dicts


def sd_linear(n_in, n_out, p=""):
    return {f"{p}weight": _r(n_out, n_in), f"{p}bias": _r(n_out)}


def sd_recurrent(kind, n_in, hid):
    g = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    return {"weight_ih_l0": _r(g * hid, n_in), "weight_hh_l0": _r(g * hid, hid),
            "bias_ih_l0": _r(g * hid), "bias_hh_l0": _r(g * hid)}


def sd_mha(e):
    return {"in_proj_weight": _r(3 * e, e), "in_proj_bias": _r(3 * e),
            "out_proj.weight": _r(e, e), "out_proj.bias": _r(e)}


def _init(model, shape):
    return model.init(jax.random.key(0), shape)[1]


# --------------------------------------------------------------------------- against numpy


def test_dense_mlp_against_numpy():
    sd = {**sd_linear(5, 7, "fc1."), **sd_linear(7, 3, "fc2.")}
    model = L.serial(L.dense(7), L.activation("tanh"), L.dense(3))
    params = interop.load(model, _init(model, (None, 5)), sd, {"0": "fc1", "2": "fc2"})
    x = _r(4, 5)
    want = np_linear(sd, "fc2.", np.tanh(np_linear(sd, "fc1.", x)))
    np.testing.assert_allclose(model.apply(params, x), want, rtol=1e-10)


@pytest.mark.slow
def test_cnn_with_flatten_order_against_numpy():
    """conv (OIHW -> HWIO), NCHW flatten (C, H, W) vs funnn's NHWC flatten (H, W, C)."""
    sd = {"conv.weight": _r(4, 2, 3, 3), "conv.bias": _r(4), **sd_linear(4 * 5 * 6, 3, "fc.")}
    model = L.serial(L.conv2d(4, (3, 3), padding=1), L.flatten(), L.dense(3))
    params = interop.load(model, _init(model, (None, 5, 6, 2)), sd,
                          {"0": "conv", "2": ("fc", {"flatten_from": (4, 5, 6)})})
    x_nchw = _r(2, 2, 5, 6)
    feat = np_conv2d_nchw(sd["conv.weight"], sd["conv.bias"], x_nchw, pad=1)
    want = np_linear(sd, "fc.", feat.reshape(2, -1))
    got = model.apply(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # without flatten_from the rows are in the wrong order: the outputs differ
    bad = interop.load(model, _init(model, (None, 5, 6, 2)), sd, {"0": "conv", "2": "fc"})
    assert not np.allclose(model.apply(bad, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))), want)


def test_conv1d_against_numpy():
    sd = {"weight": _r(3, 2, 4), "bias": _r(3)}
    model = L.conv1d(3, 4)
    params = interop.load(model, _init(model, (None, 9, 2)), sd, {"": ""})
    x = _r(2, 2, 9)
    want = np_conv1d_ncw(sd["weight"], sd["bias"], x)
    np.testing.assert_allclose(model.apply(params, x.transpose(0, 2, 1)), want.transpose(0, 2, 1),
                               rtol=1e-10)


def test_norms_and_embedding_against_numpy():
    sd = {"emb.weight": _r(10, 6), "ln.weight": _r(6), "ln.bias": _r(6),
          "bn.weight": _r(6), "bn.bias": _r(6), "bn.running_mean": _r(6),
          "bn.running_var": RNG.uniform(0.5, 2.0, 6), "bn.num_batches_tracked": np.array(3)}
    model = L.serial(L.embedding(10, 6), L.layer_norm(), L.batch_norm(momentum=0.9))
    params, state = interop.load(model, _init(model, (None, 4)), sd,
                                 {"0": "emb", "1": "ln", "2": "bn"},
                                 state=model.init_state((None, 4)))
    ids = RNG.integers(0, 10, (3, 4))
    e = sd["emb.weight"][ids]
    ln = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)
    ln = ln * sd["ln.weight"] + sd["ln.bias"]
    bn = (ln - sd["bn.running_mean"]) / np.sqrt(sd["bn.running_var"] + 1e-5)
    want = bn * sd["bn.weight"] + sd["bn.bias"]
    got, _ = model.apply(params, jnp.asarray(ids), state=state, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_array_equal(state[2]["var"], sd["bn.running_var"])


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_recurrent_against_numpy(kind):
    sd = sd_recurrent(kind, 3, 5)
    model = getattr(L, kind)(5)
    params = interop.load(model, _init(model, (None, 6, 3)), sd, {"": ""})
    x = _r(2, 6, 3)
    np.testing.assert_allclose(model.apply(params, x), np_recurrent(kind, sd, x), rtol=1e-9,
                               atol=1e-12)


def test_attention_against_numpy():
    sd = sd_mha(8)
    model = L.multi_head_attention(2)
    params = interop.load(model, _init(model, (None, 5, 8)), sd, {"": ""})
    x = _r(3, 5, 8)
    np.testing.assert_allclose(model.apply(params, x), np_mha(sd, x, 2), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_key_the_layer_and_the_shapes():
    model = L.serial(L.dense(7), L.activation("tanh"), L.dense(3))
    params = _init(model, (None, 5))
    sd = {**sd_linear(5, 7, "fc1."), **sd_linear(7, 3, "fc2.")}
    with pytest.raises(interop.StateDictError, match=r"^serial\[2\] dense\(3\): .*'fc9\.weight'"):
        interop.load(model, params, sd, {"2": "fc9"})
    bad = {**sd, "fc2.weight": _r(3, 6)}
    with pytest.raises(interop.StateDictError) as err:
        interop.load(model, params, bad, {"2": "fc2"})
    assert "serial[2] dense(3)" in str(err.value) and "'fc2.weight'" in str(err.value) \
        and "(7, 3)" in str(err.value)
    with pytest.raises(ConfigError, match=r"serial\[1\] activation\(tanh\): no PyTorch converter"):
        interop.load(model, params, sd, {"1": "act"})
    with pytest.raises(ConfigError, match=r"sub-layers 0\.\.2"):
        interop.load(model, params, sd, {"5": "fc1"})
    with pytest.raises(interop.StateDictError, match=r"'w\.bias'.*shape \(4,\), expected \(3,\)"):
        interop.dense({"w.weight": _r(3, 2), "w.bias": _r(4)}, "w")
    with pytest.raises(interop.StateDictError, match=r"'weight_ih_l0'.*4\*hidden"):
        interop.lstm({"weight_ih_l0": _r(6, 2), "weight_hh_l0": _r(6, 6)})


def _zeros(**shapes):
    """Params of the shapes ``init`` makes (all ``load`` reads of them), without compiling it."""
    return {k: np.zeros(v) for k, v in shapes.items()}


def test_a_missing_bias_is_refused_unless_allowed_or_the_layer_has_none():
    """issue 22 item 17: a bias-free state dict loaded silently as zeros into a biased layer."""
    sd = {"fc.weight": _r(3, 5)}
    model, params = L.dense(3), _zeros(W=(5, 3), b=(3,))
    with pytest.raises(interop.StateDictError, match=r"^dense\(3\): state_dict has no "
                       r"'fc\.bias' for the layer's b \(3,\): a module without a bias fits a "
                       r"layer built with use_bias=False; pass allow_missing_bias=True"):
        interop.load(model, params, sd, {"": "fc"})
    got = interop.load(model, params, sd, {"": "fc"}, allow_missing_bias=True)
    np.testing.assert_array_equal(got["b"], np.zeros(3))
    np.testing.assert_allclose(got["W"], sd["fc.weight"].T, rtol=1e-6)
    bare = L.dense(3, use_bias=False)          # a bias-free module fits a bias-free layer
    assert set(interop.load(bare, _zeros(W=(5, 3)), sd, {"": "fc"})) == {"W"}
    assert set(interop.dense(sd, "fc")) == {"W"}
    # recurrent biases come in pairs: one alone is refused, naming the other
    half = {k: v for k, v in sd_recurrent("lstm", 3, 2).items() if k != "bias_hh_l0"}
    with pytest.raises(interop.StateDictError, match=r"has 'bias_ih_l0' but not 'bias_hh_l0'"):
        interop.lstm(half)
    lstm = L.lstm(2)
    with pytest.raises(interop.StateDictError, match=r"no 'bias_ih_l0 \+ bias_hh_l0' for the "
                                                     r"layer's b \(8,\)"):
        interop.load(lstm, _zeros(W_x=(3, 8), W_h=(2, 8), b=(8,)),
                     {k: v for k, v in half.items() if "bias" not in k}, {"": ""})


def test_unused_keys_nonfinite_values_and_a_negative_variance_are_refused_unless_allowed():
    model = L.serial(L.dense(4), L.batch_norm())
    params = (_zeros(W=(3, 4), b=(4,)), _zeros(gamma=(4,), beta=(4,)))
    state = (None, _zeros(mean=(4,), var=(4,)))
    sd = {**sd_linear(3, 4, "fc."), "bn.weight": _r(4), "bn.bias": _r(4),
          "bn.running_mean": _r(4), "bn.running_var": RNG.uniform(0.5, 2, 4),
          "bn.num_batches_tracked": np.array(7), "head.weight": _r(2, 4), "head.bias": _r(2)}
    load = lambda sd, **kw: interop.load(model, params, sd, {"0": "fc", "1": "bn"},
                                         state=state, **kw)
    with pytest.raises(interop.StateDictError, match=r"^state_dict keys that no layer of the "
                       r"mapping reads: \['head\.bias', 'head\.weight'\]; map their modules "
                       r"to layers, or pass allow_unused=True"):
        load(sd)
    p, s = load(sd, allow_unused=True)
    np.testing.assert_allclose(s[1]["var"], sd["bn.running_var"], rtol=1e-6)

    bad = {**sd, "fc.weight": sd["fc.weight"].copy()}
    bad["fc.weight"][1, 2], bad["fc.weight"][0, 0] = np.nan, -np.inf
    with pytest.raises(interop.StateDictError, match=r"^serial\[0\] dense\(4\): state_dict key "
                       r"'fc\.weight' holds 2 non-finite values \(NaN or inf\) of 12; pass "
                       r"allow_nonfinite=True"):
        load(bad, allow_unused=True)
    p, _ = load(bad, allow_unused=True, allow_nonfinite=True)
    assert np.isnan(p[0]["W"][2, 1]) and np.isneginf(p[0]["W"][0, 0])

    bad = {**sd, "bn.running_var": np.array([1.0, -0.25, 2.0, -3.0])}
    with pytest.raises(interop.StateDictError, match=r"^serial\[1\] batch_norm: state_dict key "
                       r"'bn\.running_var' holds 2 negative values \(the lowest -3\), and a "
                       r"variance is never negative; pass allow_negative_variance=True"):
        load(bad, allow_unused=True)
    _, s = load(bad, allow_unused=True, allow_negative_variance=True)
    np.testing.assert_array_equal(s[1]["var"], [1.0, -0.25, 2.0, -3.0])


def test_a_transposed_weight_is_named_by_its_own_key_with_both_shapes():
    model = L.serial(L.dense(7), L.activation("tanh"), L.dense(3))
    params = (_zeros(W=(5, 7), b=(7,)), {}, _zeros(W=(7, 3), b=(3,)))
    sd = {**sd_linear(5, 7, "fc1."), **sd_linear(7, 3, "fc2.")}
    flipped = {**sd, "fc2.weight": sd["fc2.weight"].T}           # saved as (in, out)
    with pytest.raises(interop.StateDictError, match=r"^serial\[2\] dense\(3\): state_dict key "
                       r"'fc2\.weight' .* has shape \(7, 3\), expected \(3, 7\) to match "
                       r"'fc2\.bias' of shape \(3,\); it looks transposed: load 'fc2\.weight' "
                       r"as \.T$"):
        interop.load(model, params, flipped, {"0": "fc1", "2": "fc2"})
    nobias = L.dense(5, use_bias=False)         # no bias to tell: the layer's W says it
    with pytest.raises(interop.StateDictError, match=r"^dense\(5\): state_dict key 'weight' "
                       r"has shape \(4, 5\), expected \(5, 4\) for the layer's W \(4, 5\); "
                       r"it looks transposed: load 'weight' as \.T$"):
        interop.load(nobias, _zeros(W=(4, 5)), {"weight": _r(4, 5)}, {"": ""})
    with pytest.raises(interop.StateDictError, match=r"'c\.weight' .* has shape \(2, 4, 3, 3\), "
                       r"expected \(4, 2, 3, 3\) .*it looks transposed: load 'c\.weight' as "
                       r"\.swapaxes\(0, 1\)"):                   # OIHW saved as IOHW
        interop.conv({"c.weight": _r(2, 4, 3, 3), "c.bias": _r(4)}, "c")
    lstm = interop.lstm                       # weight_hh (4H, H) gives H: each named as itself
    sd = sd_recurrent("lstm", 4, 2)
    with pytest.raises(interop.StateDictError, match=r"'weight_hh_l0' .* has shape \(2, 8\), "
                                                     r"expected \(8, 2\); it looks transposed"):
        lstm({**sd, "weight_hh_l0": sd["weight_hh_l0"].T})
    with pytest.raises(interop.StateDictError, match=r"'weight_ih_l0' .* has shape \(4, 8\), "
                                                     r"expected \(8, in\) .*looks transposed"):
        lstm({**sd, "weight_ih_l0": sd["weight_ih_l0"].T})


# --------------------------------------------------------------------------- against PyTorch


def _sd(module):
    return {k: v.detach().numpy().astype(np.float64) for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_against_pytorch():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)

    # CNN: conv -> relu -> batch-norm -> flatten -> linear, NCHW in PyTorch
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                        nn.Flatten(), nn.Linear(4 * 5 * 6, 3)).double()
    with torch.no_grad():
        net[2].running_mean.uniform_(-1, 1)
        net[2].running_var.uniform_(0.5, 2)
    net.eval()
    model = L.serial(L.conv2d(4, (3, 3), padding=1), L.activation("relu"), L.batch_norm(),
                     L.flatten(), L.dense(3))
    params, state = interop.load(model, _init(model, (None, 5, 6, 2)), _sd(net),
                                 {"0": "0", "2": "2", "4": ("4", {"flatten_from": (4, 5, 6)})},
                                 state=model.init_state((None, 5, 6, 2)))
    x = _r(3, 2, 5, 6)
    got, _ = model.apply(params, x.transpose(0, 2, 3, 1), state=state, train=False)
    np.testing.assert_allclose(got, net(t(x)).detach().numpy(), rtol=1e-9, atol=1e-12)

    # recurrent layers, batch_first
    for kind, cls in (("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)):
        mod = cls(3, 5, batch_first=True).double()
        m = getattr(L, kind)(5)
        p = interop.load(m, _init(m, (None, 6, 3)), _sd(mod), {"": ""})
        x = _r(2, 6, 3)
        np.testing.assert_allclose(m.apply(p, x), mod(t(x))[0].detach().numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=kind)

    # embedding, layer norm, attention, conv1d
    emb, ln = nn.Embedding(10, 8).double(), nn.LayerNorm(8).double()
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
        mha.in_proj_bias.uniform_(-1, 1)
    sd = {**{f"e.{k}": v for k, v in _sd(emb).items()}, **{f"l.{k}": v for k, v in _sd(ln).items()},
          **{f"a.{k}": v for k, v in _sd(mha).items()}}
    model = L.serial(L.embedding(10, 8), L.layer_norm(), L.multi_head_attention(2))
    params = interop.load(model, _init(model, (None, 5)), sd, {"0": "e", "1": "l", "2": "a"})
    ids = RNG.integers(0, 10, (3, 5))
    h = ln(emb(torch.tensor(ids)))
    want = mha(h, h, h, need_weights=False)[0].detach().numpy()
    np.testing.assert_allclose(model.apply(params, jnp.asarray(ids)), want, rtol=1e-9, atol=1e-12)

    # bias-free modules: into bias-free layers, or with zeros where funnn's layer has a bias
    lin, rec = nn.Linear(5, 3, bias=False).double(), nn.LSTM(3, 4, bias=False, batch_first=True)
    m = L.dense(3, use_bias=False)
    p = interop.load(m, _init(m, (None, 5)), _sd(lin), {"": ""})
    x = _r(2, 5)
    np.testing.assert_allclose(m.apply(p, x), lin(t(x)).detach().numpy(), rtol=1e-9)
    m = L.lstm(4)
    with pytest.raises(interop.StateDictError, match="allow_missing_bias=True"):
        interop.load(m, _init(m, (None, 6, 3)), _sd(rec.double()), {"": ""})
    p = interop.load(m, _init(m, (None, 6, 3)), _sd(rec), {"": ""}, allow_missing_bias=True)
    x = _r(2, 6, 3)
    np.testing.assert_allclose(m.apply(p, x), rec(t(x))[0].detach().numpy(), rtol=1e-9,
                               atol=1e-12)

    c1 = nn.Conv1d(2, 3, 4).double()
    m = L.conv1d(3, 4)
    p = interop.load(m, _init(m, (None, 9, 2)), _sd(c1), {"": ""})
    x = _r(2, 2, 9)
    np.testing.assert_allclose(m.apply(p, x.transpose(0, 2, 1)),
                               c1(t(x)).detach().numpy().transpose(0, 2, 1), rtol=1e-9)


def test_nested_paths_and_converter_options():
    """Paths go through combinators ("1.0": the first layer inside the residual's serial);
    options reach the converter (the second layer of a stacked PyTorch LSTM)."""
    model = L.serial(L.dense(3), L.residual(L.serial(L.dense(3), L.activation("tanh"))))
    sd = {**sd_linear(4, 3, "a."), **sd_linear(3, 3, "b.")}
    params = interop.load(model, _init(model, (None, 4)), sd, {"0": "a", "1.0": "b"})
    x = _r(2, 4)
    h = np_linear(sd, "a.", x)
    np.testing.assert_allclose(model.apply(params, x), h + np.tanh(np_linear(sd, "b.", h)),
                               rtol=1e-10)

    two = {**{k.replace("_l0", "_l1"): v for k, v in sd_recurrent("lstm", 5, 5).items()},
           **sd_recurrent("lstm", 3, 5)}
    stack = L.serial(L.lstm(5), L.lstm(5))
    p = interop.load(stack, _init(stack, (None, 6, 3)), two,
                     {"0": ("", {"layer": 0}), "1": ("", {"layer": 1})})
    x = _r(2, 6, 3)
    first = np_recurrent("lstm", two, x)
    second = np_recurrent("lstm", {k.replace("_l1", "_l0"): v for k, v in two.items()
                                   if k.endswith("_l1")}, first)
    np.testing.assert_allclose(stack.apply(p, x), second, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- transformer layers


def _torch_encoder_check(torch, enc, model, params, lengths, rtol=1e-9):
    """Outputs at the valid positions, the input gradient and two weight gradients of a
    PyTorch encoder layer (train mode, dropout 0: no fast path) against funnn's manual path."""
    x = _r(2, 5, 8)
    pad = np.arange(5)[None, :] >= np.asarray(lengths)[:, None]
    xt = torch.tensor(x, requires_grad=True)
    yt = enc(xt, src_key_padding_mask=torch.tensor(pad))
    dy = _r(*yt.shape) * ~pad[..., None]                 # no loss on the padded queries
    yt.backward(torch.tensor(dy))
    kw = {"lengths": jnp.asarray(lengths)}
    y, res = jax.jit(lambda p, x: model.forward(p, x, **kw))(params, jnp.asarray(x))
    grads, dx = jax.jit(model.backward)(params, res, jnp.asarray(dy))
    valid = ~pad
    np.testing.assert_allclose(np.asarray(y)[valid], yt.detach().numpy()[valid], rtol=rtol,
                               atol=rtol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=rtol, atol=rtol)
    return grads


@pytest.mark.slow   # ~2.5 CPU-s besides importing torch
def test_transformer_encoder_layer_matches_pytorch():
    """Acceptance: a converted nn.TransformerEncoderLayer (post-norm, relu: PyTorch's default)
    matches PyTorch to 1e-5 (here 1e-9 in float64), outputs and gradients, with key padding."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    with torch.no_grad():
        for n in (enc.norm1, enc.norm2):
            n.weight.uniform_(0.5, 2)
            n.bias.uniform_(-1, 1)
        enc.self_attn.in_proj_bias.uniform_(-1, 1)
    model = L.transformer_encoder_layer(8, 2, 16, implementation="materialized")
    assert model.kind == "transformer_encoder_layer"
    like = _init(model, (None, 5, 8))
    params = interop.transformer_encoder_layer(_sd(enc), like=like)
    grads = _torch_encoder_check(torch, enc, model, params, [5, 3])
    np.testing.assert_allclose(grads[2][0]["W"], enc.linear1.weight.grad.numpy().T, rtol=1e-5,
                               atol=1e-8)
    q_grad = enc.self_attn.in_proj_weight.grad.numpy()[:8].T
    np.testing.assert_allclose(grads[0][0]["W_q"], q_grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(interop.StateDictError, match="norm_first or bias setting differs"):
        interop.transformer_encoder_layer(_sd(enc), norm_first=True, like=like)
    bad = {k: (v[:, :4] if k == "linear2.weight" else v) for k, v in _sd(enc).items()}
    with pytest.raises(interop.StateDictError, match=r"gives \[2\]\[3\]\['W'\] of shape"):
        interop.transformer_encoder_layer(bad, like=like)


@pytest.mark.slow   # ~3 CPU-s: two pre-norm layers compiled
def test_pre_norm_gelu_encoder_layer_and_transformer_block_match_pytorch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                           norm_first=True, batch_first=True).double()
    with torch.no_grad():
        enc.self_attn.in_proj_bias.uniform_(-1, 1)
        enc.norm2.bias.uniform_(-1, 1)
    layer = L.transformer_encoder_layer(8, 2, 16, activation="gelu", norm_first=True,
                                        implementation="materialized")
    p = interop.transformer_encoder_layer(_sd(enc), norm_first=True,
                                          like=_init(layer, (None, 5, 8)))
    _torch_encoder_check(torch, enc, layer, p, [5, 2])
    enc.zero_grad()
    block = L.transformer_block(2, 16, implementation="materialized")
    p = interop.transformer_block(_sd(enc), like=_init(block, (None, 5, 8)))
    _torch_encoder_check(torch, enc, block, p, [4, 5])


@pytest.mark.slow   # ~4 CPU-s: two bidirectional recurrent layers compiled, plus torch
def test_bidirectional_lstm_and_gru_match_pytorch_with_packed_sequences():
    """Converted nn.LSTM/nn.GRU(bidirectional=True): outputs of every step and the input
    gradient match PyTorch on packed variable-length sequences (lengths=)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    pack = torch.nn.utils.rnn
    lengths = np.array([6, 3, 5])
    x = _r(3, 6, 4)
    for kind, cls in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)):
        mod = cls(4, 5, batch_first=True, bidirectional=True).double()
        layer = L.bidirectional(getattr(L, kind)(5))
        p = interop.bidirectional(_sd(mod), kind=kind, like=_init(layer, (None, 6, 4)))
        xt = torch.tensor(x, requires_grad=True)
        packed = pack.pack_padded_sequence(xt, torch.tensor(lengths), batch_first=True,
                                           enforce_sorted=False)
        yt = pack.pad_packed_sequence(mod(packed)[0], batch_first=True, total_length=6)[0]
        dy = _r(*yt.shape)
        yt.backward(torch.tensor(dy))
        kw = {"lengths": jnp.asarray(lengths)}
        y, res = jax.jit(lambda p, x: layer.forward(p, x, **kw))(p, jnp.asarray(x))
        _, dx = jax.jit(layer.backward)(p, res, jnp.asarray(dy))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=kind)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=kind)
    with pytest.raises(interop.StateDictError, match="is the module bidirectional=True"):
        interop.bidirectional(_sd(torch.nn.LSTM(4, 5)), kind="lstm")


@pytest.mark.slow   # ~4 CPU-s: two decoder layers compiled, plus torch
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_decoder_layer_matches_pytorch(norm_first):
    """Causal self-attention, memory key padding: outputs, dx and dmemory against PyTorch."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    act = "gelu" if norm_first else "relu"
    dec = torch.nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, activation=act,
                                           norm_first=norm_first, batch_first=True).double()
    with torch.no_grad():
        for n in (dec.norm1, dec.norm2, dec.norm3):
            n.weight.uniform_(0.5, 2)
            n.bias.uniform_(-1, 1)
        dec.multihead_attn.in_proj_bias.uniform_(-1, 1)
    layer = L.transformer_decoder_layer(8, 2, 16, activation=act, norm_first=norm_first,
                                        implementation="materialized")
    p = interop.transformer_decoder_layer(_sd(dec),
                                          like=_init(layer, ((None, 5, 8), (None, 4, 8))))
    x, mem, mem_len = _r(2, 5, 8), _r(2, 4, 8), np.array([4, 2])
    xt, mt = torch.tensor(x, requires_grad=True), torch.tensor(mem, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    pad = torch.tensor(np.arange(4)[None] >= mem_len[:, None])
    yt = dec(xt, mt, tgt_mask=causal, memory_key_padding_mask=pad)
    dy = _r(*yt.shape)
    yt.backward(torch.tensor(dy))
    kw = {"memory_lengths": jnp.asarray(mem_len)}
    pair = (jnp.asarray(x), jnp.asarray(mem))
    y, res = jax.jit(lambda p, xm: layer.forward(p, xm, **kw))(p, pair)
    g, (dx, dmem) = jax.jit(layer.backward)(p, res, jnp.asarray(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dmem, mt.grad.numpy(), rtol=1e-9, atol=1e-12)
    want = {("ff", 0, "W"): dec.linear1.weight.grad.numpy().T,
            ("norm1", "gamma"): dec.norm1.weight.grad.numpy(),
            ("self_attn", "W_v"): dec.self_attn.in_proj_weight.grad.numpy()[16:].T,
            ("cross_attn", "W_q"): dec.multihead_attn.in_proj_weight.grad.numpy()[:8].T,
            ("cross_attn", "b_o"): dec.multihead_attn.out_proj.bias.grad.numpy()}
    for path, w in want.items():
        got = g
        for k in path:
            got = got[k]
        np.testing.assert_allclose(got, w, rtol=1e-9, atol=1e-12, err_msg=str(path))
