"""Runs you can trust: a run owns its directory, resume checks what it resumes,
divergence exits non-zero, checkpoints predict on their own (issue 8, items 1-15).

Every hostile case checks the message names the problem and that the files already
in the run directory are byte-for-byte intact (hashes before and after).
"""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from funnn import _files, checkpoint, cli, data, rundir, train

XOR = ["--data", "xor", "--quiet"]


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:          # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _snapshot(directory) -> dict:
    """sha256 of every file under ``directory`` except the lock (its pid may change)."""
    found = {}
    for root, _, names in os.walk(directory):
        for n in names:
            if n == rundir.LOCK_NAME:
                continue
            p = os.path.join(root, n)
            digest = hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest()
            found[os.path.relpath(p, directory)] = digest
    return found


def _strict(text):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture
def xor_run(tmp_path, capsys):
    """A finished 2-epoch run on XOR in ``tmp_path/D``."""
    d = tmp_path / "D"
    code, _, err = _main(["train", *XOR, "--epochs", "2", "--out", str(d)], capsys)
    assert code == 0, err
    return d


def _run_id(d):
    return json.loads((d / "run.json").read_text())["run_id"]


# ------------------------------------------------------------------ 1. a run owns its directory


def test_used_directory_is_refused_and_left_untouched(xor_run, capsys):
    before = _snapshot(xor_run)
    code, _, err = _main(["train", *XOR, "--epochs", "2", "--seed", "7", "--out", str(xor_run)],
                         capsys)
    assert code == 2
    assert f"run {_run_id(xor_run)}" in err and "model mlp, data xor, 2 of 2 epochs done" in err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(xor_run) == before


def test_overwrite_removes_only_funnn_files(xor_run, capsys):
    (xor_run / "notes.txt").write_text("mine")
    (xor_run / "checkpoints" / "keep.me").write_text("mine too")
    old = _run_id(xor_run)
    code, _, err = _main(["train", *XOR, "--epochs", "1", "--seed", "7", "--overwrite",
                          "--out", str(xor_run)], capsys)
    assert code == 0, err
    new = _run_id(xor_run)
    assert new != old
    assert (xor_run / "notes.txt").read_text() == "mine"
    assert (xor_run / "checkpoints" / "keep.me").read_text() == "mine too"
    found = checkpoint.checkpoints(xor_run / "checkpoints")
    assert [s for s, _ in found] == [1]
    assert all(checkpoint.header(p)["run"] == new for _, p in found)
    metrics = json.loads((xor_run / "metrics.json").read_text())
    assert metrics["run_id"] == new and metrics["config"]["seed"] == 7


def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path):
    d = tmp_path / "c"
    checkpoint.save_in(d, 99, params={"w": np.ones(2)}, run="other")
    (d / "ckpt_00000098.safetensors").write_bytes(b"not a checkpoint")
    for step in range(1, 6):
        checkpoint.save_in(d, step, params={"w": np.ones(2)}, run="mine", keep=2)
    assert [s for s, _ in checkpoint.checkpoints(d)] == [4, 5, 98, 99]


def test_fit_refuses_a_used_checkpoint_dir(tmp_path):
    model, params, xy = _tiny()
    kw = dict(epochs=1, batch_size=4, progress=False, checkpoint_dir=tmp_path / "c")
    first = train.fit(model, params, xy, "mse", "sgd", **kw)
    before = _snapshot(tmp_path / "c")
    with pytest.raises(train.ConfigError, match=f"holds run {first.run_id}.*overwrite=True"):
        train.fit(model, params, xy, "mse", "sgd", **kw)
    assert _snapshot(tmp_path / "c") == before
    again = train.fit(model, params, xy, "mse", "sgd", overwrite=True, **kw)
    assert again.run_id != first.run_id
    with pytest.raises(train.ConfigError, match="nothing to resume"):
        train.fit(model, params, xy, "mse", "sgd", resume=True, **{**kw, "checkpoint_dir":
                                                                  tmp_path / "empty"})
    auto = train.fit(model, params, xy, "mse", "sgd", resume="auto",
                     **{**kw, "checkpoint_dir": tmp_path / "auto"})
    assert auto.resumed_from is None and auto.epochs_done == 1


