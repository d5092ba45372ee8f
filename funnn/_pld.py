"""The privacy loss distribution (PLD) accountant of the Poisson-subsampled Gaussian mechanism.

One DP-SGD step with Poisson sampling at rate ``q`` and noise multiplier ``sigma`` is, for the
worst pair of neighbouring datasets (add/remove-one, sensitivity 1), the pair of output
distributions on the line (Koskela, Jälkö, Honkela 2020; Zhu, Dong, Wang 2022)::

    remove:  P = (1 - q) N(0, sigma^2) + q N(1, sigma^2)   against   Q = N(0, sigma^2)
    add:     P = N(0, sigma^2)   against   Q = (1 - q) N(0, sigma^2) + q N(1, sigma^2)

Its privacy loss ``L = log(P(x) / Q(x))`` for ``x ~ P`` has the hockey-stick curve
``delta(eps) = E[(1 - e^(eps - L))_+] = P(L > eps) - e^eps Q(L > eps)``, in closed form
through the normal CDF. On a grid ``eps_i = i h`` the curve is sampled exactly and the
distribution whose curve joins those samples linearly in ``e^eps`` is built ("connect the
dots", Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022): since ``delta`` is convex in
``e^eps`` the joined curve lies above the true one, so the discrete PLD is pessimistic (a
valid upper bound). ``T`` steps compose by convolving the PLD with itself (FFT, by repeated
squaring); mass below ``1e-15`` is cut from each tail after every convolution, the lower tail
moved up onto the first kept point and the upper tail to ``L = inf`` (both pessimistic).
Epsilon at ``delta`` is read off the composed curve, the larger of the two directions.

Plain numpy and scipy (a jax dependency); :func:`funnn.privacy.epsilon` with
``accountant="pld"`` calls :func:`poisson_gaussian_epsilon`. The tests check it against the
exact Gaussian epsilon (``q = 1``) and against dp-accounting's PLD accountant.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

__all__ = ["poisson_gaussian_epsilon"]

_TAIL = 1e-15       # mass cut from each tail after each convolution


def _curve(sigma: float, q: float, remove: bool):
    """``(delta(eps) for an array eps, lowest, highest)``: one step's hockey-stick curve and
    the range of the privacy loss kept (beyond ``x = 1 + 12 sigma`` lies below 1e-32)."""
    s2 = sigma * sigma
    log1mq = math.log1p(-q) if q < 1 else -math.inf
    # the loss at x = 1 + 12 sigma (remove direction; the add direction is its negative)
    u_hi = (1 + 24 * sigma) / (2 * s2)
    l_hi = float(np.logaddexp(log1mq, math.log(q) + u_hi)) if q < 1 else u_hi
    u_lo = (-24 * sigma - 1) / (2 * s2)                     # x = -12 sigma
    l_lo = float(np.logaddexp(log1mq, math.log(q) + u_lo)) if q < 1 else u_lo

    def x_of(e):        # the x where the remove-direction loss equals e (e > log(1 - q))
        with np.errstate(invalid="ignore", divide="ignore"):
            return s2 * (np.log(np.maximum(np.exp(e) - (1 - q), 1e-300)) - math.log(q)) + 0.5

    if remove:
        def delta_remove(e):
            x = x_of(e)
            t0, t1 = ndtr(-x / sigma), ndtr(-(x - 1) / sigma)
            return np.where(e <= log1mq, -np.expm1(np.minimum(e, 0)),
                            (1 - q) * t0 + q * t1 - np.exp(e) * t0)
        return delta_remove, max(log1mq, l_lo), l_hi

    def delta_add(e):
        x = x_of(-e)
        h0, h1 = ndtr(x / sigma), ndtr((x - 1) / sigma)
        return np.where(e >= -log1mq, 0.0, h0 - np.exp(e) * ((1 - q) * h0 + q * h1))
    return delta_add, -l_hi, min(-log1mq, -l_lo)


def _connect_dots(delta, lo: float, hi: float, h: float):
    """``(masses, first index, mass at infinity)`` of the pessimistic PLD on ``i h``."""
    idx = np.arange(math.floor(lo / h), math.ceil(hi / h) + 1)
    grid = idx * h
    d = np.maximum(delta(grid), 0.0)
    d = np.minimum.accumulate(d)                  # the curve falls; keep rounding from rising
    eg = np.exp(grid - grid[-1])                  # e^eps scaled: only ratios enter
    b = (d[:-1] - d[1:]) / (eg[1:] - eg[:-1])
    inf_mass = float(d[-1])
    a = d[:-1] - inf_mass + eg[:-1] * b           # finite mass above grid[j]
    w = np.empty(len(grid))
    w[1:] = a - np.append(a[1:], 0.0)
    w[0] = 1.0 - inf_mass - a[0]
    return np.maximum(w, 0.0), int(idx[0]), inf_mass


def _truncate(w, start: int, inf_mass: float):
    """Cut mass below :data:`_TAIL` from both ends, pessimistically (module doc)."""
    c = np.cumsum(w)
    lo = int(np.searchsorted(c, _TAIL))           # first index whose prefix reaches the tail
    r = np.cumsum(w[::-1])
    hi = len(w) - int(np.searchsorted(r, _TAIL))  # one past the last kept index
    hi = max(hi, lo + 1)
    kept = w[lo:hi].copy()
    kept[0] += c[lo] - w[lo] if lo > 0 else 0.0   # the lower tail moves up
    upper = float(w[hi:].sum())
    return kept, start + lo, 1.0 - (1.0 - inf_mass) * (1.0 - upper)


def _convolve(a, b):
    n = len(a) + len(b) - 1
    size = 1 << (n - 1).bit_length()
    return np.maximum(np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(b, size), size)[:n], 0)


def _compose(w, start: int, inf_mass: float, steps: int):
    """The ``steps``-fold self-composition, by repeated squaring with truncation."""
    result = None
    base = (w, start, inf_mass)
    while steps:
        if steps & 1:
            result = base if result is None else _truncate(
                _convolve(result[0], base[0]), result[1] + base[1],
                1 - (1 - result[2]) * (1 - base[2]))
        steps >>= 1
        if steps:
            base = _truncate(_convolve(base[0], base[0]), 2 * base[1],
                             1 - (1 - base[2]) ** 2)
    assert result is not None
    return result


def _epsilon_of(w, start: int, inf_mass: float, h: float, delta: float) -> float:
    """The smallest ``eps >= 0`` with ``delta(eps) <= delta`` on the composed PLD."""
    if inf_mass >= delta:
        return math.inf
    values = (start + np.arange(len(w))) * h
    keep = values > 0
    v, m = values[keep], w[keep]
    if v.size == 0:
        return 0.0
    # delta(e) = sum_{v > e} m (1 - e^(e - v)) + inf: suffix sums give it at every point
    s1 = np.append(np.cumsum(m[::-1])[::-1], 0.0)
    s2 = np.append(np.cumsum((m * np.exp(-v))[::-1])[::-1], 0.0)
    tail = s2[1:]
    with np.errstate(divide="ignore"):
        scaled = np.where(tail > 0, np.exp(v + np.log(np.where(tail > 0, tail, 1.0))), 0.0)
    at = s1[1:] - scaled + inf_mass                       # delta at e = v_j
    if s1[0] - s2[0] + inf_mass <= delta:                 # already at e = 0
        return 0.0
    j = int(np.argmax(at <= delta))                       # first grid point that meets it
    lo = 0.0 if j == 0 else float(v[j - 1])
    # on (lo, v_j] delta(e) = s1[j] - e^e s2[j] + inf: solve it for delta
    return max(lo, float(math.log((s1[j] + inf_mass - delta) / s2[j])))


def poisson_gaussian_epsilon(sigma: float, q: float, steps: int, delta: float,
                             interval: float = 1e-4) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (rate ``q``,
    noise multiplier ``sigma``, add/remove-one) by the pessimistic PLD on a loss grid of
    spacing ``interval`` (module doc): an upper bound, tight to about ``interval``."""
    out = 0.0
    for remove in (True, False):
        curve, lo, hi = _curve(sigma, q, remove)
        w, start, inf_mass = _truncate(*_connect_dots(curve, lo, hi, interval))
        w, start, inf_mass = _compose(w, start, inf_mass, steps)
        out = max(out, _epsilon_of(w, start, inf_mass, interval, delta))
    return out
