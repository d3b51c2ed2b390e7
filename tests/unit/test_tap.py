"""
Tests for L{twisted_router.tap} (twistd options), the twistd plugin, and
L{twisted_router.service.make_router_service} on a L{MemoryReactorClock}.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

import twisted.plugins
from tests.support.deferreds import success_result_of
from twisted_router import tap
from twisted_router.config import ConfigError, RouterConfig, config_from_args
from twisted_router.service import make_router_service, stop_reactor_on_failure

# -- Options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--port", "30081"],
        ["--host", "127.0.0.1", "--port", "0", "--verbose"],
        ["--worker-urls", "http://127.0.0.1:30000", "http://127.0.0.1:30001"],
        ["--listen", "tcp:0:interface=127.0.0.1", "--routing-algorithm", "round-robin"],
        [
            "--max-connections", "3",
            "--timeout", "9",
            "--health-check-interval", "2",
            "--health-check-failure-threshold", "4",
            "--health-check-timeout", "1",
            "--log-level", "error",
            "--max-video-jobs", "5",
            "--max-image-ids", "6",
        ],
    ],
)
def test_options_give_the_same_config_as_the_command_line(argv: list[str]) -> None:
    options = tap.Options()
    options.parseOptions(list(argv))
    assert isinstance(options.config, RouterConfig)
    assert options.config == config_from_args(argv)


def test_options_actually_parse_values() -> None:
    options = tap.Options()
    options.parseOptions(["--port", "4444", "--worker-urls", "http://10.0.0.1:30000"])
    assert options.config.port == 4444
    assert options.config.worker_urls == ("http://10.0.0.1:30000",)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "http"], "--port"),
        (["--port", "70000"], "--port"),
        (["--max-connections", "0"], "--max-connections"),
        (["--timeout", "-1"], "--timeout"),
        (["--health-check-interval", "0"], "--health-check-interval"),
        (["--health-check-failure-threshold", "0"], "--health-check-failure-threshold"),
        (["--routing-algorithm", "fastest"], "--routing-algorithm"),
        (["--log-level", "loud"], "--log-level"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_values_raise_usage_error_not_system_exit(argv: list[str], flag: str) -> None:
    options = tap.Options()
    with pytest.raises(usage.UsageError) as info:
        options.parseOptions(argv)
    assert flag in str(info.value)


def test_usage_names_the_program_and_its_flags() -> None:
    text = str(tap.Options())
    assert "usage: sglang-d-router" in text
    assert "--worker-urls" in text
    assert "--health-check-failure-threshold" in text
    assert tap.Options().getUsage() == text


# -- the twistd plugin -------------------------------------------------------------


def test_twistd_plugin_is_discoverable() -> None:
    makers = [p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "sglang-d-router"]
    assert len(makers) == 1
    maker: Any = makers[0]
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService
    assert maker.description


# -- make_router_service -----------------------------------------------------------


class RecordingPort:
    """A listening port that remembers whether it was stopped."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.stopped = 0

    def getHost(self) -> Any:
        return self._inner.getHost()

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        self.stopped += 1
        return succeed(None)


