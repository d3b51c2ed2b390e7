"""
Supervision state changes of L{twisted_router.launcher.LauncherService} and
L{twisted_router.launcher.WorkerMonitor} on a fake reactor.

No process is spawned and no time passes: a fake process reactor (a
L{Clock} with C{spawnProcess}) hands out fake process transports, a fake
process table stands in for C{os.killpg}, the router is a fake
L{FleetHooks}, and C{/health} answers come from a fake HTTP client.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    CannotListenError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from tests.support.network import HealthAnswers
from twisted_router.config import RouterConfig
from twisted_router.launcher import (
    STARTUP_EXIT_LIMIT,
    TAIL_LINES,
    LauncherConfig,
    LauncherService,
    LaunchFailed,
    RestartPolicy,
    SimulatedWorker,
    describe_exit,
    plan_fleet,
)

URL0 = "http://127.0.0.1:10090"
URL1 = "http://127.0.0.1:10092"

# -- fakes ----------------------------------------------------------------------------------


class FakeProcessTable:
    """Process groups as C{os.killpg} sees them; a signal ends the whole group unless it is stubborn."""

    def __init__(self) -> None:
        self.groups: dict[int, set[Any]] = {}
        self.signals: list[tuple[int, int]] = []
        self.stubborn: set[int] = set()
        self.undying: set[int] = set()  # members that stay listed even after SIGKILL (unreaped zombies)
        self.leaders: dict[int, FakeProcess] = {}
        self.clock: Clock | None = None

    def killpg(self, pgid: int, sig: int) -> None:
        if not self.groups.get(pgid):
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if sig == 0:
            return
        self.signals.append((pgid, sig))
        if sig == signal.SIGTERM and pgid in self.stubborn:
            return
        if pgid in self.undying:
            return
        del self.groups[pgid]
        leader = self.leaders.get(pgid)
        if leader is not None and leader.alive:
            assert self.clock is not None
            self.clock.callLater(0, leader.exit, sig=sig)

    def signals_to(self, pgid: int) -> list[int]:
        return [sig for group, sig in self.signals if group == pgid]


class FakeProcess:
    """A spawned process as its protocol sees it."""

    def __init__(self, table: FakeProcessTable, proto: ProcessProtocol, pid: int, args: list[str], env: dict[str, str]) -> None:
        self.table = table
        self.proto = proto
        self.pid: int | None = pid
        self.pgid = pid
        self.args = args
        self.env = env
        self.alive = True
        self.own_signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if not self.alive:
            raise ProcessExitedAlready()
        self.own_signals.append(name)

    def write(self, data: bytes) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def output(self, data: bytes, stream: str = "stdout") -> None:
        if stream == "stdout":
            self.proto.outReceived(data)
        else:
            self.proto.errReceived(data)

    def exit(self, code: int | None = None, sig: int | None = None, *, hold_pipes: bool = False) -> None:
        """The main process exits; its pipes close too unless an orphan keeps them open."""
        self.alive = False
        self.pid = None
        members = self.table.groups.get(self.pgid)
        if members is not None:
            members.discard(self.pgid)
            if not members:
                del self.table.groups[self.pgid]
        reason = Failure(ProcessDone(0)) if code == 0 and sig is None else Failure(ProcessTerminated(exitCode=code, signal=sig))
        self.reason = reason
        self.proto.processExited(reason)
        if not hold_pipes:
            self.proto.processEnded(reason)

    def close_pipes(self) -> None:
        self.proto.processEnded(self.reason)


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A clock that spawns L{FakeProcess}es; the wrapper's C{setpgid} is immediate."""

    def __init__(self, table: FakeProcessTable) -> None:
        super().__init__()
        self.table = table
        table.clock = self
        self.spawned: list[FakeProcess] = []
        self.next_pid = 1000
        self.refuse_spawn = False

    def spawnProcess(self, processProtocol: ProcessProtocol, executable: Any, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False, childFDs: Any = None) -> FakeProcess:
        if self.refuse_spawn:
            raise OSError(errno.ENOENT, "No such file or directory")
        pid = self.next_pid
        self.next_pid += 1
        proc = FakeProcess(self.table, processProtocol, pid, list(args), dict(env or {}))
        self.table.groups[pid] = {pid}
        self.table.leaders[pid] = proc
        self.spawned.append(proc)
        processProtocol.makeConnection(proc)
        return proc

    def running(self, index: int) -> FakeProcess:
        """The latest process of worker C{index}."""
        port = str(10090 + 2 * index)
        return [p for p in self.spawned if port in p.args][-1]

    def processes_of(self, index: int) -> list[FakeProcess]:
        port = str(10090 + 2 * index)
        return [p for p in self.spawned if port in p.args]


