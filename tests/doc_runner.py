"""Run the Python blocks of a documentation page in order, in one namespace.

``python tests/doc_runner.py docs/tutorials/quickstart.md`` runs every fenced ```python block
of the page, top to bottom, as one program (a later block sees the names an earlier one made),
the way a reader would paste them into one session. A block directly preceded by the line
``<!-- not run: REASON -->`` (invisible on the rendered page) is skipped: shell commands are
fenced as ```bash and never run; long trainings are marked. Tracebacks name the page and the
line of the Markdown file.

Exit status 0 when every block ran; the last line printed is ``ran N of M python blocks``.
``--timings`` after the path prints each block's seconds to stderr.

``python tests/doc_runner.py --serve`` is how the test suite runs pages (Linux): it imports
what the pages import once, then runs each page named on its standard input in a child forked
from it. No JAX backend is started before the fork, so each page still starts a fresh JAX
(its own devices, flags and ``jax.config``) and pays for its own work, not for importing JAX,
funnn and optax again (2.4 s a page).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import sys
import time
import traceback

FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)")
SKIP = re.compile(r"^\s*<!--\s*not run:\s*(.+?)\s*-->\s*$")


def blocks(text: str):
    """``[(first_line_number, source, skipped_reason_or_None)]`` for the python blocks."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(prev)
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^{indent}```", lines[j]):
            body.append(lines[j][len(indent):])
            j += 1
        if lang == "python":
            out.append((i + 2, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i = j + 1
    return out


def run(path: str, timings: bool = False) -> tuple[int, int]:
    page = pathlib.Path(path)
    found = blocks(page.read_text())
    ns: dict = {"__name__": "__main__"}
    ran = 0
    for line, src, skipped in found:
        if skipped:
            continue
        # pad with newlines so the traceback's line numbers are the Markdown file's
        code = compile("\n" * (line - 1) + src, str(page), "exec")
        t0 = time.perf_counter()
        exec(code, ns)
        if timings:
            print(f"[block at line {line}: {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
        ran += 1
    return ran, len(found)


# What most pages import: loaded once by the server, before any page runs.
PRELOAD = ("numpy", "jax", "jax.numpy", "optax", "matplotlib.pyplot", "funnn", "funnn.train",
           "funnn.layers", "funnn.gradcheck", "funnn.privacy", "funnn.curvature",
           "funnn.parallel", "funnn.checkpoint", "funnn.bench")


def _run_forked(request: dict) -> int:
    """Run one page in a child of this process; its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:                                            # the child: never returns
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(request["cwd"])
        sys.argv = [__file__, request["page"]]
        ran, total = run(request["page"])
        print(f"ran {ran} of {total} python blocks")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Answer ``{"page", "cwd", "out", "err"}`` lines on stdin with ``{"returncode"}`` lines."""
    for name in PRELOAD:
        importlib.import_module(name)
    from jax._src import xla_bridge
    if getattr(xla_bridge, "_backends", None):      # a child would inherit a live backend
        print("refused: a JAX backend started while importing", flush=True)
        return
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps({"returncode": _run_forked(json.loads(line))}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        ran, total = run(sys.argv[1], timings="--timings" in sys.argv[2:])
        print(f"ran {ran} of {total} python blocks")
