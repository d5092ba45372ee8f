"""The ``funnn`` command: end to end in a subprocess, and every bad input exits 2 cleanly."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from _runs import XOR, main, strict

from funnn import checkpoint, cli, data


def _run(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "funnn.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_train_end_to_end_then_resume(tmp_path):
    out = tmp_path / "run"
    r = _run("train", "--epochs", "1", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["final"]["eval_accuracy"] > 0.85
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.latest(out / "checkpoints").endswith("ckpt_00000001.safetensors")
    # resume to 2 epochs: continues from the checkpoint of epoch 1
    r = _run("train", "--epochs", "2", "--out", str(out), "--quiet", "--resume")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][0] == json.loads(json.dumps(metrics["history"][0]))


@pytest.mark.slow
def test_gradcheck_and_info_commands(capsys):
    assert cli.main(["gradcheck", "--model", "sigmoid", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "0.W" in out and "all leaves agree" in out
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "jax" in out and "device 0" in out


def _main_exit(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:        # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("argv, match", [
    (["train", "--model", "transformer"], "invalid choice"),
    (["train", "--engine", "symbolic"], "invalid choice"),
    (["train", "--optimizer", "adamax"], "invalid choice"),
    (["train", "--data", "imagenet"], "unknown dataset"),
    (["train", "--epochs", "0"], "positive"),
    (["train", "--batch-size", "-3"], "positive"),
    (["train", "--lr", "0"], "positive"),
    (["train", "--lr", "nan"], "positive"),
    (["train", "--model", "cnn", "--data", "xor"], "needs square images"),
])
def test_bad_input_exits_2(argv, match, capsys, tmp_path):
    code, err = _main_exit(argv + ["--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2
    assert match in err


def test_missing_and_corrupt_mnist(capsys, tmp_path):
    code, err = _main_exit(["train", "--data", f"mnist:{tmp_path / 'nope'}",
                            "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope" in err
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix, n in (("train", 6), ("t10k", 3)):
        data.write_idx(str(d / f"{prefix}-images-idx3-ubyte"), np.zeros((n, 28, 28), np.uint8))
        data.write_idx(str(d / f"{prefix}-labels-idx1-ubyte"), np.zeros(n, np.uint8))
    raw = (d / "train-images-idx3-ubyte").read_bytes()
    (d / "train-images-idx3-ubyte").write_bytes(raw[:-100])       # truncated
    code, err = _main_exit(["train", "--data", f"mnist:{d}", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "train-images-idx3-ubyte" in err


@pytest.mark.slow
def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = _main_exit(["train", "--out", str(blocker / "sub"), "--quiet"], capsys)
    assert code == 2 and "cannot be written" in err


@pytest.mark.slow
def test_tampered_checkpoint_on_resume(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--quiet",
                     "--model", "sigmoid"]) == 0
    path = checkpoint.latest(out / "checkpoints")
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    capsys.readouterr()
    code, err = _main_exit(["train", "--epochs", "2", "--out", str(out), "--quiet",
                            "--model", "sigmoid", "--resume"], capsys)
    assert code == 2 and "checksum" in err.lower() and "sha256" in err.lower()
    assert open(path, "rb").read() == bytes(raw)      # left as it was, not overwritten


@pytest.mark.slow
def test_gradcheck_cnn_passes_off_the_relu_kinks(capsys):
    """Zero biases over blank pixels would put ReLUs on their kink; the command checks
    at a jittered point, so directional finite differences agree."""
    assert cli.main(["gradcheck", "--model", "cnn", "--examples", "2"]) == 0
    assert "all leaves agree" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["train", "gradcheck"])
def test_out_of_range_seed_exits_2(cmd, capsys, tmp_path):
    extra = ["--out", str(tmp_path / "o")] if cmd == "train" else []
    code, err = _main_exit([cmd, "--seed", "1" + "0" * 30] + extra, capsys)
    assert code == 2 and "seed must lie in" in err


# ----- moved from tests/test_runs.py


@pytest.mark.slow
def test_diverging_run_exits_3_with_strict_json(tmp_path, capsys):
    d = tmp_path / "D"
    code, _, err = main(["train", "--quiet", "--optimizer", "sgd", "--lr", "1e6", "--epochs",
                          "3", "--out", str(d)], capsys)
    assert code == cli.EXIT_DIVERGED == 3
    assert "epoch 1: the training loss is nan" in err and "--check-numerics" in err
    assert len(err.strip().splitlines()) == 1
    metrics = strict((d / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["history"][-1]["train_loss"] is None
    assert checkpoint.checkpoints(d / "checkpoints") == []


@pytest.mark.slow
def test_eval_reproduces_the_recorded_accuracy(tmp_path, capsys):
    d = tmp_path / "D"
    code, _, err = main(["train", "--quiet", "--epochs", "2", "--out", str(d)], capsys)
    assert code == 0, err
    final = json.loads((d / "metrics.json").read_text())["final"]
    code, out, err = main(["eval", str(d), "--json"], capsys)
    assert code == 0, err
    got = strict(out.strip().splitlines()[-1])
    assert got["accuracy"] == final["eval_accuracy"] and got["loss"] == final["eval_loss"]
    assert got["epoch"] == 2
    ck = checkpoint.restore(checkpoint.latest(d / "checkpoints"))
    assert set(ck.extras) == {"input_mean", "input_scale"}       # standardisation travels along
    code, _, err = main(["eval", str(d), "--data", "xor"], capsys)
    assert code == 2 and "inputs of shape" in err
    code, _, err = main(["eval", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_description_and_metrics_state_what_ran(tmp_path, capsys):
    d = tmp_path / "D"
    code, out, err = main(["train", *XOR, "--epochs", "1", "--batch-size", "100000",
                            "--optimizer", "sgd", "--out", str(d)], capsys)
    assert code == 0, err
    assert "batch 4 (asked 100000; the training set has 4 examples)" in out
    assert "optimizer sgd, lr 0.1, constant schedule" in out and "AdamW" not in out
    config = json.loads((d / "metrics.json").read_text())["config"]
    assert (config["batch_size"], config["optimizer"], config["schedule"]) == (4, "sgd",
                                                                              "constant")
    code, out, _ = main(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "E")], capsys)
    assert "optimizer adamw, lr 0.003, cosine schedule" in out


@pytest.mark.slow
def test_info_never_crashes():
    r = subprocess.run([sys.executable, "-m", "funnn.cli", "info"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cuda"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "backend unavailable" in r.stdout


def test_info_with_a_coordinator_and_no_peer_exits_2_with_one_line(capsys, monkeypatch):
    """issue 22 item 12: ``funnn info --coordinator H:P --num-processes 2 --process-id 0``
    with no peer ended in SIGABRT; now funnn's rendezvous gives up after --init-timeout."""
    from funnn import distributed

    monkeypatch.setattr(distributed, "_backend_started", lambda: False)   # JAX not yet up
    monkeypatch.setattr(distributed, "_start_jax", lambda *a: pytest.fail("JAX started"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = main(["info", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                           "--process-id", "0", "--init-timeout", "0.3"], capsys)
    assert code == 2 and err.strip() == (
        f"funnn info: error: --coordinator: process 0 waited 0.3 s at 127.0.0.1:{port} for the "
        f"other processes: process 1 did not join; start each with the same --coordinator and "
        f"--num-processes, or raise --init-timeout")
    assert "processes: cannot join the job: --coordinator: process 0 waited" in out
    assert "extras: " in out        # the rest of the report still comes


def _mnist(d, train_shape, test_shape):
    d.mkdir()
    for prefix, shape in (("train", train_shape), ("t10k", test_shape)):
        data.write_idx(str(d / f"{prefix}-images-idx3-ubyte"), np.zeros(shape, np.uint8))
        data.write_idx(str(d / f"{prefix}-labels-idx1-ubyte"), np.zeros(shape[0], np.uint8))


@pytest.mark.parametrize("train_shape, test_shape, match", [
    ((6, 28, 28), (0, 28, 28), "the test split is empty"),
    ((6, 28, 28), (3, 14, 14), "test images have shape (196,) but the training images (784,)"),
])
def test_bad_mnist_exits_2(tmp_path, capsys, train_shape, test_shape, match):
    _mnist(tmp_path / "m", train_shape, test_shape)
    code, _, err = main(["train", "--quiet", "--data", f"mnist:{tmp_path / 'm'}", "--out",
                          str(tmp_path / "o")], capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_mnist_file_instead_of_directory(tmp_path, capsys):
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(b"\0" * 16)
    code, _, err = main(["train", "--quiet", "--data", f"mnist:{f}", "--out",
                          str(tmp_path / "o")], capsys)
    assert code == 2 and "is a file, not a directory" in err and "does not exist" not in err


def test_library_words_become_flags():
    msg = ("fit: D already holds run x; continue it with resume=True, or replace it with "
           "overwrite=True. Resume from one with from_checkpoint=PATH; check_numerics runs one "
           "step at a time on one device; leave out mesh= to use it")
    assert cli._in_flags(msg) == (     # the library's "fit:" is no place on the command line
        "D already holds run x; continue it with --resume, or replace it with "
        "--overwrite. Resume from one with --from-checkpoint PATH; --check-numerics runs one "
        "step at a time on one device; leave out --devices, --model-axis, --sharding and "
        "--coordinator to use it")


@pytest.mark.slow
def test_a_broken_backend_is_one_line_naming_jax_platforms(xor_run, tmp_path):
    """issue 22 item 13: ``JAX_PLATFORMS=bogus`` ends train, gradcheck and eval with exit 2
    and one line naming the variable, as ``info`` reports it, and creates nothing."""
    env = {**os.environ, "JAX_PLATFORMS": "bogus", "PYTHONPATH": os.pathsep.join(sys.path)}
    for args in (["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "new")],
                 ["gradcheck"], ["eval", str(xor_run)]):
        r = subprocess.run([sys.executable, "-m", "funnn.cli", *args], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 2 and "JAX_PLATFORMS=bogus" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra, want", [
    (["--precision", "f16"], "DP-SGD (--dp-clip, --dp-noise) trains in float32 or bfloat16"),
    (["--check-numerics"], "leave it out with --dp-clip/--dp-noise"),
])
def test_library_refusals_speak_in_flags(extra, want, capsys, tmp_path):
    """issue 22 item 17: no ``fit:``, ``dp=`` or ``precision=`` in the command's errors."""
    code, _, err = main(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "o"),
                         "--dp-clip", "1", "--dp-noise", "1", *extra], capsys)
    assert code == 2 and want in err, err
    assert "fit:" not in err and "dp=" not in err and "precision=" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_eval_reports_calibration_with_and_without_laplace(xor_run, capsys):
    """issue 21 item 4: ``funnn eval`` prints the softmax's ECE and NLL, and with
    ``--laplace`` those of a Laplace posterior's predictive fitted on the training split."""
    code, out, err = main(["eval", str(xor_run), "--json"], capsys)
    assert code == 0, err
    plain = strict(out.strip().splitlines()[-1])
    assert "calibration (softmax): ECE" in out and 0 <= plain["ece"] <= 1 and plain["nll"] > 0
    assert np.isclose(plain["nll"], plain["loss"], rtol=1e-5)       # the mean cross-entropy
    code, out, err = main(["eval", str(xor_run), "--json", "--laplace", "kfac", "--subset",
                           "all"], capsys)
    assert code == 0, err
    got = strict(out.strip().splitlines()[-1])
    lap = got["laplace"]
    assert "by marginal likelihood" in out and lap["prior_precision"] > 0
    assert (lap["structure"], lap["subset"], lap["predictive"]) == ("kfac", "all", "probit")
    assert 0 <= lap["ece"] <= 1 and lap["nll"] > 0 and got["ece"] == plain["ece"]
    code, out, err = main(["eval", str(xor_run), "--laplace", "diag", "--prior-precision",
                           "1e12"], capsys)      # a prior this strong leaves the softmax
    assert code == 0, err
    nll = float(out.split("NLL ")[-1].split(",")[0])
    assert abs(nll - plain["nll"]) < 1e-3
    code, _, err = main(["eval", str(xor_run), "--laplace", "kfac", "--prior-precision", "0"],
                        capsys)
    assert code == 2 and "--prior-precision" in err


@pytest.mark.slow
def test_train_with_kfac_records_it_and_resumes(tmp_path, capsys):
    """``--optimizer kfac``: the curvature optimizer by name, its state checkpointed and
    resumed (the factors, inverses and adapted step travel in the optimizer state)."""
    d = tmp_path / "K"
    code, out, err = main(["train", *XOR, "--epochs", "1", "--optimizer", "kfac", "--out",
                           str(d)], capsys)
    assert code == 0, err
    assert "optimizer kfac, lr 1, constant schedule" in out
    code, out, err = main(["train", *XOR, "--epochs", "2", "--optimizer", "kfac", "--out",
                           str(d), "--resume"], capsys)
    assert code == 0, err
    config = json.loads((d / "metrics.json").read_text())["config"]
    assert config["optimizer"] == "kfac" and config["epochs"] == 2
    from funnn import models, train
    ck = train.restore_run(d, models.get("mlp").build(config["num_outputs"]))
    assert int(ck.opt_state[0].inner.count) == 2             # XOR: one step an epoch
