"""``funnn bench compare OLD NEW``: what changed between two runs, and whether to fail.

Rows are matched by suite, group name and implementation. For each, the change is ``new /
old`` with a 95% bootstrap interval (:func:`funnn.bench.stats.change_summary`), on one of two
bases:

- ``"ratio"`` (the default): the row's per-round ratios to its group's baseline. A machine
  that is busier during one run slows the baseline and the row alike, so this basis survives
  a shared machine; it asks "did this implementation get slower *relative to* its baseline".
  Baseline rows are shown by time but take no part in the gate on this basis.
- ``"time"``: per-round median seconds per call; every row, baselines included, is gated.
  Use it on a dedicated machine, or when the baseline itself is what changed.

"faster" or "slower" is said only where the whole interval clears ``1 ± 2%``, else "no
change". A gated row is a *regression* when its whole interval lies above ``1 + fail_above``:
the command then exits 1 and names it.
Differences in the environments (device, versions, flags, threads) are warned about first:
a change across machines or settings is not a change in the code.
"""

from __future__ import annotations

import json
import os

from funnn.bench import stats
from funnn.bench.env import COMPARED
from funnn.core import ConfigError

__all__ = ["load", "compare", "format_compare", "parse_fraction", "main"]


def load(path: str) -> dict:
    """A ``bench.json`` (or a directory holding one) of format ``funnn.bench/2``."""
    file = os.path.join(path, "bench.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            doc = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {file!r} as bench.json ({err})",
                          ("bench", "compare")) from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != "funnn.bench/2":
        raise ConfigError(f"{file}: expected format funnn.bench/2, got {fmt!r} (format /1 keeps "
                          f"no per-round medians: rerun it with this funnn)", ("bench", "compare"))
    return doc


def parse_fraction(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ConfigError(f"--fail-above: expected a percentage like 5%, got {text!r}",
                          ("bench", "compare")) from None
    if v < 0:
        raise ConfigError(f"--fail-above: expected a non-negative threshold, got {text!r}",
                          ("bench", "compare"))
    return v


def _key(r: dict) -> tuple:
    return r["suite"], r["name"], r["impl"]


def _timed(doc: dict) -> dict:
    return {_key(r): r for r in doc["results"]
            if r.get("role") != "aa" and r.get("status") == "ok" and r.get("round_medians_s")}


def env_differences(old: dict, new: dict) -> list[str]:
    """``"field: old -> new"`` for each compared environment field that differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in COMPARED
            if old.get(k) != new.get(k)]


def _basis(old_row: dict, new_row: dict, by: str) -> tuple[str, str, bool]:
    """``(field, label, gated)`` for one matched row."""
    relative = by == "ratio" and old_row.get("role") != "baseline" and \
        old_row.get("round_ratios") and new_row.get("round_ratios") and \
        old_row.get("baseline") == new_row.get("baseline")
    if relative:
        return "round_ratios", f"ratio to {new_row['baseline']}", True
    return "round_medians_s", "time", by == "time"


def compare(old: dict, new: dict, fail_above: float = 0.05, seed: int = 0,
            by: str = "ratio") -> dict:
    """Match rows of two loaded runs; see the module docstring for the bases and verdicts."""
    if by not in ("ratio", "time"):
        raise ConfigError(f"--by: expected ratio or time, got {by!r}", ("bench", "compare"))
    a, b = _timed(old), _timed(new)
    rows = []
    for k in [k for k in b if k in a]:
        field, label, gated = _basis(a[k], b[k], by)
        s = stats.change_summary(a[k][field], b[k][field], seed)
        lo, hi = s["change_ci95"]
        rows.append({"suite": k[0], "name": k[1], "impl": k[2], "basis": label,
                     "old_s": a[k]["time_median_s"], "new_s": b[k]["time_median_s"],
                     "change": s["change"], "change_ci95": [lo, hi],
                     "verdict": stats.verdict(lo, hi), "gated": gated,
                     "regression": gated and lo > 1.0 + fail_above})
    return {"rows": rows, "fail_above": fail_above, "by": by,
            "env_differences": env_differences(old.get("env", {}), new.get("env", {})),
            "only_old": [" / ".join(k) for k in a if k not in b],
            "only_new": [" / ".join(k) for k in b if k not in a],
            "regressions": [f"{r['name']}: {r['impl']}" for r in rows if r["regression"]]}


def format_compare(result: dict) -> str:
    """The comparison as text: warnings, one line per matched row, the verdict."""
    lines = [f"warning: environments differ: {d}" for d in result["env_differences"]]
    w = max([20] + [len(r["impl"]) + 1 for r in result["rows"]])
    group = None
    for r in result["rows"]:
        if (r["suite"], r["name"]) != group:
            group = (r["suite"], r["name"])
            lines += ["", f"[{r['suite']}] {r['name']}",
                      f"  {'impl':<{w}}{'old ms':>9}{'new ms':>9}  {'new/old [95% CI]':<20}"
                      "verdict (basis)"]
        lo, hi = r["change_ci95"]
        mark = "!" if r["regression"] else " "
        gate = "" if r["gated"] else ", not gated"
        lines.append(f"{mark} {r['impl']:<{w}}{1e3 * r['old_s']:>9.3f}{1e3 * r['new_s']:>9.3f}  "
                     f"{r['change']:.2f} [{lo:.2f}, {hi:.2f}]".ljust(w + 42)
                     + f"{r['verdict']} ({r['basis']}{gate})")
    for label in ("only_old", "only_new"):
        if result[label]:
            lines.append(f"rows only in the {label[5:]} run: {', '.join(result[label])}")
    if not result["rows"]:
        lines.append("no timed rows in common")
    thr = f"{100 * result['fail_above']:g}%"
    lines.append("")
    lines.append(f"REGRESSION (slower by more than {thr} with 95% confidence): "
                 + "; ".join(result["regressions"]) if result["regressions"]
                 else f"no row slower by more than {thr} with 95% confidence")
    return "\n".join(lines)


def main(old_path: str, new_path: str, fail_above: str | float = "5%",
         as_json: bool = False, by: str = "ratio") -> int:
    """Print the comparison of two runs; return 1 on a regression, else 0."""
    thr = parse_fraction(str(fail_above)) if isinstance(fail_above, str) else float(fail_above)
    result = compare(load(old_path), load(new_path), thr, by=by)
    if as_json:
        from funnn import _files
        print(_files.strict_json(result, indent=2))
    else:
        print(format_compare(result))
    return 1 if result["regressions"] else 0
