"""Datasets and mini-batches: shipped digits, local MNIST files, synthetic problems.

Every loader returns a :class:`Dataset` whose arrays already live on the default
device (``jax.Array``), so batching never copies the data back and forth::

    train, test = funnn.data.load("digits")                 # x: (1437, 64) float32 in [0, 1]
    for xb, yb in funnn.data.batches(train, 32, key=k):     # one shuffle per epoch, on device
        ...
    xb, yb = funnn.data.epoch_batches(train.x, train.y, 32, k)  # (44, 32, 64), (44, 32)

Nothing downloads: the digits ship inside the package (``funnn/_data/digits.npz``,
checked against a sha256 on load), MNIST is read from IDX files the user already
has, and the synthetic problems are generated from an explicit PRNG key.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import io
import math
import os
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from funnn.core import ConfigError, DataError

__all__ = [
    "Dataset", "load", "NAMES",
    "load_digits", "DIGITS_SHA256", "load_mnist", "MNIST_FILES", "read_idx", "write_idx",
    "xor", "spirals", "teacher_regression", "seed_linear",
    "batches", "epoch_batches", "epoch_order", "num_batches",
]


class Dataset(NamedTuple):
    """Examples ``x`` (leading axis = example) and targets ``y``.

    ``y`` holds int32 class labels when ``num_classes > 0`` and float32 regression
    targets of shape ``(n, out)`` when ``num_classes == 0``.
    """

    x: jax.Array
    y: jax.Array
    num_classes: int
    name: str

    @property
    def n(self) -> int:
        """The number of examples (``len(dataset)`` is the tuple's length, 4)."""
        return int(self.x.shape[0])


def _dataset(x, y, num_classes: int, name: str) -> Dataset:
    return Dataset(jnp.asarray(x, jnp.float32), jnp.asarray(y), int(num_classes), name)


# --------------------------------------------------------------------------- digits

#: sha256 of ``funnn/_data/digits.npz``; see ``funnn/_data/DIGITS_LICENSE.txt``.
DIGITS_SHA256 = "305689653b44dba53bbc7a39d3e831a795c229c86e509d0a12d6b7fb1e3a0377"
_DIGITS_FILE = "digits.npz"
_SPLITS = ("train", "test", "all")


def _digits_bytes() -> bytes:
    return (importlib.resources.files("funnn") / "_data" / _DIGITS_FILE).read_bytes()


def _digits_arrays(raw: bytes | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (1797, 8, 8), labels uint8 (1797,), is_test bool (1797,))``, verified."""
    if raw is None:
        try:
            raw = _digits_bytes()
        except OSError as err:
            raise DataError(f"digits: cannot read the shipped file funnn/_data/{_DIGITS_FILE} "
                            f"({err}); reinstall funnn") from None
    got = hashlib.sha256(raw).hexdigest()
    if got != DIGITS_SHA256:
        raise DataError(f"digits: funnn/_data/{_DIGITS_FILE} has sha256 {got}, expected "
                        f"{DIGITS_SHA256}; the file is corrupt, reinstall funnn")
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return z["images"], z["labels"], z["is_test"]


def load_digits(split: str = "train", flatten: bool = True, scale: bool = True) -> Dataset:
    """The 1,797 8x8 handwritten digits (UCI, Alpaydin & Kaynak 1998, CC BY 4.0).

    ``split``: ``"train"`` (1,437), ``"test"`` (360, a fixed stratified 20% stored in
    the file) or ``"all"`` (1,797, original order). ``x``: ``(n, 64)`` when
    ``flatten`` else ``(n, 8, 8, 1)``; float32, pixel counts 0..16, divided by 16
    when ``scale``. ``y``: int32 digits 0..9.
    """
    if split not in _SPLITS:
        raise ConfigError(f"digits: unknown split {split!r}; expected one of {_SPLITS}")
    images, labels, is_test = _digits_arrays()
    keep = {"train": ~is_test, "test": is_test, "all": np.ones_like(is_test)}[split]
    x = images[keep].astype(np.float32)
    x = x / 16.0 if scale else x
    x = x.reshape(len(x), 64) if flatten else x[..., None]
    return _dataset(x, labels[keep].astype(np.int32), 10, f"digits:{split}")


# --------------------------------------------------------------------------- IDX / MNIST

# IDX type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}

#: file names looked for by :func:`load_mnist`, per split (``.gz`` also accepted).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return gzip.decompress(raw) if path.endswith(".gz") else raw
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err}); is the file "
                        f"complete and, for .gz, a valid gzip stream?") from None


def read_idx(path: str, magic: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) into a native-endian numpy array.

    Header: 2 zero bytes, a type code, the rank ``d``, then ``d`` big-endian uint32
    sizes; the data follow, big-endian, exactly ``prod(sizes) * itemsize`` bytes.
    ``magic`` (e.g. 2051 for MNIST images) is checked when given.
    """
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: file has {len(raw)} bytes, too short for an IDX header (4+)")
    got_magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if magic is not None and got_magic != magic:
        raise DataError(f"{path}: bad IDX magic number {got_magic}, expected {magic}; "
                        f"is this the right file?")
    if raw[0] or raw[1] or code not in _IDX_TYPES:
        raise DataError(f"{path}: bad IDX magic number {got_magic} (0x{got_magic:08x}); "
                        f"expected 0x0000TTDD with type TT in {sorted(_IDX_TYPES)}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated header: expected {head} bytes for {ndim} "
                        f"dimensions, got {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[code])
    want = head + math.prod(shape) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "too long"
        raise DataError(f"{path}: file {what}: shape {shape} of {dtype.name} needs {want} "
                        f"bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    dtypes: uint8, int8, int16, int32, float32, float64 (the IDX types); the
    inverse of :func:`read_idx`.
    """
    a = np.asarray(array)
    code = _IDX_CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise DataError(f"write_idx({path}): dtype {a.dtype} has no IDX type; use one of "
                        f"uint8, int8, int16, int32, float32, float64")
    if a.ndim > 255 or any(d >= 2 ** 32 for d in a.shape):
        raise DataError(f"write_idx({path}): shape {a.shape} does not fit an IDX header")
    raw = bytes([0, 0, code, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    raw += a.astype(_IDX_TYPES[code]).tobytes()
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if path.endswith(".gz") else raw)


def _find(directory: str, stem: str) -> str:
    dotted = stem.replace("-idx", ".idx")          # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    names = [n for pair in MNIST_FILES.values() for n in pair]
    raise DataError(f"mnist: {os.path.join(directory, stem)}[.gz] not found; the directory "
                    f"must hold the IDX files {names} (raw or .gz)")


def load_mnist(directory: str, split: str = "train", flatten: bool = True,
               scale: bool = True) -> Dataset:
    """MNIST (or any MNIST-format set, e.g. Fashion-MNIST) from local IDX files.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``directory``.
    ``x``: ``(n, rows*cols)`` when ``flatten`` else ``(n, rows, cols, 1)``; float32,
    divided by 255 when ``scale``. ``y``: int32 labels 0..9.
    """
    if split not in MNIST_FILES:
        raise ConfigError(f"mnist: unknown split {split!r}; expected 'train' or 'test'")
    directory = os.fspath(directory)
    names = [n for pair in MNIST_FILES.values() for n in pair]
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DataError(f"mnist: {directory!r} is a file, not a directory; mnist:DIR names "
                        f"the directory that holds the IDX files {names} (raw or .gz)")
    if not os.path.isdir(directory):
        raise DataError(f"mnist: directory {directory!r} does not exist; it must hold the "
                        f"IDX files {names} (raw or .gz)")
    img_path, lab_path = (_find(directory, s) for s in MNIST_FILES[split])
    images = read_idx(img_path, magic=2051)
    labels = read_idx(lab_path, magic=2049)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"mnist: {img_path} must hold images (n, rows, cols) and {lab_path} "
                        f"labels (n,); got shapes {images.shape} and {labels.shape}")
    if len(images) == 0:
        raise DataError(f"mnist: the {split} split is empty: {img_path} holds no images")
    if len(images) != len(labels):
        raise DataError(f"mnist: {img_path} holds {len(images)} images but {lab_path} holds "
                        f"{len(labels)} labels; expected equal counts")
    if labels.size and labels.max() > 9:
        raise DataError(f"mnist: {lab_path}: labels must be 0..9, found {int(labels.max())}")
    x = images.astype(np.float32)
    x = x / 255.0 if scale else x
    x = x.reshape(len(x), -1) if flatten else x[..., None]
    return _dataset(x, labels.astype(np.int32), 10, f"mnist:{split}")


# --------------------------------------------------------------------------- synthetic


def xor(n: int = 4, key=None, noise: float = 0.0) -> Dataset:
    """The XOR problem: points near the corners of the unit square, label ``a xor b``.

    Corner ``i % 4`` of ``(0,0), (0,1), (1,0), (1,1)`` for example ``i`` (balanced);
    with a ``key`` the examples are shuffled and N(0, noise^2) is added to ``x``.
    ``x``: (n, 2) float32, ``y``: (n,) int32 in {0, 1}. ``xor()`` is the truth table.
    """
    n = _positive("xor", "n", n)
    if key is None:
        if noise:
            raise ConfigError(f"xor: noise={noise} needs a PRNG key; pass key=jax.random.key(0)")
        idx = np.arange(n) % 4
        return _dataset(_CORNERS[idx], ((idx == 1) | (idx == 2)).astype(np.int32), 2, "xor")
    x, y = _xor(key, jnp.float32(noise), n)
    return Dataset(x, y, 2, "xor")


_CORNERS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)


@functools.partial(jax.jit, static_argnums=2)
def _xor(key, noise, n):
    k_perm, k_noise = jax.random.split(key)
    idx = jax.random.permutation(k_perm, jnp.arange(n) % 4)
    x = jnp.asarray(_CORNERS)[idx] + noise * jax.random.normal(k_noise, (n, 2), jnp.float32)
    return x, ((idx == 1) | (idx == 2)).astype(jnp.int32)


def spirals(n: int, key, noise: float = 0.1, turns: float = 1.5) -> Dataset:
    """Two interleaved spirals in the plane (a classic non-linear 2-class problem).

    Class ``c`` point at angle ``t`` in ``[0.25, 1] * turns * 2 pi``:
    ``r = t / (turns * 2 pi)``, ``x = r (cos(t + c pi), sin(t + c pi)) + N(0, noise^2)``.
    ``x``: (n, 2) float32 within about [-1, 1]; ``y``: (n,) int32, alternating 0, 1.
    """
    n = _positive("spirals", "n", n)
    if key is None:
        raise ConfigError("spirals: needs a PRNG key; pass key=jax.random.key(0)")
    x, y = _spirals(key, jnp.float32(noise), jnp.float32(turns), n)
    return Dataset(x, y, 2, "spirals")


@functools.partial(jax.jit, static_argnums=3)
def _spirals(key, noise, turns, n):
    k_t, k_noise = jax.random.split(key)
    y = jnp.arange(n, dtype=jnp.int32) % 2
    span = turns * 2 * jnp.float32(np.pi)
    t = span * (0.25 + 0.75 * jax.random.uniform(k_t, (n,), jnp.float32))
    ang = t + jnp.float32(np.pi) * y
    x = (t / span)[:, None] * jnp.stack([jnp.cos(ang), jnp.sin(ang)], axis=1)
    return x + noise * jax.random.normal(k_noise, x.shape, jnp.float32), y


def teacher_regression(n: int, key, in_dim: int = 4, out_dim: int = 1, hidden: int = 16,
                       noise: float = 0.0, data_key=None) -> Dataset:
    """Regression on the outputs of a random one-hidden-layer tanh "teacher" network.

    ``x ~ N(0, I)``, ``y = tanh(x @ W1 + b1) @ W2 + b2 + N(0, noise^2)`` with
    ``W1 ~ N(0, 1/in_dim)``, ``W2 ~ N(0, 1/hidden)``, ``b ~ N(0, 0.1^2)``.
    ``x``: (n, in_dim) float32, ``y``: (n, out_dim) float32; ``num_classes`` is 0.
    The teacher is drawn from ``key``; ``x`` and the noise from ``data_key``
    (default: derived from ``key``), so one teacher can make train and test sets.
    """
    n = _positive("teacher", "n", n)
    for what, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
        _positive("teacher", what, v)
    if key is None:
        raise ConfigError("teacher: needs a PRNG key; pass key=jax.random.key(0)")
    x, y = _teacher(key, data_key, jnp.float32(noise), n, int(in_dim), int(out_dim), int(hidden))
    return Dataset(x, y, 0, "teacher")


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _teacher(key, data_key, noise, n, in_dim, out_dim, hidden):
    k_teacher, k_data = jax.random.split(key)
    k_x, k_noise = jax.random.split(k_data if data_key is None else data_key)
    k1, k2, k3, k4 = jax.random.split(k_teacher, 4)
    f = jnp.float32
    w1 = jax.random.normal(k1, (in_dim, hidden), f) / math.sqrt(in_dim)
    b1 = 0.1 * jax.random.normal(k2, (hidden,), f)
    w2 = jax.random.normal(k3, (hidden, out_dim), f) / math.sqrt(hidden)
    b2 = 0.1 * jax.random.normal(k4, (out_dim,), f)
    x = jax.random.normal(k_x, (n, in_dim), f)
    y = jnp.tanh(x @ w1 + b1) @ w2 + b2
    return x, y + noise * jax.random.normal(k_noise, y.shape, f)


def seed_linear(dtype=jnp.float32) -> Dataset:
    """The seed notes' "unknown function" data (001, section 4.1): ``t = X @ [2, -1, 5]^T``.

    ``X = [[4,9,1],[2,5,6],[1,8,3]]`` (3, 3), ``t = [[4],[29],[9]]`` (3, 1); regression.
    """
    x = np.array([[4.0, 9.0, 1.0], [2.0, 5.0, 6.0], [1.0, 8.0, 3.0]])
    t = x @ np.array([[2.0, -1.0, 5.0]]).T
    return Dataset(jnp.asarray(x, dtype), jnp.asarray(t, dtype), 0, "seed_linear")


def _positive(where: str, what: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ConfigError(f"{where}: {what} must be a positive int, got {v!r}")
    return int(v)


# --------------------------------------------------------------------------- by name

#: names accepted by :func:`load` (``"mnist:DIR"`` carries its directory).
NAMES = ("digits", "mnist:DIR", "xor", "spirals", "teacher")


def load(name: str, **kw) -> tuple[Dataset, Dataset]:
    """``(train, test)`` for a dataset named as on the command line.

    ``"digits"`` (kw: flatten, scale), ``"mnist:DIR"`` (kw: flatten, scale),
    ``"xor"`` / ``"spirals"`` / ``"teacher"`` (kw: ``n`` train size, ``n_test``,
    ``seed`` (default 0) or ``key``, and the generator's own keywords).
    """
    base, _, arg = str(name).partition(":")
    try:
        if base == "digits" and not arg:
            return load_digits("train", **kw), load_digits("test", **kw)
        if base == "mnist":
            directory = arg or kw.pop("directory", "")
            if not directory:
                raise ConfigError("mnist needs a directory: use 'mnist:/path/to/idx/files'")
            train, test = load_mnist(directory, "train", **kw), load_mnist(directory, "test", **kw)
            if train.x.shape[1:] != test.x.shape[1:]:
                raise DataError(f"mnist: the test images have shape {test.x.shape[1:]} but the "
                                f"training images {train.x.shape[1:]} (in {directory}); both "
                                f"splits must have images of one size")
            return train, test
        if base in ("xor", "spirals", "teacher") and not arg:
            return _load_synthetic(base, **kw)
    except TypeError as err:  # an unexpected keyword argument
        raise ConfigError(f"load({name!r}): {err}") from None
    raise ConfigError(f"unknown dataset {name!r}; expected one of {list(NAMES)}")


def _load_synthetic(base: str, n: int | None = None, n_test: int | None = None, seed: int = 0,
                    key=None, **kw) -> tuple[Dataset, Dataset]:
    key = jax.random.key(seed) if key is None else key
    k_train, k_test, k_teacher = jax.random.split(key, 3)
    if base == "xor":
        n = 4 if n is None else n
        return xor(n, k_train, **kw), xor(n if n_test is None else n_test, k_test, **kw)
    n = 512 if n is None else n
    n_test = max(1, n // 4) if n_test is None else n_test
    if base == "spirals":
        return spirals(n, k_train, **kw), spirals(n_test, k_test, **kw)
    return (teacher_regression(n, k_teacher, data_key=k_train, **kw),
            teacher_regression(n_test, k_teacher, data_key=k_test, **kw))


# --------------------------------------------------------------------------- batching


def _batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch: ``n // batch_size``, plus one for a remainder unless ``drop_last``."""
    b = _batch_size(batch_size)
    return n // b if drop_last else -(-n // b)


def _xy(dataset):
    x, y = (dataset.x, dataset.y) if isinstance(dataset, Dataset) else dataset
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape[:1] != y.shape[:1]:
        raise DataError(f"batches: x has {x.shape[0]} examples but y has {y.shape[0]}; "
                        f"expected equal leading axes (x {x.shape}, y {y.shape})")
    return x, y


@jax.jit
def _permute(x, y, key):
    perm = jax.random.permutation(key, x.shape[0])
    return x[perm], y[perm]


def batches(dataset, batch_size: int, key=None, drop_last: bool = False
            ) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Iterate over one epoch of ``(x, y)`` mini-batches of ``batch_size`` examples.

    ``dataset``: a :class:`Dataset` or an ``(x, y)`` pair. With a ``key`` the whole
    set is permuted once, on device, then sliced; without, the order is kept. The
    last ``n % batch_size`` examples form a short final batch, or are skipped when
    ``drop_last`` (use it to keep one compiled shape).
    """
    b = _batch_size(batch_size)
    x, y = _xy(dataset)
    n = x.shape[0]
    if key is not None:
        x, y = _permute(x, y, key)
    for i in range(num_batches(n, b, drop_last)):
        yield _slice(x, y, i * b, min(b, n - i * b))


@functools.partial(jax.jit, static_argnums=3)
def _slice(x, y, start, size):
    return (jax.lax.dynamic_slice_in_dim(x, start, size),
            jax.lax.dynamic_slice_in_dim(y, start, size))


def epoch_batches(x, y, batch_size: int, key=None) -> tuple[jax.Array, jax.Array]:
    """One epoch as stacked batches ``(xb, yb)`` for a ``lax.scan`` over steps.

    ``x: (n, ...) -> xb: (n // batch_size, batch_size, ...)``, likewise ``y``. With a
    ``key`` the examples are permuted first (a fresh key per epoch gives a fresh
    order). The remainder ``n % batch_size`` is dropped: with a key, different
    examples each epoch; without, always the last ones. Pure and ``jit``-able with
    ``batch_size`` static (``jax.jit(epoch_batches, static_argnames="batch_size")``).
    """
    b = _batch_size(batch_size)
    n = x.shape[0]
    if y.shape[0] != n:
        raise DataError(f"epoch_batches: x has {n} examples but y has {y.shape[0]}; "
                        f"expected equal leading axes (x {x.shape}, y {y.shape})")
    nb = n // b
    if nb == 0:
        raise ConfigError(f"epoch_batches: batch_size {b} is larger than the {n} examples; "
                          f"use batch_size <= {n}")
    idx = epoch_order(key, n, b).reshape(-1)
    return (jnp.take(x, idx, axis=0).reshape((nb, b) + x.shape[1:]),
            jnp.take(y, idx, axis=0).reshape((nb, b) + y.shape[1:]))


def epoch_order(key, num_examples: int, batch_size: int) -> jax.Array:
    """The examples of one epoch's batches: ``idx[i]`` are the rows of batch ``i``.

    ``(num_examples // batch_size, batch_size)`` int indices: a permutation by ``key``
    (``jax.random.permutation``) cut to whole batches, so the last
    ``num_examples % batch_size`` rows of that permutation sit the epoch out (different
    ones each epoch); without a key, the examples in order. This is the order
    :func:`epoch_batches`, :func:`funnn.train.fit` and the benchmarks train in.
    ``jit``-able with ``num_examples`` and ``batch_size`` static.
    """
    nb = num_examples // batch_size
    idx = jnp.arange(num_examples) if key is None else jax.random.permutation(key, num_examples)
    return idx[: nb * batch_size].reshape(nb, batch_size)
