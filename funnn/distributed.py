"""Processes: joining a multi-process JAX job (``jax.distributed``), agreeing across the
processes before a collective, and gathering global arrays to the host.

Several processes (:func:`initialize`) form one mesh over all their devices
(:mod:`funnn.parallel`); each feeds only its own rows of every batch, and :func:`is_main`
(process 0) alone writes files. With one process every function here is a no-op or trivial.
Errors name the Python arguments (``initialize(timeout=)``); the ``funnn`` command translates
them to its flags.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from funnn._rendezvous import gather_peers, join_coordinator
from funnn.errors import ConfigError

__all__ = ["initialize", "is_main", "agree", "gather", "parse_coordinator",
           "simulate_cpu_devices", "check_backend", "agree_settings"]

_WHERE = ("parallel",)


def parse_coordinator(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> ``(host, port)``; bad text is an error."""
    text = str(address).strip()
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 < port < 65536:
        raise ConfigError(f"coordinator must be HOST:PORT with a port in 1..65535 (e.g. "
                          f"10.0.0.1:1234), got {address!r}", ("initialize(coordinator=)",))
    return host, port


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: float = 60.0) -> None:
    """Join a multi-process JAX job (``jax.distributed.initialize``); call before any JAX work.

    ``coordinator="HOST:PORT"`` is process 0's address (process 0 listens there);
    ``num_processes`` and ``process_id`` (0 .. P-1) say who this is. ``"auto"`` (or
    all three None) lets JAX detect the cluster (SLURM, Open MPI, TPU pods; also
    ``JAX_COORDINATOR_ADDRESS``). CPU processes talk through gloo
    (``jax_cpu_collectives_implementation``), GPUs through NCCL, TPUs as JAX does.

    Bad input is a :class:`ConfigError` before JAX starts: a malformed address, a
    process id outside ``[0, num_processes)``, a call after JAX has started. Then
    funnn's own rendezvous (every process must call this function): process 0 listens
    on the port (a ConfigError at once if another program holds it) and waits up to
    ``timeout`` seconds for every other process to say who it is; each other process
    waits up to ``timeout`` for process 0 to answer and for all to come. A program on
    the port that is not a funnn coordinator, processes that count the processes
    differently, or a timeout are ConfigErrors on every process that is there, where
    JAX would end the process in C++ (SIGABRT). Only then does JAX's own rendezvous
    run, with ``timeout`` again. With ``"auto"`` JAX alone joins the job.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < float("inf")):
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}",
                          ("initialize(timeout=)",))
    auto = coordinator in (None, "auto")
    if auto and (num_processes is not None or process_id is not None):
        raise ConfigError("num_processes and process_id come with a coordinator HOST:PORT; "
                          "with 'auto' JAX detects them", ("initialize(coordinator=)",))
    if not auto:
        assert coordinator is not None
        host, port = parse_coordinator(coordinator)
        for name, v in (("num_processes", num_processes), ("process_id", process_id)):
            if v is None or isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an int with a coordinator, got {v!r}",
                                  (f"initialize({name}=)",))
        assert num_processes is not None and process_id is not None
        if num_processes < 1:
            raise ConfigError(f"num_processes must be at least 1, got {num_processes}",
                              ("initialize(num_processes=)",))
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process_id must lie in [0, {num_processes}) for "
                              f"{num_processes} processes, got {process_id}",
                              ("initialize(process_id=)",))
    if jax.distributed.is_initialized():
        if auto or (jax.process_count(), jax.process_index()) == (num_processes, process_id):
            return
        raise ConfigError(f"this process already joined a job as process "
                          f"{jax.process_index()} of {jax.process_count()}", _WHERE)
    if _backend_started():
        raise ConfigError("initialize must come before any JAX computation (this process has "
                          "already started JAX's backend)", ("initialize(coordinator=)",))
    if not auto:        # funnn's rendezvous first: its failures are errors, not SIGABRT
        assert num_processes is not None and process_id is not None
        if process_id == 0:
            bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")   # where JAX will listen
            gather_peers(str(coordinator).strip(), parse_coordinator(bind) if bind else
                         (None, port), num_processes, timeout)
        else:
            join_coordinator(host, port, num_processes, process_id, timeout)
    _start_jax(None if auto else coordinator, num_processes, process_id, math.ceil(timeout))


def _backend_started() -> bool:
    """Whether JAX's backend has started (then ``jax.distributed`` can no longer join)."""
    try:
        from jax._src import xla_bridge  # private: guarded, so imported here
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):     # a JAX without this private helper
        return False


