"""Run directories: one run owns one directory, and nothing else writes there.

What funnn writes in a run directory ``D`` (and the only files it ever deletes)::

    D/run.json                            run id, config, funnn version, start time
    D/metrics.json                        config, history, status (strict JSON)
    D/curves.png                          loss and accuracy curves
    D/checkpoints/ckpt_<step>.safetensors one per epoch; each names its run id
    D/.funnn-lock                         the advisory lock and the holder's pid

``train.fit(checkpoint_dir=C)`` follows the same rules for ``C`` alone: its
checkpoints carry the run id, it locks ``C`` while it trains, and it refuses a
``C`` that holds another run's checkpoints unless told to resume or overwrite.

The lock is ``fcntl.flock`` on ``.funnn-lock``: the operating system releases it
when the process ends, however it ends, so a killed run never leaves a stale lock.
On systems without ``fcntl`` (Windows) runs are not locked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from funnn import _files
from funnn import checkpoint as ckpt
from funnn.core import CheckpointError, ConfigError

__all__ = ["RunLock", "RunInfo", "find_run", "remove_run", "LOCK_NAME", "RUN_FILE"]

LOCK_NAME = ".funnn-lock"
RUN_FILE = "run.json"
_OWN_FILES = (RUN_FILE, "metrics.json", "curves.png")
_CKPT = re.compile(r"^ckpt_\d+\.safetensors$")


class RunLock:
    """An exclusive advisory lock on ``directory/.funnn-lock`` (a context manager).

    ``acquire`` raises :class:`ConfigError` naming the holder's pid when another
    process holds it. The pid is written only by :meth:`mark`, after the caller
    has decided to use the directory, so a refused run changes nothing there.
    """

    def __init__(self, directory, where: str = "run"):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.where = where
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise ConfigError(f"{self.directory} is in use by another funnn run (pid {pid}); "
                              f"wait for it to finish or choose another directory",
                              (self.where,)) from None
        self._fd = fd
        return self

    def mark(self) -> None:
        """Record this process's pid in the lock file (for a second run's message)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclasses.dataclass
class RunInfo:
    """What an existing run directory holds."""

    directory: str
    run_id: str | None
    config: dict
    epochs_done: int
    newest: str | None          # path of the highest-step checkpoint, if any

    def describe(self) -> str:
        """``run 3f2a9c... (model mlp, data digits, 5 of 30 epochs done)``."""
        c = self.config or {}
        bits = [f"{k} {c[k]}" for k in ("model", "data") if k in c]
        total = c.get("epochs")
        bits.append(f"{self.epochs_done} of {total} epochs done" if total is not None
                    else f"{self.epochs_done} epochs done")
        return f"run {self.run_id or '(no id)'} ({', '.join(bits)})"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def find_run(directory, checkpoint_dir=None) -> RunInfo | None:
    """The run held by ``directory`` (``run.json``, ``metrics.json`` or checkpoints), or None.

    ``checkpoint_dir`` defaults to ``directory/checkpoints``; for ``fit`` alone pass
    the same directory twice. Unreadable files still count as a run (with what
    could be read), so a damaged run is never mistaken for an empty directory.
    """
    directory = os.fspath(directory)
    cdir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else \
        os.path.join(directory, "checkpoints")
    found = ckpt.checkpoints(cdir) if os.path.isdir(cdir) else []
    present = [n for n in _OWN_FILES if os.path.isfile(os.path.join(directory, n))] \
        if cdir != directory else []
    if not found and not present:
        return None
    run = _read_json(os.path.join(directory, RUN_FILE)) or {}
    metrics = _read_json(os.path.join(directory, "metrics.json")) or {}
    config = run.get("config") or metrics.get("config") or {}
    run_id = run.get("run_id") or metrics.get("run_id")
    done, newest = 0, (found[-1][1] if found else None)
    for step, path in reversed(found):   # describe by the newest readable header
        try:
            head = ckpt.header(path)
        except CheckpointError:
            continue
        done = step
        config = config or head.get("config") or {}
        run_id = run_id or head.get("run")
        break
    if not found and isinstance(metrics.get("history"), list):
        done = len(metrics["history"])
    return RunInfo(directory, run_id if isinstance(run_id, str) else None,
                   config if isinstance(config, dict) else {}, done, newest)


def remove_run(directory, checkpoint_dir=None) -> list[str]:
    """Delete the files funnn wrote for the run in ``directory``; return their paths.

    Only ``run.json``, ``metrics.json``, ``curves.png``, ``checkpoints/ckpt_*.safetensors``
    and funnn's temporary files go; anything else (a user's notes) stays, and the
    checkpoint folder is removed only if that leaves it empty.
    """
    directory = os.fspath(directory)
    cdir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else \
        os.path.join(directory, "checkpoints")
    removed = []
    names = [os.path.join(directory, n) for n in _OWN_FILES] if cdir != directory else []
    if os.path.isdir(cdir):
        names += [os.path.join(cdir, n) for n in sorted(os.listdir(cdir)) if _CKPT.match(n)]
    for path in names:
        if os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
            removed.append(path)
    for d in {directory, cdir}:
        removed += [os.path.join(d, n) for n in _files.remove_temp_files(d)]
    if cdir != directory:
        try:
            os.rmdir(cdir)
        except OSError:
            pass
    return removed
