"""The benchmark harness: FLOP counts, bench.json, every suite at tiny sizes, bad input.

No timing is asserted here (speed is measured by ``funnn bench``, never in tests);
what is tested is that the harness counts, reports and fails the way it says.
"""

import builtins
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import bench, cli
from funnn.bench import harness, peers, suites
from funnn.core import ConfigError


def _case(impl, build, **kw):
    return bench.Case("t", "group", impl, 1, "float32", build, **kw)


def test_matmul_flops_equal_the_hand_count():
    a, b = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 16), jnp.float32)
    rows = bench.run_group([_case("matmul", lambda: (jax.jit(jnp.matmul), (a, b)))],
                           rounds=1, per_round=1)
    assert [r["role"] for r in rows] == ["baseline", "aa"]         # the hidden A/A copy
    assert rows[0]["flops_per_call"] == 2 * 64 * 32 * 16 and rows[0]["flops_source"] == "xla"
    assert rows[0]["bytes_per_call"] >= 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert rows[0]["memory_compiled_bytes"] > 0 and rows[0]["ratio_to_baseline"] == 1.0


@pytest.mark.parametrize("impl", [pytest.param("pure JAX", marks=pytest.mark.slow),
                                  pytest.param("funnn autodiff", marks=pytest.mark.slow),
                                  "funnn manual"])
def test_mlp_step_flops_match_the_hand_count(impl):
    """Forward and backward matmuls, plus Adam: by hand 14 FLOPs per parameter (two moment
    updates 3 + 4, two bias corrections, sqrt + eps + divide, the rate, the update)."""
    (case,) = [c for c in suites._step_group("t", "mlp", 16, "float32", [impl], check=False)]
    matmuls = suites.mlp_flops(16)
    assert matmuls == 3 * 2 * 16 * (784 * 512 + 512 * 512 + 512 * 10) - 2 * 16 * 784 * 512
    params = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    fn, args = case.build()
    xla_flops = harness._analyse(fn.lower(*args).compile())[0]       # XLA's own count
    assert xla_flops == pytest.approx(matmuls + 14 * params, rel=0.03)
    # the row reports the hand count (matrix products), the same on every backend
    (row,) = bench.run_group([case], rounds=1, per_round=1, aa=False)
    assert row["flops_per_call"] == matmuls and row["flops_source"] == "hand count"
    # the bytes stay XLA's (no loop in the step), so the row lands on the roofline
    assert row["bytes_source"] == "xla" and row["intensity"] > 0


def test_loops_use_the_hand_count():
    (group,) = suites.control_suite("tiny")
    rows = bench.run_group(group, rounds=1, per_round=1)
    assert all(r["flops_source"] == "hand count" for r in rows)
    # XLA's bytes count a loop body once: kept as a labelled lower bound, not dropped
    looped = [r for r in rows if "while" in r["impl"] or r["impl"] == "lax.scan"]
    assert all("lower bound" in r["bytes_source"] and r["bytes_per_call"] > 0 for r in looped)
    assert [r["status"] for r in rows] == ["ok"] * 5          # and the A/A copy of lax.scan
    assert rows[0]["ratio_to_baseline"] == 1.0 and rows[-1]["role"] == "aa"
    assert all(r["flops_flag"] is None for r in rows)          # flops= given: not flagged


def test_failures_are_rows_and_the_rest_still_runs():
    def oom():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    def missing():
        raise bench.Unavailable("somepeer (pip install -e '.[peers]')")

    def diverges():
        return (lambda s, x: (s, jnp.float32(1.0))), (None, 0)

    ok = _case("ok", lambda: (jax.jit(lambda x: x + 1), (jnp.ones(3),)), baseline=True)
    rows = bench.run_group([_case("big", oom), _case("peer", missing), ok,
                            _case("flat", diverges, jit=False, check=suites.trains)],
                           rounds=2, per_round=1)
    status = {r["impl"]: r["status"] for r in rows}
    assert status["big"] == "out of memory: skipped"
    assert status["peer"].startswith("not installed: somepeer")
    assert status["flat"].startswith("error: AssertionError: does not train")
    assert status["ok"] == "ok" and rows[2]["time_median_s"] > 0
    assert rows[2]["ratio_to_baseline"] == 1.0
    assert rows[0]["time_median_s"] is None


