"""Run the Python blocks of a documentation page in order, in one namespace.

``python tests/doc_runner.py docs/tutorials/quickstart.md`` runs every fenced ```python block
of the page, top to bottom, as one program (a later block sees the names an earlier one made),
the way a reader would paste them into one session. A block directly preceded by the line
``<!-- not run: REASON -->`` (invisible on the rendered page) is skipped: shell commands are
fenced as ```bash and never run; long trainings are marked. Tracebacks name the page and the
line of the Markdown file.

Exit status 0 when every block ran; the last line printed is ``ran N of M python blocks``.
``--timings`` after the path prints each block's seconds to stderr.
"""

from __future__ import annotations

import pathlib
import re
import sys
import time

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


if __name__ == "__main__":
    ran, total = run(sys.argv[1], timings="--timings" in sys.argv[2:])
    print(f"ran {ran} of {total} python blocks")
