"""Run directories (funnn.rundir): a run owns its directory, one lock, resume checks what it
resumes, damaged checkpoints list the intact ones, overwrite deletes only funnn's files.

Every hostile case checks the message names the problem and that the files already
in the run directory are byte-for-byte intact (hashes before and after).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _runs import XOR, main, run_id, snapshot, tiny

from funnn import checkpoint, rundir, train


@pytest.mark.slow
def test_used_directory_is_refused_and_left_untouched(xor_run, capsys):
    before = snapshot(xor_run)
    code, _, err = main(["train", *XOR, "--epochs", "2", "--seed", "7", "--out", str(xor_run)],
                         capsys)
    assert code == 2
    assert f"run {run_id(xor_run)}" in err and "model mlp, data xor, 2 of 2 epochs done" in err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert snapshot(xor_run) == before


@pytest.mark.slow
def test_overwrite_removes_only_funnn_files(xor_run, capsys):
    (xor_run / "notes.txt").write_text("mine")
    (xor_run / "checkpoints" / "keep.me").write_text("mine too")
    old = run_id(xor_run)
    code, _, err = main(["train", *XOR, "--epochs", "1", "--seed", "7", "--overwrite",
                          "--out", str(xor_run)], capsys)
    assert code == 0, err
    new = run_id(xor_run)
    assert new != old
    assert (xor_run / "notes.txt").read_text() == "mine"
    assert (xor_run / "checkpoints" / "keep.me").read_text() == "mine too"
    found = checkpoint.checkpoints(xor_run / "checkpoints")
    assert [s for s, _ in found] == [1]
    assert all(checkpoint.header(p)["run"] == new for _, p in found)
    metrics = json.loads((xor_run / "metrics.json").read_text())
    assert metrics["run_id"] == new and metrics["config"]["seed"] == 7


@pytest.mark.slow
def test_fit_refuses_a_used_checkpoint_dir(tmp_path):
    model, params, xy = tiny()
    kw = dict(epochs=1, batch_size=4, progress=False, checkpoint_dir=tmp_path / "c")
    first = train.fit(model, params, xy, "mse", "sgd", **kw)
    before = snapshot(tmp_path / "c")
    with pytest.raises(train.ConfigError, match=f"holds run {first.run_id}.*overwrite=True"):
        train.fit(model, params, xy, "mse", "sgd", **kw)
    assert snapshot(tmp_path / "c") == before
    again = train.fit(model, params, xy, "mse", "sgd", overwrite=True, **kw)
    assert again.run_id != first.run_id
    with pytest.raises(train.ConfigError, match="nothing to resume"):
        train.fit(model, params, xy, "mse", "sgd", resume=True, **{**kw, "checkpoint_dir":
                                                                  tmp_path / "empty"})
    auto = train.fit(model, params, xy, "mse", "sgd", resume="auto",
                     **{**kw, "checkpoint_dir": tmp_path / "auto"})
    assert auto.resumed_from is None and auto.epochs_done == 1


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [
    (["--lr", "0.5"], "learning_rate: 0.003 -> 0.5"),
    (["--seed", "7"], "seed: 0 -> 7"),
    (["--data", "spirals"], "data: xor -> spirals"),
    (["--engine", "manual"], "engine: autodiff -> manual"),
    (["--model", "sigmoid"], "model: mlp -> sigmoid"),
])
def test_resume_with_other_settings_is_refused(xor_run, capsys, change, field):
    before = snapshot(xor_run)
    argv = ["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)]
    i = argv.index("--data")
    if change[0] == "--data":
        argv[i + 1] = change[1]
    else:
        argv += change
    code, _, err = main(argv, capsys)
    assert code == 2 and field in err and "settings differ" in err
    assert snapshot(xor_run) == before


@pytest.mark.slow
def test_resume_continues_with_more_epochs(xor_run, capsys):
    run = run_id(xor_run)
    code, out, err = main(["train", *XOR, "--epochs", "4", "--resume", "--out", str(xor_run)],
                           capsys)
    assert code == 0, err
    path = os.path.join(str(xor_run), "checkpoints", "ckpt_00000002.safetensors")
    assert f"resuming run {run} from epoch 2 ({path})" in out
    metrics = json.loads((xor_run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4]
    assert metrics["run_id"] == run and metrics["config"]["epochs"] == 4
    # resuming a finished run trains nothing and reports the run's own result
    code, out, _ = main(["train", *XOR, "--epochs", "4", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 0 and "nothing to train" in out
    code, _, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 2 and "already trained 4 epochs" in err


@pytest.mark.slow
def test_resume_with_nothing_to_resume(tmp_path, capsys):
    code, _, err = main(["train", *XOR, "--resume", "--out", str(tmp_path / "typo")], capsys)
    assert code == 2 and "nothing to resume" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = main(["train", *XOR, "--resume", "--out", str(tmp_path / "empty")], capsys)
    assert code == 2 and "nothing to resume" in err


@pytest.mark.slow
def test_foreign_checkpoint_above_epochs_is_not_reported_as_ours(xor_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", *XOR, "--epochs", "3", "--seed", "5", "--out", str(other)],
                 capsys)[0] == 0
    foreign = checkpoint.latest(other / "checkpoints")
    (xor_run / "checkpoints" / "ckpt_00000003.safetensors").write_bytes(
        pathlib.Path(foreign).read_bytes())
    before = snapshot(xor_run)
    code, out, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                           capsys)
    assert code == 2 and "seed: 5 -> 0" in err and "test accuracy" not in out
    assert snapshot(xor_run) == before


@pytest.mark.slow
def test_corrupt_newest_lists_intact_ones_and_from_checkpoint_resumes(tmp_path, capsys):
    d = tmp_path / "D"
    assert main(["train", *XOR, "--epochs", "3", "--out", str(d)], capsys)[0] == 0
    newest = checkpoint.latest(d / "checkpoints")
    raw = bytearray(pathlib.Path(newest).read_bytes())
    raw[-3] ^= 0xFF
    pathlib.Path(newest).write_bytes(bytes(raw))
    code, _, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(d)], capsys)
    assert code == 2 and "checksum" in err and "--from-checkpoint PATH" in err
    older = os.path.join(str(d), "checkpoints", "ckpt_00000002.safetensors")
    assert f"{older} (epoch 2)" in err
    code, out, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(d),
                            "--from-checkpoint", older], capsys)
    assert code == 0, err
    assert "from epoch 2" in out
    checkpoint.restore(newest)                    # rewritten by the resumed run: intact again


@pytest.mark.slow
def test_left_over_temp_files_are_removed_and_others_kept(xor_run, capsys):
    ck = xor_run / "checkpoints"
    ours = [xor_run / ".funnn-tmp-abc123.tmp", ck / ".funnn-tmp-x.tmp"]
    for p in ours:
        p.write_bytes(b"\0" * 1000)
    (xor_run / ".my-tmp-notes.tmp").write_text("user file")
    # names earlier versions of funnn used, but a user may choose too: never deleted (issue 22)
    theirs = [ck / ".ckpt_00000003.safetensors.k2j3.tmp", xor_run / ".tmp-q1.json",
              xor_run / ".probe-results.csv"]
    for p in theirs:
        p.write_text("mine")
    code, _, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 0, err
    assert not any(p.exists() for p in ours)
    assert (xor_run / ".my-tmp-notes.tmp").read_text() == "user file"
    assert all(p.read_text() == "mine" for p in theirs)


@pytest.mark.slow
def test_second_run_in_a_locked_directory_exits_2_naming_the_pid(xor_run, capsys):
    before = snapshot(xor_run)
    with rundir.RunLock(xor_run) as lock:
        lock.mark()
        code, _, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out",
                              str(xor_run)], capsys)
    assert code == 2 and f"pid {os.getpid()}" in err and "in use by another funnn run" in err
    assert snapshot(xor_run) == before


@pytest.mark.slow
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


@pytest.mark.slow
def test_files_respect_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = main(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "D")],
                             capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    d = tmp_path / "D"
    for p in [d / "metrics.json", d / "run.json", d / "curves.png",
              checkpoint.latest(d / "checkpoints")]:
        assert os.stat(p).st_mode & 0o777 == 0o640, p


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


@pytest.mark.slow
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
    before = snapshot(xor_run)
    code, _, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                         capsys)
    assert code == 2 and match in err, err
    assert snapshot(xor_run) == before


def test_run_lock_file_holds_the_pid(tmp_path):
    with rundir.RunLock(tmp_path) as lock:
        lock.mark()
        assert (tmp_path / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())
    time.sleep(0)


# ----------------------------------------------------------------- one owner, one lock, one layout


def _fake_run(d, config=None):
    """A run directory holding only a ``run.json`` (a run stopped before its first epoch)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / rundir.RUN_FILE).write_text(json.dumps({"run_id": "abc123", "config": config or {
        "model": "mlp", "data": "xor", "epochs": 3}}))
    return d


