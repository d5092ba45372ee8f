"""The documentation: every tutorial and curriculum page runs, and the reference covers funnn.

Each page runs in its own process (``tests/doc_runner.py``): its Python blocks in order, in
one namespace, with JAX's defaults (float32, no ``jax_enable_x64`` from this suite's
conftest), as a reader would run them. ``mkdocs build --strict`` itself runs in ``.ci/run``.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([*DOCS.glob("tutorials/*.md"), *DOCS.glob("curriculum/*.md")])
SEEDS = ROOT.parent / "shared" / "seeds"

# Modules with no page of their own: helpers of other modules, documented there.
INTERNAL = {"rundir", "numerics", "bench.suites", "bench.peers"}

sys.path.insert(0, str(ROOT / "tests"))
import doc_runner  # noqa: E402


@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_page_runs(page):
    found = doc_runner.blocks(page.read_text())
    skipped = [b for b in found if b[2]]
    if page.name != "index.md":
        assert found, f"{page.name} has no python blocks"
        assert 2 * len(skipped) < len(found), (     # most blocks run
            f"{page.name}: {len(skipped)} of {len(found)} blocks are marked not run")
    if not found:
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg"}
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "doc_runner.py"), str(page)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{page.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert f"ran {len(found) - len(skipped)} of {len(found)}" in proc.stdout


def test_runner_reads_blocks_and_skip_marks():
    text = "x\n```python\na = 1\n```\n<!-- not run: slow -->\n```python\nb = 2\n```\n" \
           "```bash\nls\n```\n  ```python\n  c = 3\n  ```\n"
    got = doc_runner.blocks(text)
    assert [(src, why) for _, src, why in got] == [("a = 1\n", None), ("b = 2\n", "slow"),
                                                   ("c = 3\n", None)]
    assert got[0][0] == 3


def _public_modules():
    pkg = ROOT / "funnn"
    mods = set()
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if not parts or any(p.startswith("_") for p in parts):
            continue
        mods.add(".".join(parts))
    return sorted(mods - INTERNAL)


def test_every_public_module_has_an_api_page():
    """One line per module: ``- funnn.<module>: api/<module>.md`` under "API reference" in
    ``mkdocs.yml``; the page is generated from it (``docs/hooks/funnn_docs.py``) unless
    ``docs/api/<module>.md`` is written by hand, which must then render the module."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for mod in _public_modules():
        assert f"- funnn.{mod}: api/{mod}.md" in nav, (
            f"funnn.{mod} has no API page: add the line '      - funnn.{mod}: api/{mod}.md' "
            f"under 'API reference' in mkdocs.yml")
        page = DOCS / "api" / f"{mod}.md"
        if page.exists():
            assert f"::: funnn.{mod}" in page.read_text()


def test_one_curriculum_page_per_seed():
    pages = {p.name[:3] for p in DOCS.glob("curriculum/[0-9][0-9][0-9]_*.md")}
    if SEEDS.is_dir():
        seeds = {p.name[:3] for p in SEEDS.glob("[0-9][0-9][0-9]_*.txt")}
        assert seeds <= pages, f"seed notes without a page: {sorted(seeds - pages)}"
    assert {"000", "001", "002", "003", "004"} <= pages


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        rel = page.relative_to(DOCS).as_posix()
        assert rel in nav, f"mkdocs.yml nav lacks {rel}"
