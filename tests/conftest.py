"""Shared test set-up: float64 everywhere, small hypothesis budgets."""

import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole run, shared by the xdist workers and by every
# process a test starts (the docs pages, `funnn train`, the examples, two-process jobs): the
# same program compiled twice in one run (the README run twice, a CLI run resumed, a fixture
# compiled on both workers) is compiled once. The controller makes the folder before the
# workers start, so they inherit it; it is removed when the run ends. A user's own
# JAX_COMPILATION_CACHE_DIR wins. The cache changes no result: XLA keys it on the program,
# the compile options and the device, and JAX retraces as before.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="funnn-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Compile at XLA's backend optimisation level 0 and with XLA's CPU loop emitters instead of its
# newer fusion emitters: the suite's cost is compiling many small programs (eager references
# compile one program per primitive), not running them. Level 0 takes a quarter to a third
# off most compiles, the emitters about a third more (a tiny program 28 -> 19 ms; the
# per-example and convolution files 114 -> 66 CPU-s). Every test asserts values to a tolerance
# or compares two runs made under the same flags. Added to the flags the processes a test
# starts inherit; a user's own setting of either flag in XLA_FLAGS wins. Benchmarks never run
# under them (`funnn bench` outside pytest compiles with XLA's defaults, and the ceilings'
# probes pin them whatever XLA_FLAGS says).
from _flags import SUITE_XLA_FLAGS

for _flag in SUITE_XLA_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_x64", True)

from hypothesis import HealthCheck, settings  # noqa: E402

