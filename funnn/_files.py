"""File helpers shared by checkpoints, run directories and the CLI.

Every file funnn writes goes through :func:`write_atomic`: a temporary file in the
target's directory (named ``.funnn-tmp-*``, so a later run can recognise and remove
what a killed one left behind), fsync, then ``os.replace``; the result gets the
permissions the user's umask allows (``mkstemp`` alone would leave 0600).
JSON goes through :func:`strict_json`: non-finite numbers become ``null``, so every
parser accepts the file.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import tempfile
from typing import Any

TMP_PREFIX = ".funnn-tmp-"


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with umask-respecting permissions.

    Raises ``OSError`` (the caller turns it into its own error); on any failure the
    temporary file is removed and an existing ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=directory)
    tmp: str | None = tmp_name      # None once renamed into place: nothing left to remove
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp = None
        try:  # make the rename itself durable; not every file system allows this
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None``, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, **kw) -> str:
    """JSON text that strict parsers accept: non-finite numbers are written as ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kw)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON to ``path`` atomically."""
    write_atomic(path, (strict_json(obj, indent=2) + "\n").encode())


def remove_temp_files(directory: str) -> list[str]:
    """Delete funnn's own left-over temporary files in ``directory``; return their names.

    Only the name funnn's writer uses (``.funnn-tmp-*.tmp``, :func:`write_atomic`) is
    touched, and only regular files: a name a user could have chosen (``.probe-*``,
    ``.tmp-*.json``) is never funnn's to delete. Call it only while holding the directory's
    run lock, so no live writer owns them.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        ours = name.startswith(TMP_PREFIX) and name.endswith(".tmp")
        path = os.path.join(directory, name)
        if ours and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
    return removed


def can_plot() -> bool:
    """Whether the optional ``plot`` extra (matplotlib) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def figure(**kwargs):
    """A matplotlib ``Figure`` (``kwargs`` as ``Figure``'s), or None without the optional
    ``plot`` extra. No pyplot: the caller's backend and open figures are left as they are (a
    notebook user of ``fit`` keeps an interactive backend), and the import is 0.5 s lighter."""
    if not can_plot():
        return None
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def write_figure(path: str, fig, dpi: int = 100) -> None:
    """Save a figure from :func:`figure` to ``path`` as PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
