"""Run directories: one run owns one directory, and nothing else writes there.

This module is the one owner of a run directory: it claims it (one lock, one refusal
vocabulary, overwrite), decides whether and from where a run resumes (comparing
configs, listing intact checkpoints when the newest is damaged), saves checkpoints, and
writes ``run.json``, ``metrics.json`` and ``curves.png``. ``funnn train`` and
``train.fit`` both go through :class:`Run`, so both leave the same files by the same rules.

What funnn writes in a run directory ``D`` (and the only files it ever deletes)::

    D/run.json                            run id, config, start time
    D/metrics.json                        config, history, status (strict JSON)
    D/curves.png                          loss and accuracy curves (with matplotlib)
    D/checkpoints/ckpt_<step>.safetensors one per epoch; each names its run id
    D/.funnn-lock                         the advisory lock and the holder's pid

``fit(run_dir=D)`` and ``funnn train --out D`` use that layout. ``fit(checkpoint_dir=C)``
keeps everything in ``C`` itself: ``C/ckpt_<step>.safetensors`` beside ``C/run.json``,
``C/metrics.json``, ``C/curves.png`` and ``C/.funnn-lock``. Either way one lock, in the
run's top directory. (Runs written by funnn before this layout also held a lock file
in ``D/checkpoints/``; it is ignored, and removed with the run on overwrite.)

The lock is ``fcntl.flock`` on ``.funnn-lock``: the operating system releases it
when the process ends, however it ends, so a killed run never leaves a stale lock.
On systems without ``fcntl`` (Windows) runs are not locked.

Refusals speak the library's words (``resume=True``, ``overwrite=True``,
``from_checkpoint=PATH``); the ``funnn`` command translates them into its flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import time
from typing import Any

import jax
import jax.numpy as jnp

from funnn import _files
from funnn import checkpoint as ckpt
from funnn.core import CheckpointError, ConfigError

__all__ = ["Run", "Resumed", "RunLock", "RunInfo", "find_run", "remove_run", "config_diff",
           "check_mode", "check_config", "read_config", "SCHEMA", "load_newest",
           "check_same_run",
           "plot_curves", "LOCK_NAME", "RUN_FILE", "METRICS_FILE", "CURVES_FILE"]

LOCK_NAME = ".funnn-lock"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
_OWN_FILES = (RUN_FILE, METRICS_FILE, CURVES_FILE)
_CKPT = re.compile(r"^ckpt_\d+\.safetensors$")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def check_regular(path: str, where: str = "run") -> None:
    """Refuse ``path`` if it exists as anything but a regular file: a symlink (which funnn
    would follow into someone else's file), a FIFO (which would block), a directory."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return          # absent (an unwritable parent is reported when the lock is taken)
    except OSError as err:
        raise ConfigError(f"cannot inspect {path}: {err.strerror or err}", (where,)) from None
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a directory" if stat.S_ISDIR(mode) else "a special file"
        raise ConfigError(f"{path} is {kind}, not a file funnn wrote; funnn writes that name "
                          f"itself and will not follow or replace it: move it away", (where,))


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
        check_regular(self.path, self.where)
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as err:
            raise ConfigError(f"run directory {self.directory!r} cannot be written "
                              f"({err.strerror or err})", (self.where,)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):     # swapped in since check_regular
            os.close(fd)
            raise ConfigError(f"{self.path} is not a regular file; funnn keeps its lock there: "
                              f"remove it", (self.where,))
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
    newest: str | None          # path of the newest checkpoint by its header, if any
    misnamed: list = dataclasses.field(default_factory=list)   # (path, header step) pairs

    def notes(self) -> list[str]:
        """One line per checkpoint whose name disagrees with its header (kept, not used by
        its name)."""
        return [f"{p}: its name says epoch {_named(p)} but its header says epoch {step}; it is "
                f"ordered by its header and never deleted by funnn (a copied or renamed file?)"
                for p, step in self.misnamed]

    def describe(self) -> str:
        """``run 3f2a9c... (model mlp, data digits, 5 of 30 epochs done)``."""
        c = self.config or {}
        bits = [f"{k} {c[k]}" for k in ("model", "data") if k in c]
        total = c.get("epochs")
        bits.append(f"{self.epochs_done} of {total} epochs done" if total is not None
                    else f"{self.epochs_done} epochs done")
        return f"run {self.run_id or '(no id)'} ({', '.join(bits)})"


def _read_json(path: str) -> dict | None:
    """A JSON object from a regular file (never through a symlink, never blocking on a FIFO),
    or None."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def find_run(directory, checkpoint_dir=None) -> RunInfo | None:
    """The run held by ``directory`` (``run.json``, ``metrics.json`` or checkpoints), or None.

    ``checkpoint_dir`` defaults to ``directory/checkpoints``; for ``fit(checkpoint_dir=C)``
    pass ``C`` twice. Unreadable files still count as a run (with what
    could be read), so a damaged run is never mistaken for an empty directory.
    """
    directory = os.fspath(directory)
    cdir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else \
        os.path.join(directory, "checkpoints")
    run = _read_json(os.path.join(directory, RUN_FILE)) or {}
    metrics = _read_json(os.path.join(directory, "metrics.json")) or {}
    run_id = run.get("run_id") or metrics.get("run_id")
    found = ckpt.scan(cdir, run_id if isinstance(run_id, str) else None) \
        if os.path.isdir(cdir) else []
    present = [n for n in _OWN_FILES if os.path.isfile(os.path.join(directory, n))]
    if not found and not present:
        return None
    config = run.get("config") or metrics.get("config") or {}
    done, newest = 0, (found[-1].path if found else None)
    for f in reversed(found):   # describe by the newest readable header
        if f.readable:
            done = f.step
            config = config or ckpt.header(f.path).get("config") or {}
            run_id = run_id or f.run
            break
    if not found and isinstance(metrics.get("history"), list):
        done = len(metrics["history"])
    return RunInfo(directory, run_id if isinstance(run_id, str) else None,
                   config if isinstance(config, dict) else {}, done, newest,
                   [(f.path, f.step) for f in found if f.misnamed])


def _named(path: str) -> int:
    return int(os.path.basename(path)[5:].split(".")[0])


def remove_run(directory, checkpoint_dir=None) -> list[str]:
    """Delete the files funnn wrote for the run in ``directory``; return their paths.

    Only ``run.json``, ``metrics.json``, ``curves.png``, ``checkpoints/ckpt_*.safetensors``
    (with an old ``checkpoints/.funnn-lock``) and funnn's temporary files go; anything
    else (a user's notes) stays, and the checkpoint folder is removed only if that leaves
    it empty.
    """
    directory = os.fspath(directory)
    cdir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else \
        os.path.join(directory, "checkpoints")
    removed = []
    names = [os.path.join(directory, n) for n in _OWN_FILES]
    if os.path.isdir(cdir):
        info = find_run(directory, cdir)
        kept = {p for p, _ in info.misnamed} if info is not None else set()
        names += [p for n in sorted(os.listdir(cdir))
                  if _CKPT.match(n) and (p := os.path.join(cdir, n)) not in kept]
        if cdir != directory:       # the second lock of runs written before the one-lock layout
            names.append(os.path.join(cdir, LOCK_NAME))
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


def load_newest(cdir, load) -> tuple[str, Any, list[str]]:
    """``(path, load(path), skipped)`` for the newest checkpoint in ``cdir`` (by header) that
    ``load`` reads: one that vanishes meanwhile (a run that trains prunes its old ones) is
    skipped and named in ``skipped``; a damaged one is an error (never passed over)."""
    cdir = os.fspath(cdir)
    found = ckpt.scan(cdir) if os.path.isdir(cdir) else []
    if not found:
        raise CheckpointError(f"{os.path.dirname(cdir) or cdir} holds no checkpoint (no {cdir}/"
                              f"ckpt_*.safetensors); is it a funnn train run directory?")
    skipped: list[str] = []
    for f in reversed(found):
        try:
            return f.path, load(f.path), skipped
        except CheckpointError as err:
            if os.path.lexists(f.path):
                raise
            skipped.append(f"{f.path}: {err}")
    raise CheckpointError(f"every checkpoint in {cdir} vanished while it was read: "
                          f"{'; '.join(skipped)}")


# --------------------------------------------------------------------------- config schema


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SHAPE = ("a list of positive ints",
          lambda v: isinstance(v, list) and all(_is_int(d, 1) for d in v))
_POSITIVE = ("a positive int", lambda v: _is_int(v, 1))
_COUNT = ("a non-negative int", lambda v: _is_int(v, 0))
_TEXT = ("a string", lambda v: isinstance(v, str))
_NUMBER = ("a number", _is_num)
# What funnn writes for each setting it records; a config read back is checked against it.
SCHEMA: dict = {
    **dict.fromkeys(("epochs", "batch_size", "batch_size_asked", "num_examples",
                     "num_outputs"), _POSITIVE),
    **dict.fromkeys(("train_examples", "test_examples"), _COUNT),
    **dict.fromkeys(("model", "data", "engine", "loss", "optimizer", "schedule", "precision",
                     "data_sha256", "dtypes", "sharding", "from_checkpoint", "dp_sampling"),
                    _TEXT),
    **dict.fromkeys(("dp_clip", "dp_noise", "dp_delta"), _NUMBER),
    "learning_rate": ("a number or null", lambda v: v is None or _is_num(v)),
    "seed": ("an int", lambda v: _is_int(v, -2**63)),
    "standardize": ("true or false", lambda v: isinstance(v, bool)),
    "input_shape": _SHAPE,
    "mesh": ("an object of axis sizes", lambda v: isinstance(v, dict)),
}


def check_config(config, path: str) -> dict:
    """``config`` as read from ``path`` (a checkpoint header), checked against
    :data:`SCHEMA`: a setting funnn records with another type is a CheckpointError naming
    it (settings funnn does not know, from ``fit(config=...)``, pass as they are)."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config must be a JSON object, got "
                              f"{type(config).__name__}")
    for k, v in config.items():
        if k in SCHEMA and not SCHEMA[k][1](v):
            raise CheckpointError(f"checkpoint {path}: config.{k} must be {SCHEMA[k][0]}, "
                                  f"got {v!r}; the file was edited or not written by funnn")
    return config


def read_config(path) -> dict:
    """The checked config in the header of the checkpoint ``path``."""
    path = os.fspath(path)
    return check_config(ckpt.header(path).get("config"), path)


# --------------------------------------------------------------------------- resume rules

# Settings that may change on resume: epochs may grow; the others do not change results.
_SAVED_DEFAULTS = {"precision": "f32"}
RESUMABLE = ("epochs", "batch_size_asked", "from_checkpoint", "mesh", "sharding")


# Settings recorded since a later version: a run saved without one is not compared on it.
_RECORDED_LATER = ("data_sha256", "dtypes")


def config_diff(saved: dict, now: dict, ignore=RESUMABLE) -> list[str]:
    """``["learning_rate: 0.1 -> 0.2", ...]`` for every setting that differs."""
    out = []
    saved = {**_SAVED_DEFAULTS, **saved}        # runs saved before a setting existed
    for k in sorted(set(saved) | set(now), key=str):
        if k in ignore or (k in _RECORDED_LATER and k not in saved):
            continue
        a, b = saved.get(k, "(unset)"), now.get(k, "(unset)")
        if a != b:
            out.append(f"{k}: {a} -> {b}")
    return out


def _x64_hint(diffs: list[str]) -> str:
    """Where float64 against float32 comes from, when the dtypes differ."""
    if not any(d.startswith("dtypes:") and "float64" in d for d in diffs):
        return ""
    now = "set" if getattr(jax.config, "jax_enable_x64", False) else "not set"
    return (f" (float64 comes from the environment variable JAX_ENABLE_X64=1, which is {now} "
            f"now: resume with it as the saved run had it)")


def check_mode(resume, overwrite) -> None:
    """``resume`` (True, False or ``"auto"``) and ``overwrite`` checked before any file."""
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}", ("fit",))
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume continues the run "
                          "in the directory, overwrite deletes it", ("fit",))


