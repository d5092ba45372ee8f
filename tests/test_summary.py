"""funnn/summary.py: the printed model table (layer paths, parameter shapes and counts) and
its check that the params given belong to the model, named by layer path."""

import jax
import jax.numpy as jnp
import pytest

from funnn import activations as A
from funnn import core
from funnn import layers as L
from funnn.core import ShapeError

KEY = jax.random.key(0)


def _stack():
    return L.serial(L.dense(5), L.activation(A.tanh),
                    L.parallel(L.dense(3), L.serial(L.dense(2), L.activation(A.sigmoid))),
                    L.residual(L.serial(L.dense(5), L.activation(A.softplus))), L.dense(3))


def test_summary_and_count():
    model = _stack()
    _, params = model.init(jax.random.key(0), (None, 4))
    text = core.summary(model, params)
    assert core.param_count(params) == 25 + 18 + 12 + 30 + 18
    assert "dense(5)" in text and f"{core.param_count(params):,}" in text.splitlines()[-1]
    assert "[2][1][0]" in text          # a nested path
    paths = [p for p, _ in core.tree_paths(params)]
    assert paths[0] == "0.W" and "2.1.0.b" in paths



def test_summary_notes_the_gradient_free_key_bias():
    from funnn.summary import KEY_BIAS_NOTE
    lm = L.serial(L.embedding(7, 4), L.residual(L.multi_head_attention(2)), L.dense(7))
    params = jax.eval_shape(lambda k: lm.init(k, (None, 3))[1], KEY)
    assert core.summary(lm, params).endswith(KEY_BIAS_NOTE)
    assert all(len(line) <= 100 for line in KEY_BIAS_NOTE.splitlines())
    no_bias = L.serial(L.embedding(7, 4), L.multi_head_attention(2, use_bias=False))
    plain = [no_bias, _stack()]
    for model, shape in zip(plain, [(None, 3), (None, 4)]):
        p = jax.eval_shape(lambda k, m=model, s=shape: m.init(k, s)[1], KEY)
        assert "b_k" not in core.summary(model, p)

@pytest.mark.slow
def test_summary_rejects_another_models_params():
    model = L.serial(L.dense(30), L.activation("tanh"), L.dense(10))
    _, params = model.init(KEY, (None, 64))
    text = core.summary(model, params)
    assert core.summary(model, params, in_shape=(None, 64)) == text
    longer = L.serial(L.dense(30), L.activation("tanh"), L.dense(10), L.activation("tanh"),
                      L.dense(5))
    _, p_long = longer.init(KEY, (None, 64))
    with pytest.raises(ShapeError, match=r"^serial: params do not match the model: expected a "
                                         r"tuple of 3 entries \(one per layer\), got a tuple of 5"):
        core.summary(model, p_long)
    swapped = L.serial(L.dense(30), L.dense(10), L.activation("tanh"))
    _, p_swap = swapped.init(KEY, (None, 64))
    with pytest.raises(ShapeError, match=r"^serial\[1\] activation\(tanh\): params do not match "
                                         r"the model: expected no params, got W \(30, 10\), "
                                         r"b \(10,\)"):
        core.summary(model, p_swap)
    narrower = L.serial(L.dense(20), L.activation("tanh"), L.dense(10))
    _, p_narrow = narrower.init(KEY, (None, 64))
    core.summary(model, p_narrow)             # without in_shape only the structure is known
    with pytest.raises(ShapeError, match=r"^serial\[0\] dense\(30\): params do not match the "
                                         r"model: expected W \(64, 30\), b \(30,\), got "
                                         r"W \(64, 20\), b \(20,\)"):
        core.summary(model, p_narrow, in_shape=(None, 64))
    with pytest.raises(ShapeError, match=r"^serial\[0\] dense\(30\): params do not match"):
        core.summary(model, params, in_shape=(None, 63))


