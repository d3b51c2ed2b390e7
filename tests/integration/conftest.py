"""
Fixtures for the integration tests: real router and simulated-worker processes on 127.0.0.1.

Every process is started on port 0 in its own process group (see
L{tests.support.processes}) and every one is stopped when the test ends, whatever happened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.live import twistd_env, twistd_router_argv
from tests.support.processes import ServerProcess, python_module, sigkill_all, start_process


class Processes:
    """Starts server processes for one test and remembers them so they are always stopped."""

    def __init__(self) -> None:
        self.started: list[ServerProcess] = []

    def start(self, argv: Sequence[str], **kwargs: object) -> ServerProcess:
        proc = start_process(argv, **kwargs)  # type: ignore[arg-type]
        self.started.append(proc)
        return proc

    def workers(self, *arg_lists: Sequence[str]) -> list[ServerProcess]:
        """Start one simulated worker per argument list, in parallel (start-up is import-bound)."""
        argvs = [
            python_module("twisted_router.simulator", "--host", "127.0.0.1", "--port", "0", *args)
            for args in arg_lists
        ]
        with ThreadPoolExecutor(max_workers=max(1, len(argvs))) as pool:
            futures = [pool.submit(start_process, argv) for argv in argvs]
            procs: list[ServerProcess] = []
            errors: list[BaseException] = []
            for future in futures:
                try:
                    procs.append(future.result())
                except BaseException as exc:  # noqa: BLE001 - re-raised after bookkeeping
                    errors.append(exc)
        self.started.extend(procs)
        if errors:
            raise errors[0]
        return procs

    def router(self, workers: Sequence[ServerProcess], *args: str) -> ServerProcess:
        """Start C{python -m twisted_router} in front of C{workers}."""
        argv = python_module(
            "twisted_router",
            "--host", "127.0.0.1",
            "--port", "0",
            "--health-check-interval", "1",
            *args,
        )
        if workers:
            argv += ["--worker-urls", *(w.url for w in workers)]
        return self.start(argv)

    def twistd_router(
        self, workers: Sequence[ServerProcess], *args: str, env: dict[str, str] | None = None
    ) -> ServerProcess:
        """Start C{twistd -n sglang-d-router} in front of C{workers}, as L{router} does the console router."""
        argv = twistd_router_argv("--host", "127.0.0.1", "--port", "0", "--health-check-interval", "1", *args)
        if workers:
            argv += ["--worker-urls", *(w.url for w in workers)]
        return self.start(argv, env={**twistd_env(), **(env or {})})

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop(grace=5.0)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def worker_groups() -> Iterator[set[int]]:
    """Process groups of launched workers; whatever is left of them is SIGKILLed when the test ends."""
    groups: set[int] = set()
    try:
        yield groups
    finally:
        sigkill_all(os.killpg, groups)