@dataclass
class FakeRouter:
    """The router's two launcher hooks, recorded; C{hold} keeps worker_ready pending."""

    ready: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    hold: Deferred[None] | None = None
    broken: bool = False

    async def worker_ready(self, url: str) -> str:
        self.ready.append(url)
        if self.hold is not None:
            await self.hold
        if self.broken:
            raise RuntimeError("router refused")
        return url

    def worker_lost(self, url: str, reason: str) -> None:
        self.lost.append((url, reason))


@dataclass
class Harness:
    reactor: FakeProcessReactor
    table: FakeProcessTable
    router: FakeRouter
    http: HealthAnswers
    service: LauncherService
    failures: list[Failure]

    def up(self, *urls: str) -> None:
        for url in urls:
            self.http.up[url] = 200

    def advance(self, seconds: float) -> None:
        """
        Advance in small steps, so callbacks scheduled on the way run in
        order, and a hair further, so float sums never stop just short of a
        timer that is due.
        """
        steps = max(1, round(seconds / 0.1))
        for _ in range(steps):
            self.reactor.advance(seconds / steps)
        self.reactor.advance(1e-6)


def harness(
    num_workers: int = 2,
    *,
    restart: RestartPolicy | None = None,
    wait_timeout: float = 60.0,
    shutdown_grace: float = 15.0,
) -> Harness:
    table = FakeProcessTable()
    reactor = FakeProcessReactor(table)
    config = LauncherConfig(
        backend="simulated",
        num_workers=num_workers,
        simulated=tuple(SimulatedWorker() for _ in range(num_workers)),
        restart=restart or RestartPolicy(min_delay=1.0, max_delay=8.0, threshold=60.0),
        wait_timeout=wait_timeout,
        shutdown_grace=shutdown_grace,
    )
    plan = plan_fleet(config, environ={"PATH": "/bin"}, is_port_free=lambda host, port: True, python="/py")
    router = FakeRouter()
    http = HealthAnswers()
    failures: list[Failure] = []
    service = LauncherService(
        plan, router, reactor, http, on_failure=failures.append,  # type: ignore[arg-type]
        python="/py", parent_pid=4242, killpg=table.killpg,
    )
    return Harness(reactor, table, router, http, service, failures)


def messages(events: Any, level: LogLevel | None = None) -> list[str]:
    return [formatEvent(e) for e in events if level is None or e["log_level"] == level]


# -- start-up ----------------------------------------------------------------------------------


def test_start_spawns_every_worker_in_its_own_process_group_wrapper() -> None:
    h = harness()
    h.service.startService()
    assert len(h.reactor.spawned) == 2
    first = h.reactor.spawned[0]
    assert first.args[:2] == ["/py", "-c"]
    assert first.args[3] == "4242"  # the router's pid, for the orphan check
    assert first.args[4:] == ["/py", "-m", "twisted_router.simulator", "--host", "127.0.0.1", "--port", "10090"]
    assert first.env["PYTHONUNBUFFERED"] == "1" and first.env["PATH"] == "/bin"
    assert h.router.ready == []


def test_each_worker_is_registered_the_moment_its_health_answers_200() -> None:
    h = harness()
    with capturedLogs() as events:
        h.service.startService()
        h.advance(2.0)
        assert h.router.ready == [] and h.http.calls  # polled, refused, polled again
        h.up(URL1)
        h.advance(0.5)
        assert h.router.ready == [URL1]
        assert h.service.ready_count() == 1
        h.up(URL0)
        h.advance(0.5)
    assert sorted(h.router.ready) == [URL0, URL1]
    assert h.service.ready_count() == 2
    text = messages(events)
    assert "1/2 workers ready (2 s)" in text
    assert "2/2 workers ready (3 s)" in text
    assert any(m.startswith("[worker 1] ready at http://127.0.0.1:10092") for m in text)


def test_polling_stops_once_ready() -> None:
    h = harness(1)
    h.service.startService()
    h.up(URL0)
    h.advance(1.0)
    calls = len(h.http.calls)
    h.advance(10.0)
    assert len(h.http.calls) == calls


def test_a_non_200_health_keeps_polling() -> None:
    h = harness(1)
    h.service.startService()
    h.http.up[URL0] = 503
    h.advance(2.0)
    assert h.router.ready == []
    h.http.up[URL0] = 200
    h.advance(0.5)
    assert h.router.ready == [URL0]


