"""funnn._files: strict JSON (the format of metrics.json and bench.json)."""

from funnn import _files


def test_strict_json_helper():
    assert _files.strict_json({"a": float("nan"), "b": [float("inf"), 1.0]}) == \
        '{"a": null, "b": [null, 1.0]}'
