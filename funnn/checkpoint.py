"""Save and restore a training state: one safetensors file per checkpoint, no pickle.

A checkpoint holds the ``params`` pytree, the optimizer state (optax states are
NamedTuples of arrays), the ``step``, a PRNG ``key`` (typed or raw), the layers'
``model_state`` (batch-norm statistics), ``extras`` (arrays a prediction needs
besides the weights, e.g. input standardisation statistics), a JSON-able
``config``, free ``metadata`` (e.g. a metrics history) and the ``run`` id of the
run that wrote it::

    path = checkpoint.save_in("runs/a", step, params=p, opt_state=s, key=k, keep=3)
    ck = checkpoint.restore(checkpoint.latest("runs/a"),
                            like={"params": p, "opt_state": opt.init(p)})
    ck.params, ck.opt_state, ck.step, ck.key, ck.config, ck.metadata, ck.model_state

``train.fit`` and ``funnn train`` write exactly this layout, so the same call
restores their checkpoints (``train.restore_run`` does it from a run directory).

File layout: the array leaves are safetensors tensors named by tree path
(``params/0.W``, ``opt_state/0.mu/0.W``, ``key``); the safetensors metadata holds
``funnn`` (JSON: format version, step, config, metadata and each tree's structure
as nested JSON: ``dict`` with keys, ``list``/``tuple``, ``namedtuple`` with class
name and fields, ``none``, Python scalars, arrays and PRNG keys pointing at
tensors) and ``sha256``, a checksum over that JSON and every tensor's name,
dtype, shape and bytes, verified on load.

Writes are atomic (temp file in the same directory, fsync, ``os.replace``): a
failed save leaves the previous file intact. Every problem with a file is a
:class:`~funnn.core.CheckpointError` naming it.

Safety: loading never executes code: there is no pickle, only safetensors'
tensors and a JSON header interpreted as data. The sha256 catches accidental
damage (a flipped bit, a truncated copy); it is not a signature, and anyone who
can write the file can write a matching checksum, so it does not prove who wrote it.
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import json
import operator
import os
import re
import stat
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy as stn

from funnn import _files
from funnn.core import CheckpointError, ConfigError

__all__ = ["Checkpoint", "save", "restore", "latest", "save_in", "checkpoints", "header",
           "intact", "scan", "Found", "FORMAT"]

FORMAT = "funnn.checkpoint/2"
_READABLE = ("funnn.checkpoint/1", FORMAT)   # /1 had no model_state, extras or run id
_TREES = ("params", "opt_state", "key", "model_state", "extras")
_REQUIRED = ("params", "opt_state", "key")
_MAX_HEADER = 100_000_000
_NAME = re.compile(r"^ckpt_(\d+)\.safetensors$")
# dtypes safetensors stores natively; others (bfloat16, float8, complex128) go as raw bytes.
_NATIVE = {np.dtype(t) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1",
                                 "u8", "u4", "u2", "u1", "bool", "c8")}


class Checkpoint(NamedTuple):
    """A restored training state."""

    params: Any
    opt_state: Any
    step: int
    key: Any
    config: dict | None
    metadata: dict | None
    model_state: Any = None
    extras: Any = None
    run: str | None = None


# --------------------------------------------------------------------------- encoding


def _is_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and \
        jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _head(node, where: str) -> dict:
    """The description of ``node`` itself, without children or data (``"c"``, ``"n"``)."""
    if node is None:
        return {"t": "none"}
    if isinstance(node, (bool, int, float, str)) and not isinstance(node, np.generic):
        return {"t": "py", "v": node}
    if isinstance(node, jax.core.Tracer):
        raise CheckpointError(f"{where}: cannot save a traced value; save outside jit")
    if _is_key(node):
        impl = str(jax.random.key_impl(node)) if isinstance(node, jax.Array) else None
        return {"t": "key", "impl": impl, "shape": list(node.shape)}
    if isinstance(node, (np.ndarray, np.generic, jax.Array, jax.ShapeDtypeStruct)):
        return {"t": "array", "dtype": np.dtype(node.dtype).name, "shape": list(node.shape)}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return {"t": "namedtuple", "name": type(node).__name__, "fields": list(node._fields)}
    if isinstance(node, (tuple, list)):
        return {"t": "tuple" if isinstance(node, tuple) else "list", "len": len(node)}
    if isinstance(node, Mapping):
        keys = list(node.keys())
        bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (str, int))]
        if bad:
            raise CheckpointError(f"{where}: dict key {bad[0]!r} of type {type(bad[0]).__name__}"
                                  f" cannot be saved; use str or int keys")
        return {"t": "dict", "k": keys}
    raise CheckpointError(f"{where}: cannot save a value of type {type(node).__name__}; "
                          f"checkpoints hold dicts, lists, tuples, NamedTuples, None, "
                          f"Python scalars, arrays and PRNG keys")


def _encode(node, path: str, tensors: dict) -> dict:
    """The JSON description of ``node``; its array leaves are added to ``tensors``."""
    d = _head(node, path.replace("/", ".").rstrip(".") or "<root>")
    t = d["t"]
    if t == "key":
        d["n"] = _tensor_name(path, tensors)
        tensors[d["n"]] = np.asarray(jax.random.key_data(node))
    elif t == "array":
        a = np.asarray(node)
        a = np.asarray(a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("=")), order="C")
        d["n"] = _tensor_name(path, tensors)
        tensors[d["n"]] = a if a.dtype in _NATIVE else np.frombuffer(a.tobytes(), np.uint8)
    elif t == "dict":
        d["c"] = [_encode(node[k], _join(path, str(k)), tensors) for k in d["k"]]
    elif t in ("list", "tuple", "namedtuple"):
        d.pop("len", None)
        names = d.get("fields") or [str(i) for i in range(len(node))]
        d["c"] = [_encode(v, _join(path, f), tensors) for f, v in zip(names, node)]
    return d


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path and not path.endswith("/") else f"{path}{part}"


def _tensor_name(path: str, tensors: dict) -> str:
    base = path.rstrip("/") or "<root>"
    name, i = base, 1
    while name in tensors:  # dict keys containing '.' can collide; keep names unique
        name, i = f"{base}#{i}", i + 1
    return name


def _checksum(desc: str, tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(desc.encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json(value, what: str) -> Any:
    """``value`` as plain JSON data; arrays become lists, NaN and inf become ``None``."""
    def default(o):
        if isinstance(o, (np.ndarray, np.generic, jax.Array)) and not _is_key(o):
            return np.asarray(o).tolist()
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
    try:
        return _files.finite_or_none(json.loads(json.dumps(value, default=default)))
    except (TypeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{what} must be JSON-serialisable: {err}") from None


def _serialise(params, opt_state, step, key, config, metadata, model_state=None,
               extras=None, run=None) -> bytes:
    try:
        if isinstance(step, bool):
            raise TypeError
        step = operator.index(step)
        if step < 0:
            raise TypeError
    except TypeError:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}") from None
    if run is not None and not isinstance(run, str):
        raise CheckpointError(f"run must be a str id or None, got {run!r}")
    tensors: dict = {}
    trees = {t: _encode(v, t + "/", tensors)
             for t, v in zip(_TREES, (params, opt_state, key, model_state, extras))}
    desc = json.dumps({"format": FORMAT, "step": step, "config": _json(config, "config"),
                       "metadata": _json(metadata, "metadata"), "trees": trees, "run": run},
                      sort_keys=True, allow_nan=False)
    meta = {"funnn": desc, "sha256": _checksum(desc, tensors)}
    return stn.save(tensors, metadata=meta)


# --------------------------------------------------------------------------- writing


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        _files.write_atomic(path, data)
    except OSError as err:
        hint = (f"the disk holding {directory} is full (or over its quota): free space and "
                f"resume" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                else f"is {directory} a writable directory?")
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; "
                              f"{hint}") from None


def save(path, *, params, opt_state=None, step: int = 0, key=None, config=None,
         metadata=None, model_state=None, extras=None, run: str | None = None) -> str:
    """Write a checkpoint to ``path`` atomically and return ``path``.

    ``params``/``opt_state``/``key``/``model_state``/``extras``: pytrees of dicts,
    lists, tuples, NamedTuples, None, Python scalars, arrays and PRNG keys (typed
    ``jax.random.key`` or raw uint32). ``config``/``metadata``: JSON-able
    (numpy/jax numbers are converted, NaN and inf stored as null). ``run``: the id
    of the run writing it; :func:`save_in` prunes only checkpoints of its own run.
    """
    path = os.fspath(path)
    try:  # everything that can fail on the values fails here, before any file is touched
        data = _serialise(params, opt_state, step, key, config, metadata, model_state,
                          extras, run)
    except CheckpointError as err:
        raise CheckpointError(f"cannot save checkpoint {path}: {err}") from None
    _write_atomic(path, data)
    return path


def checkpoints(directory) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of the ``ckpt_<step>.safetensors`` files in ``directory``.

    Regular files only: a directory, symlink or FIFO with such a name is not a checkpoint
    (nothing reads, counts or prunes it), so what is found is what can be removed.
    """
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        return []
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    found = []
    for n in os.listdir(directory):
        path = os.path.join(directory, n)
        if (m := _NAME.match(n)) and os.path.isfile(path) and not os.path.islink(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


class Found(NamedTuple):
    """A checkpoint file as its header describes it (:func:`scan`)."""

    step: int                   # the header's step (the name's when the header is unreadable)
    path: str
    run: str | None
    readable: bool              # the header could be read (the body is not checked here)
    named: int                  # the step in the file name

    @property
    def misnamed(self) -> bool:
        """The name and the header disagree (a copied or renamed file): never chosen by its
        name, never pruned."""
        return self.readable and self.step != self.named


def scan(directory, prefer: str | None = None) -> list[Found]:
    """The checkpoints in ``directory`` ordered oldest to newest by their headers' steps.

    At one step, a file of run ``prefer`` and a file whose name agrees with its header
    come last (newest). A file with an unreadable header keeps its name's step, so a
    damaged newest checkpoint is still found (and reported when read).
    """
    found = []
    for named, path in checkpoints(directory):
        try:
            head = header(path)
        except CheckpointError:
            found.append(Found(named, path, None, False, named))
            continue
        found.append(Found(head["step"], path, head.get("run"), True, named))
    return sorted(found, key=lambda f: (f.step, prefer is not None and f.run == prefer,
                                        not f.misnamed, f.named))


def latest(directory) -> str | None:
    """The path of the newest checkpoint in ``directory`` by its header's step (see
    :func:`scan`), or None if there is none."""
    found = scan(directory)
    return found[-1].path if found else None


def save_in(directory, step: int, *, keep: int | None = 3, **fields) -> str:
    """Save as ``directory/ckpt_<step:08d>.safetensors``, then prune the run's older ones.

    ``fields`` are :func:`save`'s (params, opt_state, key, config, metadata,
    model_state, extras, run). Pruning keeps the newest ``keep`` checkpoints (by their
    headers' steps) whose header names the same ``run`` (all run-less ones when ``run`` is
    None); files of other runs, files whose header cannot be read and files whose name
    disagrees with their header's step are never deleted.
    ``keep=None`` keeps every checkpoint. Returns the new file's path.
    """
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ConfigError(f"save_in: keep must be a positive int or None, got {keep!r}")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"cannot write checkpoints into {directory}: not a directory")
    path = save(os.path.join(directory, f"ckpt_{int(step):08d}.safetensors"), step=step,
                **fields)
    if keep is not None:
        run = fields.get("run")
        own = [f.path for f in scan(directory)
               if f.readable and f.run == run and not f.misnamed]
        for old in own[:-keep]:
            try:
                os.unlink(old)
            except OSError:
                pass
    return path


