"""funnn.checkpoint: bit-exact round trips, atomic writes, corruption detection."""

import collections
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funnn import checkpoint
from funnn import checkpoint as ckpt
from funnn.core import CheckpointError, ConfigError

OPT = optax.adam(1e-2)
_update = jax.jit(OPT.update)      # one compile, shared by every test (same tree, same dtypes)


def _state():
    """Params, an optax adam state after one real update, and a split typed key."""
    k = jax.random.key(42)
    layer0 = {"W": jnp.arange(6.0).reshape(3, 2) / 7, "b": jnp.full(2, 0.1, jnp.float32)}
    params = {"dense": (layer0, {"W": jnp.asarray([[1.5], [-2.25]])}),
              "scale": 0.5, "tag": None}
    opt_state = OPT.init(params)
    grads = jax.tree_util.tree_map(lambda p: p + 1.0, params)
    _, opt_state = _update(grads, opt_state, params)
    return params, opt_state, jax.random.split(k)[1]


def _leaves_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # bit-exact


def test_round_trip_with_template(tmp_path):
    params, opt_state, key = _state()
    config = {"layers": [64, 30, 10], "act": "sigmoid", "lr": 0.01}
    meta = {"loss": [2.3, np.float32(1.25), jnp.asarray(0.5)], "note": "épreuve"}
    path = ckpt.save(tmp_path / "a.safetensors", params=params, opt_state=opt_state,
                     step=123, key=key, config=config, metadata=meta)
    assert os.fspath(path) == os.fspath(tmp_path / "a.safetensors")
    ck = ckpt.restore(path, like={"params": params, "opt_state": opt_state, "key": key})
    _leaves_equal(ck.params, params)
    _leaves_equal(ck.opt_state, opt_state)                  # same optax classes, same values
    assert type(ck.opt_state[0]) is type(opt_state[0])
    assert jax.random.key_impl(ck.key) == jax.random.key_impl(key)
    _leaves_equal(ck.key, key)
    np.testing.assert_array_equal(np.asarray(jax.random.normal(ck.key, (3,))),
                                  np.asarray(jax.random.normal(key, (3,))))
    assert ck.step == 123 and isinstance(ck.step, int)
    assert ck.config == config
    assert ck.metadata == {"loss": [2.3, 1.25, 0.5], "note": "épreuve"}
    # training resumes identically: one more optax step from each state
    g = jax.tree_util.tree_map(lambda p: p - 0.25, params)
    u1, s1 = _update(g, opt_state, params)
    u2, s2 = _update(g, ck.opt_state, ck.params)
    _leaves_equal(u1, u2)
    _leaves_equal(s1, s2)


def test_round_trip_without_template(tmp_path):
    params, opt_state, key = _state()
    path = ckpt.save(tmp_path / "a.safetensors", params=params, opt_state=opt_state, key=key)
    ck = ckpt.restore(path)
    _leaves_equal(ck.params, params)                           # dicts, tuples, None, scalars
    adam = ck.opt_state[0]                                      # re-created namedtuple
    assert type(adam).__name__ == "ScaleByAdamState" and adam._fields == ("count", "mu", "nu")
    _leaves_equal(adam.mu, opt_state[0].mu)
    assert int(adam.count) == 1 and adam.count.dtype == jnp.int32
    assert ck.step == 0 and ck.config is None and ck.metadata is None
    _leaves_equal(ck.key, key)


def test_odd_leaves_round_trip(tmp_path):
    tree = {"bf16": jnp.asarray([1.5, -2.0], jnp.bfloat16),
            "big_endian": np.arange(3, dtype=">f8"),
            "c128": np.asarray([1 + 2j], np.complex128),
            "bool": np.asarray([True, False]),
            "empty": np.zeros((0, 3), np.float32),
            "scalar": np.float64(2.5),
            "ints": [1, 2, {"deep": (np.int8(-3),)}],
            "od": collections.OrderedDict(z=jnp.ones(1), a=jnp.zeros(1)),
            7: "seven", "a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}   # colliding paths
    raw_key = jax.random.PRNGKey(5)                                    # uint32 (2,)
    rbg = jax.random.key(3, impl="rbg")
    path = ckpt.save(tmp_path / "odd.safetensors", params=tree, key={"raw": raw_key, "rbg": rbg})
    ck = ckpt.restore(path)
    assert ck.params["bf16"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ck.params["bf16"], np.float32), [1.5, -2.0])
    np.testing.assert_array_equal(np.asarray(ck.params["big_endian"]), [0.0, 1.0, 2.0])
    assert ck.params["c128"].dtype == jnp.complex128 and complex(ck.params["c128"][0]) == 1 + 2j
    assert ck.params["empty"].shape == (0, 3) and ck.params["scalar"].shape == ()
    assert ck.params["ints"][:2] == [1, 2] and int(ck.params["ints"][2]["deep"][0]) == -3
    assert list(ck.params["od"]) == ["z", "a"] and ck.params[7] == "seven"
    np.testing.assert_array_equal(np.asarray(ck.params["a.b"]), [1, 1])
    np.testing.assert_array_equal(np.asarray(ck.params["a"]["b"]), [0, 0])
    assert ck.key["raw"].dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(ck.key["raw"]), np.asarray(raw_key))
    assert jax.random.key_impl(ck.key["rbg"]) == jax.random.key_impl(rbg)
    _leaves_equal(ck.key["rbg"], rbg)
    like = ckpt.restore(path, like={"params": tree})
    assert isinstance(like.params["od"], collections.OrderedDict)


