"""funnn's own rendezvous of a multi-process job, before ``jax.distributed.initialize``.

JAX's rendezvous ends the process in C++ (SIGABRT) when something goes wrong: a port held by
another program, a coordinator that is not one, process 0 alone past its timeout. funnn's
rendezvous comes first and turns each into a :class:`~funnn.errors.ConfigError`: process 0
listens on the coordinator's port, each other process connects and says who it is
(``funnn-join/1 P I``), process 0 answers at once (``funnn-coordinator/1 wait``, or
``refuse`` with a reason) and, once every process has come, ``go`` (or ``stop`` with a
reason) to all. Process 0 then closes the port and JAX's own service takes it; by then every
process is known to be alive, so JAX's rendezvous has little left to fail. One text line
each way; anything else on the port is a stranger, ignored by process 0 and refused by the
others.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time

from funnn.errors import ConfigError, FunnnError

__all__ = ["gather_peers", "join_coordinator"]

_JOIN, _COORDINATOR = "funnn-join/1", "funnn-coordinator/1"
_ANSWER_S = 5.0     # how long a process waits for the coordinator's first answer


def _listen(host: str | None, port: int, name: str) -> socket.socket:
    """Process 0's listening socket on ``host:port`` (None: every address, as JAX listens), or
    a ConfigError naming the coordinator ``name`` if another program holds the port."""
    places = ([(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port)] if host else
              [(socket.AF_INET6, "::", port), (socket.AF_INET, "0.0.0.0", port)])
    for i, (family, address, p) in enumerate(places):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue                        # no IPv6 here: listen on IPv4 as JAX then does
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a past run's TIME_WAIT
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((address, p))
            s.listen(64)
            return s
        except OSError as err:
            s.close()
            if err.errno == errno.EADDRINUSE or i == len(places) - 1:
                raise ConfigError(
                    f"process 0 cannot listen on {name} (port {p}: {err.strerror or err}): "
                    f"another program holds it; choose a free port in initialize(coordinator=) "
                    f"or stop that program", ("initialize(coordinator=)",)) from None
    raise ConfigError("process 0 found no network interface to listen on",
                      ("initialize(coordinator=)",))


def _missing(joined, num_processes: int) -> str:
    """``"process 2, 3 did not join (1 did)"`` for the peers still missing."""
    gone = [i for i in range(1, num_processes) if i not in joined]
    came = f" ({', '.join(map(str, sorted(joined)))} did)" if joined else ""
    return f"process {', '.join(map(str, gone))} did not join{came}"


def gather_peers(name: str, bind: tuple[str | None, int], num_processes: int,
                 timeout: float) -> None:
    """Process 0 (of the coordinator ``name``, ``"HOST:PORT"``): listen on ``bind`` (``(host
    or None, port)``) until every other process has
    said who it is, then tell them all to go on; a ConfigError (and "stop" to those that
    came) on a timeout, an interruption, or a process that counts the processes differently.
    Connections that do not speak funnn's line are closed and ignored; a process that leaves
    before the others came is forgotten (it may come again)."""
    listener, deadline = _listen(*bind, name), time.monotonic() + timeout
    joined: dict[int, socket.socket] = {}
    pending: dict[socket.socket, bytes] = {}
    try:
        while len(joined) < num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(
                    f"process 0 waited {timeout:g} s at {name} for the other processes: "
                    f"{_missing(joined, num_processes)}; start each with the same "
                    f"initialize(coordinator=) and initialize(num_processes=), or raise "
                    f"initialize(timeout=)", ("initialize(coordinator=)",))
            ready, _, _ = select.select([listener, *pending, *joined.values()], [], [],
                                        min(left, 0.5))
            for s in ready:
                if s is listener:
                    pending[listener.accept()[0]] = b""
                elif s in pending:
                    _hear(s, pending, joined, num_processes)
                else:                                   # a process that joined has left
                    gone = next(i for i, t in joined.items() if t is s)
                    with contextlib.suppress(OSError):
                        if s.recv(16):
                            continue                    # it said more than it should: ignore
                    del joined[gone]
                    s.close()
        listener.close()            # closed before "go": JAX's service takes the port next
        for s in joined.values():
            _say(s, "go")
        for s in joined.values():   # each peer closes first: the TIME_WAIT stays with it
            with contextlib.suppress(OSError):
                s.settimeout(2.0)
                s.recv(16)
    except BaseException as err:
        why = (err.message if isinstance(err, FunnnError) else
               "process 0 was interrupted (Ctrl-C or SIGTERM)"
               if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}")
        for s in joined.values():
            _say(s, f"stop {why.splitlines()[0] if why else 'process 0 failed'}")
        raise
    finally:
        for s in [listener, *joined.values(), *pending]:
            s.close()


def _hear(s: socket.socket, pending: dict, joined: dict, num_processes: int) -> None:
    """Read from a connection that has not said who it is yet: on its whole line, answer it
    and move it to ``joined`` (or refuse it, or drop a stranger)."""
    try:
        data = s.recv(256)
    except OSError:
        data = b""
    buf = pending.pop(s) + data
    if data and b"\n" not in buf and len(buf) < 256:
        pending[s] = buf                                # the line is still coming
        return
    who = buf.split(b"\n")[0].decode("ascii", "replace").split()
    if len(who) != 3 or who[0] != _JOIN or not (who[1].isdigit() and who[2].isdigit()):
        s.close()                                       # a stranger, not a funnn process
        return
    n, i = int(who[1]), int(who[2])
    refusal = (f"process 0 starts {num_processes} processes, process {i} says {n}: start "
               f"every process with the same initialize(num_processes=)"
               if n != num_processes else
               f"process {i} already joined: give each process its own initialize(process_id=)"
               if i in joined or not 0 < i < n else "")
    _say(s, f"{_COORDINATOR} {'refuse ' + refusal if refusal else 'wait'}")
    if not refusal:
        joined[i] = s
        return
    s.close()
    if n != num_processes:
        raise ConfigError(refusal, ("initialize(num_processes=)",))


def _say(s: socket.socket, line: str) -> None:
    """Send one line, ignoring a peer that has gone."""
    with contextlib.suppress(OSError):
        s.sendall(line.encode("utf-8", "replace") + b"\n")


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """Retry a TCP connection to the coordinator until it answers or ``timeout`` passes."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        try:
            return socket.create_connection((host, port), timeout=max(0.1, min(
                1.0, deadline - time.monotonic())))
        except OSError as err:
            last = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"cannot reach the coordinator {host}:{port} within {timeout:g} s ({last}); "
                f"start process 0 with the same initialize(coordinator=) first, check the host "
                f"name, port and firewall, or raise initialize(timeout=)",
                ("initialize(coordinator=)",))
        time.sleep(0.2)