# --------------------------------------------------------------------------- reading


def _parse_header(path: str, head: bytes, size: int) -> tuple[dict, str, str]:
    """``(description, description text, recorded sha256)`` from a file's first bytes."""
    if size < 8:
        raise CheckpointError(f"checkpoint {path} is truncated: {size} bytes, "
                              f"not even a safetensors header")
    n = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{":       # a safetensors header is JSON: a PNG or text file is not one
        raise CheckpointError(f"checkpoint {path} is not a funnn checkpoint (not a safetensors "
                              f"file: it does not start with a length and a JSON header)")
    if 8 + n > size:
        raise CheckpointError(f"checkpoint {path} is truncated: the header announces {n} "
                              f"bytes, the file has {size - 8} after the length")
    try:
        meta = json.loads(head[8:8 + n])["__metadata__"]
        desc_text, want = meta["funnn"], meta["sha256"]
        desc = json.loads(desc_text)
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"checkpoint {path} has a corrupt or foreign header "
                              f"(not a funnn checkpoint, or damaged)") from None
    if not isinstance(desc, dict) or desc.get("format") not in _READABLE:
        got = desc.get("format") if isinstance(desc, dict) else None
        raise CheckpointError(f"checkpoint {path}: format {got!r}, expected {FORMAT!r}")
    _check_description(path, desc)
    return desc, desc_text, want


