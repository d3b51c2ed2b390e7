# -*- test-case-name: tests.unit.test_launcher_service,tests.unit.test_launcher_safety -*-
"""
Running worker processes: Twisted's L{ProcessMonitor}, taught about process groups.

C{ProcessMonitor} already spawns processes on the reactor, restarts them with
backoff and escalates SIGTERM to SIGKILL when stopping them. Four things it
does not do, and a GPU fleet needs, are added here:

  - it signals only the process it spawned, but C{sglang serve} forks
    scheduler processes that hold the GPUs: every worker runs as the leader
    of its own process group and every signal goes to the whole group;
  - it learns of an exit only when the process's pipes close, which an
    orphaned child holding stdout can delay for ever: the launcher is told
    as soon as the worker's main process exits, so the router can take it
    out of rotation at once;
  - a worker is restarted (or counted as stopped) only once nothing of its
    group is left, so a restart never races its predecessor's leftovers for
    the GPU or the port;
  - a start that never became ready (see L{WorkerMonitor.mark_ready}) always
    backs off, however long it ran: C{ProcessMonitor} restarts anything that
    ran longer than its threshold at once, which for a model that crashes at
    the end of a long load means reloading it for ever without a pause.

The launcher service receives what happens through L{ProcessEvents}.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import LoggingProtocol, ProcessMonitor

from twisted_router.launcher._config import RestartPolicy

__all__ = ["ProcessEvents", "WorkerMonitor", "describe_exit", "restart_delay"]

#: Longest line kept whole; a child that writes megabytes without a newline
#: must not make the router buffer them.
MAX_LINE_BYTES = 64 * 1024

#: How long a group may still look alive after SIGKILL before we stop waiting
#: (members that are zombies nobody reaps, e.g. when the router runs as PID 1).
_AFTER_KILL_PATIENCE = 5.0


def describe_exit(reason: Failure) -> str:
    """C{exited with status 1} / C{was killed by signal 9 (SIGKILL)}, for logs and quarantine reasons."""
    value = reason.value
    own = getattr(value, "exit_description", None)
    if isinstance(own, str):
        return own  # e.g. a Ray actor that died with its worker
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {signal_number} ({name})"
    code = getattr(value, "exitCode", None)
    if code is not None:
        return f"exited with status {code}"
    return f"could not run: {reason.getErrorMessage()}"


def restart_delay(
    current: float | None, *, became_ready: bool, ran: float, policy: RestartPolicy
) -> tuple[float, float]:
    """
    When to restart a worker that just ended, and the delay to use after the next quick death.

    C{ProcessMonitor}'s rule (a process that ran less than C{threshold}
    seconds waits C{current}, which doubles up to C{max_delay}; one that ran
    longer is restarted at once and its delay reset), except that only a
    start that became ready counts as having run: an exit before readiness
    always backs off.

    @param current: the delay this worker is due (C{None}: C{min_delay}).
    @return: C{(delay now, next current)}.
    """
    if became_ready and ran >= policy.threshold:
        return 0.0, policy.min_delay
    delay = policy.min_delay if current is None else current
    return delay, min(delay * 2, policy.max_delay)


class ProcessEvents(Protocol):
    """What the L{WorkerMonitor} reports about each named process."""

    def process_started(self, name: str, pid: int, url: str | None = None) -> None:
        """The process was spawned (a restart too); C{url}: where it listens, when only known now (Ray)."""

    def process_output(self, name: str, stream: str, line: str) -> None:
        """One line of its stdout or stderr."""

    def process_exited(self, name: str, reason: Failure) -> None:
        """Its main process exited (or could not be spawned); called at once."""

    def process_restart_scheduled(self, name: str, delay: float) -> None:
        """It will be started again in C{delay} seconds."""


class _WorkerProcess(LoggingProtocol):
    """
    The process protocol of one worker: splits output into lines and reports
    exits. Subclasses C{LoggingProtocol} only because that is the type
    C{ProcessMonitor} keeps; the line relay is the launcher's own.
    """

    service: WorkerMonitor

    def __init__(self, monitor: WorkerMonitor, name: str) -> None:
        self.service = monitor
        self.name = name
        self.pid: int | None = None
        self.exited = False
        self._partial = {"stdout": b"", "stderr": b""}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.service._started(self)

    def outReceived(self, data: bytes) -> None:
        self._received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._received("stderr", data)

    def _received(self, stream: str, data: bytes) -> None:
        *lines, rest = (self._partial[stream] + data).split(b"\n")
        if len(rest) > MAX_LINE_BYTES:
            lines.append(rest)
            rest = b""
        self._partial[stream] = rest
        for line in lines:
            self._line(stream, line)

    def _line(self, stream: str, line: bytes) -> None:
        self.service._output(self, stream, line.rstrip(b"\r").decode("utf-8", "replace"))

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self.service._leader_exited(self, reason)

    def processEnded(self, reason: Failure) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._line(stream, rest)
        self._partial = {"stdout": b"", "stderr": b""}
        if not self.exited:  # not every transport reports processExited first
            self.processExited(reason)
        self.service._reap(self, reason)


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name.removeprefix("SIG")


@dataclass(frozen=True)
class _Spawn:
    """How to start one supervised process (what C{addProcess} was given)."""

    args: list[str]
    uid: int | None
    gid: int | None
    env: dict[str, str]
    cwd: str | None


class WorkerMonitor(ProcessMonitor):
    """
    A C{ProcessMonitor} whose processes are process-group leaders (see the
    module docstring), reporting to L{ProcessEvents}.

    Add processes with C{addProcess(name, argv, env=...)} where C{argv} makes
    the process its own group leader (see
    L{twisted_router.launcher.process_group_argv}); stop everything with
    L{stop_all}, whose Deferred fires once every group is gone.

    It spawns processes itself (its own protocol, a group per worker), so it
    keeps its own record of what C{addProcess} was given and its own
    references to the reactor rather than reading C{ProcessMonitor}'s
    private attributes; the rest of C{ProcessMonitor}'s state it uses
    (C{protocols}, C{timeStarted}, C{delay}, C{murder}, C{restart}) is public.

    @param killpg: C{os.killpg}, replaceable in tests.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        events: ProcessEvents,
        *,
        restart: RestartPolicy,
        kill_time: float,
        killpg: Callable[[int, int], None] = os.killpg,
        reap_interval: float = 0.1,
    ) -> None:
        super().__init__(reactor)
        self._spawner = reactor
        self._time = IReactorTime(reactor)
        self._spawns: dict[str, _Spawn] = {}
        self.threshold = restart.threshold  # type: ignore[assignment]  # typeshed says int; any number works
        self.minRestartDelay = restart.min_delay  # type: ignore[assignment]
        self.maxRestartDelay = restart.max_delay  # type: ignore[assignment]
        self.killTime = kill_time  # type: ignore[assignment]
        self._restart_enabled = restart.enabled
        self._events = events
        self._killpg = killpg
        self._reap_interval = reap_interval
        self._reaping: dict[str, IDelayedCall] = {}
        self._killed_at: dict[str, float] = {}
        self._stopped: list[Deferred[None]] = []
        #: Processes whose current start became ready (see L{mark_ready}).
        self._ready: set[str] = set()

    # -- spawning --------------------------------------------------------------------

    def addProcess(
        self,
        name: str,
        args: Sequence[str],
        uid: int | None = None,
        gid: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        """C{ProcessMonitor.addProcess}; C{env=None} is an empty environment, as there."""
        if name in self._spawns:
            raise KeyError(f"remove {name} first")
        environment = dict(env or {})
        self._spawns[name] = _Spawn(list(args), uid, gid, environment, cwd)
        super().addProcess(name, list(args), uid, gid, environment, cwd)

    def removeProcess(self, name: str) -> None:
        """C{ProcessMonitor.removeProcess}: stop supervising C{name} (and stop its process)."""
        super().removeProcess(name)
        del self._spawns[name]

    def startProcess(self, name: str) -> None:
        """C{ProcessMonitor.startProcess}, with the launcher's protocol."""
        if name in self.protocols:
            return
        process = self._spawns[name]
        proto = _WorkerProcess(self, name)
        self.protocols[name] = proto
        self.timeStarted[name] = self._time.seconds()
        self._ready.discard(name)
        try:
            self._spawner.spawnProcess(
                proto,
                process.args[0],
                process.args,
                uid=process.uid,
                gid=process.gid,
                env=process.env,
                path=process.cwd,
            )
        except OSError:
            failure = Failure()
            proto.exited = True
            self._leader_exited(proto, failure)
            self._finished(name, failure)

    def running_pid(self, name: str) -> int | None:
        """
        The pid of C{name}'s current process while its main process runs
        (as far as the reactor has told us), else C{None}.
        """
        proto = self.protocols.get(name)
        if isinstance(proto, _WorkerProcess) and not proto.exited:
            return proto.pid
        return None

    def mark_ready(self, name: str, pid: int) -> None:
        """
        Process C{pid} of C{name} became ready (it answered its health
        check). Only then may its exit, if it ran longer than C{threshold},
        be restarted at once; an exit of a start that never became ready
        always backs off.
        """
        if self.running_pid(name) == pid:
            self._ready.add(name)

    def do_not_restart(self, name: str) -> None:
        """Stop supervising C{name}: its current process is not restarted when it exits (nor stopped here)."""
        if name in self._spawns:
            self.removeProcess(name)

    def _started(self, proto: _WorkerProcess) -> None:
        assert proto.pid is not None
        self._events.process_started(proto.name, proto.pid)

    def _output(self, proto: _WorkerProcess, stream: str, line: str) -> None:
        self._events.process_output(proto.name, stream, line)

    # -- signalling the group --------------------------------------------------------

    def _group_alive(self, pgid: int | None) -> bool:
        if pgid is None:
            return False
        try:
            self._killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process now: not ours to wait for
            return False
        return True

    def _signal(self, proto: _WorkerProcess, sig: int) -> None:
        """Signal the worker's whole process group (or just the worker, before it made its group)."""
        if proto.pid is None:
            return
        try:
            self._killpg(proto.pid, sig)
            return
        except ProcessLookupError:
            pass
        # No such group yet: the wrapper has not called setpgid. Signal the
        # process itself, through the transport, which knows whether that
        # pid is still ours.
        if not proto.exited and proto.transport is not None:
            try:
                proto.transport.signalProcess(_signal_name(sig))
            except ProcessExitedAlready:
                pass

    def _terminating(self, name: str) -> bool:
        """Whether SIGTERM was sent and the SIGKILL after it is still to come."""
        return name in self.murder and self.murder[name].active()

    def _terminate(self, proto: _WorkerProcess) -> None:
        """SIGTERM the group now, SIGKILL it after C{killTime} seconds unless it is gone by then."""
        self._signal(proto, signal.SIGTERM)
        if not self._terminating(proto.name):
            self.murder[proto.name] = self._time.callLater(self.killTime, self._kill, proto)

    def _kill(self, proto: _WorkerProcess) -> None:
        self.log.warn(
            "[{name}] still running {seconds:g} s after SIGTERM: sending SIGKILL to its process group",
            name=proto.name,
            seconds=self.killTime,
        )
        self._killed_at[proto.name] = self._time.seconds()
        self._signal(proto, signal.SIGKILL)

    def stopProcess(self, name: str) -> None:
        """Stop a worker: SIGTERM to its process group, SIGKILL after C{killTime}."""
        if name not in self._spawns:
            raise KeyError(f"Unrecognized process name: {name}")
        proto = self.protocols.get(name)
        if not isinstance(proto, _WorkerProcess) or proto.exited:
            return  # not running, or already on its way out (see _leader_exited)
        self._terminate(proto)

    # -- exits -------------------------------------------------------------------

    def _leader_exited(self, proto: _WorkerProcess, reason: Failure) -> None:
        name = proto.name
        if not self._restart_enabled and name in self._spawns:
            self.removeProcess(name)
        self._events.process_exited(name, reason)
        # What the worker started is now orphaned and may hold GPUs and the
        # port: end it too (unless a stop in progress already did).
        if self._group_alive(proto.pid) and not self._terminating(name):
            self._terminate(proto)

    def _reap(self, proto: _WorkerProcess, reason: Failure) -> None:
        """Once the main process has ended, wait until its whole group is gone, then let the monitor go on."""
        name = proto.name
        self._reaping.pop(name, None)
        killed_at = self._killed_at.get(name)
        patience_left = killed_at is None or self._time.seconds() - killed_at < _AFTER_KILL_PATIENCE
        if self._group_alive(proto.pid) and patience_left:
            if killed_at is None and not self._terminating(name):
                self._terminate(proto)
            self._reaping[name] = self._time.callLater(self._reap_interval, self._reap, proto, reason)
            return
        if not patience_left:
            self.log.warn(
                "[{name}] process group {pgid} still listed after SIGKILL (zombies?); not waiting any longer",
                name=name,
                pgid=proto.pid,
            )
        self._killed_at.pop(name, None)
        self._finished(name, reason)

    def _finished(self, name: str, reason: Failure) -> None:
        """
        The process and its group are gone: C{ProcessMonitor}'s bookkeeping,
        and a restart with backoff if it is still supervised.

        This is C{ProcessMonitor}'s own rule (a process that ran less than
        C{threshold} seconds waits C{delay}, which doubles up to
        C{maxRestartDelay}; one that ran longer is restarted at once and its
        delay reset), except that only a start that became ready counts as
        having run: an exit before readiness always backs off.
        """
        murder = self.murder.pop(name, None)
        if murder is not None and murder.active():
            murder.cancel()
        self.protocols.pop(name, None)
        became_ready = name in self._ready
        self._ready.discard(name)
        now = self._time.seconds()
        ran = now - self.timeStarted.get(name, now)
        policy = RestartPolicy(
            min_delay=self.minRestartDelay, max_delay=self.maxRestartDelay, threshold=self.threshold
        )
        delay, self.delay[name] = restart_delay(
            self.delay.get(name), became_ready=became_ready, ran=ran, policy=policy
        )
        if self.running and name in self._spawns:
            self.restart[name] = self._time.callLater(delay, self.startProcess, name)
            self._events.process_restart_scheduled(name, delay)
        self._check_stopped()

    # -- stopping everything -------------------------------------------------------

    def stop_all(self) -> Deferred[None]:
        """
        Stop the monitor: no more restarts, SIGTERM to every group, SIGKILL
        after C{killTime}.

        @return: fires once no process of any worker's group is left.
        """
        if self.running:
            self.stopService()
        for call in list(self.restart.values()):  # also restarts scheduled while stopped
            if call.active():
                call.cancel()
        d: Deferred[None] = Deferred()
        self._stopped.append(d)
        self._check_stopped()
        return d

    def _check_stopped(self) -> None:
        if self.running or self.protocols:
            return
        waiters, self._stopped = self._stopped, []
        for d in waiters:
            d.callback(None)