def join_coordinator(host: str, port: int, num_processes: int, process_id: int,
                     timeout: float) -> None:
    """A process other than 0: reach process 0 within ``timeout``, say who this is, and wait
    until every process has come; a ConfigError for a program on that port that is not a
    funnn coordinator, a refusal, process 0 stopping, or the timeout."""
    deadline = time.monotonic() + timeout
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with _connect(host, port, timeout) as conn, conn.makefile("rb") as lines:
        _say(conn, f"{_JOIN} {num_processes} {process_id}")

        def line(seconds: float) -> bytes | None:
            conn.settimeout(max(seconds, 0.01))
            try:
                return lines.readline(256)
            except TimeoutError:
                return None
            except OSError:         # reset: the other side closed without reading
                return b""

        wait = min(_ANSWER_S, max(deadline - time.monotonic(), 1.0))
        first = line(wait)
        if not first or not first.startswith(_COORDINATOR.encode()):
            how = (f"it did not answer within {wait:g} s" if first is None else
                   "it closed the connection" if not first else
                   f"it answered {first[:40]!r}")
            raise ConfigError(
                f"{where} is not a funnn coordinator waiting for processes ({how}): another "
                f"program listens there, or the job started without this process; check "
                f"initialize(coordinator=)", ("initialize(coordinator=)",))
        said = first.decode("utf-8", "replace").strip().split(" ", 2)
        if said[1:2] == ["refuse"]:
            raise ConfigError(f"the coordinator {where} refused this process: "
                              f"{said[2] if len(said) > 2 else 'no reason given'}",
                              ("initialize(coordinator=)",))
        got = line(deadline - time.monotonic())
        if got is None:
            raise ConfigError(
                f"process 0 at {where} answered, but the other processes did not all join "
                f"within {timeout:g} s; start each with the same initialize(coordinator=) and "
                f"initialize(num_processes=), or raise initialize(timeout=)",
                ("initialize(coordinator=)",))
        text = got.decode("utf-8", "replace").strip()
        if text != "go":
            raise ConfigError(
                f"process 0 at {where} stopped: {text[5:]}" if text.startswith("stop ") else
                f"process 0 at {where} closed the connection before every process joined "
                f"(see its error)", ("initialize(coordinator=)",))