def test_template_mismatch_names_the_leaf(tmp_path):
    params, opt_state, _ = _state()
    path = ckpt.save(tmp_path / "a.safetensors", params=params, opt_state=opt_state)
    wrong = {**params, "dense": ({"W": jnp.zeros((3, 4)), "b": params["dense"][0]["b"]},
                                 params["dense"][1])}
    with pytest.raises(CheckpointError, match=r"params\.dense\.0\.W: checkpoint has array "
                       r"float64\(3, 2\), template has array float64\(3, 4\)"):
        ckpt.restore(path, like={"params": wrong})
    f32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    with pytest.raises(CheckpointError, match=r"opt_state\.0\.mu\.dense\.0\.W.*float32"):
        ckpt.restore(path, like={"opt_state": OPT.init(f32)})
    with pytest.raises(CheckpointError, match="namedtuple EmptyState"):
        ckpt.restore(path, like={"opt_state": optax.sgd(0.1).init(params)})
    with pytest.raises(ConfigError, match="like must be"):
        ckpt.restore(path, like=params)                          # the params, not a dict of trees
    shapes = jax.eval_shape(lambda: params)                      # ShapeDtypeStruct templates
    _leaves_equal(ckpt.restore(path, like={"params": shapes}).params,
                  jax.tree_util.tree_map(jnp.asarray, params))


def _saved(tmp_path):
    params, opt_state, key = _state()
    path = ckpt.save(tmp_path / "c.safetensors", params=params, opt_state=opt_state, step=3,
                     key=key, metadata={"acc": [0.5]})
    return path, open(path, "rb").read()


@pytest.mark.parametrize("keep", [0, 5, 8, 100, 0.5, -1], ids=lambda k: f"keep{k}")
def test_truncated_file(tmp_path, keep):
    path, raw = _saved(tmp_path)
    n = int(keep * len(raw)) if isinstance(keep, float) else (
        len(raw) + keep if keep < 0 else keep)
    open(path, "wb").write(raw[:n])
    with pytest.raises(CheckpointError, match=r"c.safetensors"):
        ckpt.restore(path)


def test_flipped_bytes_detected(tmp_path):
    path, raw = _saved(tmp_path)
    for pos in range(0, len(raw), max(1, len(raw) // 150)):    # header, padding and data
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        open(path, "wb").write(bytes(bad))
        with pytest.raises(CheckpointError, match=r"c.safetensors"):
            ckpt.restore(path)
    bad = bytearray(raw)
    bad[-1] ^= 0x01                                             # one bit of the last tensor
    open(path, "wb").write(bytes(bad))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.restore(path)


def test_foreign_and_missing_files(tmp_path):
    import safetensors.numpy as stn
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(stn.save({"w": np.ones(2, np.float32)}))
    with pytest.raises(CheckpointError, match="not a funnn checkpoint"):
        ckpt.restore(foreign)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*nope"):
        ckpt.restore(tmp_path / "nope.safetensors")


def _temp_files(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    path, raw = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"params\.bad: cannot save a value of type object"):
        ckpt.save(path, params={"bad": object()})
    with pytest.raises(CheckpointError, match="config must be JSON"):
        ckpt.save(path, params={}, config={"f": print})
    with pytest.raises(CheckpointError, match="step must be a non-negative int"):
        ckpt.save(path, params={}, step=1.5)

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="No space left on device"):
        ckpt.save(path, params={"w": jnp.ones(3)}, step=4)
    monkeypatch.undo()
    assert open(path, "rb").read() == raw and not _temp_files(tmp_path)
    assert ckpt.restore(path).step == 3


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*file/sub/a.safetensors"):
        ckpt.save(blocker / "sub" / "a.safetensors", params={"w": jnp.ones(2)})
    with pytest.raises(CheckpointError, match="not a directory"):
        ckpt.save_in(blocker, 1, params={})
    if os.geteuid() != 0:                                       # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(CheckpointError, match="ro"):
                ckpt.save(ro / "a.safetensors", params={})
        finally:
            ro.chmod(0o700)


def test_save_in_keeps_last_k_and_latest(tmp_path):
    run = tmp_path / "run"
    assert ckpt.latest(run) is None
    w = {"w": jnp.ones(2)}
    for step in (1, 2, 9, 10):
        ckpt.save_in(run, step, params=w, keep=2, metadata={"step": step})
    names = sorted(os.listdir(run))
    assert names == ["ckpt_00000009.safetensors", "ckpt_00000010.safetensors"]
    assert ckpt.latest(run).endswith("ckpt_00000010.safetensors")
    assert ckpt.restore(ckpt.latest(run)).step == 10
    ckpt.save(run / "ckpt_99.safetensors", params=w, step=99)   # numeric, not lexical order
    (run / ".ckpt_00000100.safetensors.x.tmp").write_bytes(b"junk")  # a crashed write
    assert ckpt.latest(run).endswith("ckpt_99.safetensors")
    assert [s for s, _ in ckpt.checkpoints(run)] == [9, 10, 99]
    with pytest.raises(ConfigError, match="keep"):
        ckpt.save_in(run, 11, params=w, keep=0)


def test_file_is_plain_safetensors(tmp_path):
    params, opt_state, key = _state()
    path = ckpt.save(tmp_path / "a.safetensors", params=params, opt_state=opt_state, key=key)
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    desc = json.loads(header["__metadata__"]["funnn"])
    assert desc["format"] == ckpt.FORMAT
    assert {"params/dense.0.W", "opt_state/0.mu.dense.1.W", "key"} <= set(header)
    assert header["params/dense.0.W"]["shape"] == [3, 2] and header["key"]["dtype"] == "U32"


# ----- moved from tests/test_runs.py


def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path):
    d = tmp_path / "c"
    checkpoint.save_in(d, 99, params={"w": np.ones(2)}, run="other")
    (d / "ckpt_00000098.safetensors").write_bytes(b"not a checkpoint")
    for step in range(1, 6):
        checkpoint.save_in(d, step, params={"w": np.ones(2)}, run="mine", keep=2)
    assert [s for s, _ in checkpoint.checkpoints(d)] == [4, 5, 98, 99]


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