def _check_description(path: str, desc: dict) -> None:
    """The header's fields have the types funnn writes; anything else is a CheckpointError."""
    step = desc.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: step must be a non-negative int, "
                              f"got {step!r}")
    trees = desc.get("trees")
    if not isinstance(trees, dict) or any(
            not isinstance(trees.get(t), dict) or "t" not in trees[t] for t in _REQUIRED):
        raise CheckpointError(f"checkpoint {path}: the header's trees are missing or malformed"
                              f" (expected descriptions of {', '.join(_REQUIRED)})")
    for field in ("config", "metadata"):
        if desc.get(field) is not None and not isinstance(desc[field], dict):
            raise CheckpointError(f"checkpoint {path}: {field} must be a JSON object, got "
                                  f"{type(desc[field]).__name__}")
    if desc.get("run") is not None and not isinstance(desc["run"], str):
        raise CheckpointError(f"checkpoint {path}: run id must be a string")


def _open_regular(path: str):
    """``path`` opened for reading if it is a regular file (a symlink to one is fine); a
    FIFO, device (``/dev/zero``), directory or socket is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else \
            "a device or special file"
        raise CheckpointError(f"checkpoint {path} is {kind}, not a regular file; funnn reads "
                              f"checkpoints only from regular files")
    return os.fdopen(fd, "rb")


def _read_head(f, path: str) -> tuple[bytes, int]:
    """``(the first 8 + header bytes, file size)``, never more than ``_MAX_HEADER``."""
    try:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        n = int.from_bytes(first, "little") if len(first) == 8 else 0
        return first + f.read(min(n, _MAX_HEADER, max(size - 8, 0))), size
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None


def _body_size(path: str, head: bytes) -> int:
    """The tensors' bytes the safetensors header announces (the largest end offset)."""
    n = int.from_bytes(head[:8], "little")
    try:
        entries = json.loads(head[8:8 + n])
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        raise CheckpointError(f"checkpoint {path} has a corrupt or foreign header "
                              f"(not a funnn checkpoint, or damaged)") from None
    return max(ends, default=0)


