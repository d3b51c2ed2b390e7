"""Tests for L{twisted_router.config}: the one frozen config object and its command line."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock

from twisted_router import cli
from twisted_router.config import (
    LOG_LEVELS,
    PROGRAM_NAME,
    ROUTING_ALGORITHMS,
    ConfigError,
    RouterConfig,
    build_parser,
    config_from_args,
)

# -- defaults -----------------------------------------------------------------


def test_defaults_match_the_design() -> None:
    config = config_from_args([])
    assert config.host == "0.0.0.0"
    assert config.port == 30080
    assert config.listen is None
    assert config.worker_urls == ()
    assert config.max_connections == 100
    assert config.timeout == 120.0
    assert config.health_check_interval == 10.0
    assert config.health_check_failure_threshold == 3
    assert config.routing_algorithm == "least-request"
    assert config.launcher_config is None
    assert config.verbose is False
    assert config.log_level == "info"
    assert config.access_log is True  # one line per request unless --access-log off
    assert config_from_args(["--access-log", "off"]).access_log is False
    assert config.client_timeout == 60.0  # well under the 360 s idle timeout it replaced


def test_command_line_defaults_equal_dataclass_defaults() -> None:
    """No option means something different on the command line than in code."""
    assert config_from_args([]) == RouterConfig()


def test_config_is_frozen() -> None:
    config = RouterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_program_name() -> None:
    assert PROGRAM_NAME == "sglang-d-router"
    assert build_parser().prog == "sglang-d-router"


# -- every flag parses ------------------------------------------------------


def test_every_flag_parses() -> None:
    config = config_from_args(
        [
            "--host", "127.0.0.1",
            "--port", "30081",
            "--listen", "tcp:30082:interface=127.0.0.1",
            "--worker-urls", "http://127.0.0.1:30000", "http://127.0.0.1:30001",
            "--max-connections", "7",
            "--timeout", "2.5",
            "--health-check-interval", "0.5",
            "--health-check-failure-threshold", "5",
            "--health-check-timeout", "1.5",
            "--routing-algorithm", "round-robin",
            "--max-video-jobs", "11",
            "--max-image-ids", "12",
            "--client-timeout", "7.5",
            "--verbose",
            "--log-level", "warn",
        ]
    )
    assert config == RouterConfig(
        host="127.0.0.1",
        port=30081,
        listen="tcp:30082:interface=127.0.0.1",
        worker_urls=("http://127.0.0.1:30000", "http://127.0.0.1:30001"),
        max_connections=7,
        timeout=2.5,
        health_check_interval=0.5,
        health_check_failure_threshold=5,
        health_check_timeout=1.5,
        routing_algorithm="round-robin",
        verbose=True,
        log_level="warn",
        max_video_jobs=11,
        max_image_ids=12,
        client_timeout=7.5,
    )


def test_worker_urls_take_several_urls_in_order() -> None:
    urls = ["http://10.0.0.3:30000", "http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    config = config_from_args(["--worker-urls", *urls, "--port", "1"])
    assert config.worker_urls == tuple(urls)
    assert isinstance(config.worker_urls, tuple)
    assert config.port == 1


def test_worker_urls_with_no_value_is_empty() -> None:
    assert config_from_args(["--worker-urls"]).worker_urls == ()


@pytest.mark.parametrize("algorithm", ROUTING_ALGORITHMS)
def test_every_routing_algorithm_is_accepted(algorithm: str) -> None:
    assert config_from_args(["--routing-algorithm", algorithm]).routing_algorithm == algorithm


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_every_log_level_is_accepted(level: str) -> None:
    assert config_from_args(["--log-level", level]).log_level == level


def test_the_earlier_routers_algorithms_are_available() -> None:
    assert {"least-request", "round-robin", "random"} <= set(ROUTING_ALGORITHMS)


def test_launcher_config_is_kept_or_refused_never_ignored() -> None:
    """An operator who asked for launched workers must not silently get a router without them."""
    try:
        config = config_from_args(["--launcher-config", "fleet.yaml"])
    except ConfigError as exc:
        assert "--launcher-config" in str(exc)
    else:
        assert config.launcher_config == "fleet.yaml"


def test_port_zero_is_allowed() -> None:
    assert config_from_args(["--port", "0"]).port == 0


# -- validation: the dataclass -----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"port": -1}, "--port"),
        ({"port": 65536}, "--port"),
        ({"max_connections": 0}, "--max-connections"),
        ({"timeout": 0}, "--timeout"),
        ({"timeout": -3.0}, "--timeout"),
        ({"health_check_interval": 0}, "--health-check-interval"),
        ({"health_check_failure_threshold": 0}, "--health-check-failure-threshold"),
        ({"health_check_timeout": 0}, "--health-check-timeout"),
        ({"routing_algorithm": "fastest"}, "--routing-algorithm"),
        ({"log_level": "loud"}, "--log-level"),
        ({"max_video_jobs": 0}, "--max-video-jobs"),
        ({"max_image_ids": 0}, "--max-image-ids"),
        ({"client_timeout": 0}, "--client-timeout"),
        ({"client_timeout": float("inf")}, "--client-timeout"),
    ],
)
def test_invalid_value_raises_config_error_naming_the_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig(**kwargs)
    message = str(info.value)
    assert flag in message
    # The bad value is shown too, so the operator sees what was wrong.
    if flag not in ("--max-video-jobs", "--max-image-ids"):
        assert str(next(iter(kwargs.values()))) in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("field", ["timeout", "health_check_interval", "health_check_timeout", "client_timeout"])
def test_nan_durations_are_refused(field: str) -> None:
    """NaN is not a positive number of seconds; a NaN timer would never fire (or stall the heap)."""
    with pytest.raises(ConfigError) as info:
        RouterConfig(**{field: float("nan")})
    assert "--" + field.replace("_", "-") in str(info.value)


# -- validation: the command line ------------------------------------------


def test_out_of_range_port_on_the_command_line_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--port"):
        config_from_args(["--port", "70000"])


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "http"], "--port"),
        (["--max-connections", "0"], "--max-connections"),
        (["--max-connections", "many"], "--max-connections"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "-1"], "--timeout"),
        (["--timeout", "soon"], "--timeout"),
        (["--health-check-interval", "0"], "--health-check-interval"),
        (["--health-check-failure-threshold", "0"], "--health-check-failure-threshold"),
        (["--health-check-timeout", "-2"], "--health-check-timeout"),
        (["--routing-algorithm", "fastest"], "--routing-algorithm"),
        (["--log-level", "loud"], "--log-level"),
        (["--max-video-jobs", "0"], "--max-video-jobs"),
        (["--max-image-ids", "-5"], "--max-image-ids"),
    ],
)
def test_bad_flag_value_exits_with_a_message_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    assert err.startswith("usage: sglang-d-router")


def test_unknown_flag_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["--no-such-flag"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_nan_timeout_on_the_command_line_is_refused() -> None:
    with pytest.raises((SystemExit, ConfigError)):
        config_from_args(["--timeout", "nan"])


# -- endpoint_description ----------------------------------------------------


def test_endpoint_description_defaults_to_host_and_port() -> None:
    assert RouterConfig().endpoint_description == "tcp:30080:interface=0.0.0.0"
    assert (
        RouterConfig(host="127.0.0.1", port=0).endpoint_description == "tcp:0:interface=127.0.0.1"
    )


def test_listen_overrides_host_and_port() -> None:
    config = config_from_args(
        ["--host", "127.0.0.1", "--port", "1234", "--listen", "unix:/tmp/router.sock"]
    )
    assert config.endpoint_description == "unix:/tmp/router.sock"


def test_empty_listen_falls_back_to_host_and_port() -> None:
    assert RouterConfig(listen="", port=5).endpoint_description == "tcp:5:interface=0.0.0.0"


def test_ipv6_host_colons_are_escaped() -> None:
    assert RouterConfig(host="::1", port=8080).endpoint_description == r"tcp:8080:interface=\:\:1"


@pytest.mark.parametrize("host", ["::1", "::", "fe80::1%eth0", "127.0.0.1", "0.0.0.0"])
def test_endpoint_description_round_trips_through_server_from_string(host: str) -> None:
    """The escaped string binds exactly the configured interface and port."""
    reactor = MemoryReactorClock()
    endpoint = serverFromString(reactor, RouterConfig(host=host, port=4321).endpoint_description)
    endpoint.listen(object())  # type: ignore[arg-type]
    [(port, _factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (4321, host)


# -- log level --------------------------------------------------------------


def test_verbose_means_debug() -> None:
    assert config_from_args(["--verbose"]).effective_log_level == "debug"
    assert config_from_args(["--verbose", "--log-level", "error"]).effective_log_level == "debug"


def test_log_level_is_effective_without_verbose() -> None:
    assert config_from_args([]).effective_log_level == "info"
    assert config_from_args(["--log-level", "error"]).effective_log_level == "error"


# -- help -----------------------------------------------------------------------


def test_help_names_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sglang-d-router")
    for flag in (
        "--host",
        "--port",
        "--worker-urls",
        "--max-connections",
        "--timeout",
        "--health-check-interval",
        "--health-check-failure-threshold",
        "--routing-algorithm",
        "--launcher-config",
        "--verbose",
        "--log-level",
    ):
        assert flag in out
    # ArgumentDefaultsHelpFormatter: the defaults are in the help text.
    assert "30080" in out


def test_console_script_help_names_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    """C{sglang-d-router --help} (and C{python -m twisted_router --help}, which calls the same main)."""
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: sglang-d-router")


def test_console_script_reports_config_errors_with_the_program_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--port", "70000"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sglang-d-router: error: ")
    assert "--port" in err