# ----------------------------------------------------------------- 2. resume checks what it resumes


@pytest.mark.parametrize("change, field", [
    (["--lr", "0.5"], "learning_rate: 0.003 -> 0.5"),
    (["--seed", "7"], "seed: 0 -> 7"),
    (["--data", "spirals"], "data: xor -> spirals"),
    (["--engine", "manual"], "engine: autodiff -> manual"),
    (["--model", "sigmoid"], "model: mlp -> sigmoid"),
])
def test_resume_with_other_settings_is_refused(xor_run, capsys, change, field):
    before = _snapshot(xor_run)
    argv = ["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)]
    i = argv.index("--data")
    if change[0] == "--data":
        argv[i + 1] = change[1]
    else:
        argv += change
    code, _, err = _main(argv, capsys)
    assert code == 2 and field in err and "settings differ" in err
    assert _snapshot(xor_run) == before


def test_resume_continues_with_more_epochs(xor_run, capsys):
    run = _run_id(xor_run)
    code, out, err = _main(["train", *XOR, "--epochs", "4", "--resume", "--out", str(xor_run)],
                           capsys)
    assert code == 0, err
    path = os.path.join(str(xor_run), "checkpoints", "ckpt_00000002.safetensors")
    assert f"resuming run {run} from epoch 2 ({path})" in out
    metrics = json.loads((xor_run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4]
    assert metrics["run_id"] == run and metrics["config"]["epochs"] == 4
    # resuming a finished run trains nothing and reports the run's own result
    code, out, _ = _main(["train", *XOR, "--epochs", "4", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 0 and "nothing to train" in out
    code, _, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 2 and "already trained 4 epochs" in err


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    code, _, err = _main(["train", *XOR, "--resume", "--out", str(tmp_path / "typo")], capsys)
    assert code == 2 and "nothing to resume" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = _main(["train", *XOR, "--resume", "--out", str(tmp_path / "empty")], capsys)
    assert code == 2 and "nothing to resume" in err


def test_foreign_checkpoint_above_epochs_is_not_reported_as_ours(xor_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert _main(["train", *XOR, "--epochs", "3", "--seed", "5", "--out", str(other)],
                 capsys)[0] == 0
    foreign = checkpoint.latest(other / "checkpoints")
    (xor_run / "checkpoints" / "ckpt_00000003.safetensors").write_bytes(
        pathlib.Path(foreign).read_bytes())
    before = _snapshot(xor_run)
    code, out, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                           capsys)
    assert code == 2 and "seed: 5 -> 0" in err and "test accuracy" not in out
    assert _snapshot(xor_run) == before


# ------------------------------------------------------------------ 3. corrupt newest checkpoint


def test_corrupt_newest_lists_intact_ones_and_from_checkpoint_resumes(tmp_path, capsys):
    d = tmp_path / "D"
    assert _main(["train", *XOR, "--epochs", "3", "--out", str(d)], capsys)[0] == 0
    newest = checkpoint.latest(d / "checkpoints")
    raw = bytearray(pathlib.Path(newest).read_bytes())
    raw[-3] ^= 0xFF
    pathlib.Path(newest).write_bytes(bytes(raw))
    code, _, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(d)], capsys)
    assert code == 2 and "checksum" in err and "--from-checkpoint PATH" in err
    older = os.path.join(str(d), "checkpoints", "ckpt_00000002.safetensors")
    assert f"{older} (epoch 2)" in err
    code, out, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(d),
                            "--from-checkpoint", older], capsys)
    assert code == 0, err
    assert "from epoch 2" in out
    checkpoint.restore(newest)                    # rewritten by the resumed run: intact again


