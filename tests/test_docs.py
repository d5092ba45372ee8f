"""The documentation: every tutorial, reference and curriculum page runs, the README's Python
runs, and the API reference covers funnn.

Each page runs in its own process (``tests/doc_runner.py``, forked from a server that has
imported JAX and funnn: ``_PageServer``): its Python blocks in order, in one namespace, with
JAX's defaults (float32, no ``jax_enable_x64`` from this suite's conftest), as a reader would
run them. Running a page costs seconds (a fresh JAX, compiles), so those tests are ``slow``;
the checks of the pages' structure are fast.
``mkdocs build --strict`` itself runs in ``.ci/run``.
"""

import ast
import json
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([*DOCS.glob("tutorials/*.md"), *DOCS.glob("reference/*.md"),
                *DOCS.glob("curriculum/*.md")])
README = ROOT / "README.md"
SEEDS = ROOT.parent / "shared" / "seeds"

# Modules with no page of their own: helpers of other modules, documented there.
INTERNAL = {"rundir", "numerics", "bench.suites", "bench.peers"}

sys.path.insert(0, str(ROOT / "tests"))
import _flags  # noqa: E402
import doc_runner  # noqa: E402


def _page_env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg"}
    env.pop("JAX_ENABLE_X64", None)
    # A page starts from XLA's flags as a reader's shell has them, but for the suite's
    # compile flags (tests/conftest.py; a third to a half less CPU on most pages): a page that
    # wants simulated devices asks for them itself.
    level = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if f.startswith(_flags.names())]
    env.pop("XLA_FLAGS", None)
    if level:
        env["XLA_FLAGS"] = " ".join(level)
    return env


