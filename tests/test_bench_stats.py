"""Trusting the benchmark: intervals, the A/A control, ``bench compare``, honest ceilings.

The timed steps here are tiny and the assertions are about the statistics (a step doing four
times the work is reported slower with confidence, identical steps "no change"), never about
absolute speed. Deliberately slowed steps do the work several times over, so that a loaded
machine cannot hide the difference.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import bench, cli
from funnn.bench import ceilings, output, stats
from funnn.core import ConfigError

W = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)) / 16, jnp.float32)
X = jnp.ones((256, 256), jnp.float32)


def _work(k):
    def f(x, w):
        for _ in range(k):
            x = jnp.tanh(x @ w)
        return x
    return jax.jit(f)


def _report(slow=1, **kw):
    """A group: a baseline, an identical copy compiled on its own, a 4x-work step."""
    fns = {"base": _work(1), "same": _work(1), "four": _work(4 * slow)}
    return bench.steps(fns, (X, W), rounds=kw.pop("rounds", 15), per_round=5, **kw)


# --------------------------------------------------------------------------- statistics


def test_bootstrap_interval_and_verdicts_on_known_numbers():
    assert stats.iqr([1, 2, 3, 4, 5]) == pytest.approx(np.percentile([1, 2, 3, 4, 5], 75)
                                                       - np.percentile([1, 2, 3, 4, 5], 25))
    assert stats.iqr([3.0]) is None
    lo, hi = stats.bootstrap_median_ci([1.0] * 9 + [100.0], seed=1)
    assert lo == hi == 1.0                              # the median ignores the outlier
    lo, hi = stats.bootstrap_median_ci(list(np.linspace(0.9, 1.1, 21)), seed=2)
    assert 0.9 < lo < 1.0 < hi < 1.1
    assert stats.bootstrap_median_ci([1.0, 2.0], seed=3) == stats.bootstrap_median_ci(
        [1.0, 2.0], seed=3)                             # reproducible from its seed
    s = stats.ratio_summary([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert s["round_ratios"] == [2.0, 2.0, 2.0] and s["ratio"] == 2.0 and not s["noisy"]
    assert stats.ratio_summary([1.0, 2.0], [1.0, 1.0])["noisy"]      # fewer than 3 rounds
    assert stats.verdict(1.1, 1.3) == "slower" and stats.verdict(0.7, 0.9) == "faster"
    assert stats.verdict(0.95, 1.05) == "no change" and stats.verdict(1.005, 1.01) == "no change"
    with pytest.raises(ValueError, match="equal, non-empty"):
        stats.ratio_summary([1.0], [1.0, 2.0])


def test_aa_group_slower_step_is_slower_and_identical_steps_are_no_change():
    """A 95% interval misses the truth one time in twenty by construction (less with the 2%
    margin of "no change"), so the claim about identical steps gets up to three independent
    runs (seeds); the 4x step must read slower with confidence in every one."""
    for seed in range(3):
        report = _report(seed=seed)
        rows = {r["impl"]: r for r in report["results"]}
        assert rows["base"]["role"] == "baseline" and rows["base [A/A copy]"]["role"] == "aa"
        four, same, aa = rows["four"], rows["same"], rows["base [A/A copy]"]
        assert four["verdict"] == "slower" and four["ratio_ci95"][0] > 1.5, four["ratio_ci95"]
        if same["verdict"] == aa["verdict"] == "no change":
            break
    else:
        pytest.fail(f"identical steps read as changed in 3 runs: {same['ratio_ci95']}, "
                    f"A/A {aa['ratio_ci95']}")
    (group,) = report["groups"]
    assert group["baseline"] == "base" and group["aa_flag"] == output.aa_flag(aa)
    assert group["aa_ratio"] == aa["ratio_to_baseline"]
    for r in rows.values():          # every sample and every round's median is kept
        assert r["n_samples"] == len(r["samples_s"]) == 75 and len(r["round_medians_s"]) == 15
        assert r["time_iqr_s"] >= 0 and r["order_seed"] == seed
    assert "noise floor (A/A)" in report["table"] and "1 (base)" in report["table"]


def test_round_order_is_random_from_the_recorded_seed(monkeypatch):
    from funnn.bench import harness, timing

    seen: list = []
    real = timing.time_samples

    def spy(call, args, calls, how):
        seen.append(call.tag)
        return real(call, args, calls, how)

    def build(i):
        def f(x):
            return x + i
        f.tag = i
        return f, (jnp.ones(2),)

    monkeypatch.setattr(timing, "time_samples", spy)
    fns = [bench.Case("t", "g", str(i), 1, "float32", lambda i=i: build(i), jit=False,
                      baseline=i == 0) for i in range(4)]
    rows = harness.run_group(fns, rounds=8, per_round=1, seed=5, memory=False)
    first = list(seen)
    seen.clear()
    harness.run_group(fns, rounds=8, per_round=1, seed=5, memory=False)
    assert seen == first                          # the same seed, the same order
    seen.clear()
    harness.run_group(fns, rounds=8, per_round=1, seed=6, memory=False)
    assert seen != first                          # another seed, another order
    orders = [tuple(first[i:i + 5]) for i in range(0, 40, 5)]
    assert len(set(orders)) > 1                   # the order changes between rounds
    assert all(sorted(o) == [0, 0, 1, 2, 3] for o in orders)   # the A/A copy runs too
    assert all(r["order_seed"] == 5 for r in rows)


def test_aa_flag_and_noisy_rows():
    assert output.aa_flag({"ratio_to_baseline": 1.2, "ratio_ci95": [1.1, 1.3]}).startswith(
        "A/A ratio 1.20 outside")
    assert "excludes 1" in output.aa_flag({"ratio_to_baseline": 1.05,
                                           "ratio_ci95": [1.03, 1.08]})
    assert output.aa_flag({"ratio_to_baseline": 1.01, "ratio_ci95": [0.97, 1.04]}) is None
    rows = [{"suite": "s", "name": "g", "impl": "a", "role": "baseline", "baseline": "a",
             "ratio_to_baseline": 1.0, "ratio_ci95": [1.0, 1.0], "status": "ok"},
            {"suite": "s", "name": "g", "impl": "a [A/A copy]", "role": "aa", "baseline": "a",
             "ratio_to_baseline": 1.3, "ratio_ci95": [1.2, 1.4], "status": "ok"},
            {"suite": "s", "name": "g", "impl": "b", "role": "row", "baseline": "a",
             "ratio_to_baseline": 1.0, "ratio_ci95": [0.5, 1.5], "noisy": True, "status": "ok"}]
    rows = [dict.fromkeys(output.ROW_FIELDS) | r for r in rows]
    table = output.format_table(rows)
    assert "UNRELIABLE GROUP: A/A ratio 1.30" in table and "~ b" in table.replace("~ ", "~ ")
    assert "--rounds" in table                          # says how to get a firmer number


def test_blocked_timing_runs_on_cpu_and_reports_latency():
    rows = bench.run_group([bench.Case("t", "g", "mm", 1, "float32",
                                       lambda: (_work(1), (X, W)), baseline=True)],
                           rounds=3, per_round=4, timing_mode="blocked")
    for r in rows:
        assert r["timing"] == "blocked" and r["calls_per_sample"] == 4
        assert r["n_samples"] == 3 and r["latency_median_s"] > 0
    with pytest.raises(ValueError, match="timing: expected one of"):
        bench.run_group(rows and [], rounds=1, per_round=1, timing_mode="fast")


def test_zero_rounds_and_bad_counts_are_errors():
    with pytest.raises(ConfigError, match="expected rounds >= 1, got 0"):
        bench.run_group([], rounds=0)
    with pytest.raises(ConfigError, match="expected rounds >= 1, got 0"):
        bench.run(["jit"], size="tiny", rounds=0)
    with pytest.raises(ConfigError, match="expected per_round >= 1"):
        bench.steps({"a": _work(1)}, (X, W), per_round=0)


def test_failed_baseline_is_recorded_and_said():
    def broken():
        raise RuntimeError("no")
    rows = bench.run_group([bench.Case("t", "g", "pure", 1, "float32", broken, baseline=True),
                            bench.Case("t", "g", "other", 1, "float32",
                                       lambda: (_work(1), (X, W)))], rounds=3, per_round=1)
    assert all(r["baseline"] == "other" for r in rows)
    assert "baseline 'pure' did not run" in rows[0]["baseline_note"]
    assert "! baseline 'pure' did not run" in bench.format_table(rows)


# --------------------------------------------------------------------------- user steps


def test_steps_plain_functions_with_jit_and_loop_flag():
    def looped(x, w):
        return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), x)

    rep = bench.steps({"plain": lambda x, w: jnp.tanh(x @ w), "loop": looped}, (X, W),
                      jit=True, rounds=3, per_round=1)
    rows = {r["impl"]: r for r in rep["results"]}
    assert rows["plain"]["flops_source"] == "xla" and rows["plain"]["flops_flag"] is None
    assert "loop" in rows["loop"]["flops_flag"] and "lower bound" in rows["loop"]["bytes_source"]
    rep = bench.steps({"loop": looped}, (X, W), jit=True, flops=3 * 2 * 256 ** 3, rounds=3,
                      per_round=1)
    assert rep["results"][0]["flops_flag"] is None
    assert rep["results"][0]["flops_per_call"] == 3 * 2 * 256 ** 3
    eager = bench.steps({"eager": lambda x: x * 2}, (X,), rounds=3, per_round=1)
    assert eager["results"][0]["status"] == "ok" and eager["results"][0]["compile_s"] >= 0


# --------------------------------------------------------------------------- compare


def test_compare_same_code_exits_0_and_a_slowed_row_fails_by_name(tmp_path, capsys):
    old, slow = str(tmp_path / "old"), str(tmp_path / "slow")
    _report(out_dir=old)
    _report(slow=3, out_dir=slow, seed=9)
    for seed in range(1, 4):     # a 95% interval may miss by chance: up to three same runs
        same = str(tmp_path / f"same{seed}")
        _report(out_dir=same, seed=seed)
        if cli.main(["bench", "compare", old, same]) == 0:
            break
    else:
        pytest.fail("three runs of the same code each compared as a regression")
    text = capsys.readouterr().out
    assert "no row slower by more than 5%" in text and "four" in text
    assert cli.main(["bench", "compare", old, slow, "--fail-above", "5%"]) == 1
    text = capsys.readouterr().out
    assert "REGRESSION" in text and "my step: four" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("! four"))
    assert "slower" in line
    assert cli.main(["bench", "compare", old, slow, "--fail-above", "2000%"]) == 0
    capsys.readouterr()
    assert cli.main(["bench", "compare", old, slow, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (four,) = [r for r in doc["rows"] if r["impl"] == "four"]
    assert four["change_ci95"][0] > 1.05 and four["verdict"] == "slower"


def test_compare_warns_on_environment_and_refuses_format_1(tmp_path, capsys):
    a = tmp_path / "a"
    _report(out_dir=str(a), rounds=3)
    doc = json.loads((a / "bench.json").read_text())
    doc["env"]["device"] = "NVIDIA H200 (gpu)"
    doc["env"]["xla_flags"] = "--xla_foo"
    (tmp_path / "b.json").write_text(json.dumps(doc))
    assert cli.main(["bench", "compare", str(a), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "warning: environments differ: device" in out and "xla_flags" in out
    doc["format"] = "funnn.bench/1"
    (tmp_path / "c.json").write_text(json.dumps(doc))
    assert cli.main(["bench", "compare", str(a), str(tmp_path / "c.json")]) == 2
    assert "expected format funnn.bench/2, got 'funnn.bench/1'" in capsys.readouterr().err


def test_out_is_never_overwritten_silently_and_checked_before_timing(tmp_path, capsys):
    out = tmp_path / "run"
    _report(out_dir=str(out), rounds=3)
    with pytest.raises(ConfigError, match=r"bench\.json exists: pass --overwrite"):
        _report(out_dir=str(out), rounds=3)
    _report(out_dir=str(out), rounds=3, overwrite=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["bench", "--suite", "jit", "--out", str(blocker / "sub")]) == 2
    assert "cannot be written" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLI defects


def test_cli_small_defects(tmp_path, capsys):
    assert cli.main(["bench", "--suite", ","]) == 2
    assert "expected at least one of engines" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "roofline" in help_text and "attention" in help_text and "compare" in help_text
    assert cli.main(["bench", "compare", "only-one"]) == 2
    capsys.readouterr()


@pytest.mark.slow
def test_cli_json_has_the_format_key(capsys):
    assert cli.main(["bench", "--suite", "jit", "--rounds", "3", "--json", "--seed", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "funnn.bench/2" and doc["env"]["seed"] == 3


# --------------------------------------------------------------------------- ceilings


def test_fraction_above_the_peak_is_flagged_with_its_cause():
    peaks = {"float32": 1e9, "bfloat16": 2e9}
    rows = [{"dtype": "float32", "achieved_flops_per_s": 2e9, "flops_source": "xla"},
            {"dtype": "float32", "achieved_flops_per_s": 2e9, "flops_source": "hand count"},
            {"dtype": "bfloat16", "achieved_flops_per_s": 1e9, "flops_source": "xla"}]
    ceilings.fill_fraction(rows, peaks, ceilings.datasheet_peaks("x", peak_tflops=0.004))
    assert "peak was under-measured" in rows[0]["peak_flag"]
    assert "by hand" in rows[1]["peak_flag"] and "peak_flag" not in rows[2]
    assert rows[2]["mfu"] == pytest.approx(0.25) and rows[2]["mfu_source"] == \
        "--peak-tflops 0.004"
    assert ceilings.datasheet_peaks("NVIDIA H200")["source"] == "datasheet H200"
    assert ceilings.datasheet_peaks("cpu") is None


def test_cpu_bandwidth_ceiling_is_at_least_half_of_numpy_into_a_preallocated_buffer():
    import time

    n = 4 * 2 ** 20                                # measure_peaks("tiny")'s array
    copy_rate, read_rate = ceilings._bandwidth(n, 3)
    a, out = np.ones(n, np.float32), np.empty(n, np.float32)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        np.multiply(a, -1.0, out=out)
        best = min(best, time.perf_counter() - t0)
    numpy_rate = 2 * 4 * n / best
    assert copy_rate >= 0.5 * numpy_rate, (copy_rate, numpy_rate)
    assert read_rate > 0



def test_probes_compile_with_xlas_defaults_whatever_xla_flags_says():
    """The suite's own flags (level 0, loop emitters) must not lower the measured ceiling; an
    option XLA_FLAGS does not name is not handed over (an older XLA may not know it)."""
    assert ceilings.probe_options("") == {"xla_backend_optimization_level": 3}
    from _flags import SUITE_XLA_FLAGS

    suite = " ".join(SUITE_XLA_FLAGS)
    assert ceilings.probe_options(suite) == {"xla_backend_optimization_level": 3,
                                             "xla_cpu_use_fusion_emitters": True}
    assert ceilings._PROBE == ceilings.probe_options(os.environ.get("XLA_FLAGS", ""))

# --------------------------------------------------------------------------- roofline


@pytest.mark.slow
def test_roofline_suite_draws_every_row(tmp_path):
    report = bench.run(["roofline", "epoch", "control"], size="tiny", out_dir=str(tmp_path),
                       progress=False, seed=0)
    doc = json.loads((tmp_path / "bench.json").read_text())
    ok = [r for r in doc["results"] if r["status"] == "ok" and r["role"] != "aa"]
    assert doc["roofline"]["not_drawn"] == [] and doc["roofline"]["drawn"] == len(ok)
    assert all(r["bytes_per_call"] and r["intensity"] for r in ok)
    assert all(r["peak_flag"] for r in ok if (r["fraction_of_measured_peak"] or 0) > 1)
    if any(f.endswith("roofline.png") for f in report["files"]):
        assert (tmp_path / "roofline.png").stat().st_size > 1000


# --------------------------------------------------------------------------- memory, trace


def test_memory_peak_is_measured_beside_the_compiled_estimate():
    rows = bench.run_group([bench.Case("t", "g", "mm", 1, "float32",
                                       lambda: (_work(1), (X, W)))], rounds=1, per_round=1)
    r = rows[0]
    assert r["memory_compiled_bytes"] > 0
    if os.path.exists("/proc/self/clear_refs"):
        assert r["memory_peak_bytes"] >= 0 and r["memory_peak_source"].startswith("cpu")


def test_trace_writes_a_profiler_trace_of_one_row(tmp_path):
    rep = bench.steps({"base": _work(1), "four": _work(4)}, (X, W), rounds=2, per_round=1,
                      trace="four", out_dir=str(tmp_path))
    rows = {r["impl"]: r for r in rep["results"]}
    assert rows["four"]["trace"] and rows["base"]["trace"] is None
    files = [f for _, _, fs in os.walk(rows["four"]["trace"]) for f in fs]
    assert files, "no trace files written"


# --------------------------------------------------------------------------- peers isolated

_PEERS_SCRIPT = r"""
import dataclasses, json, os
from funnn import bench
from funnn.bench import suites
cases = suites._step_group("peers", "mlp", 32, "float32", ["pure JAX", "torch"], check=False)
again = dataclasses.replace(cases[0], impl="pure JAX again", baseline=False)
rows = bench.run_group(cases + [again], rounds=12, per_round=2, seed=0, memory=False)
import torch
print(json.dumps({"rows": rows, "policy": os.environ.get("OMP_WAIT_POLICY"),
                  "threads": torch.get_num_threads()}))