def test_a_hung_health_probe_times_out_and_polling_goes_on() -> None:
    h = harness(1)
    h.service.startService()
    h.http.hang.add(URL0)
    h.advance(1.0)
    calls = len(h.http.calls)
    h.advance(1.0)  # still within the 2 s probe timeout: no second probe yet
    assert len(h.http.calls) == calls
    h.http.hang.clear()
    h.up(URL0)
    h.advance(2.0)
    assert h.router.ready == [URL0]


def test_a_failed_registration_is_retried() -> None:
    h = harness(1)
    h.router.broken = True
    h.service.startService()
    h.up(URL0)
    h.advance(0.5)
    assert h.router.ready == [URL0] and h.service.ready_count() == 0
    h.router.broken = False
    h.advance(0.5)
    assert h.router.ready == [URL0, URL0]
    assert h.service.ready_count() == 1


def test_progress_is_logged_while_workers_load() -> None:
    h = harness(2, wait_timeout=600)
    with capturedLogs() as events:
        h.service.startService()
        h.up(URL0)
        h.advance(30.0)
    assert "1/2 workers ready (30 s); waiting for worker 1" in messages(events)


def test_output_is_relayed_line_by_line_with_the_worker_prefix() -> None:
    h = harness(1)
    with capturedLogs() as events:
        h.service.startService()
        proc = h.reactor.running(0)
        proc.output(b"loading model\nhalf a ")
        proc.output(b"line\r\n")
        proc.output(b"oops\n", stream="stderr")
    text = messages(events)
    assert "[worker 0] loading model" in text
    assert "[worker 0] half a line" in text
    assert "[worker 0] oops" in text
    streams = [e.get("stream") for e in events if e.get("line") == "oops"]
    assert streams == ["stderr"]


# -- a worker that dies ---------------------------------------------------------------------------


def test_a_dead_worker_is_taken_out_of_rotation_at_once_restarted_and_re_registered() -> None:
    h = harness()
    h.service.startService()
    h.up(URL0, URL1)
    h.advance(0.5)
    first = h.reactor.running(0)

    del h.http.up[URL0]
    first.exit(sig=signal.SIGKILL)
    # Out of rotation at once, not after health-check intervals.
    assert h.router.lost == [(URL0, "launcher: worker process was killed by signal 9 (SIGKILL)")]
    assert h.service.ready_count() == 1

    h.advance(0.9)
    assert h.reactor.running(0) is first  # the restart backs off min_delay (it died young)
    h.advance(0.2)
    second = h.reactor.running(0)
    assert second is not first and second.alive
    h.advance(2.0)
    assert h.router.ready.count(URL0) == 1  # not re-registered before it is healthy
    h.up(URL0)
    h.advance(0.5)
    assert h.router.ready.count(URL0) == 2
    assert h.service.ready_count() == 2


def test_a_worker_that_dies_young_again_and_again_backs_off() -> None:
    h = harness(1, restart=RestartPolicy(min_delay=1.0, max_delay=4.0, threshold=60.0))
    delays = []
    with capturedLogs() as events:
        h.service.startService()
        h.up(URL0)
        h.advance(0.5)
        del h.http.up[URL0]  # it served once, so start-up succeeded; now it keeps crashing
        for _ in range(5):
            h.reactor.running(0).exit(code=1)
            delays.append(next(e["delay"] for e in reversed(events) if "delay" in e))
            h.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_worker_that_ran_long_is_restarted_at_once() -> None:
    h = harness(1, restart=RestartPolicy(min_delay=5.0, max_delay=60.0, threshold=10.0))
    h.service.startService()
    h.up(URL0)
    h.advance(20.0)
    h.reactor.running(0).exit(code=1)
    h.reactor.advance(0)
    assert len(h.reactor.processes_of(0)) == 2


def test_restart_off_means_not_restarted() -> None:
    h = harness(2, restart=RestartPolicy(enabled=False))
    h.service.startService()
    h.up(URL0, URL1)
    h.advance(0.5)
    h.reactor.running(0).exit(code=3)
    h.advance(120.0)
    assert len(h.reactor.processes_of(0)) == 1
    assert h.router.lost == [(URL0, "launcher: worker process exited with status 3")]
    assert h.failures == []  # worker 1 serves on