def _check_history(history, step: int, path: str) -> list:
    ok = isinstance(history, list) and len(history) == step and all(
        isinstance(r, dict) and r.get("epoch") == i + 1 for i, r in enumerate(history))
    if not ok:
        raise CheckpointError(f"checkpoint {path}: its history does not match its step {step} "
                              f"(expected one row per epoch, epochs 1..{step})")
    return history


def _damaged_hint(read, path: str, directory: str | None):
    """``read()``; a damaged checkpoint's error lists the intact ones in ``directory``."""
    try:
        return read()
    except CheckpointError as err:
        if directory is None:
            raise
        others = [(s, p) for s, p in ckpt.intact(directory) if p != path]
        if others:
            listing = ", ".join(f"{p} (epoch {s})" for s, p in reversed(others))
            hint = (f" Intact checkpoints: {listing}. Resume from one with "
                    f"from_checkpoint=PATH.")
        else:
            hint = " No intact checkpoint is left; start again with overwrite=True."
        raise CheckpointError(f"cannot resume: {err}.{hint}") from None


def read_start(path, like: dict):
    """The checkpoint a new run starts from (``from_checkpoint`` without resume)."""
    return _damaged_hint(lambda: ckpt.restore(os.fspath(path), like=like), os.fspath(path),
                         None)