def test_summary_checks_nested_combinators():
    model = L.serial(L.dense(3), L.parallel(L.dense(3), L.residual(L.serial(L.dense(3))),
                                            combine="sum"))
    _, params = model.init(KEY, (None, 2))
    assert "[1][1]/residual[0]" in core.summary(model, params, in_shape=(None, 2))
    bad = (params[0], (params[1][0], ({"W": jnp.ones((3, 4)), "b": jnp.ones(4)},)))
    with pytest.raises(ShapeError, match=r"^serial\[1\] parallel\[1\] residual\(serial\) "
                                         r"serial\[0\] dense\(3\): params do not match the model: "
                                         r"expected W \(3, 3\), b \(3,\), got W \(3, 4\), "
                                         r"b \(4,\)"):
        core.summary(model, bad, in_shape=(None, 2))
    with pytest.raises(ShapeError, match=r"^serial\[1\] parallel\[1\] residual\(serial\) serial: "
                                         r"params do not match the model: expected a tuple of 1"):
        core.summary(model, (params[0], (params[1][0], params[1][0])))


def _columns(text):
    """The table's rows, parsed by the column spans of its first rule: each row is its cells
    (path, layer, parameters, count), continuation lines (an empty count) joined by spaces."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("-"))
    spans, pos = [], 0
    for run in lines[rule].split("  "):
        spans.append((pos, pos + len(run)))
        pos += len(run) + 2
    rows = []
    for line in lines[rule + 1:]:
        if line.startswith("-"):
            break
        cells = [line[a:b].strip() for a, b in spans[:3]] + [line[spans[3][0]:].strip()]
        if cells[3]:
            rows.append(cells)
        else:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
    return rows


LONG = "a_custom_layer_with_a_rather_long_descriptive_name(alpha=0.5, beta=2.0)"


def _wide_model():
    custom = core.layer_from_apply(lambda k, s: (s, {"scale_of_everything": jnp.ones(s[-1:])}),
                                lambda p, x, **_: x * p["scale_of_everything"], name=LONG)
    block = L.transformer_block(num_heads=2, mlp_dim=8)
    return L.serial(L.dense(4), block, L.residual(L.serial(custom, L.dense(4))), L.dense(3))


@pytest.mark.parametrize("width", [100, 60, 40])
def test_summary_wraps_long_rows_to_width_and_loses_nothing(width):
    """Under ``width`` every line fits; each cell is only broken across continuation lines,
    never cut: its characters, spaces aside, are those of the unwrapped table, and every
    parameter's ``name(shape)``, from the params themselves, is in its layer's cell."""
    model = _wide_model()
    params = jax.eval_shape(lambda k: model.init(k, (None, 5, 6))[1], KEY)
    full = core.summary(model, params, width=None)
    assert max(map(len, full.splitlines())) > 100             # the case worth wrapping
    text = core.summary(model, params, width=width)
    assert max(map(len, text.splitlines())) <= width
    assert "[derived]: backward derived by jax.vjp" in text.replace("\n", " ")
    assert "[vmap]: no per-example rule" in text.replace("\n", " ")
    got, want = _columns(text), _columns(full)
    assert len(got) == len(want) == 5

    def squeeze(s):
        return s.replace(" ", "")

    assert [[squeeze(c) for c in r] for r in got] == [[squeeze(c) for c in r] for r in want]
    assert [squeeze(c) for c in got[2][:2]] == ["[2]/residual[0]", squeeze(f"{LONG}[derived][vmap]")]
    per_layer = [params[0], params[1], params[2][0], params[2][1], params[3]]
    for row, p in zip(got, per_layer):
        for path, leaf in core.tree_paths(p):
            assert squeeze(f"{path}{tuple(leaf.shape)}") in squeeze(row[2])
    lines = text.splitlines()
    total = lines[[i for i, line in enumerate(lines) if line.startswith("-")][1] + 1]
    assert total.split() == ["total", f"{core.param_count(params):,}"]


def test_summary_width_is_checked_and_a_narrow_table_is_unchanged():
    model = _stack()
    params = jax.eval_shape(lambda k: model.init(k, (None, 4))[1], KEY)
    assert core.summary(model, params) == core.summary(model, params, width=None)
    with pytest.raises(core.ConfigError, match=r"^summary: width must be an int >= 40 or None, "
                                               r"got 39$"):
        core.summary(model, params, width=39)
