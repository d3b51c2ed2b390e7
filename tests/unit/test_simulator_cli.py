"""The simulator's command line and start-up, on a memory reactor (no sockets, no real time)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from tests.support.deferreds import assert_no_result, success_result_of
from twisted_router.simulator.cli import build_parser, parse_config, serve
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.model import TaskType


def test_defaults_are_fast_and_small() -> None:
    config = parse_config([])
    assert config == SimulatorConfig()
    assert (config.host, config.port, config.task_type) == ("127.0.0.1", 30000, TaskType.T2I)
    assert config.served_model == "Qwen/Qwen-Image"
    assert config.steps * config.step_ms < 50  # a default request takes milliseconds


def test_every_flag_maps_to_the_config() -> None:
    config = parse_config([
        "--host", "0.0.0.0", "--port", "0", "--model-path", "/m", "--task-type", "ti2v",
        "--num-gpus", "2", "--step-ms", "12", "--base-ms", "3", "--speed", "1.5",
        "--default-steps", "50", "--startup-delay", "2.5", "--fail-rate", "0.25", "--fail-update",
        "--seed", "9", "--image-bytes", "200000", "--video-bytes", "200000000",
        "--update-ms", "100", "--sleep-ms", "50", "--worker-id", "w7", "--output-path", "/o",
        "--disable-endpoint", "/rollout/generate", "--disable-endpoint", "/v1/videos",
        "--keep-alive-timeout", "7.5", "--verbose",
    ])
    assert config == SimulatorConfig(
        host="0.0.0.0", port=0, model_path="/m", task_type=TaskType.TI2V, num_gpus=2,
        step_ms=12.0, base_ms=3.0, speed=1.5, default_steps=50, startup_delay=2.5,
        fail_rate=0.25, fail_update=True, seed=9, image_bytes=200_000, video_bytes=200_000_000,
        update_ms=100.0, sleep_ms=50.0, worker_id="w7", output_path="/o",
        disabled_endpoints=("/rollout/generate", "/v1/videos"), keep_alive_timeout=7.5, verbose=True,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--fail-rate", "1.5"], ["--speed", "0"], ["--port", "70000"], ["--task-type", "T2X"],
        ["--image-bytes", "-1"], ["--default-steps", "0"], ["--step-ms", "-1"],
    ],
)
def test_bad_values_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(argv)
    assert info.value.code == 2
    assert "sglang-d-sim-worker" in capsys.readouterr().err


def test_help_names_the_program_and_the_hang_recipe() -> None:
    text = build_parser().format_help()
    assert text.startswith("usage: sglang-d-sim-worker")
    assert "SIGSTOP" in text


def _serve(reactor: MemoryReactorClock, config: SimulatorConfig) -> Deferred[Any]:
    return Deferred.fromCoroutine(serve(reactor, config))  # type: ignore[arg-type]


def test_port_opens_only_after_the_startup_delay() -> None:
    reactor = MemoryReactorClock()
    with capturedLogs() as events:
        d = _serve(reactor, SimulatorConfig(port=4321, startup_delay=3.0))
        reactor.advance(2.9)
        assert reactor.tcpServers == []
        assert_no_result(d)
        assert not any("listening on" in formatEvent(e) for e in events)
        reactor.advance(0.1)
    worker, port = success_result_of(d)
    (server,) = reactor.tcpServers
    assert (server[0], server[3]) == (4321, "127.0.0.1")
    messages = [formatEvent(e) for e in events]
    assert "listening on http://127.0.0.1:4321" in messages
    assert worker.worker_id == "127.0.0.1:4321"


def test_explicit_worker_id_is_kept() -> None:
    reactor = MemoryReactorClock()
    worker, _ = success_result_of(_serve(reactor, SimulatorConfig(port=1, worker_id="w1")))
    assert worker.worker_id == "w1"


def test_idle_timeout_lines_are_dropped_unless_verbose() -> None:
    from twisted.logger import PredicateResult

    from twisted_router.simulator.cli import not_idle_timeout_noise

    assert not_idle_timeout_noise({"log_format": "Timing out client: {peer}"}) is PredicateResult.no
    assert not_idle_timeout_noise({"log_format": "Forcibly timing out client: {peer}"}) is PredicateResult.no
    assert not_idle_timeout_noise({"log_format": "listening on http://{host}:{port}"}) is PredicateResult.maybe
    assert not_idle_timeout_noise({}) is PredicateResult.maybe


# -- from_options / to_argv: the one definition of the options ---------------------------


def test_to_argv_rebuilds_the_config_through_the_command_line() -> None:
    config = SimulatorConfig(
        host="0.0.0.0", port=0, model_path="/m", task_type=TaskType.TI2V, num_gpus=2, step_ms=12.5,
        default_steps=50, fail_update=True, disabled_endpoints=("/a", "/b"), api_version="upstream",
        rollout_format="json", weights_prefixes=("/ckpt/",), verbose=True,
    )
    assert parse_config(config.to_argv()) == config


def test_to_argv_writes_defaults_only_when_asked() -> None:
    config = SimulatorConfig(port=1, seed=0, step_ms=2.0)
    assert config.to_argv() == ["--host", "127.0.0.1", "--port", "1", "--step-ms", "2.0"]
    assert config.to_argv(explicit=("seed", "fail_update", "model_path")) == [
        "--host", "127.0.0.1", "--port", "1", "--step-ms", "2.0", "--seed", "0",
    ]


def test_from_options_takes_option_names_and_refuses_unknown_ones() -> None:
    config = SimulatorConfig.from_options(
        {"task_type": "t2v", "disable_endpoint": ["/x"], "weights_prefix": ("/p",), "default_steps": None}
    )
    assert config == SimulatorConfig(task_type=TaskType.T2V, disabled_endpoints=("/x",), weights_prefixes=("/p",))
    with pytest.raises(ValueError, match="unknown simulator option"):
        SimulatorConfig.from_options({"disabled_endpoints": ("/x",)})
    with pytest.raises(ValueError, match="task-type must be one of"):
        SimulatorConfig.from_options({"task_type": "T2X"})
    with pytest.raises(ValueError, match="fail-rate"):
        SimulatorConfig.from_options({"fail_rate": 2.0})
