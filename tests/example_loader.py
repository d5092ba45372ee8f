"""Load an example script by file path (examples/ is not a package).

Its __main__ block does not run.
"""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    """Import ``examples/<name>.py`` (``name`` may contain a sub-folder, e.g. ``programs/x``)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location("funnn_example_" + name.replace("/", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
