"""The differentiable-programs gallery: every script runs, and every derivative it reports
agrees with the hand-worked value and with finite differences to the stated tolerance.

examples/programs/ is not a package: scripts are loaded by file path. Each main()
returns its rows (name, autodiff, by hand, finite differences, tolerances); the
tolerances are checked here again, independently of the scripts' own assertions, and
capped so that no example can pass by loosening them.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from example_loader import load as load_example

PROGRAMS = pathlib.Path(__file__).resolve().parent.parent / "examples" / "programs"
NAMES = ["python_control_flow", "structured_control_flow", "newton_sqrt", "projectile",
         "bouncing_ball", "stopping_rule", "implicit_layer", "checkpointed_loop"]
MAX_RTOL, MAX_FD_RTOL = 1e-9, 1e-6          # the loosest tolerance any row may state


def load(name: str):
    """Import examples/programs/<name>.py by path (its __main__ block does not run)."""
    return load_example(f"programs/{name}")


def check_rows(rows, min_rows=1):
    """Autodiff and finite differences against the hand value, |a - h| / max(|h|, 1)."""
    assert len(rows) >= min_rows
    for r in rows:
        assert r.rtol <= MAX_RTOL and r.fd_rtol <= MAX_FD_RTOL, r
        scale = max(abs(r.hand), 1.0)
        assert np.isfinite(r.auto) and np.isfinite(r.hand) and np.isfinite(r.fd), r
        assert abs(r.auto - r.hand) <= r.rtol * scale, r
        assert abs(r.fd - r.hand) <= r.fd_rtol * scale, r


def test_every_program_is_tested():
    scripts = {p.stem for p in PROGRAMS.glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(NAMES)


def test_python_control_flow():
    ex = load("python_control_flow")
    out = ex.main()
    check_rows(out["rows"], 14)
    assert float(jax.grad(ex.f)(3.0)) == 6.0 and float(jax.grad(ex.f)(-2.0)) == -1.0
    assert float(jax.grad(ex.halvings)(-37.0)) == 2.0 ** -6
    assert out["jit_errors"]["if under jit"] == "TracerBoolConversionError"
    assert out["jit_errors"]["range(n), static_argnums=1"] is None


def test_structured_control_flow():
    out = load("structured_control_flow").main()
    check_rows(out["rows"], 12)
    assert np.isnan(out["trap"][-1.0]) and np.isnan(out["trap"][0.0])
    assert out["trap"][4.0] == 0.25
    assert "Reverse-mode differentiation does not work" in out["reverse_error"]


def test_newton_sqrt():
    out = load("newton_sqrt").main(values=(2.0, 10.0))
    check_rows(out["rows"], 6)
    names = " ".join(r.name for r in out["rows"])
    assert all(k in names for k in ("unrolled", "bounded_while", "fixed_point"))
    errs = [e for _, _, e in out["trace"]]
    assert errs[0] > 1e-2 and errs[-1] < 1e-12          # the derivative converges as well
    a = np.array([0.5, 2.0, 9.0, 1e4])
    for v in out["batched"].values():
        np.testing.assert_allclose(v, 1 / (2 * np.sqrt(a)), rtol=1e-12)


def test_projectile():
    ex = load("projectile")
    out = ex.main()
    check_rows(out["rows"], 4)
    # the closed form of Euler's scheme, checked here by numpy finite differences
    t, v = 0.7, 20.0
    h = 1e-6
    num = (_closed_loss(ex, t + h, v) - _closed_loss(ex, t - h, v)) / (2 * h)
    assert num == pytest.approx(ex.grad_by_hand_no_drag(t, v)[0], rel=1e-7)
    for r in out["aim"].values():
        assert r["miss"] < 1e-6 and r["loss_last"] < 1e-3 * r["loss_first"]
    assert out["aim"][0.0]["theta"] == pytest.approx(out["closed_form"][0], abs=1e-6)


def _closed_loss(ex, theta, v):
    """Half the squared miss from the closed form of Euler's scheme without drag."""
    t = ex.N * ex.DT
    x, y = t * v * np.cos(theta), t * v * np.sin(theta) - ex.G * ex.DT ** 2 * ex.N * (ex.N - 1) / 2
    return 0.5 * ((x - ex.TARGET[0]) ** 2 + (y - ex.TARGET[1]) ** 2)


def test_bouncing_ball():
    ex = load("bouncing_ball")
    out = ex.main()
    check_rows(out["rows"], 4)
    assert out["value_gap"] < 1e-12
    # the naive program's gradient is self-consistent but not the physics
    assert abs(out["naive"]["dy/dh0"] - out["naive"]["fd"]) < 1e-5
    assert abs(out["naive"]["dy/dh0"] - ex.by_hand(2.0, 0.8)[1]) > 0.1
    h0, t = 2.0, ex.N * ex.DT                         # the restitution found by Newton
    t1 = np.sqrt(2 * h0 / ex.G)
    e = out["restitution"]
    assert e * ex.G * t1 * (t - t1) - ex.G * (t - t1) ** 2 / 2 == pytest.approx(0.9, abs=1e-10)


@pytest.mark.slow
def test_stopping_rule():
    out = load("stopping_rule").main()
    check_rows(out["rows"], 12)
    steps = [r["steps"] for r in out["info"]]
    assert len(set(steps)) == len(steps)                 # each sequence stops elsewhere
    assert [r["never_fired"] for r in out["info"]] == [False, False, False, True]


@pytest.mark.slow
def test_implicit_layer():
    out = load("implicit_layer").main(steps=200)
    check_rows(out["rows"], 8)
    assert out["gap"] < 1e-10 and out["gap_unrolled"] < 1e-10
    assert out["accuracy"] >= 0.95 and out["losses"][-1] < 0.5 * out["losses"][0]


@pytest.mark.slow
def test_checkpointed_loop():
    out = load("checkpointed_loop").main(lengths=(100, 1600))
    check_rows(out["rows"], 6)
    assert out["gap"] < 1e-12
    if out["memory"]:
        (n0, s0, c0), (n1, s1, c1) = out["memory"]
        assert s1 / s0 > 0.5 * n1 / n0                   # scan: linear in the steps
        assert c1 / c0 < 2 * np.sqrt(n1 / n0)             # checkpointed: square root


@pytest.mark.slow
def test_a_script_runs_standalone(tmp_path):
    """Run as a reader would, from another directory: the script finds _compare.py."""
    res = subprocess.run([sys.executable, str(PROGRAMS / "python_control_flow.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "TracerBoolConversionError" in res.stdout and "autodiff" in res.stdout
