"""What a run leaves behind: the table, ``bench.json`` (format ``funnn.bench/2``), the roofline.

Format ``/2`` renamed every field whose meaning changed from ``/1``, so that an old reader
fails loudly rather than misreads: ``median_s`` -> ``time_median_s`` (per call, also from
blocks), ``ratio`` -> ``ratio_to_baseline`` (the median of per-round ratios, with
``ratio_ci95``), ``flops``/``bytes`` -> ``flops_per_call``/``bytes_per_call`` (each with
its ``*_source``: ``xla``, ``hand count``, ``from <impl>``), ``fraction_of_peak`` ->
``fraction_of_measured_peak`` (with ``peak_flag`` above 1, and ``mfu`` against a datasheet),
``memory_bytes`` -> ``memory_compiled_bytes`` (XLA's estimate; ``memory_peak_bytes`` is
measured).
"""

from __future__ import annotations

import math
import os

__all__ = ["FORMAT", "ROW_FIELDS", "format_table", "write_outputs", "group_summaries",
           "roofline_points", "aa_flag", "check_out_dir"]

FORMAT = "funnn.bench/2"

ROW_FIELDS = (
    "suite", "name", "impl", "role", "baseline", "baseline_note", "batch", "dtype",
    "time_median_s", "time_iqr_s", "time_min_s", "time_max_s", "n_samples", "n_rounds",
    "calls_per_sample", "timing", "latency_median_s", "samples_s", "round_medians_s",
    "order_seed", "ratio_to_baseline", "ratio_ci95", "round_ratios", "noisy", "verdict",
    "flops_per_call", "flops_source", "flops_flag", "bytes_per_call", "bytes_source",
    "achieved_flops_per_s", "fraction_of_measured_peak", "peak_flag", "mfu", "mfu_source",
    "intensity", "compile_s", "memory_compiled_bytes", "memory_peak_bytes",
    "memory_peak_source", "samples_per_s", "status", "trace", "note")

AA_RANGE = (0.9, 1.1)
FIRMER = ("for a firmer number: more rounds (--rounds 15 or more), an idle machine "
          "(no other jobs; check the load average above), or a larger size")


def aa_flag(aa_row: dict) -> str | None:
    """Why a group's A/A control says its figures are unreliable, or None."""
    r, ci = aa_row.get("ratio_to_baseline"), aa_row.get("ratio_ci95")
    if r is None or ci is None:
        return None
    if not AA_RANGE[0] <= r <= AA_RANGE[1]:
        return f"A/A ratio {r:.2f} outside {AA_RANGE[0]}-{AA_RANGE[1]}"
    if not ci[0] <= 1.0 <= ci[1]:
        return f"A/A interval [{ci[0]:.2f}, {ci[1]:.2f}] excludes 1"
    return None


def group_summaries(rows: list[dict]) -> list[dict]:
    """One entry per group: its baseline, a re-basing note, and the A/A noise floor."""
    out: dict = {}
    for r in rows:
        g = out.setdefault((r["suite"], r["name"]), {
            "suite": r["suite"], "name": r["name"], "baseline": r.get("baseline"),
            "baseline_note": r.get("baseline_note"), "order_seed": r.get("order_seed"),
            "aa_ratio": None, "aa_ci95": None, "aa_flag": None})
        if r.get("role") == "aa":
            g.update(aa_ratio=r.get("ratio_to_baseline"), aa_ci95=r.get("ratio_ci95"),
                     aa_flag=aa_flag(r))
    return list(out.values())


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else format(v, spec)


def _ms(v) -> float | None:
    return None if v is None else 1e3 * v


def _ratio_text(r: dict) -> str:
    ci = r.get("ratio_ci95")
    if r.get("ratio_to_baseline") is None or ci is None:
        return "-"
    if r.get("role") == "baseline":
        return "1 (base)"
    return f"{r['ratio_to_baseline']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _head(env: dict | None, peaks: dict | None) -> list[str]:
    lines = []
    if env:
        lines.append(f"{env['device']}; funnn {env.get('funnn')}, jax {env['jax']}"
                     + "".join(f", {m} {env[m]}" for m in ("flax", "equinox", "torch")
                               if env.get(m))
                     + f"; load {env.get('load_average_start')} -> "
                       f"{env.get('load_average_end')}; order seed {env.get('seed')}")
    if peaks:
        lines.append(f"measured peaks: float32 {peaks['float32'] / 1e9:.1f} GFLOP/s "
                     f"(highest precision {peaks['float32_highest'] / 1e9:.1f}), bfloat16 "
                     f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s; memory "
                     f"{peaks['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s copy, "
                     f"{peaks.get('bandwidth_read_bytes_per_s', 0) / 1e9:.1f} GB/s read")
    lines.append("ratio: median of per-round ratios to the group's baseline [95% bootstrap "
                 "interval]; ~ noisy (interval wider than +-10%); ! see the notes below")
    return lines


def _line(r: dict, w: int, mfu: bool) -> str:
    gf = None if r["achieved_flops_per_s"] is None else r["achieved_flops_per_s"] / 1e9
    pk = None if r["fraction_of_measured_peak"] is None else 100 * r["fraction_of_measured_peak"]
    mark = "~" if r.get("noisy") else " "
    bang = "!" if r.get("peak_flag") or r.get("flops_flag") else " "
    status = r["status"] if r["status"] != "ok" else (
        f"{r['samples_per_s']:.0f} samples/s" if r.get("samples_per_s") else "")
    line = (f"{mark}{bang}{r['impl']:<{w}}{_fmt(_ms(r['time_median_s']), '.3f'):>10}"
            f"{_fmt(_ms(r['time_iqr_s']), '.3f'):>9}{_fmt(r['n_samples'], 'd'):>5}"
            f"  {_ratio_text(r):<19}{_fmt(gf, '.2f'):>9}{_fmt(pk, '.1f'):>7}")
    if mfu:
        line += f"{_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f'):>7}"
    return line + (f"{_fmt(r['intensity'], '.1f'):>8}{_fmt(r['compile_s'], '.2f'):>9}  "
                   f"{status}")