# JAX compiles a new program for every new shape, so each example costs ~0.1-1 s.
settings.register_profile(
    "funnn", max_examples=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# `pytest --hypothesis-profile=thorough`: many more examples, for runs outside the default suite
# (tests/test_properties.py draws a new random network per example: ~0.3-3 s each).
settings.register_profile("thorough", parent=settings.get_profile("funnn"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "funnn"))

# A finished 2-epoch XOR run: a fixture of tests/test_rundir.py, test_train.py and test_cli.py.
import pytest  # noqa: E402
from _runs import xor_run  # noqa: E402, F401

# Cases of large parametrized matrices that cost a few seconds each (compiles of LSTM/GRU,
# 4-d elementwise stacks, strided conv patches...). The fast tier keeps their cheaper
# siblings, so every property is still checked there at a small size; the full suite runs
# these too. Node ids as pytest prints them, relative to tests/.
SLOW_CASES = {
    "test_recurrent.py::test_manual_equals_autodiff_and_fd[gru-seq-mask-train]",
    "test_recurrent.py::test_manual_equals_autodiff_and_fd[gru-seq-nomask-infer]",
    "test_recurrent.py::test_manual_equals_autodiff_and_fd[gru-last-lengths-infer]",
    "test_recurrent.py::test_manual_equals_autodiff_and_fd[lstm-seq-nomask-infer]",
    "test_recurrent.py::test_manual_equals_autodiff_and_fd[lstm-last-lengths-infer]",
    "test_recurrent.py::test_manual_equals_autodiff_and_fd[lstm-last-nomask-train]",
    "test_recurrent.py::test_grads_come_back_in_param_and_input_dtypes[lstm]",
    "test_recurrent.py::test_grads_come_back_in_param_and_input_dtypes[gru]",
    "test_recurrent.py::test_per_example_gradients_vmap[lstm-True-lengths]",
    "test_recurrent.py::test_lengths_mask_semantics[rnn]",
    "test_recurrent.py::test_lengths_mask_semantics[lstm]",
    "test_activations.py::test_stability_at_large_inputs[float32]",
    "test_activations.py::test_jacobian_equals_jacfwd_and_finite_differences[softmax]",
    "test_pool.py::test_max_pool_ties_first_max_gets_all[shape1-window1-opts1]",
    "test_pool.py::test_max_pool_reference_and_gradients[(3, 2)-{'stride': (1, 2), "
    "'padding': ((2, 1), (0, 1))}-2d]",
    "test_conv.py::test_case_numpy_reference_and_gradients[2d-{'stride': (2, 1), 'padding': "
    "((1, 2), (0, 1)), 'dilation': (2, 1), 'groups': 2, 'use_bias': False}-patches]",
    "test_conv.py::test_per_example_vmap_1d[groups3-native]",
    "test_conv.py::test_jit_equals_eager_and_lax_same[patches]",
    "test_elementwise.py::test_manual_backward_equals_vjp_and_finite_differences"
    "[elu(alpha=0.5)-(2, 1, 3, 4)]",
    "test_elementwise.py::test_manual_backward_equals_vjp_and_finite_differences"
    "[elu(alpha=0.5)-(3, 4)]",
    "test_elementwise.py::test_manual_backward_equals_vjp_and_finite_differences"
    "[tanh-(2, 1, 3, 4)]",
    "test_dense.py::test_stack_three_ways[squared_error-sum]",
    "test_dense.py::test_params_of_the_wrong_length_and_a_backward_that_drops_a_leaf",
    "test_norm.py::test_batch_norm_channel_axis_1_matches_transposed_input",
}


# The longest tests (10-60 s each, measured on 2 idle cores), longest first: they are handed
# out before the rest, so that `-n 2` does not end with one worker busy on a long test while
# the other has nothing left (longest-first scheduling). Only the order changes; a name that
# no longer matches simply keeps its place.
FIRST = (
    "test_bench.py::test_every_suite_runs_at_tiny_size",
    "test_distributed.py::test_two_processes_end_where_eight_devices_end",
    "test_docs.py::test_page_runs[tutorials/transformers]",
    "test_layer_examples.py::test_cnn_digits_both_engines",
    "test_layer_examples.py::test_transformer_sorts_held_out_sequences",
    "test_parallel.py::test_eight_devices_train_like_one_on_every_layout",
    "test_docs.py::test_page_runs[tutorials/curvature]",
    "test_docs.py::test_page_runs[tutorials/per_example]",
    "test_docs.py::test_page_runs[curriculum/004_primer]",
    "test_properties.py::test_jit_equals_eager",
    "test_docs.py::test_page_runs[reference/runs]",
    "test_precision.py::test_wrapper_engines_agree_and_keep_master_weights",
    "test_rundir.py::test_x64_runs_record_float64",
    "test_char_lm.py::test_tiny_transformer_learns_and_generates",
    "test_properties.py::test_manual_equals_autodiff_and_finite_differences",
    "test_docs.py::test_page_runs[tutorials/custom_layer]",
    "test_docs.py::test_page_runs[tutorials/manual_vs_autodiff]",
    "test_docs.py::test_readme_python_runs",
)


def _first_rank(item) -> int:
    case = item.nodeid.split("tests/", 1)[-1]
    return next((i for i, name in enumerate(FIRST) if case.startswith(name)), len(FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_first_rank)                    # stable: the rest keep their order
    found = set()
    for item in items:
        case = item.nodeid.split("tests/", 1)[-1]
        if case in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
            found.add(case)
    if len(items) > 100 and not config.option.keyword and config.args == ["tests"]:
        # a renamed test must not silently drop its mark (only checked on a whole-suite run)
        missing = SLOW_CASES - found
        assert not missing, f"SLOW_CASES names tests that do not exist: {missing}"


@pytest.fixture
def run_bound(monkeypatch):
    """For the few tests whose time goes into running their compiled steps (hundreds of
    training steps) rather than compiling them: ``jax.jit`` (and so ``funnn.jit`` and ``fit``)
    compiles at XLA's default backend optimisation level (3) for the test's duration, options
    the caller passes winning. The transformer-sort and digits-CNN trainings take 65 -> 35
    CPU-s together this way; compile-bound tests (and the tests' own processes, whose training
    is short) are faster at the suite's level 0."""
    plain = jax.jit

    def jit(fun=None, /, **kwargs):
        kwargs["compiler_options"] = {"xla_backend_optimization_level": 3,
                                      **(kwargs.get("compiler_options") or {})}
        return plain(fun, **kwargs) if fun is not None else functools.partial(jit, **kwargs)

    monkeypatch.setattr(jax, "jit", jit)