def header(path) -> dict:
    """The JSON description of a checkpoint (step, run, config, metadata, trees).

    Reads only the header, so it is cheap; the checksum over the tensors is *not*
    verified here (:func:`restore` does that).
    """
    path = os.fspath(path)
    with _open_regular(path) as f:
        head, size = _read_head(f, path)
    return _parse_header(path, head, size)[0]


def _read(path: str) -> tuple[dict, dict]:
    """``(description, tensors)`` of a checkpoint file, checked end to end. The body is read
    only once the header has announced its size and the file's size agrees."""
    with _open_regular(path) as f:
        head, size = _read_head(f, path)
        desc, desc_text, want = _parse_header(path, head, size)
        body = _body_size(path, head)
        if len(head) + body != size:
            raise CheckpointError(f"checkpoint {path} is damaged: its header announces "
                                  f"{body} bytes of tensors, the file has {size - len(head)}")
        try:
            data = head + f.read(body)
        except OSError as err:
            raise CheckpointError(f"cannot read checkpoint {path}: "
                                  f"{err.strerror or err}") from None
    try:
        tensors = stn.load(data)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path} is corrupt: {err}") from None
    got = _checksum(desc_text, tensors)
    if got != want:
        raise CheckpointError(f"checkpoint {path} failed its checksum (sha256 {got[:12]}..., "
                              f"recorded {str(want)[:12]}...); the file is damaged or was "
                              f"modified")
    return desc, tensors


def _array(d: dict, tensors: dict, where: str):
    try:
        t = tensors[d["n"]]
        if d["t"] == "key":
            return jax.random.wrap_key_data(jnp.asarray(t), impl=d["impl"])
        dt = jnp.dtype(d["dtype"])
        a = t if dt in _NATIVE else np.frombuffer(t.tobytes(), dt).reshape(d["shape"])
        if list(a.shape) != list(d["shape"]) or a.dtype != dt:
            raise ValueError(f"tensor is {a.dtype}{a.shape}, description {dt}{d['shape']}")
        return jnp.asarray(a)
    except Exception as err:
        raise CheckpointError(f"{where}: cannot rebuild this leaf ({err})") from None


@functools.cache
def _namedtuple(name: str, fields: tuple):
    return collections.namedtuple(name, fields)


def _decode(d: dict, tensors: dict, where: str):
    """Rebuild a tree from its description: dicts, lists, tuples, namedtuples (re-created)."""
    t = d["t"]
    if t == "none":
        return None
    if t == "py":
        return d["v"]
    if t in ("array", "key"):
        return _array(d, tensors, where)
    kids = [_decode(c, tensors, f"{where}[{i}]") for i, c in enumerate(d["c"])]
    if t == "dict":
        return dict(zip(d["k"], kids))
    if t == "list":
        return kids
    if t == "tuple":
        return tuple(kids)
    return _namedtuple(d["name"], tuple(d["fields"]))(*kids)