def test_from_checkpoint_starts_a_new_run_from_its_weights(xor_run, tmp_path):
    path = checkpoint.latest(xor_run / "checkpoints")
    ck = checkpoint.restore(path)
    from funnn import models
    model = models.get("mlp").build(2)
    x, y = models.prepare(models.get("mlp"), data.load("xor")[0])
    res = train.fit(model, None, (x, y), "softmax_cross_entropy", "sgd", learning_rate=1e-30,
                    epochs=1, batch_size=4, progress=False, from_checkpoint=path)
    for a, b in zip(jax_leaves(res.params), jax_leaves(ck.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def jax_tree_astype(tree, dtype):
    import jax
    return jax.tree_util.tree_map(lambda v: np.asarray(v, dtype), tree)


def jax_leaves(tree):
    import jax
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


# ------------------------------------------------------------------ 4-6. temp files, locks, umask


def test_left_over_temp_files_are_removed_and_others_kept(xor_run, capsys):
    ck = xor_run / "checkpoints"
    ours = [xor_run / ".funnn-tmp-abc123.tmp", ck / ".funnn-tmp-x.tmp",
            ck / ".ckpt_00000003.safetensors.k2j3.tmp", xor_run / ".tmp-q1.json"]
    for p in ours:
        p.write_bytes(b"\0" * 1000)
    (xor_run / ".my-tmp-notes.tmp").write_text("user file")
    code, _, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 0, err
    assert not any(p.exists() for p in ours)
    assert (xor_run / ".my-tmp-notes.tmp").read_text() == "user file"


def test_second_run_in_a_locked_directory_exits_2_naming_the_pid(xor_run, capsys):
    before = _snapshot(xor_run)
    with rundir.RunLock(xor_run) as lock:
        lock.mark()
        code, _, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out",
                              str(xor_run)], capsys)
    assert code == 2 and f"pid {os.getpid()}" in err and "in use by another funnn run" in err
    assert _snapshot(xor_run) == before


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = ("import sys, time; from funnn import rundir; l = rundir.RunLock(sys.argv[1]).acquire();"
            " l.mark(); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(train.ConfigError, match=f"pid {p.pid}"):
            rundir.RunLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    rundir.RunLock(tmp_path).acquire().release()     # the OS dropped the dead holder's lock


def test_files_respect_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = _main(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "D")],
                             capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    d = tmp_path / "D"
    for p in [d / "metrics.json", d / "run.json", d / "curves.png",
              checkpoint.latest(d / "checkpoints")]:
        assert os.stat(p).st_mode & 0o777 == 0o640, p


# ------------------------------------------------------------------ 7-9. divergence and numerics


