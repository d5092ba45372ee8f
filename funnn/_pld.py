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
from scipy.special import log_ndtr, ndtr

__all__ = ["poisson_gaussian_epsilon"]

_TAIL = 1e-15       # mass cut from each tail after each convolution
_MAX_POINTS = 1e5   # one step's loss grid is coarsened beyond this many points


def _curve(sigma: float, q: float, remove: bool):
    """``(delta(eps) for an array eps, lowest, highest)``: one step's hockey-stick curve and
    the range of the privacy loss kept (beyond ``x = 1 + 12 sigma`` lies below 1e-32).
    Written with logarithms throughout, so a loss in the thousands (little noise) neither
    overflows nor loses the curve."""
    s2 = sigma * sigma
    log1mq = math.log1p(-q) if q < 1 else -math.inf
    log_q = math.log(q)

    def loss_at(x):     # the remove-direction loss at x, log(1 - q + q e^((2x - 1)/(2 s2)))
        return float(np.logaddexp(log1mq, log_q + (2 * x - 1) / (2 * s2)))

    l_hi, l_lo = loss_at(1 + 12 * sigma), loss_at(-12 * sigma)

    def x_of(e):        # where the remove-direction loss equals e (> log(1 - q))
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.log(-np.expm1(np.minimum(log1mq - e, 0.0)))   # log(1 - (1-q) e^-e)
        return s2 * (e + gap - log_q) + 0.5

    if remove:
        def delta_remove(e):
            x = x_of(e)
            t0, t1 = ndtr(-x / sigma), ndtr(-(x - 1) / sigma)
            exp_t0 = np.exp(e + log_ndtr(-x / sigma))                 # e^e t0, no overflow
            return np.where(e <= log1mq, -np.expm1(np.minimum(e, 0)),
                            (1 - q) * t0 + q * t1 - exp_t0)
        return delta_remove, max(log1mq, l_lo), l_hi

    def delta_add(e):
        x = x_of(-e)
        h0, h1 = ndtr(x / sigma), ndtr((x - 1) / sigma)
        return np.where(e >= -log1mq, 0.0, h0 - np.exp(e) * ((1 - q) * h0 + q * h1))
    return delta_add, -l_hi, min(-log1mq, -l_lo)


def _connect_dots(delta, lo: float, hi: float, h: float):
    """``(masses, first index, mass at infinity)`` of the pessimistic PLD on ``i h``.

    With masses ``w_i`` at ``eps_i`` the curve is ``sum_{i > j} w_i (1 - e^(eps - eps_i))
    + inf`` on ``[eps_j, eps_(j+1)]``, linear in ``e^eps``; matching the samples ``d_j`` at
    both ends gives the finite mass above ``eps_j``:
    ``A_j = d_j - inf + (d_j - d_(j+1)) / (e^h - 1)``, and ``w_(j+1) = A_j - A_(j+1)``."""
    idx = np.arange(math.floor(lo / h), math.ceil(hi / h) + 1)
    d = np.maximum(delta(idx * h), 0.0)
    d = np.minimum.accumulate(d)                  # the curve falls; keep rounding from rising
    inf_mass = float(d[-1])
    a = d[:-1] - inf_mass + (d[:-1] - d[1:]) / math.expm1(h)
    w = np.empty(len(idx))
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
    """The smallest ``eps >= 0`` with ``delta(eps) <= delta`` on the composed PLD.

    On ``(v_(j-1), v_j]`` the curve is ``S1_j + inf - e^(eps - v_j) S2_j`` with the suffix
    sums ``S1_j = sum_{k >= j} w_k`` and ``S2_j = sum_{k >= j} w_k e^-((k - j) h)`` (a
    decaying recurrence, no overflow), so the crossing is solved in closed form."""
    if inf_mass >= delta:
        return math.inf
    values = (start + np.arange(len(w))) * h
    keep = values > 0
    v, m = values[keep], w[keep]
    if v.size == 0 or float(m.sum()) + inf_mass <= delta:
        return 0.0
    # scipy.signal costs 0.7 s to import, paid by every `import funnn` (every `funnn` command)
    # if imported at the top; only an epsilon under the PLD accountant needs it
    from scipy.signal import lfilter

    s1 = np.cumsum(m[::-1])[::-1]
    s2 = lfilter([1.0], [1.0, -math.exp(-h)], m[::-1])[::-1]
    # delta at e = v_j: the terms k > j, S1_(j+1) - e^-h S2_(j+1)
    at = np.append(s1[1:] - math.exp(-h) * s2[1:], 0.0) + inf_mass
    if s1[0] + inf_mass - math.exp(-float(v[0])) * s2[0] <= delta:      # already at e = 0
        return 0.0
    j = int(np.argmax(at <= delta))               # the first grid point that meets it
    lo = 0.0 if j == 0 else float(v[j - 1])
    rest = float(s1[j]) + inf_mass - delta
    if not s2[j] > 0 or not rest > 0:
        return float(v[j])
    return float(min(max(lo, float(v[j]) + math.log(rest / float(s2[j]))), float(v[j])))


def poisson_gaussian_epsilon(sigma: float, q: float, steps: int, delta: float,
                             interval: float = 1e-4) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (rate ``q``,
    noise multiplier ``sigma``, add/remove-one) by the pessimistic PLD on a loss grid of
    spacing ``interval`` (module doc): an upper bound, tight to about ``interval``. Where one
    step's loss spans more than ``1e5`` intervals (little noise: sigma below about 0.9 at
    rate 0.05) the grid is that span / 1e5 instead, which keeps the cost bounded and the
    bound valid, a little less tight."""
    out = 0.0
    for remove in (True, False):
        curve, lo, hi = _curve(sigma, q, remove)
        h = max(interval, (hi - lo) / _MAX_POINTS)    # little noise: a coarser, still valid grid
        w, start, inf_mass = _truncate(*_connect_dots(curve, lo, hi, h))
        w, start, inf_mass = _compose(w, start, inf_mass, steps)
        out = max(out, _epsilon_of(w, start, inf_mass, h, delta))
    return out
