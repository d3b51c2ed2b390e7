"""Launcher safety: crash-loop backoff, never a worker on the router's own port (review findings)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.deferreds import success_result_of
from twisted_router import launcher as launcher_pkg
from twisted_router.cli import plan_launch
from twisted_router.config import RouterConfig
from twisted_router.launcher import (
    LauncherConfigError,
    RestartPolicy,
    WorkerMonitor,
    parse_launcher_config,
)

# --------------------------------------------------------------------------- fakes


class _Proc:
    """A spawned process: the leader of its own (fake) process group."""

    def __init__(self, proto: ProcessProtocol, pid: int) -> None:
        self.proto = proto
        self.pid: int | None = pid

    def signalProcess(self, name: str) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def die(self, groups: set[int]) -> None:
        """The process (and its whole group) exits with status 1 at once."""
        assert self.pid is not None
        groups.discard(self.pid)
        self.pid = None
        reason = Failure(ProcessTerminated(exitCode=1))
        self.proto.processExited(reason)
        self.proto.processEnded(reason)


@implementer(IReactorProcess)
class _ProcessClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[_Proc] = []
        self.groups: set[int] = set()

    def spawnProcess(self, processProtocol: Any, executable: Any, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> Any:
        proc = _Proc(processProtocol, 5000 + len(self.spawned))
        self.spawned.append(proc)
        self.groups.add(5000 + len(self.spawned) - 1)
        processProtocol.makeConnection(proc)
        return proc

    def killpg(self, pgid: int, sig: int) -> None:
        if pgid not in self.groups:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if sig:
            self.groups.discard(pgid)


class _Events:
    def __init__(self) -> None:
        self.restart_delays: list[float] = []

    def process_started(self, name: str, pid: int) -> None:
        pass

    def process_output(self, name: str, stream: str, line: str) -> None:
        pass

    def process_exited(self, name: str, reason: Failure) -> None:
        pass

    def process_restart_scheduled(self, name: str, delay: float) -> None:
        self.restart_delays.append(delay)


# --------------------------------------------------------------------------- launcher


def test_restart_threshold_zero_still_backs_off_a_crash_loop() -> None:
    """
    C{restart: {threshold: 0}} was accepted, and then ProcessMonitor treated
    every death as "ran long enough": a worker that crashes at once was
    respawned with no delay, for ever (a hot restart loop; seen live: 28
    spawns in 12 s with "restarting in 0.0 s"). The file now refuses a
    threshold below min_delay, and the monitor itself never restarts a start
    that did not become ready without backing off, whatever its threshold
    (a policy built in code is not validated).
    """
    document = {"launcher": {"backend": "simulated", "restart": {"threshold": 0}}}
    with pytest.raises(LauncherConfigError, match=r"launcher\.restart\.threshold: must be at least min_delay"):
        parse_launcher_config(document)
    policy = RestartPolicy(min_delay=1.0, max_delay=300.0, threshold=0.0)
    reactor = _ProcessClock()
    events = _Events()
    monitor = WorkerMonitor(
        reactor, events, restart=policy, kill_time=1.0, killpg=reactor.killpg, reap_interval=0.1
    )
    monitor.addProcess("worker 0", ["python", "-c", "boom"])
    monitor.startService()
    for _ in range(5):
        reactor.spawned[-1].die(reactor.groups)  # dies the instant it starts
        reactor.advance(max(events.restart_delays[-1], 0.0) + 0.001)
    assert len(reactor.spawned) == 6
    assert min(events.restart_delays) >= policy.min_delay, (
        f"a worker crashing at start-up is respawned after {events.restart_delays} s: "
        "no backoff at all with threshold 0"
    )
    assert events.restart_delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    stopped = monitor.stop_all()
    reactor.spawned[-1].die(reactor.groups)  # the fake does not act on signals: it obeys SIGTERM here
    success_result_of(stopped)


def test_launcher_never_plans_a_worker_on_the_routers_own_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The fleet is planned before the router binds its own port, and the plan
    does not know that port. With C{--port P} and C{worker_base_port: P} worker
    0 is given P; the router wins the bind, worker 0 dies with EADDRINUSE, and
    the launcher's readiness poll of http://127.0.0.1:P/health reaches the
    ROUTER, which answers 200 as soon as any other worker is up: the router
    registers itself as worker 0 (seen live: "managed worker 127.0.0.1:P
    registered", "[worker 0] ready at http://127.0.0.1:P").
    """
    router_port = 30080  # the router's default --port
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "launcher:\n"
        "  backend: simulated\n"
        "  worker_host: 127.0.0.1\n"
        f"  worker_base_port: {router_port}\n"
        "  simulated:\n"
        "    workers: [{task_type: T2I}, {task_type: T2I}]\n"
    )
    real_plan = launcher_pkg.plan_fleet

    def plan_without_probing(config: Any, **kwargs: Any) -> Any:
        # No sockets in unit tests: every port is free, as it is at plan time.
        return real_plan(config, is_port_free=lambda host, port: True, **kwargs)

    monkeypatch.setattr(launcher_pkg, "plan_fleet", plan_without_probing)
    config = RouterConfig(host="127.0.0.1", port=router_port, launcher_config=str(path))
    try:
        plan = plan_launch(config)
    except LauncherConfigError:
        return  # refused before anything starts: fine
    assert plan is not None
    ports = [w.port for w in plan.workers]
    clashing = {router_port, router_port - 1} & {p for port in ports for p in (port, port + 1)}
    assert not clashing, f"worker ports {ports} include the router's own port {router_port}"


