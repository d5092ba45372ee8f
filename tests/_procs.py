"""Helpers shared by the process and mesh tests: simulated CPU devices, free ports, the
``funnn`` command in a subprocess, and a relative distance between two pytrees."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np


def _env(devices: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "")          # the suite's own (tests/conftest.py)
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _funnn(*args, devices: int = 1, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "funnn.cli", *args], cwd=cwd,
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(*procs, timeout=400):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _rel(a, b) -> float:
    worst = 0.0
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        worst = max(worst, float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-300)))
    return worst