def _group_head(g: dict) -> str:
    text = f"  baseline: {g['baseline']}"
    if g["aa_ratio"] is not None:
        lo, hi = g["aa_ci95"]
        text += f"; noise floor (A/A) {g['aa_ratio']:.2f} [{lo:.2f}, {hi:.2f}]"
    if g["aa_flag"]:
        text += f"  ! UNRELIABLE GROUP: {g['aa_flag']}"
    if g["baseline_note"]:
        text += f"\n  ! {g['baseline_note']}"
    return text


def format_table(rows: list[dict], env: dict | None = None, peaks: dict | None = None) -> str:
    """A plain-text table grouped by benchmark, environment and peaks on top, notes below."""
    lines = _head(env, peaks)
    shown = [r for r in rows if r.get("role") != "aa"]
    mfu = any(r.get("mfu") for r in shown)
    w = max([26] + [len(r["impl"]) + 1 for r in shown])
    head = (f"  {'impl':<{w}}{'median ms':>10}{'IQR ms':>9}{'n':>5}  {'ratio [95% CI]':<19}"
            f"{'GFLOP/s':>9}{'% peak':>7}" + (f"{'% MFU':>7}" if mfu else "")
            + f"{'FLOP/B':>8}{'compile':>9}  status")
    groups = {(g["suite"], g["name"]): g for g in group_summaries(rows)}
    current, notes = None, []
    for r in shown:
        if (r["suite"], r["name"]) != current:
            current = (r["suite"], r["name"])
            lines += ["", f"[{r['suite']}] {r['name']}", _group_head(groups[current]), head]
        lines.append(_line(r, w, mfu))
        for key in ("peak_flag", "flops_flag"):
            if r.get(key):
                notes.append(f"! {r['name']}: {r['impl']}: {r[key]}")
    if any(r.get("noisy") for r in shown) or any(g["aa_flag"] for g in groups.values()):
        notes.append(f"~ noisy rows / unreliable groups: {FIRMER}")
    if mfu:
        notes.append(f"% MFU: against {next(r['mfu_source'] for r in shown if r.get('mfu'))}"
                     "; % peak: against this run's measured peak")
    return "\n".join(lines + ([""] + notes if notes else []))


def roofline_points(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows drawn on the roofline, and ``{"row", "why"}`` for each that cannot be."""
    pts, missing = [], []
    for r in rows:
        if r.get("role") == "aa" or r.get("status") != "ok":
            continue
        if r.get("intensity") and r.get("achieved_flops_per_s"):
            pts.append(r)
        else:
            why = "no FLOPs (a collective or data movement)" if not r.get("flops_per_call") \
                else "no byte count"
            missing.append({"row": f"{r['name']}: {r['impl']}", "why": why})
    return pts, missing


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuse an existing ``bench.json`` without ``overwrite``; fail before any timing when
    ``out_dir`` cannot be written."""
    from funnn.core import ConfigError

    path = os.path.join(out_dir, "bench.json")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{path} exists: pass --overwrite (overwrite=True) to replace it, "
                          f"or choose another --out", ("bench", "--out"))
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".funnn-bench-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"output directory {out_dir!r} cannot be written "
                          f"({err.strerror or err})", ("bench", "--out")) from None


def write_outputs(out_dir: str, env: dict, peaks: dict | None, rows: list[dict]) -> list[str]:
    """Write ``bench.json`` (format, env, peaks, groups, results, roofline) and, with
    matplotlib, ``roofline.png``."""
    from funnn import _files

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.json")
    pts, missing = roofline_points(rows)
    _files.write_json(path, {"format": FORMAT, "env": env, "peaks": peaks,
                             "groups": group_summaries(rows), "results": rows,
                             "roofline": {"drawn": len(pts), "not_drawn": missing}})
    written = [path]
    png = os.path.join(out_dir, "roofline.png")
    if peaks and _roofline(png, peaks, pts):
        written.append(png)
    return written


def _roofline(path: str, peaks: dict, pts: list[dict]) -> bool:
    from funnn import _files

    fig = _files.figure(figsize=(7, 4.5))
    if fig is None:
        return False
    lo = min([r["intensity"] for r in pts] + [0.1]) / 2
    hi = max([r["intensity"] for r in pts] + [1000.0]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    bw = peaks["bandwidth_bytes_per_s"]
    ax = fig.subplots()
    for key, style in (("float32", "-"), ("bfloat16", "--")):
        ax.plot(xs, [min(peaks[key], bw * x) for x in xs], style, color="k",
                label=f"{key} ceiling ({peaks[key] / 1e9:.0f} GFLOP/s, {bw / 1e9:.0f} GB/s)")
    for i, r in enumerate(pts):
        bound = "lower bound" in (r.get("bytes_source") or "")
        ax.scatter(r["intensity"], r["achieved_flops_per_s"], s=18, color=f"C{i % 10}",
                   marker="s" if bound else "o",
                   label=f"{r['name']}: {r['impl']}"[:60])
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)",
           ylabel="achieved FLOP/s",
           title=f"roofline (measured ceilings), {len(pts)} rows; squares: bytes a lower bound")
    ax.legend(fontsize=5, loc="lower right", ncol=2)
    fig.tight_layout()
    _files.write_figure(path, fig, dpi=110)
    return True
