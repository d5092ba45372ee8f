"""Helpers shared by the run tests (test_rundir, test_train, test_cli): run the command,
hash a directory, read strict JSON, a finished XOR run, a tiny regression problem."""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

from funnn import cli, rundir

XOR = ["--data", "xor", "--quiet"]


def main(argv, capsys):
    """``funnn ARGV`` in this process: ``(exit code, stdout, stderr)``; never a traceback."""
    try:
        code = cli.main(argv)
    except SystemExit as e:          # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def snapshot(directory) -> dict:
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


def strict(text):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture
def xor_run(tmp_path, capsys):
    """A finished 2-epoch run on XOR in ``tmp_path/D``."""
    d = tmp_path / "D"
    code, _, err = main(["train", *XOR, "--epochs", "2", "--out", str(d)], capsys)
    assert code == 0, err
    return d


def run_id(d):
    return json.loads((d / "run.json").read_text())["run_id"]


def tiny():
    """A 2-3-1 tanh network and 8 examples of ``y = x0 / 2``."""
    import jax

    from funnn import layers as L
    model = L.serial(L.dense(3), L.activation("tanh"), L.dense(1))
    _, params = model.init(jax.random.key(0), (None, 2))
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(8, 2)
    return model, params, (x, x[:, :1] * 0.5)


def tree_astype(tree, dtype):
    import jax
    return jax.tree_util.tree_map(lambda v: np.asarray(v, dtype), tree)


def leaves(tree):
    import jax
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]
