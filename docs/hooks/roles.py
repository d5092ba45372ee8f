"""MkDocs hook: show the Sphinx roles of funnn's docstrings (:func:`x`, :class:`~a.b.C`) as code.

The docstrings are read by humans in the source and by mkdocstrings here; Markdown renders
``:class:`Layer``` as the literal text ``:class:`` followed by code. This drops the role and,
as Sphinx does, the module path of a ``~``-prefixed target. Nothing is fetched or linked.
"""

import re

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html, **kwargs):
    return _ROLE.sub(_code, html)
