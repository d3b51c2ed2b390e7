"""
What the integration tests use to talk to the real processes they start on
127.0.0.1 (L{tests.support.processes}, the C{processes} fixture): a small
standard-library HTTP client (L{call}, L{Reply}), bounded waits
(L{wait_until}, L{wait_for_workers}), the simulator's common options
(L{sim}), the router's C{/workers} by URL, and the way a router is stopped
and how twistd is run.

The client side is the standard library only: what is tested is the router,
not a client library's retries or pooling.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import twisted_router
from tests.support.processes import ServerProcess

T = TypeVar("T")

#: The directory of this interpreter's scripts (C{twistd}, C{sglang-d-router}).
BIN = Path(sys.executable).parent
REPO_ROOT = Path(twisted_router.__file__).resolve().parents[1]

MB = 1_000_000

#: A small image request: 512x512 and 8 steps, a few ms of simulated GPU time.
SMALL_IMAGE = {"prompt": "a red fox in snow", "size": "512x512", "num_inference_steps": 8}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def worker(self) -> str | None:
        return self.headers.get("x-worker-id")


def connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to C{base_url}, which must be on 127.0.0.1."""
    parts = urlsplit(base_url)
    assert parts.hostname == "127.0.0.1", base_url
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(
    base_url: str,
    method: str,
    path: str,
    payload: Any = None,
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One request on a fresh connection (a JSON body when C{payload} is given); any status is returned, never raised."""
    conn = connection(base_url, timeout)
    try:
        sent = dict(headers or {})
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            sent["content-type"] = "application/json"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def post_image(base_url: str, payload: Mapping[str, Any] = SMALL_IMAGE, timeout: float = 30.0) -> Reply:
    return call(base_url, "POST", "/v1/images/generations", dict(payload), timeout=timeout)


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 15.0) -> T:
    """Call C{probe} until it returns something other than None, at most C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        else:
            if result is not None:
                return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def workers_by_url(router: ServerProcess, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The router's C{GET /workers}, keyed by worker URL."""
    reply = call(router.url, "GET", "/workers", timeout=timeout)
    assert reply.status == 200, reply
    return {w["url"]: w for w in reply.json()["workers"]}


def wait_for_workers(router: ServerProcess, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Poll C{GET /workers} until C{count} workers are registered and every task type is known."""

    def ready() -> list[dict[str, Any]] | None:
        reply = call(router.url, "GET", "/workers", timeout=5.0)
        if reply.status != 200:
            return None
        workers: list[dict[str, Any]] = reply.json()["workers"]
        if len(workers) == count and all(w.get("task_type") for w in workers):
            return workers
        return None

    return wait_until(f"{count} workers with a known task type at {router.url}", ready, timeout)


def all_routable(router: ServerProcess, urls: list[str]) -> dict[str, dict[str, Any]] | None:
    """The router's workers when they are exactly C{urls}, none quarantined and each with its task type known."""
    workers = workers_by_url(router)
    if set(workers) != set(urls):
        return None
    if all(not w["is_dead"] and w.get("task_type") for w in workers.values()):
        return workers
    return None


def sim(worker_id: str, *args: str) -> list[str]:
    """A simulated worker's options (for C{processes.workers}), its id first."""
    # Checkpoints in these tests are /ckpt/...: the simulator accepts them only when told.
    return ["--worker-id", worker_id, "--weights-prefix", "/ckpt/", *args]


def session_of(pid: int) -> int | None:
    """The session id of process C{pid} (field 6 of /proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie holds nothing; its parent just has not reaped it
    return int(fields[3])


def alive(pid: int) -> bool:
    """Whether process C{pid} still runs (a zombie does not)."""
    return session_of(pid) is not None


def proc_status_kb(pid: int) -> dict[str, int]:
    """The C{Vm*} lines of C{/proc/<pid>/status}, in kB (a process's memory, for tests that bound it)."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Vm") and value.strip().endswith("kB"):
            figures[name] = int(value.split()[0])
    return figures


def wait_exit(proc: ServerProcess, timeout: float) -> int:
    """C{proc}'s exit status once it has exited; fail with its output if it has not within C{timeout} seconds."""
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.argv} did not exit within {timeout}s\n{proc.output()}") from None


def terminate(proc: ServerProcess, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Send C{sig} to C{proc} (not its group) and return its exit status (L{wait_exit})."""
    proc.popen.send_signal(sig)
    return wait_exit(proc, timeout)


def twistd_env() -> dict[str, str]:
    """
    The environment twistd runs the router in. Not needed with a current
    install (test_first_run_process.py checks that); kept for a venv
    editable-installed before the install put the repository on sys.path.
    """
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def twistd_router_argv(*args: str) -> list[str]:
    """C{twistd -n sglang-d-router ARGS} in the foreground, without a pid file."""
    return [str(BIN / "twistd"), "-n", "--pidfile=", "sglang-d-router", *args]
