"""Imports point down the package map (docs: DESIGN's "Package map"), and none forms a cycle.

Read from the source with ``ast`` (nothing is imported): every ``import funnn.x`` and
``from funnn.x import y``, at the top of a module or inside a function.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "funnn"

# The package map, ground floor first: a module may import its own row and the rows before it.
FLOORS = [
    ["errors", "trees", "compile", "dtypes", "_files"],
    ["core"],
    ["summary"],
    ["activations", "losses"],
    ["precision"],
    ["layers"],
    ["autodiff", "manual"],
    ["engines"],
    ["curvature"],
    ["calibration", "laplace", "optimizers"],
    ["gradcheck", "numerics"],
    ["control"],
    ["generate"],
    ["data", "checkpoint"],
    ["_rendezvous", "distributed", "parallel"],
    ["privacy", "_pld", "_dp_clip"],
    ["rundir"],
    ["models"],
    ["train"],
    ["interop"],
    ["bench"],
    ["cli"],
]


def _modules() -> dict:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for i, row in enumerate(FLOORS):
        if parts[1] in row:
            return i
    return None


def _imports(mods: dict) -> dict:
    """``{module: {(imported, top_level)}}`` within funnn."""
    graph: dict = {}
    for name, f in mods.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names
                        if f"{node.module}.{a.name}" in mods]
                targets = subs or [node.module]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t not in (name, "funnn"):
                    found.add((t, node.col_offset == 0))
        graph[name] = found
    return graph


def test_every_module_is_on_the_map():
    missing = [m for m in _modules() if m != "funnn" and _floor(m) is None]
    assert not missing, f"add these modules to the package map (and FLOORS here): {missing}"


def test_no_module_imports_one_above_it():
    up = []
    for name, targets in _imports(_modules()).items():
        if name == "funnn":
            continue
        for t, _ in targets:
            same_package = name.rsplit(".", 1)[0] == t.rsplit(".", 1)[0]
            if not same_package and _floor(t) > _floor(name):
                up.append(f"{name} -> {t}")
    assert not up, f"imports pointing up the package map: {up}"


def test_no_import_cycle():
    graph = {n: {t for t, top in ts if top} for n, ts in _imports(_modules()).items()}
    state: dict = {}

    def visit(n, path):
        if state.get(n) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(n):] + [n])}")
        if state.get(n) == "done":
            return
        state[n] = "open"
        for m in sorted(graph.get(n, ())):
            if m != "funnn.layers" or not n.startswith("funnn.layers."):
                visit(m, path + [n])
        state[n] = "done"

    for n in sorted(graph):
        visit(n, [])


def test_the_command_line_starts_without_the_heavy_optional_imports():
    """``funnn --help`` (every ``funnn`` command's start) loads neither ``scipy.signal`` (only
    the PLD accountant needs it: 0.7 s) nor a peer library or plotting: a command pays for
    what it uses."""
    import subprocess
    import sys

    probe = ("import sys, runpy\nsys.argv = ['funnn', '--help']\n"
             "try:\n    runpy.run_module('funnn.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "heavy = ('scipy.signal', 'torch', 'flax', 'equinox', 'matplotlib')\n"
             "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
