"""funnn.data: shipped digits, IDX/MNIST files, synthetic sets, batching."""

import hashlib
import importlib.resources
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnn import data
from funnn.core import ConfigError, DataError

# --------------------------------------------------------------------------- digits

# Per-class counts of the UCI test set that scikit-learn ships (digits.csv.gz).
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
# The first two rows of digits.csv.gz: 64 pixels, then the label.
ROW0 = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12,
        0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0,
        0, 0, 0, 6, 13, 10, 0, 0, 0]
ROW1 = [0, 0, 0, 12, 13, 5, 0, 0, 0, 0, 0, 11, 16, 9, 0, 0, 0, 0, 3, 15, 16, 6, 0, 0, 0, 7,
        15, 16, 16, 2, 0, 0, 0, 0, 1, 16, 16, 3, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 1, 16,
        16, 6, 0, 0, 0, 0, 0, 11, 16, 10, 0, 0]


def test_digits_all_matches_source():
    d = data.load_digits("all", scale=False)
    assert d.x.shape == (1797, 64) and d.x.dtype == jnp.float32 and d.y.dtype == jnp.int32
    assert d.num_classes == 10 and d.n == 1797
    x, y = np.asarray(d.x), np.asarray(d.y)
    np.testing.assert_array_equal(x[0], ROW0)
    np.testing.assert_array_equal(x[1], ROW1)
    assert (y[0], y[1]) == (0, 1)
    assert x.min() == 0 and x.max() == 16 and np.all(x == np.round(x))
    np.testing.assert_array_equal(np.bincount(y, minlength=10), DIGIT_COUNTS)


def test_digits_scale_and_image_layout():
    flat = np.asarray(data.load_digits("test").x)
    raw = np.asarray(data.load_digits("test", scale=False).x)
    img = np.asarray(data.load_digits("test", flatten=False).x)
    assert flat.min() >= 0 and flat.max() <= 1
    np.testing.assert_array_equal(flat, raw / 16)
    assert img.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(img.reshape(360, 64), flat)  # row-major 8x8 pixels


def test_digits_split_fixed_disjoint_stratified():
    tr, te = data.load("digits")
    assert (tr.x.shape, te.x.shape) == ((1437, 64), (360, 64))
    _images, _labels, is_test = data._digits_arrays()
    assert is_test.sum() == 360
    all_ = data.load_digits("all")
    np.testing.assert_array_equal(np.asarray(all_.x)[~is_test], np.asarray(tr.x))
    np.testing.assert_array_equal(np.asarray(all_.x)[is_test], np.asarray(te.x))
    np.testing.assert_array_equal(np.asarray(all_.y)[is_test], np.asarray(te.y))
    per_class = np.bincount(np.asarray(te.y), minlength=10)
    assert per_class.min() >= 34 and per_class.max() <= 37      # stratified 20%
    again = data.load_digits("test")
    np.testing.assert_array_equal(np.asarray(again.x), np.asarray(te.x))


def test_digits_checksum_verified(monkeypatch):
    raw = (importlib.resources.files("funnn") / "_data" / "digits.npz").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == data.DIGITS_SHA256
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0xFF
    monkeypatch.setattr(data, "_digits_bytes", lambda: bytes(bad))
    with pytest.raises(DataError, match="sha256"):
        data.load_digits()


def test_digits_license_shipped():
    text = (importlib.resources.files("funnn") / "_data" / "DIGITS_LICENSE.txt").read_text()
    assert "CC BY 4.0" in text and "Alpaydin" in text and data.DIGITS_SHA256 in text


def test_digits_bad_split():
    with pytest.raises(ConfigError, match="split"):
        data.load_digits("validation")


# --------------------------------------------------------------------------- IDX / MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path, gz, dtype):
    a = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    data.write_idx(p, a)
    b = data.read_idx(p)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_header_bytes(tmp_path):
    p = tmp_path / "x"
    data.write_idx(p, np.array([[1, 2, 3], [4, 5, 255]], np.uint8))
    raw = p.read_bytes()     # magic 0x00000802, dims 2 and 3 big-endian, then the bytes
    assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    data.write_idx(p, np.array([258], np.int32))
    assert p.read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 1, 2])


def _fake_mnist(directory, n_train=5, n_test=3, gz=False, hw=(4, 4)):
    rng = np.random.default_rng(0)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n,) + hw, dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        data.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), x)
        data.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), y)
        sets[prefix] = (x, y)
    return sets


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist(tmp_path, gz):
    sets = _fake_mnist(tmp_path, gz=gz)
    tr, te = data.load(f"mnist:{tmp_path}")
    x, y = sets["train"]
    assert tr.x.shape == (5, 16) and te.x.shape == (3, 16) and tr.num_classes == 10
    np.testing.assert_allclose(np.asarray(tr.x), x.reshape(5, 16) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tr.y), y)
    assert tr.y.dtype == jnp.int32
    img = data.load_mnist(tmp_path, "test", flatten=False, scale=False)
    assert img.x.shape == (3, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(img.x)[..., 0], sets["t10k"][0])