def test_the_exit_report_has_the_last_output_lines() -> None:
    h = harness(1)
    with capturedLogs() as events:
        h.service.startService()
        proc = h.reactor.running(0)
        for i in range(TAIL_LINES + 10):
            proc.output(f"line {i}\n".encode())
        proc.exit(code=1)
    (report,) = messages(events, LogLevel.error)
    assert report.startswith("[worker 0] http://127.0.0.1:10090 exited with status 1 after 0 s; its last 50 line(s) of output:")
    assert "    line 59" in report and "    line 10" in report
    assert "line 9\n" not in report


def test_an_orphan_holding_the_pipes_does_not_delay_the_quarantine_and_is_ended_before_the_restart() -> None:
    """C{sglang serve}'s scheduler children outlive a killed main process: they hold GPUs and the port."""
    h = harness(1)
    h.service.startService()
    h.up(URL0)
    h.advance(0.5)
    proc = h.reactor.running(0)
    h.table.groups[proc.pgid].add("scheduler child")
    h.table.stubborn.add(proc.pgid)

    proc.exit(sig=signal.SIGKILL, hold_pipes=True)
    assert [url for url, _ in h.router.lost] == [URL0]  # at once, pipes or not
    assert h.table.signals_to(proc.pgid) == [signal.SIGTERM]  # the leftovers are told to go
    h.advance(10.0)
    assert len(h.reactor.processes_of(0)) == 1  # no restart while the old group lives
    proc.close_pipes()
    h.advance(5.0)
    assert h.table.signals_to(proc.pgid) == [signal.SIGTERM, signal.SIGKILL]  # after the grace period
    h.advance(1.1)
    assert len(h.reactor.processes_of(0)) == 2


def test_a_worker_that_dies_while_being_registered_is_taken_back_out() -> None:
    h = harness(1)
    h.router.hold = Deferred()
    h.service.startService()
    h.up(URL0)
    h.advance(0.5)
    assert h.router.ready == [URL0]
    h.reactor.running(0).exit(code=1)
    assert h.router.lost == []  # not registered yet: nothing to take out
    h.router.hold.callback(None)
    assert [url for url, _ in h.router.lost] == [URL0]
    assert h.service.ready_count() == 0


def test_a_spawn_that_fails_counts_as_an_exit() -> None:
    h = harness(1, restart=RestartPolicy(enabled=False))
    h.reactor.refuse_spawn = True
    with capturedLogs() as events:
        h.service.startService()
    assert any("could not run" in m for m in messages(events, LogLevel.error))
    failure_result_of(h.service.when_failed(), LaunchFailed)


def test_a_start_that_never_became_ready_backs_off_however_long_it_ran() -> None:
    """A real model that crashes at the end of a minutes-long load must not reload for ever without a pause."""
    h = harness(2, restart=RestartPolicy(min_delay=5.0, max_delay=60.0, threshold=10.0), wait_timeout=600.0)
    h.up(URL1)  # the fleet serves, so the router never gives up
    delays = []
    with capturedLogs() as events:
        h.service.startService()
        for _ in range(4):
            h.advance(30.0)  # loads for longer than threshold, never answers /health
            h.reactor.running(0).exit(code=1)
            delays.append(next(e["delay"] for e in reversed(events) if "delay" in e))
            h.advance(delays[-1])
    assert delays == [5.0, 10.0, 20.0, 40.0]
    assert len(h.reactor.processes_of(0)) == 5


def test_a_worker_stopped_for_missing_wait_timeout_backs_off() -> None:
    h = harness(2, restart=RestartPolicy(min_delay=3.0, max_delay=60.0, threshold=5.0), wait_timeout=10.0)
    h.up(URL1)
    with capturedLogs() as events:
        h.service.startService()
        h.advance(10.0)
    assert [e["delay"] for e in events if "delay" in e] == [3.0]
    h.advance(2.9)
    assert len(h.reactor.processes_of(0)) == 1
    h.advance(0.2)
    assert len(h.reactor.processes_of(0)) == 2


def test_backoff_is_reset_only_by_a_start_that_was_ready_and_ran_long() -> None:
    h = harness(1, restart=RestartPolicy(min_delay=1.0, max_delay=60.0, threshold=10.0), wait_timeout=600.0)
    delays = []
    with capturedLogs() as events:
        h.service.startService()
        for ready in (False, False, True, False):
            if ready:
                h.up(URL0)
            h.advance(20.0)
            h.reactor.running(0).exit(code=1)
            delays.append(next(e["delay"] for e in reversed(events) if "delay" in e))
            h.http.up.pop(URL0, None)
            h.advance(delays[-1])
    assert delays == [1.0, 2.0, 0.0, 1.0]


# -- a port that is taken ----------------------------------------------------------------------------

