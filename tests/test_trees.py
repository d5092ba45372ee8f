"""funnn/trees.py: readable leaf paths, leaf lists, leaf shapes and parameter counts of a
params pytree, checked on nested dicts and tuples against hand-written answers."""

import collections

import jax
import jax.numpy as jnp
import numpy as np

from funnn import trees

# serial(dense(4), parallel(dense(3), serial(batch-norm-like, dense without bias))) by hand
PARAMS = ({"W": jnp.zeros((2, 4)), "b": jnp.zeros(4)},
          ({"W": jnp.zeros((4, 3)), "b": jnp.zeros(3)},
           ({"gamma": jnp.ones(4), "beta": jnp.zeros(4)}, {"W": jnp.zeros((4, 5))}),
           {}))


def test_tree_paths_name_every_leaf_in_flatten_order():
    got = trees.tree_paths(PARAMS)
    assert [p for p, _ in got] == ["0.W", "0.b", "1.0.W", "1.0.b", "1.1.0.beta",
                                   "1.1.0.gamma", "1.1.1.W"]       # dict keys sorted
    leaves = jax.tree_util.tree_leaves(PARAMS)
    assert all(leaf is want for (_, leaf), want in zip(got, leaves, strict=True))
    assert trees.tree_paths({}) == [] and trees.tree_paths(()) == []


def test_path_str_of_each_key_kind_and_of_the_root():
    Pair = collections.namedtuple("Pair", "left right")
    tree = {"enc": [Pair(np.ones(1), np.ones(2))], "head": {3: np.ones(3)}}
    paths = [trees.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["enc.0.left", "enc.0.right", "head.3"]   # list, attribute, int key
    assert trees.path_str(()) == "<root>"
    assert trees.tree_paths(jnp.ones(2))[0][0] == "<root>"          # a bare leaf


def test_param_count_and_leaf_shapes():
    assert trees.param_count(PARAMS) == (2 * 4 + 4) + (4 * 3 + 3) + (4 + 4) + 4 * 5
    assert trees.param_count(()) == 0
    assert trees.param_count({"s": jnp.ones(())}) == 1               # a scalar is one number
    assert trees.leaf_shapes(PARAMS[1], "1.") == {
        "1.0.W": (4, 3), "1.0.b": (3,), "1.1.0.beta": (4,), "1.1.0.gamma": (4,),
        "1.1.1.W": (4, 5)}
    assert trees.leaf_shapes(jnp.ones((2, 3)), "0.b.") == {"0.b": (2, 3)}   # a bare leaf
    assert trees.leaf_shapes(jnp.ones(2)) == {"<root>": (2,)}
