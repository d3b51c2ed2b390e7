"""
The C{ray} launcher backend without Ray: its config and plan rules, the
actor-side host as a plain object with real child processes, and the
supervision state machine (L{RayWorkerMonitor} under the real
L{LauncherService}) against a fake Ray facade on a L{Clock}.

The fake runs every Ray call synchronously except C{poll}, which stays
pending until the test answers it, as the real one does while a worker runs.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from tests.support.network import HealthAnswers
from twisted_router import cli
from twisted_router.launcher import (
    STARTUP_EXIT_LIMIT,
    LauncherConfigError,
    LauncherService,
    LaunchFailed,
    LaunchPlanError,
    RestartPolicy,
    parse_launcher_config,
    plan_fleet,
)
from twisted_router.launcher._ray_actor import (
    Polled,
    Started,
    fill_argv,
    free_port_pair,
)
from twisted_router.launcher._ray_client import (
    RAY_MISSING,
    ClusterOptions,
    Interrupted,
    RayCluster,
    RayUnavailable,
    _check_reachable,
    import_ray,
)
from twisted_router.launcher._ray_supervisor import STOP_PATIENCE, RayWorkerMonitor

_T = TypeVar("_T")


def ray_config(**extra: Any) -> dict[str, Any]:
    return {"launcher": {"backend": "ray", "worker": "simulated", "num_gpus_per_worker": 0, **extra}}


def no_ray() -> object:
    raise RayUnavailable(RAY_MISSING)


# -- config ------------------------------------------------------------------------------------


def test_ray_config_defaults_and_keys() -> None:
    config = parse_launcher_config(
        ray_config(num_workers=3, strategy="SPREAD", ray_address="10.0.0.1:6379", num_cpus_per_worker=0.5,
                   simulated={"step_ms": 5})
    )
    assert (config.backend, config.worker, config.strategy) == ("ray", "simulated", "SPREAD")
    assert config.ray_address == "10.0.0.1:6379" and config.num_cpus_per_worker == 0.5
    assert config.num_workers == 3 and config.num_gpus_per_worker == 0 and config.runs_simulator
    default = parse_launcher_config({"launcher": {"backend": "ray", "model": "Qwen/Qwen-Image"}})
    assert (default.ray_address, default.strategy, default.worker) == ("auto", "PACK", "sglang")
    assert default.num_gpus_per_worker == 1 and not default.runs_simulator


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        ({"backend": "ray", "worker": "sglang"}, "launcher.model: required for Ray sglang workers"),
        ({"backend": "ray", "model": "m", "num_gpus_per_worker": 0},
         "launcher.num_gpus_per_worker: must be at least 1, got 0"),
        ({"backend": "ray", "model": "m", "strategy": "pack"},
         "launcher.strategy: must be one of PACK, SPREAD, STRICT_SPREAD, got 'pack'"),
        ({"backend": "ray", "worker": "docker"}, "launcher.worker: must be one of sglang, simulated, got 'docker'"),
        ({"backend": "ray", "model": "m", "worker_base_port": 10090},
         "launcher.worker_base_port: not used with 'backend: ray' (each worker picks a free port on its node)"),
        ({"backend": "ray", "model": "m", "worker_gpu_ids": [0]}, "launcher.worker_gpu_ids: not used with 'backend: ray'"),
        ({"backend": "ray", "model": "m", "simulated": {}}, "launcher.simulated: only used with 'backend: simulated'"),
        ({"backend": "ray", "model": "m", "ray_temp_dir": "/tmp/r"},
         "launcher.ray_temp_dir: only used with 'ray_address: local'"),
        ({"backend": "ray", "model": "m", "num_cpus_per_worker": 0},
         "launcher.num_cpus_per_worker: must be a positive number of seconds"),
        ({"backend": "local", "model": "m", "strategy": "PACK"}, "launcher.strategy: only used with 'backend: ray'"),
        ({"backend": "simulated", "ray_address": "auto"}, "launcher.ray_address: only used with 'backend: ray'"),
        ({"backend": "ray", "worker": "simulated", "num_gpus_per_worker": 0, "simulated": {"speed": 0}},
         "launcher.simulated: "),
    ],
)
def test_ray_config_errors_name_the_key(launcher: dict[str, Any], expected: str) -> None:
    with pytest.raises(LauncherConfigError) as info:
        parse_launcher_config({"launcher": launcher})
    assert expected in str(info.value)


# -- plan --------------------------------------------------------------------------------------


def test_plan_sglang_workers_leave_ports_and_host_to_the_node() -> None:
    config = parse_launcher_config(
        {"launcher": {"backend": "ray", "model": "Qwen/Qwen-Image", "num_workers": 2, "num_gpus_per_worker": 2,
                      "worker_extra_args": "--output-path /data"}}
    )
    plan = plan_fleet(config, find_ray=lambda: object())
    assert [w.placement for w in plan.workers] == ["Ray bundle 0 (1 CPU, 2 GPU)", "Ray bundle 1 (1 CPU, 2 GPU)"]
    assert plan.workers[1].argv == (
        "sglang", "serve", "--model-path", "Qwen/Qwen-Image", "--num-gpus", "2",
        "--host", "{host}", "--port", "{port}",
        "--master-port", "{master_port}", "--scheduler-port", "{scheduler_port}",
        "--output-path", "/data",
    )
    # Nothing of the router's environment is shipped to other nodes; Ray sets CUDA_VISIBLE_DEVICES.
    assert plan.workers[0].env == {"PYTHONUNBUFFERED": "1"}
    assert len({w.url for w in plan.workers}) == 2


def test_plan_simulated_workers_use_the_simulators_own_argv() -> None:
    config = parse_launcher_config(ray_config(simulated={"workers": [{"task_type": "T2V"}, {"step_ms": 3}]}))
    plan = plan_fleet(config, find_ray=lambda: object())
    assert plan.workers[0].argv[:7] == ("{python}", "-m", "twisted_router.simulator", "--host", "{host}", "--port", "{port}")
    assert "--task-type" in plan.workers[0].argv and "T2V" in plan.workers[0].argv
    assert "--step-ms" in plan.workers[1].argv


def test_plan_without_ray_is_one_line() -> None:
    config = parse_launcher_config(ray_config())
    with pytest.raises(LaunchPlanError) as info:
        plan_fleet(config, find_ray=no_ray)
    assert str(info.value) == RAY_MISSING


def test_without_ray_installed_the_command_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes "import ray" fail, installed or not
    with pytest.raises(RayUnavailable):
        import_ray()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("launcher: {backend: ray, worker: simulated, num_gpus_per_worker: 0}\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["--port", "0", "--launcher-config", str(fleet)])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"sglang-d-router: error: {RAY_MISSING}\n"


# -- on the node -------------------------------------------------------------------------------


def test_fill_argv_replaces_whole_tokens_only() -> None:
    assert fill_argv(["x", "{port}", "--p={port}", "{host}"], {"{port}": "5", "{host}": "h"}) == ["x", "5", "--p={port}", "h"]


def test_free_port_pair_keeps_the_preferred_port_while_it_and_the_next_are_free() -> None:
    busy = {7001}
    handed = iter([7000, 7010])

    def is_free(host: str, port: int) -> bool:
        return port not in busy

    assert free_port_pair("h", 6000, is_free=is_free, any_port=lambda h: next(handed)) == 6000
    # 7000's neighbour is busy: the next port the kernel hands out is taken instead.
    assert free_port_pair("h", 7000, is_free=is_free, any_port=lambda h: next(handed)) == 7010


# -- the blocking client -------------------------------------------------------------------


class SlowRay:
    """Just C{wait} and C{get} of the ray module: nothing is ever ready."""

    def __init__(self, on_wait: Callable[[], None] = lambda: None) -> None:
        self.waits: list[float] = []
        self.on_wait = on_wait

    def wait(self, refs: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        self.waits.append(timeout)
        self.on_wait()
        return [], refs

    def get(self, ref: Any) -> Any:
        raise AssertionError("nothing is ready")


def test_waits_are_sliced_so_a_stopping_router_is_not_held_up() -> None:
    options = ClusterOptions(address="auto", num_workers=1, num_cpus_per_worker=1, num_gpus_per_worker=0,
                             strategy="PACK")
    slow = SlowRay()
    cluster = RayCluster(options, ray=slow)
    with pytest.raises(TimeoutError, match=r"placing the group took longer than wait_timeout \(0.05 s\)"):
        cluster._wait(object(), 0.05, "placing the group")
    assert slow.waits and max(slow.waits) <= 0.05
    stopping = RayCluster(options, ray=SlowRay(on_wait=lambda: stopping.interrupt()))
    with pytest.raises(Interrupted):
        stopping._wait(object(), 600.0, "starting worker 0")


# -- supervision -------------------------------------------------------------------------------


@dataclass
class FakeActor:
    index: int
    started: Started
    stopped: bool = False
    killed: bool = False


@dataclass
class FakeRay:
    """The blocking Ray calls, done at once; C{poll} is answered by the test (see L{FakeOffload})."""

    refuse_connect: bool = False
    refuse_reserve: bool = False
    refuse_start: int = 0
    actors: list[FakeActor] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    on_stop: Callable[[FakeActor], None] | None = None
    next_port: int = 20000

    def connect(self) -> str:
        self.calls.append("connect")
        if self.refuse_connect:
            raise ConnectionError("Could not find any running Ray instance")
        return "2 node(s), 8 CPU(s), 0 GPU(s)"

    def reserve(self, timeout: float) -> None:
        self.calls.append(f"reserve {timeout:g}")
        if self.refuse_reserve:
            raise TimeoutError("placement group not ready")

    def start(self, index: int, argv: Sequence[str], env: Mapping[str, str], preferred_port: int | None,
              timeout: float) -> tuple[FakeActor, Started]:
        self.calls.append(f"start {index} preferring {preferred_port}")
        if self.refuse_start:
            self.refuse_start -= 1
            raise RuntimeError("actor could not be scheduled")
        port = preferred_port or self.next_port
        self.next_port += 2
        started = Started(url=f"http://10.0.0.{index + 1}:{port}", host=f"10.0.0.{index + 1}", port=port,
                          pid=5000 + len(self.actors))
        actor = FakeActor(index, started)
        self.actors.append(actor)
        return actor, started

    def poll(self, actor: FakeActor, timeout: float) -> Polled:
        raise AssertionError("answered by FakeOffload")

    def stop(self, actor: FakeActor, grace: float) -> None:
        self.calls.append(f"stop {actor.started.pid}")
        actor.stopped = True
        if self.on_stop is not None:
            self.on_stop(actor)

    def kill(self, actor: FakeActor) -> None:
        self.calls.append(f"kill {actor.started.pid}")
        actor.killed = True

    def close(self) -> None:
        self.calls.append("close")

    def interrupt(self) -> None:
        self.calls.append("interrupt")


class FakeOffload:
    """Runs calls at once, on the reactor; a poll stays pending in C{polls} until answered."""

    def __init__(self) -> None:
        self.polls: dict[int, Deferred[Polled]] = {}
        self.running = False
        self.stopped = False
        self.abandoned = False

    def start(self) -> None:
        self.running = True

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        assert self.running
        if getattr(f, "__name__", "") == "poll":
            actor = args[0]
            d: Deferred[Any] = Deferred()
            assert actor.started.pid not in self.polls, "two polls pending on one actor"
            self.polls[actor.started.pid] = d
            return d
        try:
            return succeed(f(*args))
        except Exception:  # noqa: BLE001 - becomes the Deferred's failure, as deferToThreadPool does
            return fail()

    call_owner = call

    def hold(self, method: str, function: str) -> list[Deferred[Any]]:
        """
        Make C{self.<method>} (C{call} or C{call_owner}) hold each call of the
        function named C{function} until its Deferred (in the list returned)
        is fired; it then runs. Other calls run as before.
        """
        held: list[Deferred[Any]] = []
        real = getattr(self, method)

        def holding(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if getattr(f, "__name__", "") == function:
                d: Deferred[Any] = Deferred()
                held.append(d)
                d.addCallback(lambda _: f(*args))
                return d
            return real(f, *args)  # type: ignore[no-any-return]

        setattr(self, method, holding)
        return held

    def stop(self) -> None:
        self.running = False
        self.stopped = True

    def abandon(self) -> None:
        self.abandoned = True

    def answer(self, pid: int, lines: Sequence[tuple[str, str]] = (), returncode: int | None = None) -> None:
        self.polls.pop(pid).callback(Polled(lines=tuple(lines), returncode=returncode))

    def actor_died(self, pid: int) -> None:
        self.polls.pop(pid).errback(RuntimeError("ActorDiedError: The actor died unexpectedly\n  class_name: WorkerHost"))


@dataclass
class Router:
    ready: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)

    async def worker_ready(self, url: str) -> str:
        self.ready.append(url)
        return url

    def worker_lost(self, url: str, reason: str) -> None:
        self.lost.append((url, reason))


@dataclass
class RayHarness:
    clock: Clock
    ray: FakeRay
    offload: FakeOffload
    router: Router
    http: HealthAnswers
    service: LauncherService

    def advance(self, seconds: float) -> None:
        steps = max(1, round(seconds / 0.1))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
        self.clock.advance(1e-6)

    def actor(self, index: int) -> FakeActor:
        """The latest actor of worker C{index}."""
        return [a for a in self.ray.actors if a.index == index][-1]

    def up(self, *indices: int) -> None:
        for index in indices:
            self.http.up[self.actor(index).started.url] = 200


def ray_harness(num_workers: int = 2, *, restart: RestartPolicy | None = None, ray: FakeRay | None = None) -> RayHarness:
    config = parse_launcher_config(
        ray_config(num_workers=num_workers, wait_timeout=30, shutdown_grace=5,
                   restart={"min_delay": 1, "max_delay": 4, "threshold": 10})
    )
    if restart is not None:
        config = type(config)(**{**config.__dict__, "restart": restart})
    plan = plan_fleet(config, find_ray=lambda: object())
    clock = Clock()
    fake = ray or FakeRay()
    offload = FakeOffload()
    router = Router()
    http = HealthAnswers()
    service = LauncherService(
        plan, router, clock, http,  # type: ignore[arg-type]
        supervisor=lambda s: RayWorkerMonitor(
            s, lambda: fake, offload, clock, restart=config.restart, kill_time=config.shutdown_grace,
            wait_timeout=config.wait_timeout, on_fatal=s.fleet_failed,
        ),
    )
    return RayHarness(clock, fake, offload, router, http, service)


def test_workers_start_in_their_bundles_and_register_when_healthy() -> None:
    h = ray_harness(2)
    with capturedLogs() as events:
        h.service.startService()
        assert h.ray.calls == ["connect", "reserve 30", "start 0 preferring None", "start 1 preferring None"]
        assert set(h.offload.polls) == {5000, 5001}  # one pending poll per worker
        h.offload.answer(5000, [("stdout", "2026-12-01T00:00:00+0000 [-] loading")])
        h.up(0, 1)
        h.advance(1.0)
    assert sorted(h.router.ready) == ["http://10.0.0.1:20000", "http://10.0.0.2:20002"]
    text = [formatEvent(e) for e in events]
    assert "launcher: connected to the Ray cluster: 2 node(s), 8 CPU(s), 0 GPU(s)" in text
    assert any(t.startswith("[worker 0] Ray bundle 0 (1 CPU, 0 GPU): {python} -m twisted_router.simulator") for t in text)
    assert "[worker 0] started, pid 5000; waiting for http://10.0.0.1:20000/health" in text
    assert "[worker 0] [-] loading" in text  # relayed, its own timestamp dropped
    assert any(t.startswith("2/2 workers ready (") for t in text), text
    assert 5000 in h.offload.polls  # polling again after the answer


def test_a_dead_actor_is_out_of_rotation_at_once_then_replaced_in_its_bundle() -> None:
    h = ray_harness(2)
    h.service.startService()
    h.up(0, 1)
    h.advance(1.0)
    first = h.actor(1)
    h.advance(20.0)  # served longer than the threshold: its replacement starts at once
    with capturedLogs() as events:
        h.offload.actor_died(first.started.pid)
    assert h.router.lost == [
        ("http://10.0.0.2:20002", "launcher: worker process was lost with its Ray actor "
                                  "(RuntimeError: ActorDiedError: The actor died unexpectedly)")
    ]
    assert first.killed
    h.advance(0.01)
    # A new actor in the same bundle, asking for the same port, registered once healthy.
    assert h.ray.calls[-1] == "start 1 preferring 20002"
    assert h.actor(1) is not first
    h.up(1)
    h.advance(1.0)
    assert h.router.ready[-1] == "http://10.0.0.2:20002"
    text = [formatEvent(e) for e in events]
    assert "[worker 1] restarting in 0.0 s" in text


def test_an_exit_is_reported_with_its_status_and_quick_deaths_back_off() -> None:
    h = ray_harness(1)
    h.service.startService()
    h.up(0)
    h.advance(1.0)
    delays = []
    for _ in range(4):
        pid = h.actor(0).started.pid
        with capturedLogs() as events:
            h.offload.answer(pid, [("stderr", "Segmentation fault")], returncode=-signal.SIGKILL)
        delays += [e["delay"] for e in events if "restarting in" in e.get("log_format", "")]
        starts = len(h.ray.actors)
        h.advance(delays[-1] - 0.05)
        assert len(h.ray.actors) == starts  # not before its backoff
        h.advance(0.1)
        assert len(h.ray.actors) == starts + 1
    assert delays == [1.0, 2.0, 4.0, 4.0]  # doubling up to max_delay
    assert h.router.lost[0][1] == "launcher: worker process was killed by signal 9 (SIGKILL)"


def test_a_quarantined_worker_is_stopped_on_its_node_and_replaced() -> None:
    h = ray_harness(1)
    h.ray.on_stop = lambda actor: h.clock.callLater(0, h.offload.answer, actor.started.pid, (), -signal.SIGTERM)
    h.service.startService()
    h.up(0)
    h.advance(1.0)
    first = h.actor(0)
    h.service.worker_quarantined(first.started.url, "3 failed health checks")
    assert f"stop {first.started.pid}" in h.ray.calls
    h.advance(0.1)
    assert first.killed
    h.advance(1.1)
    assert h.actor(0) is not first and h.ray.calls[-1] == "start 0 preferring 20000"


def test_stopping_stops_every_worker_then_kills_its_actor_and_closes_the_cluster() -> None:
    h = ray_harness(2)
    h.ray.on_stop = lambda actor: h.clock.callLater(0, h.offload.answer, actor.started.pid, (), -signal.SIGTERM)
    h.service.startService()
    h.up(0, 1)
    h.advance(1.0)
    d = h.service.stopService()
    assert_no_result(d)  # the workers are still stopping
    assert "close" not in h.ray.calls
    h.advance(0.1)
    success_result_of(d)
    assert [c.split()[0] for c in h.ray.calls[-5:]] == ["stop", "stop", "kill", "kill", "close"]
    assert h.offload.stopped and not h.offload.polls
    assert all(a.killed for a in h.ray.actors)
    h.advance(60.0)
    assert len(h.ray.actors) == 2  # nothing restarted


def test_no_cluster_fails_the_launch_with_one_line() -> None:
    h = ray_harness(2, ray=FakeRay(refuse_connect=True))
    failed = h.service.when_failed()
    h.service.startService()
    error = failure_result_of(failed, LaunchFailed)
    assert str(error.value) == (
        "launcher: connecting to the Ray cluster failed: "
        "ConnectionError: Could not find any running Ray instance"
    )
    assert h.ray.actors == []
    success_result_of(h.service.stopService())
    assert h.offload.stopped


def test_no_room_for_the_placement_group_fails_the_launch() -> None:
    h = ray_harness(2, ray=FakeRay(refuse_reserve=True))
    failed = h.service.when_failed()
    h.service.startService()
    error = failure_result_of(failed, LaunchFailed)
    assert "reserving the placement group failed" in str(error.value)
    success_result_of(h.service.stopService())
    assert h.ray.calls[-1] == "close"


def test_actors_that_never_start_fail_the_launch_after_the_startup_limit() -> None:
    h = ray_harness(1, ray=FakeRay(refuse_start=99))
    failed = h.service.when_failed()
    h.service.startService()
    delay = 1.0
    for _ in range(STARTUP_EXIT_LIMIT - 1):
        assert_no_result(failed)
        h.advance(delay + 0.05)  # the backoff doubles: 1, 2, ...
        delay *= 2
    failure_result_of(failed, LaunchFailed)
    assert len([c for c in h.ray.calls if c.startswith("start")]) == STARTUP_EXIT_LIMIT


def test_a_start_that_returns_after_the_stop_kills_its_actor() -> None:
    h = ray_harness(1)
    pending = h.offload.hold("call", "start")
    h.service.startService()
    d = h.service.stopService()
    assert_no_result(d)  # waits for the start in flight
    pending[0].callback(None)
    success_result_of(d)
    assert h.ray.actors[0].killed and h.ray.calls[-1] == "close"
    assert "interrupt" in h.ray.calls  # the real one cuts the waiting start short


def test_a_router_stopped_while_connecting_reserves_and_starts_nothing() -> None:
    h = ray_harness(2)
    held = h.offload.hold("call_owner", "_connect")
    h.service.startService()
    d = h.service.stopService()
    assert_no_result(d)
    held[0].callback(None)
    success_result_of(d)
    assert h.ray.calls == ["connect", "close"] and h.ray.actors == []


def test_a_connection_that_never_returns_does_not_hold_up_the_stop() -> None:
    h = ray_harness(1)

    def never(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return Deferred()  # ray.init retrying an address nothing answers at

    h.offload.call_owner = never  # type: ignore[method-assign]
    h.service.startService()
    with capturedLogs() as events:
        d = h.service.stopService()
        h.advance(5.0 + STOP_PATIENCE - 0.5)  # shutdown_grace + patience
        assert_no_result(d)
        h.advance(1.0)
        success_result_of(d)
    assert h.offload.abandoned and not h.offload.stopped  # a blocked thread cannot be joined
    assert "close" not in h.ray.calls
    assert any("Ray call(s) still blocked 15 s after the stop" in formatEvent(e) for e in events)


def test_an_address_nothing_listens_at_fails_before_ray_init() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there

    class NoInit:
        def init(self, **kwargs: Any) -> None:
            raise AssertionError("ray.init would retry for ever")

    options = ClusterOptions(address=f"127.0.0.1:{port}", num_workers=1, num_cpus_per_worker=1,
                             num_gpus_per_worker=0, strategy="PACK")
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at 127.0.0.1:{port}: Connection refused"):
        RayCluster(options, ray=NoInit()).connect()
    with pytest.raises(ConnectionError, match="expected HOST:PORT"):
        _check_reachable("head:port")
    _check_reachable("auto")  # Ray's to resolve