IN_USE = b"twisted.internet.error.CannotListenError: Couldn't listen on 127.0.0.1:10090: [Errno 98] Address already in use.\n"


def test_a_worker_that_cannot_bind_its_port_is_a_start_up_failure_and_is_not_restarted() -> None:
    h = harness(1)
    d = h.service.when_failed()
    with capturedLogs() as events:
        h.service.startService()
        proc = h.reactor.running(0)
        proc.output(IN_USE)
        proc.exit(code=1)
    (report,) = messages(events, LogLevel.error)
    assert report.startswith(
        "[worker 0] http://127.0.0.1:10090 could not start (exited with status 1): a port it needs is already in use "
        "(twisted.internet.error.CannotListenError: Couldn't listen on 127.0.0.1:10090: [Errno 98] Address already in use.); "
        "not restarting it: free port 10090 and 10091, or move launcher.worker_base_port;"
    )
    failure_result_of(d, LaunchFailed)  # its only worker failed its start-up: no 3 tries
    h.advance(60.0)
    assert len(h.reactor.processes_of(0)) == 1
    assert h.router.ready == []


def test_address_in_use_said_after_the_exit_was_reported_still_stops_the_restart() -> None:
    """The exit can be seen before the last output is read from the pipes."""
    h = harness(2)
    with capturedLogs() as events:
        h.service.startService()
        h.up(URL1)
        h.advance(0.5)
        proc = h.reactor.running(0)
        proc.exit(code=1, hold_pipes=True)
        proc.output(b"OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 10090): address already in use\n")
        proc.close_pipes()
        h.advance(60.0)
    assert len(h.reactor.processes_of(0)) == 1
    assert any("a port it needs is already in use" in m for m in messages(events, LogLevel.error))
    assert h.failures == []  # worker 1 serves


def test_address_in_use_after_a_stop_by_the_launcher_is_not_a_port_clash() -> None:
    h = harness(1, wait_timeout=5.0)
    h.service.startService()
    proc = h.reactor.running(0)
    proc.output(b"retrying: Address already in use\n")
    h.advance(5.0)  # missed wait_timeout: stopped by the launcher, restarted after the backoff
    h.advance(1.1)
    assert len(h.reactor.processes_of(0)) == 2


def test_health_is_not_trusted_once_the_spawned_process_is_gone() -> None:
    """Whatever answers on the port, only the process started for it may be registered."""
    h = harness(1)
    h.service.startService()
    h.service.monitor.running_pid = lambda name: None  # type: ignore[method-assign]  # exited, not reported yet
    h.up(URL0)
    with capturedLogs() as events:
        h.advance(2.0)
    assert h.router.ready == []
    assert any("its process is not running; not registering it" in m for m in messages(events, LogLevel.warn))


# -- a hung worker ----------------------------------------------------------------------------------


def test_a_managed_worker_quarantined_by_health_checks_is_restarted_and_re_registered() -> None:
    """A hung (SIGSTOPped) worker holds its GPUs for ever unless the launcher replaces it."""
    h = harness(2, shutdown_grace=5.0)
    h.service.startService()
    h.up(URL0, URL1)
    h.advance(0.5)
    hung, other = h.reactor.running(0), h.reactor.running(1)
    h.table.stubborn.add(hung.pgid)  # stopped: SIGTERM does nothing until it is SIGKILLed
    del h.http.up[URL0]
    with capturedLogs() as events:
        h.service.worker_quarantined(URL0, "timed out after 5 s")
    assert messages(events, LogLevel.warn) == [
        "[worker 0] http://127.0.0.1:10090 quarantined by health checks (timed out after 5 s): restarting it "
        "(SIGTERM to its process group, SIGKILL after 5 s)"
    ]
    assert h.table.signals_to(hung.pgid) == [signal.SIGTERM]
    h.advance(4.8)
    assert hung.alive
    h.advance(0.3)
    assert h.table.signals_to(hung.pgid) == [signal.SIGTERM, signal.SIGKILL]
    assert not hung.alive
    assert [url for url, _ in h.router.lost] == [URL0]
    h.advance(1.1)  # it ran 6 s after start: less than threshold, so the usual min_delay
    fresh = h.reactor.running(0)
    assert fresh is not hung and fresh.alive
    h.advance(2.0)
    assert h.router.ready.count(URL0) == 1  # not before it is healthy
    h.up(URL0)
    h.advance(0.5)
    assert h.router.ready.count(URL0) == 2  # the router re-admits it (and catches it up)
    assert h.table.signals_to(other.pgid) == []
    assert h.service.ready_count() == 2