def test_claim_refusals_speak_one_vocabulary_and_change_nothing(tmp_path):
    d = _fake_run(tmp_path / "D")
    before = snapshot(d)
    with pytest.raises(train.ConfigError, match=r"already holds run abc123 \(model mlp, data "
                       r"xor, 0 of 3 epochs done\); continue it with resume=True, or replace "
                       r"it with overwrite=True"):
        rundir.Run.claim(d)
    with pytest.raises(train.ConfigError, match=r"has no checkpoint yet.*overwrite=True"):
        rundir.Run.claim(d, resume=True)
    with pytest.raises(train.ConfigError, match="has no checkpoint yet"):
        rundir.Run.claim(d, resume="auto")
    with pytest.raises(train.ConfigError, match=r"nothing to resume: .* does not exist"):
        rundir.Run.claim(tmp_path / "typo", resume=True)
    with pytest.raises(train.ConfigError, match="exclude each other"):
        rundir.Run.claim(tmp_path / "E", resume=True, overwrite=True)
    assert snapshot(d) == before
    assert not (tmp_path / "typo").exists() and not (tmp_path / "E").exists()
    rundir.RunLock(d).acquire().release()       # every refusal released the lock


def test_overwrite_claims_and_begin_replaces_the_run(tmp_path):
    d = _fake_run(tmp_path / "D")
    (d / "notes.txt").write_text("mine")
    run = rundir.Run.claim(d, overwrite=True)
    try:
        assert json.loads((d / "run.json").read_text())["run_id"] == "abc123"   # not yet
        run.begin("new", {"model": "mlp"}, fresh=True)
        assert json.loads((d / "run.json").read_text())["run_id"] == "new"
        assert (d / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        run.release()
    assert (d / "notes.txt").read_text() == "mine"


def test_config_diff_lets_epochs_grow_and_defaults_old_settings():
    saved = {"learning_rate": 0.1, "epochs": 3, "seed": 0}
    assert rundir.config_diff(saved, {**saved, "epochs": 9, "precision": "f32"}) == []
    assert rundir.config_diff(saved, {**saved, "learning_rate": 0.2, "seed": 1,
                                      "precision": "f32"}) == [
        "learning_rate: 0.1 -> 0.2", "seed: 0 -> 1"]
    assert rundir.config_diff(saved, {**saved, "precision": "bf16"}) == ["precision: f32 -> bf16"]


def test_fit_holds_one_lock_in_the_run_directory(tmp_path):
    model, params, xy = tiny()
    d, seen = tmp_path / "D", []

    def during(row):
        with pytest.raises(train.ConfigError, match="in use by another funnn run"):
            rundir.RunLock(d).acquire()
        seen.append(sorted(p.name for p in d.rglob(rundir.LOCK_NAME)))

    train.fit(model, params, xy, "mse", "sgd", epochs=2, batch_size=4, progress=False,
              run_dir=d, on_epoch=during)
    assert seen == [[rundir.LOCK_NAME]] * 2
    assert not (d / "checkpoints" / rundir.LOCK_NAME).exists()
    rundir.RunLock(d).acquire().release()       # released at the end


@pytest.mark.parametrize("where", ["run_dir", "checkpoint_dir"])
def test_fit_writes_the_same_files_as_the_command(tmp_path, where):
    model, params, xy = tiny()
    d = tmp_path / "D"
    res = train.fit(model, params, xy, "mse", "sgd", epochs=2, batch_size=4, progress=False,
                    **{where: d})
    cdir = d / "checkpoints" if where == "run_dir" else d
    assert [s for s, _ in checkpoint.checkpoints(cdir)] == [1, 2]
    run = json.loads((d / "run.json").read_text())
    metrics = json.loads((d / "metrics.json").read_text())
    assert run["run_id"] == metrics["run_id"] == res.run_id
    assert run["config"] == metrics["config"] == res.config
    assert metrics["status"] == "completed" and metrics["history"] == res.history
    assert metrics["final"] == res.history[-1]
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = rundir.find_run(d, cdir)
    assert found is not None and found.run_id == res.run_id and found.epochs_done == 2


def test_diverged_fit_writes_metrics_with_its_status(tmp_path):
    import jax.numpy as jnp

    from funnn import layers as L

    model = L.dense(1, w_init="zeros")
    params = {"W": np.zeros((1, 1), np.float32), "b": np.zeros(1, np.float32)}

    def loss(pred, y):
        s = pred.mean()
        return jnp.where(s > 1.0, jnp.nan, -s)

    with pytest.raises(train.TrainingDiverged) as info:
        train.fit(model, params, (np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)),
                  loss, "sgd", learning_rate=0.1, epochs=20, batch_size=4, progress=False,
                  checkpoint_dir=tmp_path / "c")
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert metrics["status"] == "diverged" and "training loss" in metrics["error"]
    assert len(metrics["history"]) == info.value.epoch == 7
    assert metrics["history"][-1]["train_loss"] is None


