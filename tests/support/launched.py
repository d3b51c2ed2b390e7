"""
Helpers for integration tests of routers that launch their own workers
(C{--launcher-config fleet.yaml}): the fleet file, a free port range for
its workers, the workers the router's log says it started, and whether
anything of a worker's process group is left.
"""

from __future__ import annotations

import os
import random
import re
import socket
import textwrap
from pathlib import Path

from tests.support.processes import ServerProcess

#: The router's line for each worker start: C{[worker N] started, pid P} (or C{started again (start K)}).
STARTED = re.compile(r"\[worker (\d+)\] started(?: again \(start \d+\))?, pid (\d+)")


def free_port_range(count: int) -> int:
    """An even base port such that C{count} ports from it are free on 127.0.0.1 right now."""
    for _ in range(100):
        base = random.randrange(20000, 45000, 2)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free port range found")


def write_fleet(tmp_path: Path, body: str) -> Path:
    """Write the launcher file C{body} (dedented) as C{tmp_path/fleet.yaml}."""
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def started_workers(router: ServerProcess) -> dict[int, list[int]]:
    """Worker index -> pids it has run as, in order, from the router's log."""
    seen: dict[int, list[int]] = {}
    for line in list(router.lines):
        m = STARTED.search(line)
        if m:
            seen.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    return seen


def group_alive(pgid: int) -> bool:
    """Whether anything of process group C{pgid} is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