def test_quarantine_of_a_worker_the_launcher_does_not_manage_is_ignored() -> None:
    h = harness(1)
    h.service.startService()
    h.up(URL0)
    h.advance(0.5)
    with capturedLogs() as events:
        h.service.worker_quarantined("http://10.0.0.7:30000", "HTTP 503")
    assert messages(events) == []
    assert h.table.signals == []


def test_quarantine_matches_the_pools_spelling_of_the_url() -> None:
    h = harness(1)
    h.service.startService()
    h.up(URL0)
    h.advance(0.5)
    h.service.worker_quarantined("HTTP://127.0.0.1:10090/", "HTTP 503")
    assert h.table.signals_to(h.reactor.running(0).pgid) == [signal.SIGTERM]


def test_quarantine_while_loading_or_restarting_is_left_to_the_start_up() -> None:
    h = harness(1)
    h.service.startService()
    h.service.worker_quarantined(URL0, "connection refused")  # still loading
    assert h.table.signals == []
    h.reactor.running(0).exit(code=1)
    h.service.worker_quarantined(URL0, "connection refused")  # waiting for its restart
    assert h.table.signals == []


def test_quarantine_with_restart_off_leaves_the_worker_alone() -> None:
    h = harness(1, restart=RestartPolicy(enabled=False))
    h.service.startService()
    h.up(URL0)
    h.advance(0.5)
    with capturedLogs() as events:
        h.service.worker_quarantined(URL0, "HTTP 500")
    assert h.table.signals == []
    assert any("not restarted: restart is off" in m for m in messages(events, LogLevel.warn))


# -- wait_timeout ----------------------------------------------------------------------------------


def test_a_worker_that_misses_wait_timeout_is_reported_and_stopped() -> None:
    h = harness(2, wait_timeout=10.0)
    with capturedLogs() as events:
        h.service.startService()
        h.up(URL1)
        slow = h.reactor.running(0)
        slow.output(b"still loading shards\n")
        h.advance(10.0)
    errors = messages(events, LogLevel.error)
    assert any(
        m.startswith("[worker 0] http://127.0.0.1:10090 was not ready within wait_timeout (10 s)") and "still loading shards" in m
        for m in errors
    )
    assert h.table.signals_to(slow.pgid) == [signal.SIGTERM]
    assert not slow.alive
    assert h.failures == []  # worker 1 is serving


# -- start-up failure -----------------------------------------------------------------------------


def test_no_worker_ready_without_restart_fails_the_start_up() -> None:
    h = harness(2, restart=RestartPolicy(enabled=False))
    d = h.service.when_failed()
    h.service.startService()
    h.reactor.running(0).exit(code=1)
    assert_no_result(d)
    assert h.failures == []
    with capturedLogs() as events:
        h.reactor.running(1).exit(code=1)
    failure = failure_result_of(d, LaunchFailed)
    assert "no worker became ready" in str(failure.value)
    assert len(h.failures) == 1
    assert any("no worker became ready" in m for m in messages(events, LogLevel.critical))
    failure_result_of(h.service.when_failed(), LaunchFailed)  # later callers learn it too


def test_with_restarts_the_start_up_fails_after_repeated_exits_of_every_worker() -> None:
    h = harness(2)
    d = h.service.when_failed()
    h.service.startService()
    for attempt in range(STARTUP_EXIT_LIMIT):
        for i in range(2):
            h.reactor.running(i).exit(code=1)
        if attempt < STARTUP_EXIT_LIMIT - 1:
            assert_no_result(d)
            h.advance(2.0 ** attempt + 0.1)
    failure_result_of(d, LaunchFailed)


def test_all_workers_missing_wait_timeout_fails_the_start_up() -> None:
    h = harness(2, wait_timeout=5.0)
    d = h.service.when_failed()
    h.service.startService()
    h.advance(5.0)
    failure_result_of(d, LaunchFailed)


def test_one_ready_worker_means_the_start_up_succeeded() -> None:
    h = harness(2, restart=RestartPolicy(enabled=False))
    d = h.service.when_failed()
    h.service.startService()
    h.up(URL1)
    h.advance(0.5)
    h.reactor.running(0).exit(code=1)
    h.reactor.running(1).exit(code=1)  # even if it dies later, the router stays up
    assert_no_result(d)
    assert h.failures == []


# -- shutdown --------------------------------------------------------------------------------------