@pytest.mark.slow
def test_bad_settings_are_refused_before_the_directory_is_made(tmp_path, capsys):
    model, params, xy = tiny()
    bad = [dict(batch_size=100), dict(learning_rate=-1.0), dict(sharding="fsdp"),
           dict(check_numerics=True, mesh=1), dict(resume="maybe"), dict(epochs=0),
           dict(keep=0)]
    for kw in bad:
        args = dict(epochs=1, batch_size=4, progress=False, checkpoint_dir=tmp_path / "c")
        with pytest.raises(train.ConfigError):
            train.fit(model, params, xy, "mse", "sgd", **{**args, **kw})
        assert not (tmp_path / "c").exists(), kw
    for argv in (["--devices", "1", "--check-numerics"], ["--sharding", '{"9.W": "fsdp"}'],
                 ["--dp-clip", "1", "--dp-noise", "1", "--precision", "f16"]):
        code, _, err = main(["train", *XOR, "--epochs", "1", "--out", str(tmp_path / "o"),
                             *argv], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists(), argv


@pytest.mark.slow
def test_a_run_directory_laid_out_the_old_way_still_resumes(xor_run, capsys):
    """Before one owner, ``funnn train`` held a second lock in ``checkpoints/``: such a
    directory resumes, and overwrite removes that lock file with the run."""
    old_lock = xor_run / "checkpoints" / rundir.LOCK_NAME
    old_lock.write_text("12345\n")
    run = run_id(xor_run)
    code, out, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)],
                          capsys)
    assert code == 0, err
    assert f"resuming run {run} from epoch 2" in out
    metrics = json.loads((xor_run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3] and metrics["run_id"] == run
    code, _, err = main(["train", *XOR, "--epochs", "1", "--overwrite", "--out",
                         str(xor_run)], capsys)
    assert code == 0, err
    assert not old_lock.exists()


@pytest.mark.slow
def test_an_old_fit_checkpoint_dir_resumes_bit_for_bit(tmp_path):
    """``fit(checkpoint_dir=C)`` used to write only checkpoints and a lock in ``C``."""
    import jax
    model, params, xy = tiny()
    kw = dict(batch_size=4, progress=False, key=jax.random.key(2), learning_rate=0.1)
    full = train.fit(model, params, xy, "mse", "adam", epochs=3, **kw)
    c = tmp_path / "c"
    train.fit(model, params, xy, "mse", "adam", epochs=1, checkpoint_dir=c, **kw)
    for name in (rundir.RUN_FILE, rundir.METRICS_FILE, rundir.CURVES_FILE):
        (c / name).unlink()                     # the old layout: checkpoints and a lock
    resumed = train.fit(model, params, xy, "mse", "adam", epochs=3, checkpoint_dir=c,
                        resume=True, **kw)
    assert resumed.resumed_from is not None and resumed.history == [
        {**r, "seconds": s["seconds"]} for r, s in zip(full.history, resumed.history)]
    for a, b in zip(jax.tree_util.tree_leaves(full.params),
                    jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- issue 22: items 2, 3, 7, 8


@pytest.mark.slow
def test_user_files_with_temp_like_names_survive_every_kind_of_run(tmp_path):
    """Item 2: funnn deletes only its own temp name (``.funnn-tmp-*.tmp``), never a user's
    ``.probe-*``, ``.tmp-*.json``/``.png`` or ``.ckpt_*.tmp``: fresh, resumed or overwritten."""
    model, params, xy = tiny()
    d = tmp_path / "D"
    (d / "checkpoints").mkdir(parents=True)
    mine = [d / ".probe-results.csv", d / ".tmp-a.json", d / ".tmp-b.png",
            d / "checkpoints" / ".ckpt_00000001.safetensors.x.tmp"]
    for p in mine:
        p.write_text("mine")
    kw = dict(batch_size=4, progress=False, run_dir=d)
    train.fit(model, params, xy, "mse", "sgd", epochs=1, **kw)
    train.fit(model, params, xy, "mse", "sgd", epochs=2, resume=True, **kw)
    train.fit(model, params, xy, "mse", "sgd", epochs=1, overwrite=True, **kw)
    assert all(p.read_text() == "mine" for p in mine)
    (d / ".funnn-tmp-k2j3abcd.tmp").write_text("left by a killed run")
    train.fit(model, params, xy, "mse", "sgd", epochs=2, resume=True, **kw)
    assert not (d / ".funnn-tmp-k2j3abcd.tmp").exists()


class _Hang(Exception):
    pass


def _no_hang(seconds=20):
    def stop(*_):
        raise _Hang("blocked")
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)


def test_lock_and_run_files_that_are_not_regular_files_are_refused(tmp_path, capsys):
    """Item 3: the lock is opened with O_NOFOLLOW; a lock or run file that is a symlink,
    FIFO or directory is refused (exit 2), and a symlink's target is never touched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cases = {"symlink": lambda p: p.symlink_to(victim), "FIFO": lambda p: os.mkfifo(p),
             "directory": lambda p: p.mkdir()}
    try:
        _no_hang()
        for kind, make in cases.items():
            for name in (rundir.LOCK_NAME, rundir.RUN_FILE, rundir.METRICS_FILE):
                d = tmp_path / f"{kind}-{name}"
                d.mkdir()
                make(d / name)
                with pytest.raises(train.ConfigError, match=f"is a {kind}"):
                    rundir.Run.claim(d)
                with pytest.raises(train.ConfigError, match=f"is a {kind}"):
                    rundir.RunLock(d).acquire() if name == rundir.LOCK_NAME else \
                        rundir.Run.claim(d, overwrite=True)
    finally:
        signal.alarm(0)
    assert victim.read_text() == "precious"
    d = tmp_path / "cli"
    d.mkdir()
    (d / rundir.LOCK_NAME).symlink_to(victim)
    code, _, err = main(["train", *XOR, "--epochs", "1", "--out", str(d)], capsys)
    assert code == 2 and "is a symlink" in err and len(err.strip().splitlines()) == 1
    assert victim.read_text() == "precious" and sorted(os.listdir(d)) == [rundir.LOCK_NAME]


@pytest.mark.slow
def test_overwrite_decides_everything_before_deleting_anything(xor_run, capsys):
    """Item 7: a directory named like a checkpoint is neither counted nor removed, so
    ``--overwrite`` succeeds and the new run resumes; a checkpoint folder that is a file is
    refused before the old run loses a file."""
    odd = xor_run / "checkpoints" / "ckpt_00000009.safetensors"
    odd.mkdir()
    code, _, err = main(["train", *XOR, "--epochs", "1", "--overwrite", "--out", str(xor_run)],
                        capsys)
    assert code == 0, err
    code, out, err = main(["train", *XOR, "--epochs", "2", "--resume", "--out", str(xor_run)],
                          capsys)
    assert code == 0 and "from epoch 1" in out, err
    assert odd.is_dir()
    d = _fake_run(xor_run.parent / "E")
    (d / "checkpoints").write_text("a file, not a folder")
    before = snapshot(d)
    code, _, err = main(["train", *XOR, "--epochs", "1", "--overwrite", "--out", str(d)], capsys)
    assert code == 2 and "is not a directory" in err
    assert snapshot(d) == before


def test_refusals_come_before_any_file_is_created(tmp_path, capsys):
    """Item 8: a refused run leaves the directory as it found it: no run.json, no lock file."""
    for what, make in (("checkpoints", lambda d: (d / "checkpoints").write_text("x")),
                       ("lock", lambda d: (d / rundir.LOCK_NAME).mkdir())):
        d = tmp_path / what
        d.mkdir()
        make(d)
        before = sorted(os.listdir(d))
        code, _, err = main(["train", *XOR, "--epochs", "1", "--out", str(d)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert sorted(os.listdir(d)) == before
    model, params, xy = tiny()
    with pytest.raises(train.ConfigError, match="is not a directory"):
        train.fit(model, params, xy, "mse", "sgd", epochs=1, batch_size=4, progress=False,
                  run_dir=tmp_path / "checkpoints")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoints"]


@pytest.mark.slow
def test_a_stale_copy_with_a_higher_number_neither_wins_nor_is_deleted(tmp_path, capsys):
    """issue 22 item 4: ``cp ckpt_3 ckpt_9`` then ``--resume --epochs 7`` continues from
    epoch 5 (the header decides), reports the misnamed file and leaves it as it was."""
    d = tmp_path / "D"
    assert main(["train", *XOR, "--epochs", "5", "--out", str(d)],
                capsys)[0] == 0
    ck = d / "checkpoints"
    stale = ck / "ckpt_00000009.safetensors"
    stale.write_bytes((ck / "ckpt_00000003.safetensors").read_bytes())
    before = stale.read_bytes()
    code, out, err = main(["train", *XOR, "--epochs", "7", "--resume", "--out", str(d)],
                          capsys)
    assert code == 0, err
    assert "from epoch 5" in out and "ckpt_00000009.safetensors" in out and "header" in out
    assert stale.read_bytes() == before
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("ckpt_")) == [
        "ckpt_00000005.safetensors", "ckpt_00000006.safetensors",
        "ckpt_00000007.safetensors", "ckpt_00000009.safetensors"]
    code, out, err = main(["train", *XOR, "--epochs", "8", "--resume", "--out", str(d)],
                          capsys)
    assert code == 0 and "from epoch 7" in out, err
    assert stale.read_bytes() == before


# ----------------------------------------------------------------- issue 22: items 4 on


@pytest.mark.slow
def test_resume_on_other_data_with_the_same_counts_is_refused(tmp_path):
    """issue 22 item 5: the data's content is fingerprinted in run.json and every checkpoint
    config; resuming on regenerated data (same shapes, other values) is refused untouched."""
    model, params, (x, y) = tiny()
    kw = dict(batch_size=4, progress=False, run_dir=tmp_path / "D")
    train.fit(model, params, (x, y), "mse", "sgd", epochs=1, **kw)
    recorded = json.loads((tmp_path / "D" / rundir.RUN_FILE).read_text())["config"]
    from funnn.train.settings import fingerprint
    assert recorded["data_sha256"] == fingerprint(x, y)
    before = snapshot(tmp_path / "D")
    with pytest.raises(train.ConfigError, match="data_sha256"):
        train.fit(model, params, (x[::-1].copy(), y), "mse", "sgd", epochs=2, resume=True,
                  **kw)
    assert snapshot(tmp_path / "D") == before
    done = train.fit(model, params, (x, y), "mse", "sgd", epochs=2, resume=True, **kw)
    assert done.resumed_from is not None and done.epochs_done == 2


@pytest.mark.slow
def test_x64_runs_record_float64_and_a_resume_without_it_names_x64(tmp_path):
    """issue 22 item 6: ``JAX_ENABLE_X64=1`` trains float64 and says so in run.json; resuming
    without it is refused naming the variable, before anything changes."""
    d = tmp_path / "D"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def funnn(*args, x64):
        e = {**env, "JAX_ENABLE_X64": "1"} if x64 else {
            k: v for k, v in env.items() if k != "JAX_ENABLE_X64"}
        return subprocess.run([sys.executable, "-m", "funnn.cli", "train", *XOR, *args,
                               "--out", str(d)], capture_output=True, text=True, env=e,
                              timeout=300)
    done = funnn("--epochs", "1", x64=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((d / rundir.RUN_FILE).read_text())["config"]["dtypes"].startswith(
        "params float64")
    before = snapshot(d)
    again = funnn("--epochs", "2", "--resume", x64=False)
    assert again.returncode == 2 and "JAX_ENABLE_X64" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr and "like" not in again.stderr
    assert snapshot(d) == before
    assert funnn("--epochs", "2", "--resume", x64=True).returncode == 0


def _set_config(key, value):
    def edit(desc):
        desc["config"][key] = value
        return json.dumps(desc)
    return edit


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("num_outputs", "two"), ("epochs", "x"),
                                        ("input_shape", 3), ("learning_rate", "fast")])
def test_bad_config_values_in_a_valid_header_exit_2_in_one_line(xor_run, capsys, key, value):
    """issue 22 item 14: a checksum-valid header whose config holds values of the wrong type
    is refused by ``eval`` and ``--resume`` with one line naming the setting."""
    _rewrite_header(checkpoint.latest(xor_run / "checkpoints"), _set_config(key, value))
    before = snapshot(xor_run)
    for argv in (["eval", str(xor_run)],
                 ["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run)]):
        code, _, err = main(argv, capsys)
        assert code == 2 and f"config.{key} must be" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(xor_run) == before


def test_check_config_passes_what_fit_writes_and_unknown_keys():
    config = {"model": "mlp", "epochs": 2, "input_shape": [8, 8, 1], "learning_rate": None,
              "seed": -1, "standardize": False, "mesh": {"data": 2}, "note": object()}
    assert rundir.check_config(config, "p") is config and rundir.check_config(None, "p") == {}
    with pytest.raises(rundir.CheckpointError, match=r"checkpoint p: config.seed must be an int"):
        rundir.check_config({"seed": True}, "p")


@pytest.mark.slow
def test_eval_falls_back_when_the_newest_checkpoint_vanishes(xor_run, capsys, monkeypatch):
    """issue 22 item 10: a run that trains prunes a checkpoint between eval's listing and its
    read; eval evaluates the next-newest intact one and says which."""
    newest = checkpoint.latest(xor_run / "checkpoints")
    real = rundir.read_config

    def pruned_meanwhile(path):
        if path == newest and os.path.exists(path):
            os.unlink(path)
        return real(path)
    monkeypatch.setattr(rundir, "read_config", pruned_meanwhile)
    code, out, err = main(["eval", str(xor_run)], capsys)
    assert code == 0, err
    older = os.path.join(str(xor_run), "checkpoints", "ckpt_00000001.safetensors")
    assert f"{older} (epoch 1):" in out and f"note: skipped {newest}" in out


def test_load_newest_skips_vanished_files_and_stops_at_damaged_ones(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_in(tmp_path, step, params={"w": np.full(2, step)}, keep=None)
    newest = str(tmp_path / "ckpt_00000003.safetensors")

    def pruned_meanwhile(path):
        if path == newest:
            os.unlink(path)
        return checkpoint.restore(path)
    path, ck, skipped = rundir.load_newest(tmp_path, pruned_meanwhile)
    assert path.endswith("ckpt_00000002.safetensors") and ck.step == 2
    assert len(skipped) == 1 and "ckpt_00000003" in skipped[0]
    (tmp_path / "ckpt_00000002.safetensors").write_bytes(b"damaged")
    with pytest.raises(rundir.CheckpointError, match="ckpt_00000002"):
        rundir.load_newest(tmp_path, checkpoint.restore)
    with pytest.raises(rundir.CheckpointError, match="holds no checkpoint"):
        rundir.load_newest(tmp_path / "none", checkpoint.restore)


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_resume_is_bit_identical(tmp_path, capsys):
    """issue 22 item 9: SIGTERM (timeout, schedulers, docker stop) exits 143 with the last
    complete checkpoint and metrics.json ``"status": "interrupted"``; --resume then ends
    bit-for-bit where an uninterrupted run does."""
    d, flags = tmp_path / "D", [*XOR, "--schedule", "constant"]
    p = subprocess.Popen([sys.executable, "-m", "funnn.cli", "train", *flags, "--epochs",
                          "100000", "--out", str(d)], stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
                                  PYTHONPATH=os.pathsep.join(sys.path)))  # x64 as conftest
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((d / "checkpoints").glob("ckpt_*"))) < 3:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err, err
    metrics = json.loads((d / rundir.METRICS_FILE).read_text())
    newest = checkpoint.latest(d / "checkpoints")
    step = checkpoint.header(newest)["step"]
    assert metrics["status"] == "interrupted" and len(metrics["history"]) == step >= 3
    target = step + 2
    code, out, err = main(["train", *flags, "--epochs", str(target), "--resume", "--out",
                           str(d)], capsys)
    assert code == 0 and f"from epoch {step}" in out, err
    fresh = tmp_path / "F"
    assert main(["train", *flags, "--epochs", str(target), "--out", str(fresh)],
                capsys)[0] == 0
    a = checkpoint.restore(checkpoint.latest(d / "checkpoints"))
    b = checkpoint.restore(checkpoint.latest(fresh / "checkpoints"))
    assert a.step == b.step == target
    for x, y in zip(jax_leaves(a.params), jax_leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_an_interrupted_fit_writes_metrics_with_its_last_complete_epoch(tmp_path):
    """issue 22 item 9: Ctrl-C (KeyboardInterrupt) in fit leaves metrics.json with
    ``"status": "interrupted"`` and the history of the last complete checkpoint."""
    model, params, xy = tiny()

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.fit(model, params, xy, "mse", "sgd", epochs=5, batch_size=4, progress=False,
                  run_dir=tmp_path / "D", on_epoch=stop)
    metrics = json.loads((tmp_path / "D" / rundir.METRICS_FILE).read_text())
    assert metrics["status"] == "interrupted" and [r["epoch"] for r in metrics["history"]] == [
        1, 2]
    done = train.fit(model, params, xy, "mse", "sgd", epochs=3, batch_size=4, progress=False,
                     run_dir=tmp_path / "D", resume=True)
    assert done.resumed_from is not None and done.epochs_done == 3


@pytest.mark.slow
def test_a_run_directory_holds_one_run(xor_run, tmp_path, capsys):
    """issue 22 item 16: continuing another run's checkpoint in D (same settings) is refused
    before anything changes, and ``eval D --checkpoint OTHER`` does not evaluate the other
    model as D's."""
    other = tmp_path / "other"
    assert main(["train", *XOR, "--epochs", "3", "--out", str(other)], capsys)[0] == 0
    foreign = checkpoint.latest(other / "checkpoints")
    before, theirs = snapshot(xor_run), snapshot(other)
    code, _, err = main(["train", *XOR, "--epochs", "3", "--resume", "--out", str(xor_run),
                         "--from-checkpoint", foreign], capsys)
    assert code == 2 and f"belongs to run {run_id(other)}" in err, err
    assert f"holds run {run_id(xor_run)}" in err and "--from-checkpoint PATH" in err
    code, out, err = main(["eval", str(xor_run), "--checkpoint", foreign], capsys)
    assert code == 2 and f"belongs to run {run_id(other)}" in err and "accuracy" not in out
    assert snapshot(xor_run) == before and snapshot(other) == theirs