def _start_jax(coordinator: str | None, num_processes: int | None, process_id: int | None,
               wait: int) -> None:
    """``jax.distributed.initialize`` (gloo for CPU collectives); its errors as ConfigErrors."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if coordinator is None:
            jax.distributed.initialize(initialization_timeout=wait)
        else:
            jax.distributed.initialize(coordinator, num_processes, process_id,
                                       initialization_timeout=wait)
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines()[0].rstrip(".") if str(err).strip()
                 else type(err).__name__)
        hint = (" (call it before any JAX computation)" if "initialized" in first.lower()
                else "; no SLURM, Open MPI or TPU job was detected: give HOST:PORT, the "
                     "number of processes and this process's id" if coordinator is None
                else "")
        raise ConfigError(f"jax.distributed.initialize failed: {first}{hint}",
                          ("initialize(coordinator=)",)) from None


def check_backend() -> None:
    """Start JAX's backend now (after :func:`initialize`, if any): one that cannot start (an
    unknown or absent platform in ``JAX_PLATFORMS``) is a one-line ConfigError naming it,
    instead of a traceback later or a checkpoint that seems not to load."""
    try:
        jax.devices()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '(unset)')}: no "
                          f"usable JAX backend ({first}); unset JAX_PLATFORMS or set "
                          f"JAX_PLATFORMS=cpu to use the CPU", ("jax",)) from None


def is_main() -> bool:
    """True on process 0 (the only one that writes files); always True for one process."""
    return jax.process_index() == 0


def agree(error: BaseException | None = None, value: int = 0, what: str = "") -> None:
    """Every process says whether it is ready (and a number that must match); all stop together.

    With one process this does nothing. With several it gathers ``(failed, value)``
    from every process (``multihost_utils.process_allgather``): if any failed,
    the others raise a ConfigError naming it, instead of waiting forever in the
    next collective; if ``value`` differs between processes (say, the epoch a
    resume starts from), every process raises one naming ``what``.
    """
    if jax.process_count() == 1:
        return
    got = np.asarray(multihost_utils.process_allgather(
        np.array([error is not None, value], np.int32))).reshape(-1, 2)
    failed = [i for i, f in enumerate(got[:, 0]) if f]
    if failed and error is None:
        raise ConfigError(f"process {', '.join(map(str, failed))} failed (see its error); "
                          f"stopping process {jax.process_index()} too", _WHERE)
    if not failed and len(set(got[:, 1].tolist())) > 1:
        raise ConfigError(f"processes disagree on {what or 'a setting'}: "
                          f"{got[:, 1].tolist()} (process 0, 1, ...); is the run directory on "
                          f"a filesystem every process sees?", _WHERE)


def _digest(value) -> int:
    """A value's 31-bit fingerprint (sha256 of its sorted JSON), to compare across processes."""
    import hashlib
    import json
    text = json.dumps(value, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def agree_settings(settings: dict) -> None:
    """Every process must run with the same ``settings`` (a run's config, the data's
    fingerprint, the funnn version): two small collectives at start-up, then a ConfigError
    on every process naming the settings and the processes that differ."""
    if jax.process_count() == 1:
        return
    names = sorted(settings, key=str)

    def gathered(values: list[int]) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(
            np.asarray(values, np.int32))).reshape(jax.process_count(), -1)

    keys = gathered([len(names), _digest(names)])
    if len({tuple(r) for r in keys.tolist()}) > 1:
        raise ConfigError(f"processes run with different sets of settings (process "
                          f"{jax.process_index()} has {', '.join(map(str, names))}); start "
                          f"every process with the same command", _WHERE)
    got = gathered([_digest(settings[k]) for k in names])
    differ = [k for i, k in enumerate(names) if len(set(got[:, i].tolist())) > 1]
    if differ:
        groups: dict[tuple, list[int]] = {}
        for p, row in enumerate(got.tolist()):
            groups.setdefault(tuple(row), []).append(p)
        who = " vs ".join("process " + ", ".join(map(str, g)) for g in groups.values())
        raise ConfigError(f"processes disagree on {', '.join(map(str, differ))} ({who}); this "
                          f"is process {jax.process_index()} with "
                          f"{', '.join(f'{k}={settings[k]!r}' for k in differ)}: start every "
                          f"process with the same settings and data", _WHERE)


def gather(tree):
    """Host (numpy-convertible) copies of global arrays; from every process when sharded.

    One process: the tree as it is (``np.asarray`` already assembles its shards).
    Several: ``multihost_utils.process_allgather``, a collective every process
    must call at the same point.
    """
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def simulate_cpu_devices(n: int) -> bool:
    """Ask XLA for ``n`` CPU devices (``--xla_force_host_platform_device_count``) if JAX has
    not started yet and nobody asked for a count; True if the flag is (now) set.

    Simulated devices share the machine's cores: they test sharded programs and
    measure their overhead, never a speed-up. Other platforms are unaffected.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return True
    try:
        from jax._src import xla_bridge  # private: guarded, so imported here
        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):     # a JAX without this private helper
        started = True
    if started:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return True