def test_stop_terminates_every_group_and_waits_for_it() -> None:
    h = harness(2)
    h.service.startService()
    h.up(URL0, URL1)
    h.advance(0.5)
    procs = [h.reactor.running(0), h.reactor.running(1)]
    d = h.service.stopService()
    assert [h.table.signals_to(p.pgid) for p in procs] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert_no_result(d)
    h.reactor.advance(0)
    success_result_of(d)
    assert h.table.groups == {}
    assert h.router.lost == []  # the router is going away: no quarantine noise
    h.advance(30.0)
    assert len(h.reactor.spawned) == 2  # and nothing is restarted


def test_stop_sigkills_a_group_that_ignores_sigterm_after_the_grace_period() -> None:
    h = harness(1, shutdown_grace=15.0)
    h.service.startService()
    proc = h.reactor.running(0)
    h.table.stubborn.add(proc.pgid)
    h.table.groups[proc.pgid].add("child")
    d = h.service.stopService()
    h.advance(14.9)
    assert h.table.signals_to(proc.pgid) == [signal.SIGTERM]
    assert_no_result(d)
    h.advance(0.2)
    assert h.table.signals_to(proc.pgid) == [signal.SIGTERM, signal.SIGKILL]
    h.advance(0.2)
    success_result_of(d)
    assert h.table.groups == {}


def test_stop_while_the_leader_is_gone_but_its_group_lingers() -> None:
    h = harness(1, shutdown_grace=3.0)
    h.service.startService()
    proc = h.reactor.running(0)
    h.table.groups[proc.pgid].add("child")
    h.table.stubborn.add(proc.pgid)
    d = h.service.stopService()
    proc.exit(code=0)  # the main process obeys SIGTERM, its child does not
    assert_no_result(d)
    h.advance(3.1)
    assert h.table.signals_to(proc.pgid)[-1] == signal.SIGKILL
    h.advance(0.2)
    success_result_of(d)


def test_stop_gives_up_on_a_group_that_stays_listed_after_sigkill() -> None:
    """Zombies nobody reaps (the router as PID 1 in a container) must not hang the shutdown."""
    h = harness(1, shutdown_grace=2.0)
    h.service.startService()
    proc = h.reactor.running(0)
    h.table.groups[proc.pgid].add("zombie")
    h.table.undying.add(proc.pgid)
    d = h.service.stopService()
    proc.exit(code=0)
    h.advance(2.1)
    assert h.table.signals_to(proc.pgid) == [signal.SIGTERM, signal.SIGKILL]
    assert_no_result(d)
    with capturedLogs() as events:
        h.advance(5.1)
    success_result_of(d)
    assert any("still listed after SIGKILL" in m for m in messages(events, LogLevel.warn))


def test_stop_during_a_restart_backoff_cancels_the_restart() -> None:
    h = harness(1)
    h.service.startService()
    h.reactor.running(0).exit(code=1)
    d = h.service.stopService()
    success_result_of(d)
    h.advance(10.0)
    assert len(h.reactor.spawned) == 1


def test_stop_before_readiness_stops_polling_and_registering() -> None:
    h = harness(1)
    h.service.startService()
    d = h.service.stopService()
    h.reactor.advance(0)
    success_result_of(d)
    h.up(URL0)
    calls = len(h.http.calls)
    h.advance(5.0)
    assert len(h.http.calls) == calls
    assert h.router.ready == []


def test_signal_before_the_group_exists_goes_to_the_process() -> None:
    """Between spawn and the wrapper's setpgid there is no group yet."""
    h = harness(1)
    h.service.startService()
    proc = h.reactor.running(0)
    del h.table.groups[proc.pgid]
    h.service.stopService()
    assert proc.own_signals == ["TERM"]


# -- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (Failure(ProcessDone(0)), "exited with status 0"),
        (Failure(ProcessTerminated(exitCode=2)), "exited with status 2"),
        (Failure(ProcessTerminated(signal=15)), "was killed by signal 15 (SIGTERM)"),
        (Failure(OSError(2, "No such file or directory")), "could not run: [Errno 2] No such file or directory"),
    ],
)
def test_describe_exit(reason: Failure, text: str) -> None:
    assert describe_exit(reason) == text


# -- wiring into the router service ------------------------------------------------------------------


@implementer(IReactorProcess)
class _MemoryProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.table = FakeProcessTable()
        self.table.clock = self
        self.spawned: list[list[str]] = []

    def spawnProcess(self, processProtocol: ProcessProtocol, executable: Any, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False, childFDs: Any = None) -> FakeProcess:
        pid = 2000 + len(self.spawned)
        self.spawned.append(list(args))
        proc = FakeProcess(self.table, processProtocol, pid, list(args), dict(env or {}))
        processProtocol.makeConnection(proc)
        return proc


