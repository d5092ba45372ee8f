"""Many processes (funnn/distributed.py): joining a multi-process JAX job, agreeing across
processes, process 0 writing the run directory, and the settings checked before JAX is touched.

The two-process checks run the ``funnn`` command itself: two processes on 127.0.0.1 with 4
CPU devices each against one process with 8 (``XLA_FLAGS=--xla_force_host_platform_device_count``).
"""

import contextlib
import json
import os
import socket
import threading
import time

import jax
import numpy as np
import pytest
from _procs import _finish, _free_port, _funnn, _rel

from funnn import _rendezvous, distributed, parallel, train
from funnn.core import ConfigError

# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_end_where_eight_devices_end_and_both_resume(tmp_path):
    port = _free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("train", "--epochs", "2", "--quiet")
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
    assert a.step == b.step == 2
    assert _rel(b.params, a.params) <= 1e-5 and _rel(b.opt_state, a.opt_state) <= 1e-5
    fa, fb = (json.loads((d / "metrics.json").read_text())["final"] for d in (one, two))
    assert abs(fa["train_loss"] - fb["train_loss"]) <= 1e-5 * fa["train_loss"]
    assert fa["eval_accuracy"] == fb["eval_accuracy"]
    assert b.config["mesh"] == {"data": 8, "model": 1}

    # every process resumes from process 0's checkpoint, here onto fsdp parameters
    port = _free_port()
    job = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    more = ("train", "--epochs", "3", "--quiet", "--resume")
    runs = _finish(_funnn(*more, "--devices", "8", "--out", str(one), devices=8),
                   *(_funnn(*more, *job, "--process-id", str(i), "--out", str(two),
                            "--sharding", "fsdp", devices=4) for i in (0, 1)))
    for code, stdout, stderr in runs:
        assert code == 0, stderr[-3000:]
        assert "from epoch 2" in stdout
    a, b = train.restore_run(one), train.restore_run(two)
    assert a.step == b.step == 3
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
    """issue 22 item 12: process 0 whose peers never come exits 2 with one line after
    ``--init-timeout`` (JAX's own rendezvous used to end it with SIGABRT and a C++ stack)."""
    t0, port = time.perf_counter(), _free_port()
    ((code, stdout, stderr),) = _finish(_funnn(
        "train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
        "--process-id", "0", "--init-timeout", "1"), timeout=120)
    assert code == 2, stderr[-3000:]
    assert "waits up to 1 s" in stdout
    assert stderr.strip() == (
        f"funnn train: error: --coordinator: process 0 waited 1 s at 127.0.0.1:{port} for the "
        f"other processes: process 1 did not join; start each with the same --coordinator and "
        f"--num-processes, or raise --init-timeout")
    assert time.perf_counter() - t0 < 60


# --------------------------------------------------------------------------- rendezvous
# funnn's own rendezvous runs before JAX's (whose failures abort in C++). These tests run it
# in threads of this process: JAX counts as not started and its start is only recorded.


@pytest.fixture
def rendezvous_only(monkeypatch):
    started = []
    monkeypatch.setattr(distributed, "_backend_started", lambda: False)
    monkeypatch.setattr(distributed, "_start_jax", lambda *a: started.append(a))
    return started


def _threads(*calls):
    """Run each call in its own thread; what each returned or raised, in order."""
    got: list = [None] * len(calls)

    def run(i, call):
        try:
            got[i] = call()
        except Exception as err:        # handed back to the test
            got[i] = err

    threads = [threading.Thread(target=run, args=(i, c), daemon=True)
               for i, c in enumerate(calls)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    return got


def _serve(answer: bytes | None) -> socket.socket:
    """Another program on a port: it sends ``answer`` to each connection (None: closes it)."""
    server = socket.create_server(("127.0.0.1", 0))

    def loop():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    if answer is not None:
                        conn.sendall(answer)
                        time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()
    return server


def test_three_processes_meet_before_jax_starts_and_a_stranger_is_ignored(rendezvous_only):
    port = _free_port()
    at = f"127.0.0.1:{port}"

    gone = threading.Event()

    def stranger():         # a port scanner before the last process: process 0 ignores it
        try:
            with _rendezvous._connect("127.0.0.1", port, 10) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                return s.recv(64)
        finally:
            gone.set()

    def last():
        gone.wait(10)
        return distributed.initialize(at, 3, 1, timeout=10)

    got = _threads(lambda: distributed.initialize(at, 3, 2, timeout=10),   # before process 0
                   lambda: distributed.initialize(at, 3, 0, timeout=10), stranger, last)
    assert got == [None, None, b"", None]
    assert sorted(rendezvous_only) == [(at, 3, i, 10) for i in range(3)]
    with socket.create_server(("127.0.0.1", port)):
        pass                # process 0 gave the port back for JAX's service


def test_a_port_held_by_another_program_or_a_stranger_there_is_one_clear_error(
        rendezvous_only):
    held = socket.create_server(("127.0.0.1", 0))
    at = f"127.0.0.1:{held.getsockname()[1]}"
    t0 = time.perf_counter()
    with held, pytest.raises(ConfigError, match=rf"^initialize\(coordinator=\): process 0 "
                             rf"cannot listen on {at} \(port \d+: .*\): another program holds "
                             rf"it; choose a free port"):
        distributed.initialize(at, 2, 0, timeout=30)
    for answer, how in ((b"HTTP/1.1 400 Bad Request\r\n\r\n", r"it answered b'HTTP/1.1 400"),
                        (None, "it closed the connection")):
        server = _serve(answer)
        with server, pytest.raises(ConfigError, match=rf"127.0.0.1:\d+ is not a funnn "
                                   rf"coordinator waiting for processes \({how}"):
            distributed.initialize(f"127.0.0.1:{server.getsockname()[1]}", 2, 1, timeout=30)
    assert time.perf_counter() - t0 < 5 and rendezvous_only == []


def test_processes_that_do_not_all_come_or_count_differently_stop_every_process(
        rendezvous_only):
    at = f"127.0.0.1:{_free_port()}"
    got = _threads(lambda: distributed.initialize(at, 3, 0, timeout=0.5),
                   lambda: distributed.initialize(at, 3, 1, timeout=20))
    assert all(isinstance(e, ConfigError) for e in got), got
    alone = ("process 0 waited 0.5 s at 127.0.0.1:", " for the other processes: process 2 did "
             "not join (1 did); start each with the same initialize(coordinator=) and "
             "initialize(num_processes=), or raise initialize(timeout=)")
    assert all(part in str(got[0]) for part in alone), got[0]
    assert str(got[1]).startswith(f"initialize(coordinator=): process 0 at {at} stopped: "
                                  f"process 0 waited 0.5 s"), got[1]

    at = f"127.0.0.1:{_free_port()}"
    got = _threads(lambda: distributed.initialize(at, 2, 0, timeout=20),
                   lambda: distributed.initialize(at, 3, 1, timeout=20))
    assert str(got[0]) == ("initialize(num_processes=): process 0 starts 2 processes, process "
                           "1 says 3: start every process with the same "
                           "initialize(num_processes=)")
    assert str(got[1]).startswith(f"initialize(coordinator=): the coordinator {at} refused "
                                  f"this process: process 0 starts 2 processes")
    assert rendezvous_only == []


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