def test_a_copied_checkpoint_is_ordered_by_its_header_and_never_pruned(tmp_path):
    """issue 22 item 4: ``cp ckpt_3 ckpt_9`` must not make step 3 the newest, nor let
    pruning delete the real newer ones; the misnamed copy itself is never deleted."""
    d = tmp_path / "c"
    for step in range(1, 6):
        checkpoint.save_in(d, step, params={"w": np.full(2, step)}, run="mine", keep=3)
    stale = d / "ckpt_00000009.safetensors"
    stale.write_bytes((d / "ckpt_00000003.safetensors").read_bytes())
    assert checkpoint.latest(d) == str(d / "ckpt_00000005.safetensors")
    found = checkpoint.scan(d, "mine")
    assert [(f.step, f.named, f.misnamed) for f in found] == [
        (3, 3, False), (3, 9, True), (4, 4, False), (5, 5, False)] or \
        [(f.step, f.named, f.misnamed) for f in found] == [
        (3, 9, True), (3, 3, False), (4, 4, False), (5, 5, False)]
    before = stale.read_bytes()
    for step in (6, 7):
        checkpoint.save_in(d, step, params={"w": np.full(2, step)}, run="mine", keep=3)
    assert [s for s, _ in checkpoint.checkpoints(d)] == [5, 6, 7, 9]
    assert stale.read_bytes() == before
    assert checkpoint.latest(d) == str(d / "ckpt_00000007.safetensors")


def _alarm(seconds):
    """A guard: a read that blocks or runs away fails the test instead of hanging it."""
    import signal

    def fire(*_):
        raise TimeoutError("the checkpoint read blocked")
    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("read", [ckpt.header, ckpt.restore])
def test_special_files_are_refused_without_blocking(tmp_path, read):
    """issue 22 item 11: a FIFO or a symlink to /dev/zero named like a checkpoint is refused at
    once (no hang, no read until MemoryError)."""
    import signal
    fifo = tmp_path / "ckpt_00000001.safetensors"
    os.mkfifo(fifo)
    zero = tmp_path / "ckpt_00000002.safetensors"
    zero.symlink_to("/dev/zero")
    _alarm(10)
    try:
        with pytest.raises(CheckpointError, match="is a FIFO, not a regular file"):
            read(fifo)
        with pytest.raises(CheckpointError, match="is a device or special file"):
            read(zero)
        with pytest.raises(CheckpointError, match="is a directory"):
            read(tmp_path)
    finally:
        signal.alarm(0)


def test_the_body_is_read_only_as_large_as_the_header_announces(tmp_path):
    """issue 22 item 11: a checkpoint grown to 8 GiB (sparse) is refused from its header's
    size before the body is read; a symlink to an intact checkpoint still reads."""
    import signal
    path = ckpt.save(tmp_path / "a.safetensors", params={"w": np.ones(3)})
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(8 << 30)
    _alarm(10)
    try:
        with pytest.raises(CheckpointError, match=r"its header announces .* the file has"):
            ckpt.restore(path)
    finally:
        signal.alarm(0)
    with open(path, "r+b") as f:
        f.truncate(size)
    (tmp_path / "link.safetensors").symlink_to(path)
    np.testing.assert_array_equal(ckpt.restore(tmp_path / "link.safetensors").params["w"],
                                  np.ones(3))


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    """issue 22 item 17: ENOSPC is named as a full disk, not as an unwritable directory."""
    import errno

    from funnn import _files

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(_files, "write_atomic", full)
    with pytest.raises(CheckpointError, match=r"No space left on device; the disk holding .* "
                                              r"is full"):
        ckpt.save(tmp_path / "a.safetensors", params={"w": np.ones(2)})