"""


@pytest.mark.slow
def test_a_jax_row_after_torch_is_within_the_aa_noise():
    """PyTorch loads with passive OpenMP waiting (a fresh process, as ``funnn bench`` is):
    a pure-JAX row timed in rounds with torch is not slowed beyond the A/A control's noise."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", _PEERS_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["policy"] == "PASSIVE" and doc["threads"] >= 1
    rows = {r["impl"]: r for r in doc["rows"]}
    assert rows["torch"]["status"] == "ok"
    aa, again = rows["pure JAX [A/A copy]"]["ratio_ci95"], rows["pure JAX again"]["ratio_ci95"]
    assert again[0] <= aa[1] and aa[0] <= again[1], (again, aa)   # intervals overlap
    assert again[0] <= 1.0 + 0.1, again                             # not slowed by torch


# --------------------------------------------------------------------------- environment


def test_environment_records_source_machine_settings_and_load(monkeypatch):
    from funnn.bench import env as bench_env

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    e = bench_env.environment()
    assert e["xla_flags"] == "--xla_cpu_enable_fast_math=false"
    assert e["threads_env"]["OMP_NUM_THREADS"] == "2"
    assert e["jax"] == jax.__version__ and e["jaxlib"] and e["funnn"]
    assert e["cpu_count"] == os.cpu_count() and e["cpu_model"] and e["hostname"]
    assert e["timestamp"].endswith("+00:00") and len(e["load_average_start"]) == 3
    assert set(bench_env.COMPARED) <= set(bench_env.finish(e)) | {"torch_threads"}
    assert "load_average_end" in e
    if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(bench.__file__)), "..",
                                  ".git")) and e["git_commit"] is not None:
        assert len(e["git_commit"]) == 40 and isinstance(e["git_dirty"], bool)
    with pytest.raises(ConfigError, match="expected at least one suite"):
        bench.run([], size="tiny")