def test_mnist_bad_magic(tmp_path):
    _fake_mnist(tmp_path)
    labels = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels)    # labels where images belong
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        data.load_mnist(tmp_path)
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" + bytes(8))
    with pytest.raises(DataError, match="junk: bad IDX magic"):
        data.read_idx(tmp_path / "junk")


@pytest.mark.parametrize("cut", [3, 10, 20, -1], ids=["no-header", "mid-dims", "mid-data", "last"])
def test_idx_truncated(tmp_path, cut):
    p = tmp_path / "t10k-images-idx3-ubyte"
    data.write_idx(p, np.ones((3, 4, 4), np.uint8))
    raw = p.read_bytes()
    p.write_bytes(raw[:cut])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        data.read_idx(p)
    p.write_bytes(raw[:-1])
    with pytest.raises(DataError, match=r"truncated.*needs 64 bytes, got 63"):
        data.read_idx(p)


def test_idx_too_long_and_bad_gzip(tmp_path):
    p = tmp_path / "a"
    data.write_idx(p, np.ones((2, 2), np.uint8))
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"too long.*needs 16 bytes, got 17"):
        data.read_idx(p)
    g = tmp_path / "a.gz"
    data.write_idx(g, np.ones((2, 2), np.uint8))
    g.write_bytes(g.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"a.gz"):
        data.read_idx(g)


def test_mnist_count_mismatch(tmp_path):
    _fake_mnist(tmp_path)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"5 images but .* 4 labels"):
        data.load_mnist(tmp_path, "train")


