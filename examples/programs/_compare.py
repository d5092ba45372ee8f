"""Shared by the programs gallery: one derivative three ways, a table, and the check.

Each example builds rows ``compare(name, auto, hand, fd)``: autodiff, the derivative
worked out by hand (or analytically), and central finite differences in float64.
The error of a value ``a`` against the hand value ``h`` is ``|a - h| / max(|h|, 1)``
(relative for large values, absolute near zero).
"""

from typing import NamedTuple

import numpy as np


class Row(NamedTuple):
    name: str
    auto: float
    hand: float
    fd: float
    rtol: float      # allowed error of autodiff against the hand value
    fd_rtol: float   # allowed error of finite differences against the hand value


def central_difference(f, x, h=1e-6):
    """(f(x + h) - f(x - h)) / 2h for a scalar function of a scalar, in float64."""
    x = float(x)
    return (float(f(x + h)) - float(f(x - h))) / (2 * h)


def err(a, hand):
    """|a - hand| / max(|hand|, 1)."""
    return abs(float(a) - float(hand)) / max(abs(float(hand)), 1.0)


def compare(name, auto, hand, fd, rtol=1e-10, fd_rtol=1e-6):
    """One row of the table: the three derivatives and the tolerances they must meet."""
    return Row(name, float(auto), float(hand), float(fd), rtol, fd_rtol)


def show(rows, title="derivatives: autodiff vs by hand vs finite differences"):
    """Print the rows as a table with the errors against the hand value."""
    w = max(len(r.name) for r in rows)
    print(title)
    print(f"{'':{w}}  {'autodiff':>22}  {'by hand':>22}  {'fin. diff.':>22}  "
          f"{'err auto':>9}  {'err fd':>9}")
    for r in rows:
        print(f"{r.name:{w}}  {r.auto:22.15g}  {r.hand:22.15g}  {r.fd:22.15g}  "
              f"{err(r.auto, r.hand):9.1e}  {err(r.fd, r.hand):9.1e}")


def check(rows):
    """Assert every row meets its tolerances; the message names the row."""
    for r in rows:
        assert np.isfinite(r.auto), f"{r.name}: autodiff gave {r.auto}"
        assert err(r.auto, r.hand) <= r.rtol, (
            f"{r.name}: autodiff {r.auto!r} vs by hand {r.hand!r} (rtol {r.rtol})")
        assert err(r.fd, r.hand) <= r.fd_rtol, (
            f"{r.name}: finite differences {r.fd!r} vs by hand {r.hand!r} (rtol {r.fd_rtol})")
