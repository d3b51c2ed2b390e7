"""Start real server processes for integration tests, and always clean them up.

Every server of this project prints a log line containing
C{listening on http://HOST:PORT} once its port is bound, so tests start servers
on port 0 and read the real port from that line instead of guessing a free one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

LISTENING = re.compile(r"listening on (https?://[0-9.]+:\d+)")


@dataclass
class ServerProcess:
    """A child process in its own process group, with its output kept for diagnosis."""

    argv: list[str]
    popen: subprocess.Popen[str]
    url: str = ""
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    _reader: threading.Thread | None = None
    _url_seen: threading.Event = field(default_factory=threading.Event)
    _url_pattern: re.Pattern[str] = LISTENING

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until a line of output matches C{pattern}; fail with the output if it never does."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.popen.poll() is not None and not (self._reader and self._reader.is_alive()):
                break
            time.sleep(0.02)
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout}s from {self.argv}; "
            f"exit={self.popen.poll()}\n--- output ---\n{self.output()}"
        )

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after C{grace} seconds; return the exit code."""
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (children included) goes now.
        self.signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(timeout=grace)
        return self.popen.returncode


def _pump(proc: ServerProcess) -> None:
    assert proc.popen.stdout is not None
    for line in proc.popen.stdout:
        proc.lines.append(line)
        if not proc.url:
            m = proc._url_pattern.search(line)
            if m:
                proc.url = m.group(1)
                proc._url_seen.set()


def start_process(
    argv: Sequence[str],
    *,
    wait_url: bool = True,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> ServerProcess:
    """Start C{argv} in a new process group; if C{wait_url}, wait for its listening line."""
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    popen = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    proc = ServerProcess(argv=list(argv), popen=popen)
    proc._reader = threading.Thread(target=_pump, args=(proc,), daemon=True)
    proc._reader.start()
    if wait_url:
        if not proc._url_seen.wait(timeout):
            out = proc.output()
            proc.stop()
            raise AssertionError(
                f"{argv} did not report a listening URL within {timeout}s "
                f"(exit={popen.poll()})\n--- output ---\n{out}"
            )
    return proc


@contextmanager
def running(argv: Sequence[str], **kwargs: object) -> Iterator[ServerProcess]:
    """Context manager form of L{start_process} that always stops the process group."""
    proc = start_process(argv, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop()


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs C{python -m module args} with the interpreter running the tests."""
    return [sys.executable, "-m", module, *args]


def sigkill_all(kill: Callable[[int, int], None], ids: Iterable[int]) -> None:
    """SIGKILL each of C{ids} with C{kill} (C{os.kill} or C{os.killpg}); ids already gone are skipped."""
    for each in ids:
        try:
            kill(each, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