def _kind(d: dict) -> str:
    t = d["t"]
    if t == "namedtuple":
        return f"namedtuple {d['name']}({', '.join(d['fields'])})"
    if t == "dict":
        return f"dict with keys {d['k']}"
    if t in ("list", "tuple"):
        return f"{t} of length {d['len'] if 'len' in d else len(d['c'])}"
    if t == "array":
        return f"array {d['dtype']}{tuple(d['shape'])}"
    if t == "key":
        return f"PRNG key {d['impl'] or ''}{tuple(d['shape'])}"
    return "None" if t == "none" else f"Python {type(d['v']).__name__}"


def _fill(like, d: dict, tensors: dict, where: str):
    """Rebuild ``d`` with the node types of the template ``like``, checking that it matches."""
    spec, st = _head(like, where), d["t"]
    lt = spec["t"]

    def mismatch():
        return CheckpointError(f"{where}: checkpoint has {_kind(d)}, template has "
                               f"{_kind(spec)}; restore with a matching `like` or like=None")

    if lt == "py" and st == "py":
        return d["v"]
    if st == "py" and lt == "array" and spec["shape"] == [] and isinstance(d["v"], (int, float)):
        return jnp.asarray(d["v"], spec["dtype"])  # a Python scalar against e.g. eval_shape
    if st == "array" and lt == "py" and d["shape"] == []:
        return _array(d, tensors, where)
    if lt != st:
        raise mismatch()
    if st in ("array", "key"):
        if d["shape"] != spec["shape"] or d.get("dtype") != spec.get("dtype") or (
                st == "key" and spec["impl"] not in (None, d["impl"])):
            raise mismatch()
        return _array(d, tensors, where)
    if st == "none":
        return None
    if st == "dict":
        if sorted(map(repr, d["k"])) != sorted(map(repr, spec["k"])):
            raise mismatch()
        by_key = {k: c for k, c in zip(d["k"], d["c"])}
        pairs = [(k, _fill(like[k], by_key[k], tensors, f"{where}.{k}")) for k in spec["k"]]
        try:
            return type(like)(pairs)
        except TypeError:  # e.g. defaultdict: keep the items, lose the factory
            return dict(pairs)
    if len(d["c"]) != len(like) or (st == "namedtuple" and (
            d["name"], d["fields"]) != (spec["name"], spec["fields"])):
        raise mismatch()
    names = spec.get("fields") or range(len(like))
    kids = [_fill(v, c, tensors, f"{where}.{f}") for f, v, c in zip(names, like, d["c"])]
    return type(like)(*kids) if st == "namedtuple" else type(like)(kids)


def restore(path, like=None) -> Checkpoint:
    """Read a checkpoint written by :func:`save`.

    ``like``: a :class:`Checkpoint` or a dict with any of ``params``, ``opt_state``,
    ``key``, whose trees (arrays, ``jax.ShapeDtypeStruct`` or keys as leaves) give
    the node types to rebuild (e.g. optax's state classes) and the shapes and
    dtypes to check. Trees without a template come back as dicts, lists, tuples
    and re-created namedtuples. Array leaves come back as ``jax.Array``.
    """
    path = os.fspath(path)
    if isinstance(like, Checkpoint):
        like = {t: v for t, v in like._asdict().items() if t in _TREES}
    if like is not None and (not isinstance(like, Mapping) or set(like) - set(_TREES)):
        raise ConfigError(f"restore: like must be a Checkpoint or a dict with keys from "
                          f"{list(_TREES)}, got {type(like).__name__}"
                          f"{' with keys ' + str(list(like)) if isinstance(like, Mapping) else ''}")
    like = like or {}
    desc, tensors = _read(path)
    trees = {}
    for t in _TREES:
        d = desc["trees"].get(t, {"t": "none"})
        try:
            if like.get(t) is not None:
                trees[t] = _fill(like[t], d, tensors, f"checkpoint {path}: {t}")
            else:
                trees[t] = _decode(d, tensors, f"checkpoint {path}: {t}")
        except CheckpointError:
            raise
        except (KeyError, TypeError, IndexError, ValueError, AttributeError, RecursionError):
            raise CheckpointError(f"checkpoint {path}: the description of {t} is "
                                  f"malformed") from None
    return Checkpoint(trees["params"], trees["opt_state"], int(desc["step"]), trees["key"],
                      desc.get("config"), desc.get("metadata"), trees["model_state"],
                      trees["extras"], desc.get("run"))


def intact(directory) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of the checkpoints in ``directory`` that pass every check."""
    good = []
    for step, path in checkpoints(directory):
        try:
            _read(path)
        except CheckpointError:
            continue
        good.append((step, path))
    return good