def test_missing_peer_library_is_a_marked_row(monkeypatch):
    real = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    x, y = suites.data_for("mlp", 4)
    with pytest.raises(bench.Unavailable, match=r"torch \(pip install"):
        peers.torch_eager("mlp", x, y, jnp.float32)


@pytest.mark.slow
def test_every_suite_runs_at_tiny_size_and_bench_json_has_the_schema(tmp_path):
    report = bench.run(list(bench.SUITES), size="tiny", out_dir=str(tmp_path), progress=False)
    doc = json.loads((tmp_path / "bench.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert set(doc) == {"format", "env", "peaks", "groups", "results", "roofline"}
    assert doc["format"] == "funnn.bench/2"
    for k in ("device", "jax", "jaxlib", "funnn", "backend", "size", "rounds", "seed",
              "timestamp", "hostname", "cpu_model", "cpu_count", "xla_flags", "threads_env",
              "load_average_start", "load_average_end", "git_commit", "torch_threads"):
        assert k in doc["env"], k
    for k in ("float32", "float32_highest", "bfloat16", "bandwidth_bytes_per_s"):
        assert doc["peaks"][k] > 0
    required = set(bench.ROW_FIELDS)
    assert {r["suite"] for r in doc["results"]} == set(bench.SUITES)
    for r in doc["results"]:
        assert required <= set(r)
        if r["status"] == "ok":
            assert r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
            assert r["ratio_to_baseline"] > 0 and r["compile_s"] >= 0
            assert len(r["samples_s"]) == r["n_samples"] and r["n_rounds"] == 3
            lo, hi = r["ratio_ci95"]
            assert lo <= r["ratio_to_baseline"] <= hi
        else:
            assert r["status"].startswith(("not installed", "not applicable")), r
    ok = [r for r in doc["results"] if r["status"] == "ok" and r["fraction_of_measured_peak"]]
    assert ok and all(r["fraction_of_measured_peak"] > 0 for r in ok)
    # no fraction above 1 goes unflagged
    assert all(r["peak_flag"] for r in ok if r["fraction_of_measured_peak"] > 1)
    cudnn = [r for r in doc["results"] if "cudnn" in r["impl"]]
    assert cudnn and all(r["status"].startswith("not applicable") for r in cudnn)
    assert {g["name"] for g in doc["groups"]} == {r["name"] for r in doc["results"]}
    assert "[engines] mlp b8 float32" in report["table"]
    if "roofline.png" in " ".join(report["files"]):
        assert (tmp_path / "roofline.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_suite_and_peer_are_clear_errors(capsys):
    with pytest.raises(ConfigError, match="unknown suite 'speed'; valid: engines, peers"):
        suites.build(["speed"])
    with pytest.raises(ConfigError, match="unknown peer 'keras'; valid: flax-linen"):
        suites.build(["peers"], peer_names=["keras"])
    assert cli.main(["bench", "--suite", "engines,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err and "Traceback" not in err


def test_peaks_are_positive_and_fraction_uses_the_rows_dtype():
    p = harness.measure_peaks("tiny")
    assert p["float32"] > 0 and p["bfloat16"] > 0 and p["bandwidth_bytes_per_s"] > 0
    if jax.default_backend() == "cpu":     # one matmul precision on a CPU: one figure
        assert p["float32"] == p["float32_highest"] and "one figure" in p["float32_note"]
    rows = [{"dtype": "bfloat16", "achieved_flops_per_s": p["bfloat16"] / 2},
            {"dtype": "float32", "achieved_flops_per_s": None}]
    harness.fill_fraction(rows, p)
    assert rows[0]["fraction_of_measured_peak"] == pytest.approx(0.5)
    assert "fraction_of_measured_peak" not in rows[1] and "peak_flag" not in rows[0]


@pytest.mark.slow
def test_attention_suite_rows_compute_the_same_gradients():
    """Every implementation in the attention suite is the same function: equal gradients of the
    projections and the input (torch SDPA too, where installed)."""
    from funnn.bench import attention as bench_attention

    with jax.enable_x64(False):
        outs = {}
        for impl, build in bench_attention._case_builds(2, 16, 2, 4, "float32").items():
            try:
                fn, args = build()
            except harness.Unavailable:
                continue
            outs[impl] = fn(*args)
        ref = outs.pop("softmax(QK^T)V, jax.grad")
        want = [ref[1]] + [ref[0][n] for n in ("W_q", "W_k", "W_v", "W_o")]
        assert {"funnn autodiff", "funnn manual chunked", "funnn manual materialized",
                "jax dot_product_attention (xla)"} <= set(outs)
        for impl, got in outs.items():
            got = ([g.detach().numpy() for g in got] if impl == "torch SDPA" else
                   [got[1]] + [got[0][n] for n in ("W_q", "W_k", "W_v", "W_o")])
            for g, w in zip(got, want):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5,
                                           err_msg=impl)
    # nominal FLOPs: projections 3 x 4 x 2BTF^2, causal attention 3.5 x 4BHT^2D / 2
    assert bench_attention.attention_flops(1, 8, 2, 4) == 3 * 8 * 8 * 64 + 3.5 * 2 * 2 * 64 * 4


def test_curvature_suite_runs_at_tiny_size_and_writes_its_rows(tmp_path, monkeypatch):
    """The suite's groups name every quantity and route; a few of its rows run through the
    harness into bench.json (all of them run in the every-suite test)."""
    from funnn.bench import curvature as bench_curv

    (group,) = bench_curv.curvature_suite("tiny")
    impls = [c.impl for c in group]
    assert impls[0] == "backward: funnn manual value_and_grad" and group[0].baseline
    assert {i.split(":")[0] for i in impls} == {"backward", "batch_stats", "diag_ggn",
                                                 "diag_ggn_mc", "kfac_factors", "ggn_vp", "hvp"}
    assert sum("BackPACK" in i for i in impls) == 7 and "hvp: jax.jvp of jax.grad" in impls
    keep = {"backward: funnn manual value_and_grad", "ggn_vp: funnn"}
    funnn_rows = bench_curv.funnn_builds
    monkeypatch.setattr(bench_curv, "funnn_builds", lambda *a: {
        k: b for k, b in funnn_rows(*a).items() if k in keep})
    monkeypatch.setattr(bench_curv, "autodiff_builds", lambda *a: {})
    monkeypatch.setattr(bench_curv, "backpack_builds", lambda *a: {})
    report = bench.run(["curvature"], size="tiny", rounds=1, per_round=1, peaks=False,
                       progress=False, out_dir=str(tmp_path))
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == keep | {"backward: funnn manual value_and_grad [A/A copy]"}
    assert all(r["status"] == "ok" and r["suite"] == "curvature" for r in rows.values())
    assert rows["ggn_vp: funnn"]["ratio_to_baseline"] > 0
    assert "[curvature] curvature mlp 64-16-10 b8 float32" in report["table"]


@pytest.mark.slow
def test_curvature_suite_rows_compute_the_same_quantities():
    """funnn's rules, the autodiff routes and BackPACK (where installed) agree at tiny size:
    the exact diagonal GGN, the GGN- and Hessian-vector products (the same ``v``; BackPACK's
    rows take their own) and the gradient variance."""
    from funnn.bench import curvature as bench_curv

    with jax.enable_x64(False):
        model, params, x, y, v, key = bench_curv.problem("mlp:16", 8)
        builds = (bench_curv.funnn_builds(model, params, x, y, v, key)
                  | bench_curv.autodiff_builds(model, params, x, y, v, key))
        out = {k: jax.tree.map(np.asarray, fn(*args))
               for k, (fn, args) in ((k, b()) for k, b in builds.items())}

    def close(a, b, what):
        for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6 * np.max(np.abs(q)),
                                       err_msg=what)

    close(out["diag_ggn: funnn (exact)"], out["diag_ggn: vmap(jax.jacrev) + jax.hessian"],
          "diag_ggn")
    close(out["ggn_vp: funnn"], out["ggn_vp: jax.jvp + loss Hessian + jax.vjp"], "ggn_vp")
    close(out["hvp: funnn (jax.jvp of the manual grad)"], out["hvp: jax.jvp of jax.grad"], "hvp")
    close(out["batch_stats: funnn"].variance, out["batch_stats: vmap(jax.grad)"][2], "variance")
    pytest.importorskip("backpack")
    torch, _, net, lossf, xt, yt = bench_curv._torch_setup("mlp:16", params, x, y)
    from backpack import backpack, extensions

    loss = lossf(net(xt), yt)
    with backpack(extensions.DiagGGNExact()):
        loss.backward()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    want = jax.tree.leaves(out["diag_ggn: funnn (exact)"])             # W, b per layer
    got = [a for m in linears for a in (m.weight.diag_ggn_exact.numpy().T,
                                        m.bias.diag_ggn_exact.numpy())]
    close(got, want, "BackPACK DiagGGNExact")