def test_diverging_run_exits_3_with_strict_json(tmp_path, capsys):
    d = tmp_path / "D"
    code, _, err = _main(["train", "--quiet", "--optimizer", "sgd", "--lr", "1e6", "--epochs",
                          "3", "--out", str(d)], capsys)
    assert code == cli.EXIT_DIVERGED == 3
    assert "epoch 1: the training loss is nan" in err and "--check-numerics" in err
    assert len(err.strip().splitlines()) == 1
    metrics = _strict((d / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["history"][-1]["train_loss"] is None
    assert checkpoint.checkpoints(d / "checkpoints") == []


def _counter_model():
    """``y = x W + b`` on x = 1, trained by a loss that rewards growth and turns NaN once the
    mean output passes 1: each SGD step raises it by 0.2, so epoch 6 is the first to see NaN."""
    import jax.numpy as jnp

    from funnn import layers as L

    model = L.dense(1, w_init="zeros")

    def loss(pred, y):
        s = pred.mean()
        return jnp.where(s > 1.0, jnp.nan, -s)

    return model, loss


def test_fit_keeps_the_last_finite_checkpoint_and_raises_with_history(tmp_path):
    import jax
    model, loss = _counter_model()
    _, params = model.init(jax.random.key(0), (None, 1))
    x, y = np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)
    with pytest.raises(train.TrainingDiverged) as info:
        train.fit(model, params, (x, y), loss, "sgd", learning_rate=0.1, epochs=20,
                  batch_size=4, progress=False, checkpoint_dir=tmp_path / "c")
    err = info.value
    assert err.epoch == 7 and err.quantity == "training loss"
    assert [r["epoch"] for r in err.history] == list(range(1, 8))
    assert np.isnan(err.history[-1]["train_loss"])
    assert all(np.isfinite(r["train_loss"]) for r in err.history[:-1])
    assert checkpoint.latest(tmp_path / "c").endswith("ckpt_00000006.safetensors")
    assert err.checkpoint == checkpoint.latest(tmp_path / "c")
    assert np.isfinite(np.asarray(checkpoint.restore(err.checkpoint).params["W"])).all()


def _one_dense(w):
    from funnn import layers as L
    model = L.serial(L.dense(1))
    params = ({"W": np.full((1, 1), w, np.float32), "b": np.zeros(1, np.float32)},)
    return model, params


def test_check_numerics_names_the_layer_and_step():
    import jax.numpy as jnp
    x, y = np.full((8, 1), 10.0, np.float32), np.zeros((8, 1), np.float32)
    kw = dict(epochs=2, batch_size=4, progress=False, check_numerics=True)
    # an output overflows float32: 10 * 1e38
    model, params = _one_dense(1e38)
    with pytest.raises(train.TrainingDiverged) as info:
        train.fit(model, params, (x, y), "mse", "sgd", learning_rate=1e-3, **kw)
    assert str(info.value).startswith("fit: step 1 (epoch 1, batch 1): the output of "
                                      "serial[0] dense(1) became non-finite")
    assert info.value.step == 1 and info.value.where == "the output of serial[0] dense(1)"
    # outputs and loss finite, the weight gradient overflows: x * dL/dy = 1e30 * 2e10
    model, params = _one_dense(1e-20)
    big = np.full((8, 1), 1e30, np.float32)
    with pytest.raises(train.TrainingDiverged, match=r"step 1 .*the gradient of serial\[0\] "
                       r"dense\(1\) \(parameter W\)"):
        train.fit(model, params, (big, y), lambda p, t: jnp.sum(p ** 2), "sgd",
                  learning_rate=1e-3, **kw)
    # a loss that is non-finite on finite outputs is named as such, at its step
    model, loss = _counter_model()
    with pytest.raises(train.TrainingDiverged, match=r"step 7 \(epoch 7, batch 1\): the loss "
                       r"\(on finite outputs"):
        train.fit(model, {"W": np.zeros((1, 1), np.float32), "b": np.zeros(1, np.float32)},
                  (np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)), loss, "sgd",
                  learning_rate=0.1, epochs=20, batch_size=4, progress=False,
                  check_numerics=True)


def test_learning_rate_must_be_finite_in_float32(tmp_path, capsys):
    code, _, err = _main(["train", *XOR, "--lr", "1e39", "--out", str(tmp_path / "D")], capsys)
    assert code == 2 and "finite in float32" in err
    model, params, xy = _tiny()
    params = jax_tree_astype(params, np.float32)
    with pytest.raises(train.ConfigError, match="not finite in the parameters' dtype float32"):
        train.fit(model, params, xy, "mse", "sgd", learning_rate=1e39, progress=False,
                  batch_size=4)


# ------------------------------------------------------------------ 10-12. checkpoints, eval


