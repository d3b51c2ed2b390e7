# -*- test-case-name: tests.unit.test_launcher_ray_actor -*-
"""
What runs on a Ray node for one worker: a small host object (made a Ray
actor by L{twisted_router.launcher._ray_client}) that picks free ports on its
node, starts the worker process there and reports its URL, output and exit.

It does not import Ray, so it is tested as a plain object with real child
processes. It runs inside a Ray worker process, not in the router, so it
uses threads and blocking calls freely; the router only ever reaches it
through Ray calls made off its reactor thread.

The worker runs in a session (and process group) of its own, so a stop
reaches everything it forked (C{sglang serve}'s scheduler processes hold the
GPUs). If the actor's process dies (C{ray.kill}, a crash, a lost node), Linux
sends the worker SIGTERM (C{PR_SET_PDEATHSIG}), as the local backend does, so no worker outlives its
actor. Ray runs a threaded actor's methods on threads that live as long as
the actor, so the signal is not sent early when one method call ends.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "HOST_TOKEN", "PORT_TOKEN", "PYTHON_TOKEN", "Started", "Polled", "WorkerHost", "bindable", "fill_argv", "free_port_pair",
]

#: Placeholders in a planned command line, filled in on the node.
HOST_TOKEN = "{host}"
PORT_TOKEN = "{port}"
PYTHON_TOKEN = "{python}"
#: Further ports a real C{sglang serve} needs (master and scheduler), picked free on the node.
EXTRA_PORT_TOKENS = ("{master_port}", "{scheduler_port}")

#: Output lines kept until the router collects them; older ones are dropped.
_BUFFERED_LINES = 2000
_MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Started:
    """A worker process the host started: where it listens and its pid on the node."""

    url: str
    host: str
    port: int
    pid: int


@dataclass(frozen=True)
class Polled:
    """New output lines (stream, line), and the exit status once the worker has exited (negative: signal)."""

    lines: tuple[tuple[str, str], ...]
    returncode: int | None
    dropped: int = 0


def fill_argv(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """C{argv} with every placeholder token (a whole argument) replaced by its value."""
    return [values.get(arg, arg) for arg in argv]


def bindable(host: str, port: int) -> bool:
    """
    Whether a server could listen on C{host:port} now, found by binding it
    (C{SO_REUSEADDR} set as a real server sets it, so a port held only by
    connections in TIME_WAIT counts as free).

    @raise OSError: C{host} cannot be listened on at all.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _any_free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_pair(
    host: str,
    preferred: int | None = None,
    *,
    is_free: Callable[[str, int], bool] = bindable,
    any_port: Callable[[str], int] = _any_free_port,
    attempts: int = 100,
) -> int:
    """
    A port such that it and the next one up (where C{sglang serve} binds
    its ZMQ broker) are free on C{host}: C{preferred} when it still is (a
    replacement keeps its predecessor's URL), else one the kernel hands out.
    """
    if preferred is not None and 0 < preferred < 65535 and is_free(host, preferred) and is_free(host, preferred + 1):
        return preferred
    for _ in range(attempts):
        port = any_port(host)
        if port < 65535 and is_free(host, port + 1):
            return port
    raise OSError(errno.EADDRINUSE, f"no free port pair on {host} after {attempts} tries")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the actor's stop still ends the group
        pass


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class WorkerHost:
    """
    One worker on one node. Methods are called by the router through Ray
    (concurrently: C{poll} blocks while C{stop} runs).

    @param node_ip: the address the router reaches this node at, and the
        worker's C{--host} (Ray's node IP for this node).
    """

    def __init__(self, node_ip: str | None = None) -> None:
        self._node_ip = node_ip
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: deque[tuple[str, str]] = deque(maxlen=_BUFFERED_LINES)
        self._appended = 0
        self._taken = 0
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []

    def node_ip(self) -> str:
        """This node's address as Ray knows it (the one other nodes reach it at), unless given."""
        if self._node_ip is None:
            try:
                import ray
            except ImportError:  # used outside Ray (tests)
                self._node_ip = "127.0.0.1"
            else:
                # The address this node registered with (``ray start
                # --node-ip-address``), which other nodes reach it at; a
                # single-node cluster on 127.0.0.1 keeps its workers there.
                node_id = ray.get_runtime_context().get_node_id()
                found = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("NodeID") == node_id]
                self._node_ip = str(found[0]) if found else str(ray.util.get_node_ip_address())
        return self._node_ip

    def start(self, argv: Sequence[str], env: Mapping[str, str], preferred_port: int | None = None) -> Started:
        """
        Pick the ports, fill them into C{argv} and start the worker.

        @param env: added to this process's environment (which Ray gave its
            GPUs in C{CUDA_VISIBLE_DEVICES}).
        """
        if self._proc is not None:
            raise RuntimeError("this host already started its worker")
        ip = self.node_ip()
        port = free_port_pair(ip, preferred_port)
        values = {HOST_TOKEN: ip, PORT_TOKEN: str(port), PYTHON_TOKEN: sys.executable}
        for token in EXTRA_PORT_TOKENS:
            values[token] = str(free_port_pair(ip))
        command = fill_argv(argv, values)
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._proc = proc
        for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            reader = threading.Thread(target=self._read, args=(stream, pipe), daemon=True)
            reader.start()
            self._readers.append(reader)
        return Started(url=f"http://{_url_host(ip)}:{port}", host=ip, port=port, pid=proc.pid)

    def _read(self, stream: str, pipe: object) -> None:
        assert hasattr(pipe, "readline")
        for raw in iter(lambda: pipe.readline(_MAX_LINE_BYTES), b""):
            line = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "replace")
            with self._changed:
                self._lines.append((stream, line))
                self._appended += 1
                self._changed.notify_all()

    def poll(self, timeout: float) -> Polled:
        """
        Output since the last poll and the exit status: returns at once when
        there is news, else after C{timeout} seconds. The router keeps one
        such call pending per worker, so the actor's death fails it at once.
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError("no worker started")
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._appended == self._taken and proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.1))
            returncode = proc.poll()
            if returncode is not None:
                # Collect the last words before reporting the exit.
                self._changed.release()
                try:
                    for reader in self._readers:
                        reader.join(timeout=2.0)
                finally:
                    self._changed.acquire()
            fresh = self._appended - self._taken
            kept = min(fresh, len(self._lines))
            lines = tuple(list(self._lines)[len(self._lines) - kept :])
            self._lines.clear()
            dropped = fresh - kept
            self._taken = self._appended
        return Polled(lines=lines, returncode=returncode, dropped=dropped)

    def stop(self, grace: float) -> int | None:
        """SIGTERM to the worker's process group, SIGKILL after C{grace} seconds; its exit status."""
        proc = self._proc
        if proc is None:
            return None
        self._signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal(proc.pid, signal.SIGKILL)  # whatever is left of the group
        return proc.wait()

    @staticmethod
    def _signal(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