class RecordingReactor(MemoryReactorClock):
    """A memory reactor whose ports record C{stopListening}."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[RecordingPort] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        recording = RecordingPort(super().listenTCP(port, factory, backlog, interface))
        self.ports.append(recording)
        return recording


WORKERS = ("http://10.0.0.1:30000", "http://10.0.0.2:30000/")


def test_make_router_service_returns_an_unstarted_multiservice() -> None:
    reactor = RecordingReactor()
    service, parts, listener = make_router_service(RouterConfig(worker_urls=WORKERS), reactor)
    assert isinstance(service, MultiService)
    assert not service.running
    assert listener.parent is service
    assert parts.health.parent is service
    # Nothing happens before start: no worker, no port, no timer.
    assert len(parts.pool) == 0
    assert reactor.tcpServers == []
    assert reactor.getDelayedCalls() == []


def test_start_registers_worker_urls_in_the_pool() -> None:
    reactor = RecordingReactor()
    service, parts, _ = make_router_service(RouterConfig(worker_urls=WORKERS), reactor)
    service.startService()
    assert [w.url for w in parts.pool.workers()] == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    # No traffic before a worker has answered once (it may still be loading its model).
    assert all(w.state == "starting" and not w.routable for w in parts.pool.workers())


def test_invalid_worker_urls_never_reach_the_service() -> None:
    """A malformed --worker-urls entry stops the start (issue 8 point 7) instead of being skipped."""
    with pytest.raises(ConfigError, match="--worker-urls: invalid worker URL 'not a url'"):
        RouterConfig(worker_urls=("not a url", "http://10.0.0.1:30000"))
    with pytest.raises(usage.UsageError, match="--worker-urls: .*blocked"):
        tap.Options().parseOptions(["--worker-urls", "http://169.254.169.254:80"])


def test_start_runs_the_health_loop_on_the_reactor_clock() -> None:
    reactor = RecordingReactor()
    service, parts, _ = make_router_service(RouterConfig(health_check_interval=7.5), reactor)
    service.startService()
    assert parts.health.running
    # The round every --health-check-interval, and the suspect probes every second.
    assert sorted(c.getTime() for c in reactor.getDelayedCalls()) == [1.0, 7.5]
    reactor.advance(7.5)
    assert sorted(c.getTime() for c in reactor.getDelayedCalls()) == [8.0, 15.0]


def test_start_probes_the_startup_workers_through_the_reactor() -> None:
    reactor = RecordingReactor()
    service, _, _ = make_router_service(RouterConfig(worker_urls=WORKERS[:1]), reactor)
    service.startService()
    reactor.advance(1)  # let the connection attempts start
    assert reactor.tcpClients, "no connection to the worker was attempted"
    # (MemoryReactor's fake resolver maps every name to 127.0.0.1; the port is the worker's.)
    assert {port for _host, port, *_ in reactor.tcpClients} == {30000}


def test_start_listens_on_the_configured_host_and_port() -> None:
    reactor = RecordingReactor()
    service, _, listener = make_router_service(RouterConfig(host="127.0.0.1", port=30123), reactor)
    service.startService()
    [(port, factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (30123, "127.0.0.1")
    assert isinstance(factory, Site)
    assert success_result_of(listener.when_listening()) is reactor.ports[0]


def test_listen_endpoint_overrides_host_and_port() -> None:
    reactor = RecordingReactor()
    config = RouterConfig(host="0.0.0.0", port=1, listen="tcp:30124:interface=127.0.0.2")
    service, _, _ = make_router_service(config, reactor)
    service.startService()
    assert [(p, i) for p, _f, _b, i in reactor.tcpServers] == [(30124, "127.0.0.2")]


def test_stop_stops_the_health_loop_and_the_listener() -> None:
    reactor = RecordingReactor()
    service, parts, _ = make_router_service(RouterConfig(port=30125), reactor)
    service.startService()
    success_result_of(service.stopService())
    assert not service.running
    assert not parts.health.running
    assert [p.stopped for p in reactor.ports] == [1]
    assert reactor.getDelayedCalls() == []


def test_stop_leaves_nothing_scheduled_with_startup_workers() -> None:
    """
    The health probes and the capability fetches of the C{--worker-urls}
    workers are in flight when the router stops; none of their timers may
    outlive it.
    """
    reactor = RecordingReactor()
    service, parts, _ = make_router_service(RouterConfig(worker_urls=WORKERS), reactor)
    service.startService()
    assert reactor.getDelayedCalls(), "expected probes in flight"
    success_result_of(service.stopService())
    assert [p.stopped for p in reactor.ports] == [1]
    assert reactor.getDelayedCalls() == [], [
        (c.getTime(), c.func) for c in reactor.getDelayedCalls()
    ]
    # And nothing changes later on: no late probe outcome marks a worker.
    reactor.advance(1000)
    assert all(w.consecutive_failures == 0 and not w.is_dead for w in parts.pool.workers())


def test_stop_without_start_is_harmless() -> None:
    reactor = RecordingReactor()
    service, _, _ = make_router_service(RouterConfig(), reactor)
    service.startService()
    success_result_of(service.stopService())
    # A second start/stop cycle works the same way (twistd never does this, tests might).
    service.startService()
    assert len(reactor.tcpServers) == 2
    success_result_of(service.stopService())
    assert [p.stopped for p in reactor.ports] == [1, 1]
    assert reactor.getDelayedCalls() == []


# -- stop_reactor_on_failure ---------------------------------------------------------


class FakeCoreReactor:
    def __init__(self, running: bool) -> None:
        self.running = running
        self.stopped = 0
        self.when_running: list[Any] = []

    def stop(self) -> None:
        self.stopped += 1

    def callWhenRunning(self, f: Any) -> None:
        self.when_running.append(f)


def test_stop_reactor_on_failure_stops_a_running_reactor() -> None:
    reactor = FakeCoreReactor(running=True)
    stop_reactor_on_failure(reactor)(Failure(OSError("port taken")))  # type: ignore[arg-type]
    assert reactor.stopped == 1
    assert reactor.when_running == []


def test_stop_reactor_on_failure_defers_until_the_reactor_runs() -> None:
    reactor = FakeCoreReactor(running=False)
    stop_reactor_on_failure(reactor)(Failure(OSError("port taken")))  # type: ignore[arg-type]
    assert reactor.stopped == 0
    assert reactor.when_running == [reactor.stop]