def test_router_service_runs_the_launcher_and_stops_it_after_the_listener() -> None:
    from twisted_router.listener import ListenerService
    from twisted_router.service import make_router_service

    config = LauncherConfig(
        backend="simulated", num_workers=2, simulated=(SimulatedWorker(), SimulatedWorker())
    )
    plan = plan_fleet(config, is_port_free=lambda host, port: True)
    reactor = _MemoryProcessReactor()
    router_config = RouterConfig(host="127.0.0.1", port=0, launcher_config="fleet.yaml")
    top, parts, listener = make_router_service(router_config, reactor, launch_plan=plan)
    assert isinstance(top, MultiService)
    launcher = top.getServiceNamed("launcher")
    assert isinstance(launcher, LauncherService)
    children = list(top)
    assert children.index(launcher) < children.index(listener)  # stopped after the listener
    assert isinstance(listener, ListenerService)
    launcher.startService()
    assert reactor.spawned == []  # it waits for the router's port
    listener.startService()
    assert len(reactor.spawned) == 2
    assert launcher._hooks is parts.fleet  # type: ignore[attr-defined]


class _BusyPortReactor(_MemoryProcessReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))


@pytest.mark.parametrize("busy", [False, True])
def test_router_service_starts_no_worker_before_its_own_port_is_bound(busy: bool) -> None:
    """Issue 8 point 7: a router whose port is taken must not have started a fleet first."""
    from twisted_router.service import make_router_service

    config = LauncherConfig(
        backend="simulated", num_workers=2, simulated=(SimulatedWorker(), SimulatedWorker())
    )
    plan = plan_fleet(config, is_port_free=lambda host, port: True)
    reactor = _BusyPortReactor() if busy else _MemoryProcessReactor()
    failures: list[Failure] = []
    router_config = RouterConfig(host="127.0.0.1", port=30080, launcher_config="fleet.yaml")
    top, _, listener = make_router_service(
        router_config, reactor, launch_plan=plan, on_listen_failure=failures.append
    )
    with capturedLogs():
        top.startService()
    assert isinstance(top.getServiceNamed("launcher"), LauncherService)
    if busy:
        assert reactor.spawned == []
        assert [f.type for f in failures] == [CannotListenError]
        failure_result_of(listener.when_listening(), CannotListenError)
        with capturedLogs() as events:
            success_result_of(top.stopService())  # nothing was spawned: nothing to wait for
        assert not [e for e in events if "launcher: stopping" in formatEvent(e)]
        assert reactor.spawned == []
    else:
        assert len(reactor.spawned) == 2 and failures == []
        top.stopService()  # (the fake workers never exit, so this does not finish)


def test_router_service_hands_health_check_quarantines_to_the_launcher() -> None:
    from twisted_router.service import make_router_service

    config = LauncherConfig(backend="simulated", num_workers=1, simulated=(SimulatedWorker(),))
    plan = plan_fleet(config, is_port_free=lambda host, port: True)
    reactor = _MemoryProcessReactor()
    router_config = RouterConfig(
        host="127.0.0.1", port=0, launcher_config="fleet.yaml",
        health_check_interval=1.0, health_check_failure_threshold=2, health_check_timeout=0.5,
    )
    top, parts, _ = make_router_service(router_config, reactor, launch_plan=plan)
    launcher = top.getServiceNamed("launcher")
    handed: list[tuple[str, str]] = []
    launcher.worker_quarantined = lambda url, reason: handed.append((url, reason))  # type: ignore[attr-defined]
    parts.pool.add(URL0)
    # Probes that never answer time out: two failures quarantine it (the
    # second on the suspect schedule, which probes a worker that failed once).
    for check in (parts.health.check_all, parts.health.check_suspects):
        check()
        reactor.advance(0.6)
    (worker,) = parts.pool.workers()
    assert worker.is_dead
    assert [url for url, _ in handed] == [URL0]


def test_build_router_without_a_quarantine_hook_still_works() -> None:
    from twisted_router.service import build_router

    parts = build_router(RouterConfig(host="127.0.0.1", port=0), MemoryReactorClock())
    assert parts.health is not None


def test_router_service_without_launcher_config_has_no_launcher() -> None:
    from twisted_router.service import make_router_service

    top, _, _ = make_router_service(RouterConfig(host="127.0.0.1", port=0), MemoryReactorClock())
    assert "launcher" not in top.namedServices
