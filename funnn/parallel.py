"""Many devices: meshes and sharding plans on JAX's own SPMD runtime (processes, on many
hosts, are :mod:`funnn.distributed`'s; their names stay importable from here).

A :class:`~jax.sharding.Mesh` arranges devices on two named axes, ``data`` and
``model``. The batch is split over ``data``; parameters and optimizer state are
laid out by a *sharding spec*; ``jax.jit`` compiles one SPMD program and XLA
inserts the collectives (the gradient all-reduce of data parallelism, the
all-gathers of sharded parameters). Nothing here sends a byte by hand.

Specs (``fit(..., sharding=...)``; text for them: :func:`parse_sharding`):

- ``"replicated"`` (default): every device holds all parameters and optimizer
  state; plain data parallelism.
- ``"fsdp"``: each parameter (and its optimizer state) is split over ``data``
  along its largest axis that the data degree divides; others stay replicated.
- ``"tensor"``: each parameter's last (output) axis is split over ``model``
  where the model degree divides it (dense ``W`` by columns and its ``b``).
- ``"megatron"``: Megatron-LM's pairing (Shoeybi et al. 2019) over ``model``: attention's
  ``W_q, W_k, W_v`` (and their biases) by columns, ``W_o`` by rows; in a stack, each dense
  layer followed by another one with only parameter-free layers between (an MLP:
  ``dense, activation, dense``, as in a transformer block) splits the first by columns
  (``W`` and ``b``) and the second by rows, so the hidden activations stay split between
  the two and one all-reduce joins the output. Biases added after a row split (``b_o``, the
  second ``b``), norms, embeddings and unpaired dense layers stay replicated, and so does a
  pair whose shared axis the model degree does not divide.
- rules: ``{"0.W": (None, "model"), "2.*": "fsdp", "*": "replicated"}`` (or a
  list of ``(pattern, spec)`` pairs): a glob over parameter paths as
  ``funnn.core.summary`` and ``tree_paths`` name them; the first matching rule
  wins; a spec is a ``PartitionSpec``, a tuple of axis names / ``None`` (one
  per leading array axis), or one of the names above; unmatched leaves are
  replicated. A pattern that matches nothing, an unknown axis, or an axis that
  does not divide its dimension is a :class:`~funnn.core.ConfigError`.

One device is a mesh of shape ``data=1, model=1``: the same code path, with no
collective left in it. Several processes (``initialize``) form one mesh over
all their devices; each feeds only its own rows of every batch
(``jax.make_array_from_process_local_data``), and :func:`is_main` (process 0)
alone writes files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Processes moved to funnn.distributed; re-exported so funnn.parallel.X keeps working.
from funnn.distributed import (
    agree,
    gather,
    initialize,
    is_main,
    parse_coordinator,
    simulate_cpu_devices,
)
from funnn.errors import ConfigError
from funnn.trees import path_str

__all__ = ["DATA", "MODEL", "SPECS", "initialize", "make_mesh", "as_mesh", "describe", "Plan",
           "plan", "check_batch", "is_main", "agree", "gather", "parse_coordinator",
           "parse_sharding", "simulate_cpu_devices"]

DATA, MODEL = "data", "model"
SPECS = ("replicated", "fsdp", "tensor", "megatron")
_WHERE = ("parallel",)


# --------------------------------------------------------------------------- meshes


def make_mesh(devices=None, *, model: int = 1) -> Mesh:
    """A ``Mesh`` with axes ``("data", "model")``: ``model`` devices per tensor-parallel group.

    ``devices``: None (every device of every process), an int N (the first N
    local devices of each process, so a two-process job with N=4 has 8), or a
    list of devices. The data degree is ``len(devices) // model``.
    """
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        raise ConfigError(f"model (the tensor-parallel degree) must be a positive int, got "
                          f"{model!r}", ("make_mesh(model=)",))
    local = jax.local_devices()
    if devices is None:
        chosen = list(jax.devices())
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if n < 1:
            raise ConfigError(f"devices must be a positive int, got {n}", ("make_mesh(devices=)",))
        if n > len(local):
            more = (f"; on a CPU, simulate more with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={n} set before JAX starts"
                    if local[0].platform == "cpu" else "")
            raise ConfigError(f"asked for {n} devices but this process has {len(local)} "
                              f"({local[0].platform}){more}", ("make_mesh(devices=)",))
        mine = {d.id for d in sorted(local, key=lambda d: d.id)[:n]}
        per: dict[int, list] = {}
        for d in jax.devices():
            per.setdefault(d.process_index, []).append(d)
        chosen = [d for p in sorted(per) for d in sorted(per[p], key=lambda d: d.id)[:n]]
        if not mine <= {d.id for d in chosen}:    # another process with fewer devices
            raise ConfigError("the processes see different devices", ("make_mesh(devices=)",))
    elif isinstance(devices, Sequence) and devices and all(
            isinstance(d, jax.Device) for d in devices):
        chosen = list(devices)
    else:
        raise ConfigError(f"devices must be None, a positive int or a list of jax devices, "
                          f"got {devices!r}", ("make_mesh(devices=)",))
    if len(chosen) % model:
        raise ConfigError(f"the model axis ({model}) must divide the number of devices "
                          f"({len(chosen)})", ("make_mesh(model=)",))
    per_process = len(chosen) // max(len({d.process_index for d in chosen}), 1)
    if per_process % model:
        raise ConfigError(f"the model axis ({model}) must divide the devices of each process "
                          f"({per_process}), so a tensor-parallel group stays on one host",
                          ("make_mesh(model=)",))
    return Mesh(np.array(chosen, dtype=object).reshape(len(chosen) // model, model),
                (DATA, MODEL))


def as_mesh(mesh) -> Mesh:
    """A Mesh from a Mesh or an int (that many local devices, data-parallel)."""
    if isinstance(mesh, Mesh):
        if DATA not in mesh.axis_names:
            raise ConfigError(f"the mesh needs an axis named {DATA!r} to split the batch "
                              f"over; it has {tuple(mesh.axis_names)}", ("fit",))
        return mesh
    if isinstance(mesh, (int, np.integer)) and not isinstance(mesh, bool):
        return make_mesh(int(mesh))
    raise ConfigError(f"mesh must be a jax.sharding.Mesh or a number of devices, got "
                      f"{type(mesh).__name__}", ("fit",))


def describe(mesh: Mesh) -> str:
    """``data=4 x model=2 over 8 cpu devices in 2 processes``."""
    devs = list(mesh.devices.flat)
    procs = len({d.process_index for d in devs})
    axes = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"{axes} over {len(devs)} {devs[0].platform} device{'s' * (len(devs) > 1)} in "
            f"{procs} process{'es' * (procs > 1)}")


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """The batch must split evenly over the ``data`` axis (checked before any compile)."""
    n = mesh.shape[DATA]
    if batch_size % n:
        up = -(-batch_size // n) * n
        raise ConfigError(f"{what} {batch_size} is not divisible by the data-parallel degree "
                          f"{n} (mesh axis {DATA!r}); use a multiple of {n}, e.g. {up}",
                          ("fit",))


# --------------------------------------------------------------------------- specs


def parse_sharding(text: str):
    """Text -> spec: a name (``fsdp``) or JSON rules (``{"0.W": [null, "model"]}``)."""
    text = str(text).strip()
    if not text.startswith(("{", "[")):
        return text
    try:
        rules = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"sharding rules are not valid JSON ({err})",
                          ("parse_sharding(text=)",)) from None
    if isinstance(rules, dict):
        return rules
    if isinstance(rules, list) and all(isinstance(r, list) and len(r) == 2 for r in rules):
        return [tuple(r) for r in rules]
    raise ConfigError('sharding rules must be a JSON object {"pattern": spec} or a list of '
                      '[pattern, spec] pairs', ("parse_sharding(text=)",))


def _axes_of(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _policy(name: str, shape: tuple, mesh: Mesh, where: str) -> P:
    if name == "replicated":
        return P()
    if name == "fsdp":
        n = mesh.shape[DATA]
        fits = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
        if n == 1 or not fits:
            return P()
        best = max(fits, key=lambda i: (shape[i], -i))
        return P(*([None] * best + [DATA]))
    if name == "megatron":
        raise ConfigError(f"sharding 'megatron' pairs layers across the whole model; give it "
                          f"as sharding='megatron', not as a rule for {where}", _WHERE)
    if name == "tensor":
        if MODEL not in mesh.axis_names:
            raise ConfigError(f"sharding 'tensor' needs a mesh axis {MODEL!r}; build one with "
                              f"parallel.make_mesh(n, model=k)",
                              _WHERE)
        n = mesh.shape[MODEL]
        if not shape or n == 1 or shape[-1] % n:
            return P()
        return P(*([None] * (len(shape) - 1) + [MODEL]))
    raise ConfigError(f"unknown sharding {name!r} for {where}; valid: {', '.join(SPECS)}, or "
                      f"rules {{'layer.path': spec}}", _WHERE)


_ATTN_COLUMNS = frozenset({"W_q", "W_k", "W_v", "b_q", "b_k", "b_v"})


def _is_dense(node) -> bool:
    return (isinstance(node, Mapping) and "W" in node and set(node) <= {"W", "b"}
            and np.ndim(node["W"]) == 2)


def _megatron_roles(tree, prefix: tuple = ()) -> dict[str, str]:
    """``{path: "col" | "row"}`` for the ``"megatron"`` preset (module docstring); paths as
    :func:`~funnn.trees.path_str` writes them. Attention dicts are known by their keys; in a
    tuple (a ``serial``'s params), dense dicts separated only by leafless entries pair up."""
    def join(*keys) -> str:
        return ".".join(prefix + keys)

    roles: dict[str, str] = {}
    if isinstance(tree, Mapping):
        if {"W_q", "W_k", "W_v", "W_o"} <= set(tree):
            roles.update({join(k): "col" for k in tree if k in _ATTN_COLUMNS})
            roles[join("W_o")] = "row"
            return roles
        for k, v in tree.items():
            roles.update(_megatron_roles(v, prefix + (str(k),)))
        return roles
    if not isinstance(tree, (tuple, list)):
        return roles
    items, paired = list(tree), set()
    dense = [i for i, v in enumerate(items) if _is_dense(v)]
    for i, j in itertools.pairwise(dense):
        if i in paired or any(jax.tree_util.tree_leaves(items[m]) for m in range(i + 1, j)):
            continue
        roles.update({join(str(i), k): "col" for k in items[i]})
        roles[join(str(j), "W")] = "row"
        paired |= {i, j}
    for i, v in enumerate(items):
        if i not in paired:
            roles.update(_megatron_roles(v, prefix + (str(i),)))
    return roles


def _megatron(params, mesh: Mesh) -> list[P]:
    """The ``"megatron"`` preset's spec for every leaf, in ``tree_flatten`` order."""
    if MODEL not in mesh.axis_names:
        raise ConfigError(f"sharding 'megatron' needs a mesh axis {MODEL!r}; build one with "
                          f"parallel.make_mesh(n, model=k)", _WHERE)
    n = mesh.shape[MODEL]
    roles = _megatron_roles(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for path, a in flat:
        role, shape = roles.get(path_str(path)), tuple(np.shape(a))
        axis = len(shape) - 1 if role == "col" else 0
        if role is None or n == 1 or not shape or shape[axis] % n:
            out.append(P())
        else:
            out.append(P(*([None] * axis + [MODEL])))
    return out


def _explicit(spec, shape: tuple, mesh: Mesh, where: str) -> P:
    entries = tuple(spec) if isinstance(spec, (P, tuple, list)) else None
    if entries is None:
        raise ConfigError(f"sharding for {where}: a spec is a PartitionSpec, a tuple of axis "
                          f"names or None, or one of {', '.join(SPECS)}; got {spec!r}", _WHERE)
    if len(entries) > len(shape):
        raise ConfigError(f"sharding for {where}: spec {entries} has {len(entries)} entries but "
                          f"the parameter has shape {shape}", _WHERE)
    used: list[str] = []
    for dim, entry in enumerate(entries):
        axes = _axes_of(entry)
        for a in axes:
            if a not in mesh.axis_names:
                raise ConfigError(f"sharding for {where}: unknown mesh axis {a!r}; the mesh has "
                                  f"axes {tuple(mesh.axis_names)}", _WHERE)
            if a in used:
                raise ConfigError(f"sharding for {where}: mesh axis {a!r} is used twice in "
                                  f"{entries}", _WHERE)
            used.append(a)
        k = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % k:
            raise ConfigError(f"sharding for {where}: axis {dim} of shape {shape} has size "
                              f"{shape[dim]}, not divisible by {k} devices ({'x'.join(axes)})",
                              _WHERE)
    return P(*entries)


def _specs(params, sharding, mesh: Mesh) -> list[P]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_str(p) for p, _ in flat]
    shapes = [tuple(np.shape(a)) for _, a in flat]
    if sharding == "megatron":
        return _megatron(params, mesh)
    if isinstance(sharding, str):
        return [_policy(sharding, s, mesh, p) for p, s in zip(paths, shapes)]
    if isinstance(sharding, Mapping):
        rules = list(sharding.items())
    elif isinstance(sharding, Sequence) and all(
            isinstance(r, (tuple, list)) and len(r) == 2 for r in sharding):
        rules = [tuple(r) for r in sharding]
    else:
        raise ConfigError(f"sharding must be one of {', '.join(SPECS)} or rules "
                          f"{{'layer.path': spec}}, got {sharding!r}", _WHERE)
    for pattern, _ in rules:
        if not isinstance(pattern, str) or not any(fnmatch.fnmatchcase(p, pattern)
                                                   for p in paths):
            raise ConfigError(f"sharding rule {pattern!r} matches no parameter; the parameter "
                              f"paths are {', '.join(paths)}", _WHERE)
    out = []
    for p, s in zip(paths, shapes):
        spec = next((sp for pat, sp in rules if fnmatch.fnmatchcase(p, pat)), "replicated")
        out.append(_policy(spec, s, mesh, p) if isinstance(spec, str)
                   else _explicit(spec, s, mesh, p))
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where everything of a run lives on a mesh: parameters, optimizer state, batches.

    ``params`` is a pytree of ``NamedSharding`` shaped like the parameters;
    :meth:`like` extends it to an optimizer state; ``batches`` splits axis 1 of
    an epoch's stacked batches ``(num_batches, batch, ...)`` over ``data``.
    """

    mesh: Mesh
    params: Any
    shapes: tuple = ()
    sharding: Any = "replicated"

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.named(P())

    @property
    def rows(self) -> NamedSharding:
        return self.named(P(DATA))

    @property
    def batches(self) -> NamedSharding:
        return self.named(P(None, DATA))

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape[DATA])

    def specs(self) -> dict:
        """``{"0.W": PartitionSpec(None, 'data'), ...}``: the layout of every parameter."""
        flat = jax.tree_util.tree_flatten_with_path(self.params)[0]
        return {path_str(p): s.spec for p, s in flat}

    def like(self, tree):
        """Shardings for ``tree`` (an optimizer state, concrete or from ``eval_shape``):
        every subtree shaped like the parameters gets theirs, every other leaf is
        replicated."""
        pdef = jax.tree_util.tree_structure(self.params)

        def params_like(node) -> bool:
            leaves, d = jax.tree_util.tree_flatten(node)
            same = bool(d == pdef)  # type: ignore[operator]  # PyTreeDef's stub lacks __eq__
            return same and tuple(tuple(np.shape(l)) for l in leaves) == self.shapes

        return jax.tree_util.tree_map(
            lambda n: self.params if params_like(n) else self.replicated, tree,
            is_leaf=params_like)

    def place(self, tree, shardings):
        """Global arrays with ``shardings`` from host values every process holds alike."""
        def put(a, s):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, s, lambda idx: np.array(a[idx]))
        return jax.tree_util.tree_map(put, tree, shardings)

    def feed(self, x, idx):
        """One epoch's batches ``x[idx]`` as a global ``(num_batches, batch, ...)`` array.

        This process gathers only the rows its own devices hold
        (``jax.make_array_from_process_local_data``); ``idx`` is the same
        ``(num_batches, batch)`` index array on every process.
        """
        gshape = tuple(idx.shape) + tuple(x.shape[1:])
        lo, hi = self._local_rows(gshape)
        return jax.make_array_from_process_local_data(self.batches, x[idx[:, lo:hi]], gshape)

    def _local_rows(self, gshape: tuple) -> tuple[int, int]:
        index = self.batches.addressable_devices_indices_map(gshape).values()
        spans = sorted({(s[1].start or 0, gshape[1] if s[1].stop is None else s[1].stop)
                        for s in index if s is not None})
        for (_, a), (b, _) in itertools.pairwise(spans):
            if a != b:
                raise ConfigError("this process's devices do not hold one contiguous block of "
                                  "the batch; build the mesh with parallel.make_mesh", _WHERE)
        return spans[0][0], spans[-1][1]


def plan(mesh, params, sharding="replicated") -> Plan:
    """Check ``sharding`` against ``mesh`` and the parameters' shapes; a :class:`Plan`.

    Only shapes are read (params may come from ``jax.eval_shape``); nothing is
    compiled, so every bad spec fails here, before training starts.
    """
    mesh = as_mesh(mesh)
    specs = _specs(params, sharding, mesh)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shardings = jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
    return Plan(mesh, shardings, tuple(tuple(np.shape(a)) for a in leaves), sharding)