def test_mnist_missing(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*train-images-idx3-ubyte"):
        data.load_mnist(tmp_path / "nope")
    with pytest.raises(DataError, match=r"not found.*t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path, "test")
    with pytest.raises(ConfigError, match="directory"):
        data.load("mnist")


def test_load_unknown_name():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar'.*digits.*spirals"):
        data.load("cifar")
    with pytest.raises(ConfigError, match="unexpected keyword"):
        data.load("digits", bogus=1)


# --------------------------------------------------------------------------- synthetic


def test_xor_truth_table_and_noisy():
    d = data.xor()
    np.testing.assert_array_equal(np.asarray(d.x), [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(np.asarray(d.y), [0, 1, 1, 0])
    n = data.xor(40, jax.random.key(1), noise=0.05)
    x, y = np.asarray(n.x), np.asarray(n.y)
    assert x.shape == (40, 2) and y.dtype == np.int32 and np.bincount(y).tolist() == [20, 20]
    corner = np.round(x).astype(int)
    np.testing.assert_array_equal(y, corner[:, 0] ^ corner[:, 1])
    assert 0 < np.abs(x - corner).max() < 0.5
    with pytest.raises(ConfigError, match="key"):
        data.xor(8, noise=0.1)


def test_spirals_geometry():
    d = data.spirals(50, jax.random.key(0), noise=0.0, turns=1.5)
    x, y = np.asarray(d.x, np.float64), np.asarray(d.y)
    assert x.shape == (50, 2) and d.num_classes == 2 and np.bincount(y).tolist() == [25, 25]
    span = 1.5 * 2 * math.pi
    r = np.hypot(x[:, 0], x[:, 1])
    assert r.min() >= 0.25 - 1e-6 and r.max() <= 1 + 1e-6
    ang = r * span + math.pi * y                  # radius encodes the angle on each arm
    np.testing.assert_allclose(x, r[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1),
                               atol=1e-4)
    a = data.spirals(50, jax.random.key(0))
    b = data.spirals(50, jax.random.key(0))
    c = data.spirals(50, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert not np.allclose(np.asarray(a.x), np.asarray(c.x))


def test_teacher_regression():
    k, dims = jax.random.key(2), dict(in_dim=3, out_dim=2, hidden=5)   # one shape: one compile
    d = data.teacher_regression(8, k, data_key=jax.random.key(7), **dims)
    assert d.x.shape == (8, 3) and d.y.shape == (8, 2) and d.num_classes == 0
    assert d.x.dtype == jnp.float32 and d.y.dtype == jnp.float32
    noisy = data.teacher_regression(8, k, data_key=jax.random.key(7), noise=0.1, **dims)
    np.testing.assert_array_equal(np.asarray(noisy.x), np.asarray(d.x))   # noise is on y only
    diff = np.asarray(noisy.y) - np.asarray(d.y)
    assert 0.03 < diff.std() < 0.3
    # data_key draws x only; key draws the teacher
    again = data.teacher_regression(8, k, data_key=jax.random.key(7), **dims)
    other = data.teacher_regression(8, jax.random.key(9), data_key=jax.random.key(7), **dims)
    np.testing.assert_array_equal(np.asarray(again.y), np.asarray(d.y))
    np.testing.assert_array_equal(np.asarray(other.x), np.asarray(d.x))
    assert not np.allclose(np.asarray(other.y), np.asarray(d.y))
    tr, te = data.load("teacher", n=8, n_test=8, **dims)
    assert tr.x.shape == (8, 3) and te.y.shape == (8, 2)
    assert not np.allclose(np.asarray(tr.x), np.asarray(te.x))
    with pytest.raises(ConfigError, match="hidden"):
        data.teacher_regression(4, k, hidden=0)


def test_seed_linear_values():
    d = data.seed_linear(jnp.float64)
    np.testing.assert_array_equal(np.asarray(d.x), [[4, 9, 1], [2, 5, 6], [1, 8, 3]])
    # 4*2 - 9 + 1*5 = 4;  2*2 - 5 + 6*5 = 29;  1*2 - 8 + 3*5 = 9
    np.testing.assert_array_equal(np.asarray(d.y), [[4.0], [29.0], [9.0]])
    assert d.y.dtype == jnp.float64 and data.seed_linear().x.dtype == jnp.float32


def test_load_synthetic_by_name():
    tr, te = data.load("spirals", n=50, n_test=50, seed=3)
    assert tr.x.shape == (50, 2) and te.x.shape == (50, 2)
    assert not np.allclose(np.asarray(tr.x), np.asarray(te.x))
    tr2, _ = data.load("spirals", n=50, n_test=50, seed=3)
    np.testing.assert_array_equal(np.asarray(tr.x), np.asarray(tr2.x))
    xtr, xte = data.load("xor", n=40, n_test=40, noise=0.05)
    assert xtr.x.shape == (40, 2) and np.bincount(np.asarray(xte.y)).tolist() == [20, 20]


# --------------------------------------------------------------------------- batching


def _toy(n=10):
    x = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 3), jnp.float32)
    return data.Dataset(x, 2 * jnp.arange(n, dtype=jnp.int32), 0, "toy")


def _ids(parts):
    return np.concatenate([np.asarray(xb)[:, 0] for xb, _ in parts]).astype(int)


def test_batches_cover_each_example_once():
    d = _toy(10)
    parts = list(data.batches(d, 3, key=jax.random.key(0)))
    assert [xb.shape for xb, _ in parts] == [(3, 3)] * 3 + [(1, 3)]
    ids = _ids(parts)
    assert sorted(ids.tolist()) == list(range(10)) and ids.tolist() != list(range(10))
    for xb, yb in parts:                      # x and y stay paired
        np.testing.assert_array_equal(np.asarray(yb), 2 * np.asarray(xb)[:, 0])
    dropped = list(data.batches(d, 3, key=jax.random.key(0), drop_last=True))
    assert len(dropped) == 3 and len(set(_ids(dropped).tolist())) == 9
    assert _ids(data.batches(d, 4)).tolist() == list(range(10))     # no key: original order


def test_batches_key_controls_order():
    d = _toy(10)
    a = _ids(data.batches(d, 3, key=jax.random.key(1)))
    b = _ids(data.batches(d, 3, key=jax.random.key(1)))
    c = _ids(data.batches(d, 3, key=jax.random.key(2)))
    raw = _ids(data.batches((d.x, d.y), 3, key=jax.random.key_data(jax.random.key(1))))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, raw)     # a raw uint32 key works the same
    assert a.tolist() != c.tolist() and sorted(c.tolist()) == list(range(10))


def test_epoch_batches():
    d = _toy(10)
    step = jax.jit(data.epoch_batches, static_argnames="batch_size")
    xb, yb = step(d.x, d.y, batch_size=3, key=jax.random.key(0))
    assert xb.shape == (3, 3, 3) and yb.shape == (3, 3)
    ids = np.asarray(xb)[..., 0].astype(int).ravel()
    assert len(set(ids.tolist())) == 9 and set(ids.tolist()) <= set(range(10))
    np.testing.assert_array_equal(np.asarray(yb), 2 * np.asarray(xb)[..., 0])
    ex, _ey = data.epoch_batches(d.x, d.y, 3, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ex), np.asarray(xb))
    other, _ = step(d.x, d.y, batch_size=3, key=jax.random.key(5))
    assert not np.array_equal(np.asarray(other), np.asarray(xb))
    plain, _ = data.epoch_batches(d.x, d.y, 5)
    np.testing.assert_array_equal(np.asarray(plain)[..., 0].ravel(), np.arange(10))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_batch_size_checked(bad):
    d = _toy(4)
    with pytest.raises(ConfigError, match="batch_size"):
        next(data.batches(d, bad))
    with pytest.raises(ConfigError, match="batch_size"):
        data.epoch_batches(d.x, d.y, bad)


def test_batching_errors():
    d = _toy(4)
    with pytest.raises(ConfigError, match="larger than the 4 examples"):
        data.epoch_batches(d.x, d.y, 5)
    with pytest.raises(DataError, match="4 examples but y has 3"):
        next(data.batches((d.x, d.y[:3]), 2))
    assert data.num_batches(10, 3) == 3 and data.num_batches(10, 3, drop_last=False) == 4


def test_mnist_dotted_names(tmp_path):
    sets = _fake_mnist(tmp_path, gz=True)
    for stem in ("t10k-images", "t10k-labels"):          # t10k-images.idx3-ubyte.gz style
        old = next(tmp_path.glob(f"{stem}-idx*"))
        old.rename(tmp_path / old.name.replace("-idx", ".idx"))
    te = data.load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(np.asarray(te.y), sets["t10k"][1])
