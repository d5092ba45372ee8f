"""MkDocs hooks for the funnn site (listed under ``hooks:`` in ``mkdocs.yml``).

1. **API pages from the nav.** A nav entry ``- funnn.x.y: api/x.y.md`` whose file does not
   exist gets a generated page holding ``::: funnn.x.y`` (mkdocstrings renders the module's
   docstrings there). Adding a module to the reference is therefore one line in
   ``mkdocs.yml``; a page written by hand in ``docs/api/`` (with options, or prose) wins.
2. **Sphinx roles as code.** The docstrings use ``:func:`x``` and ``:class:`~a.b.C```, which
   Markdown would render as the literal ``:class:`` before the code; the role is dropped and,
   as Sphinx does, the module path of a ``~`` target too. Nothing is fetched or linked.
3. **reST literal blocks.** A paragraph ending ``text::`` before an indented block (which
   Markdown already makes a code block) shows one colon, as Sphinx shows it; a paragraph
   that is only ``::`` goes. Source listings (``<pre>``) are left as they are.
"""

from __future__ import annotations

import re

from mkdocs.structure.files import File

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):<code>(~?)([^<]*)</code>")
_API = re.compile(r"^api/(?P<module>[\w.]+)\.md$")
_LITERAL = re.compile(r"(?:<p>::</p>|::</p>)"                     # before a code block
                      r"(?=\s*<(?:div class=\"(?:language-\w+ )?highlight|pre))")


def _nav_paths(nav) -> list[str]:
    out: list[str] = []
    items = nav.values() if isinstance(nav, dict) else nav or []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (dict, list)):
            out += _nav_paths(item)
    return out


def on_files(files, config, **kwargs):
    for path in _nav_paths(config["nav"]):
        m = _API.match(path)
        if m and files.get_file_from_path(path) is None:
            module = m.group("module")
            module = module if module.startswith("funnn") else f"funnn.{module}"
            files.append(File.generated(config, path, content=f"# `{module}`\n\n::: {module}\n"))
    return files


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def _literal(match: re.Match) -> str:
    return "" if match.group(0).startswith("<p>") else ":</p>"


def on_page_content(html, **kwargs):
    return _LITERAL.sub(_literal, _ROLE.sub(_code, html))
