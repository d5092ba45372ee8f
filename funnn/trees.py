"""Tree helpers: readable paths, leaf lists, leaf shapes and parameter counts of pytrees."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["path_str", "tree_paths", "leaf_shapes", "param_count"]


def path_str(path) -> str:
    """A compact, readable tree path: ``[0]['W']`` becomes ``0.W``."""
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(p.name)
        else:
            parts.append(str(p))
    return ".".join(parts) if parts else "<root>"


def tree_paths(tree) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` for every leaf of ``tree``, paths as in :func:`path_str`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def param_count(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))



def leaf_shapes(tree, prefix: str = "") -> dict:
    """``{path: shape}`` for every leaf of ``tree``: paths as in :func:`path_str`, after
    ``prefix``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = path_str(path)
        out[prefix + p if path else prefix.rstrip(".") or p] = tuple(jnp.shape(leaf))
    return out
