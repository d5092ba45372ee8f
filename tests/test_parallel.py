"""Many devices: meshes, sharding specs, fit on a mesh (funnn/parallel.py).

This process started JAX with one CPU device, so the multi-device checks run in
fresh processes with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``:
``tests/_parallel_worker.py`` (8 devices, ``fit`` on every layout, both engines,
float32 and float64). Many processes (funnn/distributed.py) are in test_distributed.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _procs import _env, _free_port, _rel

from funnn import _rendezvous, cli, core, data, parallel, train
from funnn import layers as L
from funnn.core import ConfigError

HERE = Path(__file__).parent





# --------------------------------------------------------------------------- 8 devices


@pytest.mark.slow
def test_eight_devices_train_like_one_on_every_layout(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(HERE / "_parallel_worker.py"), str(out)],
                       env=_env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["devices"] == 8
    tol = {"float32": 1e-5, "float64": 1e-10}
    for dtype in tol:
        for engine in ("autodiff", "manual"):
            rows = rep[f"{dtype} {engine}"]
            assert "replicated" in rows
            for layout, row in rows.items():
                where = f"{dtype} {engine} {layout}"
                assert row["dtype"] == dtype, where
                assert row["params"] <= tol[dtype], (where, row["params"])
                assert row["opt_state"] <= tol[dtype], (where, row["opt_state"])
                assert row["loss"] <= tol[dtype] and row["eval"] <= 10 * tol[dtype], where
                assert row["mu_specs"] == row["param_specs"], where   # Adam's state follows
    rows = rep["float32 autodiff"]
    assert rows["replicated"]["mesh"] == {"data": 8, "model": 1}
    assert rows["replicated"]["param_specs"] == ["P()"] * 6
    # fsdp splits each leaf's largest axis over data where 8 divides it: W (2, 16) by
    # columns, b (16,), W (16, 8) by rows, b (8,); the (8, 3) W too; b (3,) stays whole
    assert rows["fsdp"]["param_specs"] == ["P(None, 'data')", "P('data',)", "P('data',)",
                                           "P('data',)", "P('data',)", "P()"]
    # tensor parallel on data=4 x model=2: output axes split where 2 divides them
    assert rows["tensor"]["mesh"] == {"data": 4, "model": 2}
    assert rows["tensor"]["param_specs"] == ["P(None, 'model')", "P('model',)",
                                             "P(None, 'model')", "P('model',)", "P()", "P()"]
    # megatron: dense 0 by columns (W, b) paired with dense 2 by rows, its b and dense 4 whole
    assert rows["megatron"]["param_specs"] == ["P(None, 'model')", "P('model',)",
                                               "P('model',)", "P()", "P()", "P()"]
    rules = next(v for k, v in rows.items() if k.startswith("{"))
    assert rules["param_specs"] == ["P(None, 'model')", "P()", "P('data',)", "P('data',)",
                                    "P('data', None)", "P()"]
    assert rep["dropout+batch_norm"]["params"] <= 1e-5
    assert rep["dropout+batch_norm"]["state"] <= 1e-5
    assert rep["padded_lm"]["params"] <= 1e-5       # side inputs sharded with the batch
    assert rep["padded_lm"]["loss"] <= 1e-5 and rep["padded_lm"]["eval"] <= 1e-5
    dp = rep["dp"]                                  # DP-SGD on 8 devices: the same run
    assert dp["params"] <= 1e-5 and dp["loss"] <= 1e-5, dp
    assert dp["epsilon"][0] == dp["epsilon"][1] and dp["epsilon"][0][-1] > 0
    err = rep["errors"]
    assert err["batch"].startswith("ConfigError") and "batch_size 30 is not divisible by the " \
        "data-parallel degree 8" in err["batch"] and "e.g. 32" in err["batch"]
    assert "unknown mesh axis 'modle'" in err["axis"] and "('data', 'model')" in err["axis"]
    assert "rule '7.W' matches no parameter" in err["path"] and "0.W, 0.b" in err["path"]
    assert "axis 1 of shape (8, 3) has size 3, not divisible by 8" in err["indivisible"]
    assert "needs a mesh axis 'model'" in err["tensor_without_model_axis"]
    assert "asked for 16 devices but this process has 8" in err["devices"]
    assert rep["compiles_before_errors"] > 0       # the listener does see compiles...
    assert rep["compiles_during_errors"] == 0      # ...and every bad input fails before one


# --------------------------------------------------------------------------- this process


@pytest.mark.parametrize("argv, match", [
    (["train", "--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "2"],
     "process_id must lie in [0, 2)"),
    (["train", "--num-processes", "2", "--process-id", "0"], "need --coordinator"),
    (["train", "--coordinator", "127.0.0.1:9"], "needs --num-processes and --process-id"),
    (["train", "--devices", "2"], "asked for 2 devices but this process has 1 (cpu)"),
    (["train", "--sharding", "zero3"], "unknown sharding 'zero3'"),
    (["train", "--sharding", '{"9.W": "fsdp"}'], "rule '9.W' matches no parameter"),
    (["train", "--sharding", '{"0.W": [null, "modle"]}'], "unknown mesh axis 'modle'"),
    (["train", "--sharding", "{oops"], "not valid JSON"),
    (["train", "--model", "sigmoid", "--devices", "1", "--check-numerics"],
     "--check-numerics runs one step at a time on one device"),
])
def test_bad_parallel_options_exit_2_with_one_line(argv, match, capsys, tmp_path):
    code = cli.main(argv + ["--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_library_errors_name_python_arguments_and_the_cli_names_its_flags(capsys, tmp_path):
    # from Python: the place is the function and its argument, never a command-line flag
    for call, where in [
            (lambda: parallel.make_mesh(1, model=3), "make_mesh(model=): the model axis (3)"),
            (lambda: parallel.make_mesh(2), "make_mesh(devices=): asked for 2 devices"),
            (lambda: parallel.parse_sharding("{oops"), "parse_sharding(text=): sharding rules"),
            (lambda: parallel.initialize("127.0.0.1:1234", 2, 1, timeout=0),
             "initialize(timeout=): timeout must be a positive number"),
            (lambda: parallel.initialize("127.0.0.1", 2, 0), "initialize(coordinator=): "),
            (lambda: parallel.initialize("127.0.0.1:1234", 0, 0),
             "initialize(num_processes=): num_processes must be at least 1"),
            (lambda: _rendezvous._connect("127.0.0.1", _free_port(), 0.2),
             "initialize(coordinator=): cannot reach the coordinator")]:
        with pytest.raises(ConfigError) as info:
            call()
        flags = str(info.value).replace("XLA_FLAGS=--xla", "")   # XLA's flag, not ours
        assert str(info.value).startswith(where) and "--" not in flags, info.value
    model = L.serial(L.dense(4))
    _, params = model.init(jax.random.key(0), (None, 3))
    with pytest.raises(ConfigError, match=r"build one with parallel\.make_mesh\(n, model=k\)$"):
        parallel.plan(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), params, "tensor")
    # through the command line, the same errors name the flags that set those arguments
    run = ["--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]
    for argv, said in [(["train", "--model-axis", "3"], "--model-axis: the model axis (3)"),
                       (["train", "--sharding", "{oops"], "--sharding: sharding rules are not"),
                       (["train", "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                         "--process-id", "2"], "--process-id: process_id must lie in [0, 2)")]:
        assert cli.main(argv + run) == 2
        err = capsys.readouterr().err
        assert said in err and "make_mesh(" not in err and "initialize(" not in err, err
    assert cli._in_flags(ConfigError("build one with parallel.make_mesh(n, model=k)",
                                     ("parallel",))) == "parallel: build one with --model-axis k"


@pytest.mark.slow
def test_one_device_mesh_is_the_same_code_path_and_says_where_arrays_live():
    tr, te = data.load("xor", n=64)
    model = L.serial(L.dense(8), L.activation("tanh"), L.dense(2))
    _, params = model.init(jax.random.key(0), (None, 2))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    x = np.asarray(tr.x, np.float64)
    kw = dict(epochs=2, batch_size=16, progress=False, eval_data=(np.asarray(te.x), te.y))
    plain = train.fit(model, params, (x, tr.y), "softmax_cross_entropy", "adam", **kw)
    meshed = train.fit(model, params, (x, tr.y), "softmax_cross_entropy", "adam", mesh=1,
                       sharding="fsdp", **kw)
    assert _rel(meshed.params, plain.params) <= 1e-10
    assert _rel(meshed.opt_state, plain.opt_state) <= 1e-10
    assert [r["train_loss"] for r in meshed.history] == pytest.approx(
        [r["train_loss"] for r in plain.history], rel=1e-10)
    w = meshed.params[0]["W"]
    assert isinstance(w.sharding, jax.sharding.NamedSharding) and w.dtype == jnp.float64
    assert dict(w.sharding.mesh.shape) == {"data": 1, "model": 1}
    assert meshed.config["mesh"] == {"data": 1, "model": 1}
    assert meshed.config["sharding"] == "fsdp"


def test_plans_check_specs_against_the_mesh_and_the_shapes():
    model = L.serial(L.dense(4), L.activation("relu"), L.dense(2))
    _, params = model.init(jax.random.key(0), (None, 3))
    mesh = parallel.make_mesh(1)
    plan = parallel.plan(mesh, params, [("0.W", (None, "model")), ("0.b", ("model",)),
                                        ("*", "fsdp")])
    spec = jax.sharding.PartitionSpec
    assert plan.specs() == {"0.W": spec(None, "model"), "0.b": spec("model"), "2.W": spec(),
                            "2.b": spec()}
    for spec, match in [
            ({"0.W": ("data", "model", None)}, r"has 3 entries but the parameter has shape"),
            ({"0.W": ("data", "data")}, "used twice"),
            ({"0.W": 3}, "a spec is a PartitionSpec"),
            ("zero3", "unknown sharding 'zero3'"),
            (42, "sharding must be one of replicated, fsdp, tensor, megatron")]:
        with pytest.raises(ConfigError, match=match):
            parallel.plan(mesh, params, spec)
    with pytest.raises(ConfigError, match=r"the model axis \(3\) must divide"):
        parallel.make_mesh(1, model=3)
    with pytest.raises(ConfigError, match="needs an axis named 'data'"):
        parallel.as_mesh(jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))
    with pytest.raises(ConfigError, match="sharding='fsdp' needs a mesh"):
        train.fit(model, params, (np.ones((8, 3)), np.zeros(8, int)), "softmax_cross_entropy",
                  batch_size=4, sharding="fsdp", progress=False)
    assert parallel.parse_sharding('[["0.W", [null, "model"]]]') == [("0.W", [None, "model"])]
    assert parallel.parse_coordinator("[::1]:8476") == ("::1", 8476)


def test_megatron_pairs_columns_then_rows_in_attention_and_mlp_blocks():
    """Shapes only (an abstract data=4 x model=2 mesh): a block's W_q/W_k/W_v and the MLP's
    first dense by columns, W_o and the second dense by rows; the rest whole."""
    model = L.serial(L.embedding(11, 8), L.transformer_block(2, 16, num_kv_heads=1),
                     L.transformer_encoder_layer(8, 2, 16), L.dense(6), L.dense(11))
    params = jax.eval_shape(lambda k: model.init(k, (None, 5))[1], jax.random.key(0))
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = {core.path_str(p): s for (p, _), s in zip(flat, parallel._specs(params, "megatron",
                                                                          mesh))}
    spec, col, row = jax.sharding.PartitionSpec, ("col",), ("row",)
    want = {"1.attn.1.W_q": col, "1.attn.1.W_k": col, "1.attn.1.W_v": col, "1.attn.1.b_q": col,
            "1.attn.1.b_k": col, "1.attn.1.b_v": col, "1.attn.1.W_o": row,
            "1.mlp.1.W": col, "1.mlp.1.b": col, "1.mlp.3.W": row,
            "2.0.0.W_q": col, "2.0.0.W_k": col, "2.0.0.W_v": col, "2.0.0.b_q": col,
            "2.0.0.b_k": col, "2.0.0.b_v": col, "2.0.0.W_o": row,
            "2.2.0.W": col, "2.2.0.b": col, "2.2.3.W": row,
            "3.W": col, "3.b": col, "4.W": row}        # two dense layers in a row pair up too
    for path, s in got.items():
        leaf = dict((core.path_str(p), a) for p, a in flat)[path]
        if path not in want:
            assert s == spec(), path
        elif want[path] == col:
            assert s == spec(*([None] * (leaf.ndim - 1)), "model"), path
        else:
            assert s == spec("model"), path
    odd = L.serial(L.dense(3), L.activation("relu"), L.dense(2))   # 3 hidden: 2 cannot split
    p_odd = jax.eval_shape(lambda k: odd.init(k, (None, 4))[1], jax.random.key(0))
    assert parallel._specs(p_odd, "megatron", mesh) == [spec()] * 4
    with pytest.raises(ConfigError, match="sharding 'megatron' needs a mesh axis 'model'"):
        parallel.plan(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), p_odd, "megatron")
    with pytest.raises(ConfigError, match="give it as sharding='megatron', not as a rule"):
        parallel.plan(parallel.make_mesh(1), p_odd, {"0.W": "megatron"})


def test_info_shows_processes_and_the_mesh(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "processes: 1 (this is process 0)" in out and "process 0" in out
    assert "mesh: none" in out and "data=1 x model=1 over 1 cpu device" in out
    assert cli.main(["info", "--devices", "4"]) == 0
    assert "asked for 4 devices but this process has 1" in capsys.readouterr().out


def test_parallel_bench_suite_says_cpu_devices_show_overhead_not_speed_up():
    from funnn.bench import suites

    (group,) = suites.parallel_suite("tiny")           # this process has one device
    assert [c.impl for c in group] == ["step, replicated params"]
    assert "CPU-simulated devices" in group[0].name and "not speed-up" in group[0].name
    quick = suites.parallel_suite("quick")
    assert [len(g) for g in quick] == [1, 3, 3, 3]       # 1, 2, 4, 8 devices
    assert quick[3][2].impl == "all-reduce: share of step"