def test_eval_reproduces_the_recorded_accuracy(tmp_path, capsys):
    d = tmp_path / "D"
    code, _, err = _main(["train", "--quiet", "--epochs", "2", "--out", str(d)], capsys)
    assert code == 0, err
    final = json.loads((d / "metrics.json").read_text())["final"]
    code, out, err = _main(["eval", str(d), "--json"], capsys)
    assert code == 0, err
    got = _strict(out.strip().splitlines()[-1])
    assert got["accuracy"] == final["eval_accuracy"] and got["loss"] == final["eval_loss"]
    assert got["epoch"] == 2
    ck = checkpoint.restore(checkpoint.latest(d / "checkpoints"))
    assert set(ck.extras) == {"input_mean", "input_scale"}       # standardisation travels along
    code, _, err = _main(["eval", str(d), "--data", "xor"], capsys)
    assert code == 2 and "inputs of shape" in err
    code, _, err = _main(["eval", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_documented_restore_works_on_fit_checkpoints(tmp_path):
    import jax
    import optax
    model, params, xy = _tiny()
    train.fit(model, params, xy, "mse", "adam", learning_rate=1e-2, epochs=2, batch_size=4,
              progress=False, checkpoint_dir=tmp_path / "c")
    opt = optax.adam(1e-2)
    ck = checkpoint.restore(checkpoint.latest(tmp_path / "c"),
                            like={"params": params, "opt_state": opt.init(params)})
    assert ck.step == 2 and type(ck.opt_state[0]).__name__ == "ScaleByAdamState"
    run = train.restore_run(tmp_path / "c", model)
    assert isinstance(run.opt_state[0], optax.ScaleByAdamState)
    grads = jax.tree_util.tree_map(lambda p: p * 0 + 1, run.params)
    updates, _ = train.get_optimizer("adam", 1e-2).update(grads, run.opt_state, run.params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(run.params)


def _rewrite_header(path, edit):
    """Rewrite a checkpoint's JSON description with ``edit(desc)`` and a matching checksum."""
    import safetensors.numpy as stn
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    tensors = stn.load(raw)
    desc_text = edit(json.loads(meta["funnn"]))
    meta = {"funnn": desc_text, "sha256": checkpoint._checksum(desc_text, tensors)}
    pathlib.Path(path).write_bytes(stn.save(tensors, metadata=meta))


def _set(key, value):
    def edit(desc):
        desc[key] = value
        return json.dumps(desc)
    return edit


def _deep(desc):
    return json.dumps(desc)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("edit, match", [
    (_set("trees", None), "trees are missing or malformed"),
    (_set("trees", {}), "trees are missing or malformed"),
    (_set("step", "abc"), "step must be a non-negative int"),
    (_set("step", -5), "step must be a non-negative int"),
    (_set("metadata", {"history": "x"}), "history does not match its step"),
    (_set("metadata", None), "history does not match its step"),
    (_set("step", 99), "history does not match its step"),
    (_deep, "corrupt or foreign header"),
    (lambda d: json.dumps({**d, "trees": {**d["trees"], "params": {"t": "dict", "k": ["a"],
                                                                   "c": [{"t": 3}]}}}),
     "params"),
])
def test_hostile_checkpoint_headers_exit_2(xor_run, capsys, edit, match):
    path = checkpoint.latest(xor_run / "checkpoints")
    _rewrite_header(path, edit)
    before = _snapshot(xor_run)
    code, _, err = _main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 2 and match in err, err
    assert _snapshot(xor_run) == before


def test_loading_never_executes_code(tmp_path):
    """A pickle payload in the header is data, never run: restore refuses the file."""
    import safetensors.numpy as stn
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode("latin-1").decode("latin-1")
    desc = json.dumps({"format": checkpoint.FORMAT, "step": 1, "trees": payload})
    tensors = {"x": np.zeros(1, np.float32)}
    path = tmp_path / "evil.safetensors"
    path.write_bytes(stn.save(tensors, metadata={
        "funnn": desc, "sha256": checkpoint._checksum(desc, tensors)}))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.restore(path)
    assert not marker.exists()
    source = pathlib.Path(checkpoint.__file__).read_text()
    assert "import pickle" not in source and "pickle.load" not in source


# ------------------------------------------------------------------ 13-15. the CLI says what it ran


def test_description_and_metrics_state_what_ran(tmp_path, capsys):
    d = tmp_path / "D"
    code, out, err = _main(["train", *XOR, "--epochs", "1", "--batch-size", "100000",
                            "--optimizer", "sgd", "--out", str(d)], capsys)
    assert code == 0, err
    assert "batch 4 (asked 100000; the training set has 4 examples)" in out
    assert "optimizer sgd, lr 0.1, constant schedule" in out and "AdamW" not in out
    config = json.loads((d / "metrics.json").read_text())["config"]
    assert (config["batch_size"], config["optimizer"], config["schedule"]) == (4, "sgd",
                                                                              "constant")
    code, out, _ = _main(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "E")], capsys)
    assert "optimizer adamw, lr 0.003, cosine schedule" in out


def test_info_never_crashes():
    r = subprocess.run([sys.executable, "-m", "funnn.cli", "info"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cuda"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "backend unavailable" in r.stdout


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
    code, _, err = _main(["train", "--quiet", "--data", f"mnist:{tmp_path / 'm'}", "--out",
                          str(tmp_path / "o")], capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_mnist_file_instead_of_directory(tmp_path, capsys):
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(b"\0" * 16)
    code, _, err = _main(["train", "--quiet", "--data", f"mnist:{f}", "--out",
                          str(tmp_path / "o")], capsys)
    assert code == 2 and "is a file, not a directory" in err and "does not exist" not in err


# ------------------------------------------------------------------ 16-17, 19. fit's API edges


def _tiny():
    import jax

    from funnn import layers as L
    model = L.serial(L.dense(3), L.activation("tanh"), L.dense(1))
    _, params = model.init(jax.random.key(0), (None, 2))
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(8, 2)
    return model, params, (x, x[:, :1] * 0.5)


def test_optax_object_with_learning_rate_is_refused():
    import optax
    model, params, xy = _tiny()
    for kw in ({"learning_rate": 0.1}, {"schedule": "cosine"}):
        with pytest.raises(train.ConfigError, match="optax optimizer carries its own"):
            train.fit(model, params, xy, "mse", optax.sgd(0.1), progress=False, batch_size=4,
                      **kw)
    res = train.fit(model, params, xy, "mse", optax.sgd(0.1), progress=False, batch_size=4,
                    epochs=1)
    assert res.config["optimizer"] == "optax:GradientTransformationExtraArgs"


def test_loss_as_name_or_callable():
    import jax.numpy as jnp
    model, params, xy = _tiny()
    kw = dict(epochs=2, batch_size=4, progress=False, learning_rate=0.1)
    by_obj = train.fit(model, params, xy, train.losses.mse, "sgd", **kw)
    by_name = train.fit(model, params, xy, "mse", "sgd", **kw)
    by_fn = train.fit(model, params, xy, lambda p, t: jnp.mean((p - t) ** 2), "sgd", **kw)
    bridge = train.fit(model, params, xy, lambda p, t: jnp.mean((p - t) ** 2), "sgd",
                       engine="bridge", **kw)
    for other in (by_name, by_fn, bridge):
        np.testing.assert_allclose(other.history[-1]["train_loss"],
                                   by_obj.history[-1]["train_loss"], rtol=1e-5)
    with pytest.raises(train.ConfigError, match=r"manual engine needs .*\.grad"):
        train.fit(model, params, xy, lambda p, t: jnp.mean((p - t) ** 2), "sgd",
                  engine="manual", **kw)
    with pytest.raises(train.ConfigError, match="unknown loss"):
        train.fit(model, params, xy, "hinge", "sgd", **kw)


def test_fit_on_empty_data():
    model, params, _ = _tiny()
    x = np.zeros((0, 2), np.float32)
    with pytest.raises(train.DataError, match="training data is empty"):
        train.fit(model, params, (x, x[:, :1]), "mse", "sgd", progress=False)


def test_strict_json_helper():
    assert _files.strict_json({"a": float("nan"), "b": [float("inf"), 1.0]}) == \
        '{"a": null, "b": [null, 1.0]}'


def test_run_lock_file_holds_the_pid(tmp_path):
    with rundir.RunLock(tmp_path) as lock:
        lock.mark()
        assert (tmp_path / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())
    time.sleep(0)
