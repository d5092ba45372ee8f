"""Many processes (funnn/distributed.py): joining a multi-process JAX job, agreeing across
processes, process 0 writing the run directory, and the settings checked before JAX is touched.

The two-process checks run the ``funnn`` command itself: two processes on 127.0.0.1 with 4
CPU devices each against one process with 8 (``XLA_FLAGS=--xla_force_host_platform_device_count``).
"""

import json
import os
import time

import jax
import numpy as np
import pytest
from _procs import _finish, _free_port, _funnn, _rel

from funnn import distributed, parallel, train
from funnn.core import ConfigError

# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_end_where_eight_devices_end_and_both_resume(tmp_path):
    port = _free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("train", "--epochs", "5", "--quiet")
    job = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    runs = _finish(_funnn(*common, "--devices", "8", "--out", str(one), devices=8),
                   *(_funnn(*common, *job, "--process-id", str(i), "--out", str(two),
                            devices=4) for i in (0, 1)))
    for code, _, stderr in runs:
        assert code == 0, stderr[-3000:]
    assert "8 cpu devices in 1 process" in runs[0][1]
    assert "8 cpu devices in 2 processes" in runs[1][1] and "process 0 of 2" in runs[1][1]
    assert "process 1 of 2; process 0 writes the run directory" in runs[2][1]
    # process 0 alone wrote the run directory, the same files as the one-process run
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
    a, b = train.restore_run(one), train.restore_run(two)
    assert a.step == b.step == 5
    assert _rel(b.params, a.params) <= 1e-5 and _rel(b.opt_state, a.opt_state) <= 1e-5
    fa, fb = (json.loads((d / "metrics.json").read_text())["final"] for d in (one, two))
    assert abs(fa["train_loss"] - fb["train_loss"]) <= 1e-5 * fa["train_loss"]
    assert fa["eval_accuracy"] == fb["eval_accuracy"]
    assert b.config["mesh"] == {"data": 8, "model": 1}

    # every process resumes from process 0's checkpoint, here onto fsdp parameters
    port = _free_port()
    job = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    more = ("train", "--epochs", "6", "--quiet", "--resume")
    runs = _finish(_funnn(*more, "--devices", "8", "--out", str(one), devices=8),
                   *(_funnn(*more, *job, "--process-id", str(i), "--out", str(two),
                            "--sharding", "fsdp", devices=4) for i in (0, 1)))
    for code, stdout, stderr in runs:
        assert code == 0, stderr[-3000:]
        assert "from epoch 5" in stdout
    a, b = train.restore_run(one), train.restore_run(two)
    assert a.step == b.step == 6
    assert _rel(b.params, a.params) <= 1e-5 and _rel(b.opt_state, a.opt_state) <= 1e-5

    # a setup error on process 0 alone (nothing to resume there) stops process 1 too
    t0, port = time.perf_counter(), _free_port()
    job = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    runs = _finish(*(_funnn("train", "--resume", "--out", str(tmp_path / "typo"), *job,
                            "--process-id", str(i), devices=4) for i in (0, 1)), timeout=120)
    assert [code for code, _, _ in runs] == [2, 2]
    assert "nothing to resume" in runs[0][2] and "process 0 failed" in runs[1][2]
    assert time.perf_counter() - t0 < 100


@pytest.mark.slow
def test_unreachable_coordinator_is_a_clear_error_within_the_timeout():
    t0 = time.perf_counter()
    ((code, _, stderr),) = _finish(_funnn(
        "train", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
        "--process-id", "1", "--init-timeout", "2"), timeout=120)
    assert code == 2, stderr
    assert "cannot reach the coordinator 127.0.0.1:" in stderr and "within 2 s" in stderr
    assert "raise --init-timeout" in stderr and "initialize(" not in stderr   # the CLI's words
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_process_zero_alone_stops_after_the_timeout_instead_of_hanging():
    """Past the coordinator's port, JAX owns the wait: it ends the process (SIGABRT)."""
    t0 = time.perf_counter()
    ((code, stdout, stderr),) = _finish(_funnn(
        "train", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
        "--process-id", "0", "--init-timeout", "1"), timeout=120)
    assert code != 0
    assert "waits up to 1 s" in stdout + stderr
    assert time.perf_counter() - t0 < 60


# --------------------------------------------------------------------------- this process


@pytest.mark.parametrize("kw, match", [
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
     r"process_id must lie in \[0, 2\) for 2 processes, got 2"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": -1}, r"got -1"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 0, "process_id": 0},
     "num_processes must be at least 1"),
    ({"coordinator": "127.0.0.1", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator": "host:99999", "num_processes": 2, "process_id": 0}, "1..65535"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": None},
     "process_id must be an int"),
    ({"coordinator": "auto", "num_processes": 2, "process_id": 0}, "JAX detects them"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 1, "timeout": 0},
     "timeout must be a positive number"),
])
def test_bad_process_settings_fail_before_jax_is_touched(kw, match):
    with pytest.raises(ConfigError, match=match):
        parallel.initialize(**kw)
    assert not jax.distributed.is_initialized()


def test_processes_moved_to_distributed_and_stay_importable_from_parallel():
    for name in ("initialize", "is_main", "agree", "gather", "parse_coordinator",
                 "simulate_cpu_devices"):
        assert getattr(parallel, name) is getattr(distributed, name)


def test_parse_coordinator_and_one_process_is_main_agrees_and_gathers_as_is():
    assert distributed.parse_coordinator("10.0.0.1:1234") == ("10.0.0.1", 1234)
    assert distributed.parse_coordinator(" node-7:65535 ") == ("node-7", 65535)
    assert distributed.parse_coordinator("[::1]:8476") == ("::1", 8476)
    for bad in ("10.0.0.1", ":1234", "host:0", "host:port", "host:65536"):
        with pytest.raises(ConfigError, match=r"^initialize\(coordinator=\): coordinator must "
                                              r"be HOST:PORT"):
            distributed.parse_coordinator(bad)
    # one process: it is the main one, agreement is free and gather hands back its input
    assert jax.process_count() == 1 and distributed.is_main()
    assert distributed.agree(None, value=3, what="the epoch") is None
    tree = {"W": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}
    assert distributed.gather(tree) is tree


@pytest.mark.slow
def test_processes_that_disagree_exit_2_together_and_write_nothing(tmp_path):
    """issue 22 item 1: ``--epochs 2`` on process 0 and ``--epochs 3`` on process 1 of one job
    stop both within seconds, naming the setting and the processes, before any file."""
    t0, port = time.perf_counter(), _free_port()
    job = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--init-timeout", "60")
    runs = _finish(*(_funnn("train", "--data", "xor", "--quiet", "--epochs", str(2 + i), *job,
                            "--process-id", str(i), "--out", str(tmp_path / "D"), devices=1)
                     for i in (0, 1)), timeout=120)
    assert [code for code, _, _ in runs] == [2, 2], [r[2][-2000:] for r in runs]
    for i, (_, _, stderr) in enumerate(runs):
        assert "processes disagree on epochs (process 0 vs process 1)" in stderr, stderr
        assert f"this is process {i} with epochs={2 + i}" in stderr
        assert "Traceback" not in stderr
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "D").exists()