@dataclasses.dataclass
class Resumed:
    """Where a resumed run continues: its checkpoint, epoch, history, key and id."""

    checkpoint: Any
    start: int
    history: list
    key: Any
    run_id: str | None
    path: str


def plot_curves(path: str, history: list) -> bool:
    """Loss and accuracy curves as a PNG (needs the optional matplotlib extra)."""
    fig = _files.figure(figsize=(9, 3.5)) if history else None
    if fig is None:
        return False
    epochs = [r["epoch"] for r in history]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    if "eval_loss" in history[0]:
        ax1.plot(epochs, [r["eval_loss"] for r in history], label="test")
        ax2.plot(epochs, [r["eval_accuracy"] for r in history], color="C2")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    fig.tight_layout()
    _files.write_figure(path, fig, dpi=100)
    return True


# --------------------------------------------------------------------------- one claimed run


class Run:
    """A claimed run directory: its lock, what it held, and how this run uses it.

    :meth:`claim` locks and decides (every refusal happens there or in :meth:`resume`,
    before anything in the directory changes); :meth:`begin` then applies the decision
    (overwrite, temp files, the lock's pid, ``run.json``); :meth:`save` writes a checkpoint,
    :meth:`finish` ``metrics.json`` and ``curves.png``; :meth:`release` drops the lock.
    With several processes only process 0 (``main``) locks and writes; every process
    reads the directory to decide alike.
    """

    def __init__(self, root: str, cdir: str, *, main: bool, lock: RunLock | None,
                 found: RunInfo | None, resume_from: str | None, overwrite: bool):
        self.root, self.cdir, self.main, self.lock = root, cdir, main, lock
        self.found, self.resume_from, self.overwrite = found, resume_from, overwrite
        self.started = time.perf_counter()

    @classmethod
    def claim(cls, root, cdir=None, *, resume=False, overwrite=False, from_checkpoint=None,
              main: bool = True) -> Run:
        """Lock ``root`` and decide: a fresh run, a resumed one (from which checkpoint), or
        a refusal (a ConfigError). ``cdir`` holds the checkpoints (default ``root``).

        Another process than process 0 (``main=False``) takes no lock and refuses nothing:
        it reads the same directory to find the checkpoint to resume from, and learns of
        process 0's refusal when they agree."""
        root = os.fspath(root)
        cdir = os.fspath(cdir) if cdir is not None else root
        check_mode(resume, overwrite)
        if not main:        # process 0 refuses for every process (they agree after claim)
            found = find_run(root, cdir)
            try:
                path = _decide(root, found, resume, overwrite, from_checkpoint)
            except ConfigError:
                path = None
            return cls(root, cdir, main=False, lock=None, found=found, resume_from=path,
                       overwrite=overwrite)
        if resume is True and from_checkpoint is None and not os.path.isdir(root):
            raise ConfigError(f"nothing to resume: {root} does not exist (a typo in the "
                              f"directory?); leave out resume=True to start a new run", ("run",))
        _check_layout(root, cdir)
        lock = RunLock(root, "run").acquire()
        try:
            found = find_run(root, cdir)
            path = _decide(root, found, resume, overwrite, from_checkpoint)
        except BaseException:
            lock.release()
            raise
        return cls(root, cdir, main=main, lock=lock, found=found, resume_from=path,
                   overwrite=overwrite)

    def resume(self, like: dict, config: dict, key, key_given: bool) -> Resumed | None:
        """Restore the checkpoint :meth:`claim` chose (None for a fresh run): its config must
        match ``config`` (but ``epochs`` may grow), its key the given one."""
        path = self.resume_from
        if path is None:
            return None
        head = _damaged_hint(lambda: ckpt.header(path), path, self.cdir)
        diffs = config_diff(_damaged_hint(lambda: check_config(head.get("config"), path), path,
                                          self.cdir), config)
        if diffs:
            raise ConfigError(f"cannot resume run {head.get('run') or '(no id)'} from {path}: "
                              f"settings differ from the saved run: {'; '.join(diffs)}. Resume "
                              f"with the saved settings{_x64_hint(diffs)}, or start a new run "
                              f"(another directory, or overwrite=True)", ("run",))
        _check_one_run(self.found, head.get("run"), path)
        saved = _damaged_hint(lambda: ckpt.restore(path, like=like), path, self.cdir)
        if key_given and saved.key is not None and not bool(jnp.array_equal(
                jax.random.key_data(saved.key), jax.random.key_data(key))):
            raise ConfigError(f"cannot resume run {saved.run or '(no id)'} from {path}: it was "
                              f"trained with another PRNG key; pass the same key (or none) to "
                              f"resume", ("run",))
        start = int(saved.step)
        history = list(_check_history((saved.metadata or {}).get("history"), start, path))
        epochs = config.get("epochs")
        if epochs is not None and start > epochs:
            raise ConfigError(f"run {saved.run} has already trained {start} epochs; "
                              f"epochs={epochs} would undo them: ask for at least {start}",
                              ("run",))
        return Resumed(saved, start, history, saved.key if saved.key is not None else key,
                       saved.run, path)

    def begin(self, run_id: str, config: dict, fresh: bool) -> None:
        """Apply the decision: delete an overwritten run, stale temp files; mark the lock;
        a fresh run writes ``run.json``."""
        if not self.main:
            return
        if self.overwrite and self.found is not None:
            remove_run(self.root, self.cdir)
        for d in {self.root, self.cdir}:
            _files.remove_temp_files(d)
        assert self.lock is not None
        self.lock.mark()
        if fresh:
            _files.write_json(os.path.join(self.root, RUN_FILE), {
                "format": "funnn.run/1", "run_id": run_id, "config": config,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.started = time.perf_counter()

    def save(self, epoch: int, *, keep, run_id, history, **fields) -> str | None:
        """Write the checkpoint of ``epoch`` (process 0 only); its path, else None."""
        if not self.main:
            return None
        return ckpt.save_in(self.cdir, epoch, keep=keep, metadata={"history": history},
                            run=run_id, **fields)

    def saved(self, run_id) -> int:
        """The epoch of this run's newest complete checkpoint on disk (0 if none): where an
        interrupted run stands, even if the signal came between a write and its return."""
        own = [f.step for f in ckpt.scan(self.cdir) if f.readable and f.run == run_id
               and not f.misnamed]
        return max(own, default=0)

    def finish(self, status: str, run_id, config: dict, history: list, error=None) -> None:
        """``metrics.json`` (strict JSON) and ``curves.png`` (process 0 only)."""
        if not self.main or not history:
            return
        metrics = {"run_id": run_id, "status": status, "config": config, "history": history,
                   "seconds": time.perf_counter() - self.started, "final": history[-1]}
        if error is not None:
            metrics["error"] = str(error)
        _files.write_json(os.path.join(self.root, METRICS_FILE), metrics)
        plot_curves(os.path.join(self.root, CURVES_FILE), history)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _check_one_run(found: RunInfo | None, run_id, path: str) -> None:
    """A run directory holds one run: a checkpoint of another run does not continue in it."""
    if found is None or found.run_id is None or run_id is None or run_id == found.run_id:
        return
    raise ConfigError(f"{path} belongs to run {run_id}, but {found.directory} holds run "
                      f"{found.run_id}; a run directory holds one run: continue run {run_id} "
                      f"in its own directory, or start a new run from that checkpoint "
                      f"(from_checkpoint=PATH without resume=True, in another directory)",
                      ("run",))


def check_same_run(directory, path) -> None:
    """Refuse the checkpoint ``path`` unless it belongs to the run ``directory`` holds (or
    either has no run id)."""
    _check_one_run(find_run(directory), ckpt.header(path).get("run"), os.fspath(path))


def _check_layout(root: str, cdir: str) -> None:
    """Everything that would stop the run later, refused now: before the lock file, a
    deletion or ``run.json`` (the run directory or its checkpoint folder being a file, a run
    file being a symlink, FIFO or directory)."""
    for d in dict.fromkeys((root, cdir)):
        if os.path.lexists(d) and not os.path.isdir(d):
            raise ConfigError(f"{d} is not a directory; the run keeps its files there: move it "
                              f"away or choose another directory", ("run",))
    for name in (*_OWN_FILES, LOCK_NAME):
        check_regular(os.path.join(root, name))


def _decide(root: str, found: RunInfo | None, resume, overwrite, from_checkpoint) -> str | None:
    """The checkpoint to resume from (None: start fresh), or the refusal."""
    if from_checkpoint is not None and resume:
        return os.fspath(from_checkpoint)
    if resume and found is not None:
        if found.newest is None:
            raise ConfigError(f"nothing to resume in {root}: {found.describe()} has no "
                              f"checkpoint yet (it stopped before its first epoch ended); start "
                              f"again with overwrite=True", ("run",))
        return found.newest
    if resume is True:
        raise ConfigError(f"nothing to resume in {root}: it holds no run (a typo in the "
                          f"directory?); leave out resume=True to start a new run", ("run",))
    if found is not None and not overwrite:
        raise ConfigError(f"{root} already holds {found.describe()}; continue it with "
                          f"resume=True, or replace it with overwrite=True (deletes that run's "
                          f"files)", ("run",))
    return None