class _PageServer:
    """``tests/doc_runner.py --serve`` for this test process: each page runs in a process
    forked from one that has imported JAX, funnn and optax (no backend started), instead of a
    new interpreter importing them again. Where there is no server (not Linux, or it refused),
    a page runs in a new interpreter, as a reader would run it."""

    def __init__(self):
        self.proc = None
        if sys.platform == "linux":
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "doc_runner.py"), "--serve"], cwd=ROOT,
                env=_page_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                start_new_session=True)
            if self.proc.stdout.readline().strip() != "ready":
                self.close()

    def run(self, page: pathlib.Path, cwd: pathlib.Path, timeout: float = 300):
        if self.proc is None:
            return subprocess.run(
                [sys.executable, str(ROOT / "tests" / "doc_runner.py"), str(page)], cwd=cwd,
                env=_page_env(), capture_output=True, text=True, timeout=timeout)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = pathlib.Path(tmp, "out"), pathlib.Path(tmp, "err")
            self.proc.stdin.write(json.dumps({"page": str(page), "cwd": str(cwd),
                                              "out": str(out), "err": str(err)}) + "\n")
            self.proc.stdin.flush()
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                self.close()                    # the page and its server, together
                raise subprocess.TimeoutExpired(str(page), timeout)
            answer = self.proc.stdout.readline()
            if not answer:                      # the server died: later pages run on their own
                self.close()
                raise RuntimeError(f"the docs page server exited while running {page.name}")
            code = json.loads(answer)["returncode"]
            return subprocess.CompletedProcess(str(page), code, out.read_text(), err.read_text())

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def pages():
    server = _PageServer()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_page_runs(page, pages):
    found = doc_runner.blocks(page.read_text())
    skipped = [b for b in found if b[2]]
    if page.name != "index.md":
        assert found, f"{page.name} has no python blocks"
        assert 2 * len(skipped) < len(found), (     # most blocks run
            f"{page.name}: {len(skipped)} of {len(found)} blocks are marked not run")
    if not found:
        return
    proc = pages.run(page, ROOT)
    assert proc.returncode == 0, (
        f"{page.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert f"ran {len(found) - len(skipped)} of {len(found)}" in proc.stdout


@pytest.mark.slow
def test_readme_python_runs(tmp_path, pages):
    """Every Python block of the README runs, none skipped, in a fresh directory (the
    quickstart writes ``runs/quickstart``); run twice, its ``resume="auto"`` resumes."""
    found = doc_runner.blocks(README.read_text())
    assert found and not [b for b in found if b[2]], "README python blocks must all run"
    for _ in range(2):
        proc = pages.run(README, tmp_path)
        assert proc.returncode == 0, f"README failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        assert f"ran {len(found)} of {len(found)}" in proc.stdout
    assert (tmp_path / "runs" / "quickstart").is_dir()


def test_readme_is_a_front_door():
    """At most 200 lines; the two set-up commands come first, the test command exactly as
    ``.ci/run`` runs it; every relative link points at a file of the repository."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines"
    fences = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    (lang1, train_cmd), (lang2, test_cmd) = fences[0], fences[1]
    assert lang1 == lang2 == "bash"
    assert train_cmd.strip().endswith("funnn train")
    assert test_cmd.strip().endswith('pip install -e ".[test]" && python -m pytest -n 2 -q')
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert 'pip install -e ".[test]" && python -m pytest -n 2 -q' in ci.read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


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


def test_layers_page_lists_every_constructor():
    """``docs/api/layers.md`` renders only the package docstring (``members: false``), so its
    table must name every export of ``funnn.layers``, each in its own row."""
    tree = ast.parse((ROOT / "funnn" / "layers" / "__init__.py").read_text())
    exported = next(ast.literal_eval(node.value) for node in tree.body   # without importing
                    if isinstance(node, ast.Assign)
                    and getattr(node.targets[0], "id", "") == "__all__")
    rows = re.findall(r"^\| \[?`(\w+)`", (DOCS / "api" / "layers.md").read_text(), flags=re.M)
    assert sorted(rows) == sorted(exported), (
        f"docs/api/layers.md lacks {sorted(set(exported) - set(rows))}, "
        f"lists unexported {sorted(set(rows) - set(exported))}")


def test_hook_renders_sphinx_roles_as_code():
    """Docstrings' ``:func:`x``` reach the page as ``:func:<code>x</code>`` (Markdown makes
    the backticks code); the hook drops the role, and with ``~`` the module path, as Sphinx
    does. A literal in double backticks needs nothing: Markdown reads it as code too. A
    paragraph ending ``::`` before a code block shows one colon."""
    pytest.importorskip("mkdocs")
    import importlib.util
    spec = importlib.util.spec_from_file_location("funnn_docs", DOCS / "hooks" / "funnn_docs.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    html = ("<p>see :func:<code>fit</code>, :class:<code>~funnn.core.Layer</code>, "
            ":mod:<code>funnn.precision</code> and :meth:<code>a.b</code>; "
            ":attr:<code>x</code> :data:<code>y</code> :exc:<code>~e.ShapeError</code></p>")
    assert hook.on_page_content(html) == (
        "<p>see <code>fit</code>, <code>Layer</code>, <code>funnn.precision</code> and "
        "<code>a.b</code>; <code>x</code> <code>y</code> <code>ShapeError</code></p>")
    block = '\n<div class="highlight"><pre><code>init(key, shape)\n</code></pre></div>'
    assert hook.on_page_content(f"<p>Stateless layers::</p>{block}") == (
        f"<p>Stateless layers:</p>{block}")                      # reST's literal-block marker
    assert hook.on_page_content(f"<p>::</p>{block}") == block
    kept = "<p>a::</p><p>b</p><pre><code>x::</code></pre>"     # no block after; a listing
    assert hook.on_page_content(kept) == kept


def test_curriculum_index_points_only_at_what_the_repository_has():
    """Every link of ``docs/curriculum/index.md`` is a page beside it, and every path it
    names in backticks (``docs/...``, ``examples/...``) is in the repository."""
    index = DOCS / "curriculum" / "index.md"
    text = index.read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (index.parent / target).exists(), f"curriculum/index.md links to {target}"
    paths = re.findall(r"`((?:[\w.-]+/)+(?:[\w-]+\.\w+)?)`", text)   # folder/ or folder/file.ext
    for path in paths:
        assert (ROOT / path).exists(), f"curriculum/index.md names {path}, not in the repository"
