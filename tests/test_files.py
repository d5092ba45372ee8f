"""funnn._files: strict JSON (the format of metrics.json and bench.json), figures."""

import sys

import pytest

from funnn import _files


def test_strict_json_helper():
    assert _files.strict_json({"a": float("nan"), "b": [float("inf"), 1.0]}) == \
        '{"a": null, "b": [null, 1.0]}'


def test_curves_are_drawn_without_touching_the_callers_matplotlib(tmp_path):
    """``plot_curves`` (``fit`` with a run directory, ``funnn train``) draws on a bare
    ``Figure``: the caller's backend stays what it was and no pyplot figure is left open."""
    matplotlib = pytest.importorskip("matplotlib")
    from funnn import rundir

    before = matplotlib.get_backend()
    matplotlib.use("svg")                           # what a notebook's backend is to Agg
    try:
        history = [{"epoch": 1, "train_loss": 1.0, "eval_loss": 1.2, "eval_accuracy": 0.5},
                   {"epoch": 2, "train_loss": 0.5, "eval_loss": 0.7, "eval_accuracy": 0.8}]
        assert rundir.plot_curves(str(tmp_path / "curves.png"), history)
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not rundir.plot_curves(str(tmp_path / "none.png"), [])
        if "matplotlib.pyplot" in sys.modules:
            assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    finally:
        matplotlib.use(before)
