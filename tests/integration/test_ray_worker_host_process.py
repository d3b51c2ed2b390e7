"""
The Ray actor's worker host (L{WorkerHost}) with real child processes, no Ray:
it relays a worker's output and exit status, and stopping it ends the
worker's whole process group (a child the worker forked included).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests.support.live import alive, wait_until
from twisted_router.launcher._ray_actor import Polled, WorkerHost


def collect_until(host: WorkerHost, done: Callable[[Polled, list[tuple[str, str]]], bool]) -> list[tuple[str, str]]:
    """Every (stream, line) the host relays, until C{done} says so (at most 10 s)."""
    lines: list[tuple[str, str]] = []

    def poll() -> bool | None:
        polled = host.poll(1.0)
        lines.extend(polled.lines)
        return True if done(polled, lines) else None

    wait_until(f"worker output ({lines})", poll, timeout=10.0)
    return lines


def test_worker_host_relays_output_and_the_exit_status() -> None:
    host = WorkerHost("127.0.0.1")
    started = host.start(
        ["{python}", "-c", "import sys; print('on {host}', sys.argv[1]); sys.stderr.write('oops\\n'); sys.exit(3)", "{port}"],
        {"EXTRA": "1"},
    )
    assert started.url == f"http://127.0.0.1:{started.port}" and started.host == "127.0.0.1"
    seen: list[Polled] = []
    lines = collect_until(host, lambda p, _: seen.append(p) or p.returncode is not None)
    assert seen[-1].returncode == 3
    assert ("stdout", f"on {{host}} {started.port}") in lines  # only whole arguments are placeholders
    assert ("stderr", "oops") in lines


def test_worker_host_stop_ends_the_whole_process_group() -> None:
    host = WorkerHost("127.0.0.1")
    # The worker forks a child that would outlive it if only the worker were signalled.
    started = host.start(
        ["{python}", "-c",
         "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
         " print(c.pid, flush=True); time.sleep(60)"],
        {},
    )
    try:
        lines = collect_until(host, lambda _, got: bool(got))
        child = int(lines[0][1])
        assert host.stop(2.0) == -signal.SIGTERM
        assert host.poll(0.1).returncode == -signal.SIGTERM
        wait_until("the worker's child gone", lambda: None if alive(child) else True, timeout=5.0)
        assert not alive(started.pid)
    finally:
        if host.poll(0.0).returncode is None:
            host.stop(1.0)
