"""
Tests for L{twisted_router.launcher} config loading and validation, and for
how the command line and twistd report a bad launcher file (exit status 2 /
C{UsageError}, one line naming the key, nothing started).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from twisted.python import usage

from twisted_router import cli, tap
from twisted_router.config import ConfigError, config_from_args
from twisted_router.launcher import (
    SIMULATOR_OPTIONS,
    LauncherConfig,
    LauncherConfigError,
    RestartPolicy,
    load_launcher_config,
    parse_launcher_config,
)

REPO = Path(__file__).resolve().parents[2]


def parse(text: str) -> LauncherConfig:
    return parse_launcher_config(yaml.safe_load(textwrap.dedent(text)))


def error_of(text: str) -> str:
    with pytest.raises(LauncherConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message  # one clear line
    return message


# -- what valid files give -------------------------------------------------------------


def test_defaults_of_a_minimal_local_config() -> None:
    config = parse("launcher: {model: Qwen/Qwen-Image}")
    assert config == LauncherConfig(model="Qwen/Qwen-Image")
    assert config.backend == "local"
    assert config.num_workers == 1
    assert config.num_gpus_per_worker == 1
    assert config.worker_host == "127.0.0.1"
    assert config.worker_base_port == 10090
    assert config.worker_gpu_ids is None
    assert config.worker_extra_args == ()
    assert (config.master_port_base, config.scheduler_port_base, config.internal_port_stride) == (30005, 5555, 1000)
    assert config.wait_timeout == 600.0
    assert config.shutdown_grace == 15.0
    assert config.restart == RestartPolicy(enabled=True)
    assert config.simulated == ()


def test_every_local_key() -> None:
    config = parse(
        """
        launcher:
          backend: local
          model: /models/qwen
          num_workers: 2
          num_gpus_per_worker: 2
          worker_host: 0.0.0.0
          worker_base_port: 20000
          worker_gpu_ids: ["0,1", [2, 3]]
          worker_extra_args: "--dit-cpu-offload false --text-encoder-precisions 'bf16 fp32'"
          master_port_base: 31000
          scheduler_port_base: 6000
          internal_port_stride: 10
          wait_timeout: 900
          shutdown_grace: 30.5
          restart: {enabled: true, min_delay: 2, max_delay: 120, threshold: 10}
        """
    )
    assert config.model == "/models/qwen"
    assert config.num_workers == 2 and config.num_gpus_per_worker == 2
    assert config.worker_host == "0.0.0.0"
    assert config.worker_base_port == 20000
    assert config.worker_gpu_ids == ("0,1", "2,3")
    assert config.worker_extra_args == ("--dit-cpu-offload", "false", "--text-encoder-precisions", "bf16 fp32")
    assert (config.master_port_base, config.scheduler_port_base, config.internal_port_stride) == (31000, 6000, 10)
    assert config.wait_timeout == 900.0 and config.shutdown_grace == 30.5
    assert config.restart == RestartPolicy(enabled=True, min_delay=2.0, max_delay=120.0, threshold=10.0)


def test_restart_false_is_shorthand_for_disabled() -> None:
    assert parse("launcher: {model: m, restart: false}").restart == RestartPolicy(enabled=False)


def test_simulated_per_worker_list_merges_shared_options() -> None:
    config = parse(
        """
        launcher:
          backend: simulated
          simulated:
            step_ms: 20
            fail_rate: 0.1
            workers:
              - {task_type: T2I}
              - {task_type: t2v, fail_rate: 0}
              - {speed: 0.5, disable_endpoint: [/rollout/generate], fail_update: true}
        """
    )
    assert config.num_workers == 3
    first, second, third = config.simulated
    assert dict(first.options) == {"task_type": "T2I", "num_gpus": 1, "step_ms": 20, "fail_rate": 0.1}
    assert second.get("task_type") == "T2V" and second.get("fail_rate") == 0
    assert third.get("speed") == 0.5
    assert third.get("disable_endpoint") == ("/rollout/generate",)
    assert third.get("fail_update") is True
    assert third.get("task_type") is None


def test_simulated_num_workers_with_shared_options() -> None:
    config = parse("launcher: {backend: simulated, num_workers: 3, simulated: {task_type: T2V}}")
    assert config.num_workers == 3
    assert [w.get("task_type") for w in config.simulated] == ["T2V"] * 3


def test_simulated_without_options_runs_one_default_worker() -> None:
    config = parse("launcher: {backend: simulated}")
    assert config.num_workers == 1 and config.model is None
    assert config.simulated[0].get("task_type") is None


def test_simulator_option_table_matches_the_simulator_command_line() -> None:
    """Every option the launcher passes on must exist in the (stable) simulator CLI, and vice versa."""
    from twisted_router.simulator.cli import build_parser

    dests = set(vars(build_parser().parse_args([]))) - {"host", "port"}
    assert set(SIMULATOR_OPTIONS) == dests


@pytest.mark.parametrize("name", ["simulated_launcher.yaml", "local_launcher.yaml", "ray_launcher.yaml"])
def test_the_examples_are_valid(name: str) -> None:
    config = load_launcher_config(str(REPO / "examples" / name))
    assert config.source == str(REPO / "examples" / name)


def test_the_simulated_example_is_the_documented_fleet() -> None:
    config = load_launcher_config(str(REPO / "examples" / "simulated_launcher.yaml"))
    assert config.backend == "simulated"
    assert [w.get("task_type") for w in config.simulated] == ["T2I", "T2I", "T2V", "T2I"]
    assert [w.get("speed") for w in config.simulated] == [None, None, None, 0.5]


# -- every error case -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the document
        ("", "the file is empty"),
        ("[1, 2]", "the file: expected a mapping, got a list"),
        ("workers: 3", "launcher: missing"),
        ("launcher: {model: m}\nrouter: {}", "(top level).router: unknown key"),
        ("launcher: [model]", "launcher: expected a mapping, got a list"),
        # unknown keys, with a suggestion for typos
        ("launcher: {model: m, num_worker: 2}", "launcher.num_worker: unknown key (did you mean 'num_workers'?)"),
        ("launcher: {model: m, colour: red}", "launcher.colour: unknown key (known keys: backend, model"),
        ("launcher: {model: m, restart: {enable: false}}", "launcher.restart.enable: unknown key (did you mean 'enabled'?)"),
        # wrong types
        ("launcher: {model: m, num_workers: two}", "launcher.num_workers: expected an integer, got 'two'"),
        ("launcher: {model: m, num_workers: 2.5}", "launcher.num_workers: expected an integer, got 2.5"),
        ("launcher: {model: m, num_workers: true}", "launcher.num_workers: expected an integer, got a boolean (true)"),
        ("launcher: {model: m, num_gpus_per_worker: '1'}", "launcher.num_gpus_per_worker: expected an integer, got '1'"),
        ("launcher: {model: m, worker_base_port: http}", "launcher.worker_base_port: expected an integer"),
        ("launcher: {model: m, master_port_base: []}", "launcher.master_port_base: expected an integer, got a list"),
        ("launcher: {model: m, scheduler_port_base: null}", "launcher.scheduler_port_base: expected an integer, got nothing"),
        ("launcher: {model: m, internal_port_stride: x}", "launcher.internal_port_stride: expected an integer"),
        ("launcher: {model: m, wait_timeout: soon}", "launcher.wait_timeout: expected a number, got 'soon'"),
        ("launcher: {model: m, shutdown_grace: {a: 1}}", "launcher.shutdown_grace: expected a number, got a mapping"),
        ("launcher: {model: m, worker_host: 127}", "launcher.worker_host: expected a string, got 127"),
        ("launcher: {model: 7}", "launcher.model: expected a string, got 7"),
        ("launcher: {model: m, backend: 1}", "launcher.backend: expected a string, got 1"),
        ("launcher: {model: m, worker_extra_args: [--a, --b]}", "launcher.worker_extra_args: expected one string"),
        ("launcher: {model: m, restart: yes please}", "launcher.restart: expected a mapping, got 'yes please'"),
        ("launcher: {model: m, restart: {enabled: 1}}", "launcher.restart.enabled: expected true or false, got 1"),
        ("launcher: {model: m, restart: {min_delay: fast}}", "launcher.restart.min_delay: expected a number"),
        # bad values
        ("launcher: {backend: docker, model: m}", "launcher.backend: must be one of local, simulated, ray, got 'docker'"),
        ("launcher: {model: m, num_workers: 0}", "launcher.num_workers: must be at least 1, got 0"),
        ("launcher: {model: m, num_gpus_per_worker: -1}", "launcher.num_gpus_per_worker: must be at least 1, got -1"),
        ("launcher: {model: m, worker_base_port: 65535}", "launcher.worker_base_port: must be at most 65534"),
        ("launcher: {model: m, worker_base_port: 0}", "launcher.worker_base_port: must be at least 1"),
        ("launcher: {model: m, wait_timeout: 0}", "launcher.wait_timeout: must be a positive number of seconds"),
        ("launcher: {model: m, wait_timeout: .inf}", "launcher.wait_timeout: must be a finite number"),
        ("launcher: {model: m, shutdown_grace: -5}", "launcher.shutdown_grace: must be a positive number"),
        ("launcher: {model: '  '}", "launcher.model: must not be empty"),
        ("launcher: {model: m, worker_extra_args: \"--a 'unclosed\"}", "launcher.worker_extra_args: cannot split"),
        ("launcher: {model: m, restart: {min_delay: 10, max_delay: 5}}", "launcher.restart.max_delay: must be at least min_delay (10)"),
        ("launcher: {model: m, restart: {min_delay: 0}}", "launcher.restart.min_delay: must be a positive number"),
        # a threshold below min_delay (0: no backoff for a serving worker at all) is refused
        ("launcher: {model: m, restart: {threshold: 0}}", "launcher.restart.threshold: must be at least min_delay (1), got 0"),
        (
            "launcher: {model: m, restart: {min_delay: 120}}",
            "launcher.restart.threshold: must be at least min_delay (120), got the default 60",
        ),
        (
            "launcher: {model: m, num_workers: 40, master_port_base: 30005}",
            "launcher.master_port_base: worker 39 would get port 69005",
        ),
        # the local backend needs a model
        ("launcher: {num_workers: 2}", "launcher.model: required for the local backend"),
        ("launcher: {}", "launcher.model: required for the local backend"),
        ("launcher: {model: m, simulated: {step_ms: 1}}", "launcher.simulated: only used with 'backend: simulated'"),
        # GPU lists
        ("launcher: {model: m, num_workers: 2, worker_gpu_ids: ['0']}", "launcher.worker_gpu_ids: has 1 entries but launcher.num_workers is 2"),
        ("launcher: {model: m, worker_gpu_ids: '0'}", "launcher.worker_gpu_ids: expected a list with one entry per worker"),
        ("launcher: {model: m, worker_gpu_ids: ['0,1']}", "launcher.worker_gpu_ids[0]: names 2 GPU(s) but launcher.num_gpus_per_worker is 1"),
        ("launcher: {model: m, worker_gpu_ids: ['']}", "launcher.worker_gpu_ids[0]: expected GPU ids like"),
        ("launcher: {model: m, worker_gpu_ids: [1.5]}", "launcher.worker_gpu_ids[0]: expected GPU ids like"),
        ("launcher: {model: m, num_gpus_per_worker: 2, worker_gpu_ids: ['3,3']}", "launcher.worker_gpu_ids[0]: names a GPU twice"),
        # simulated options
        ("launcher: {backend: simulated, simulated: {stepms: 1}}", "launcher.simulated.stepms: unknown key (did you mean 'step_ms'?)"),
        ("launcher: {backend: simulated, simulated: {port: 1}}", "launcher.simulated.port: chosen by the launcher"),
        ("launcher: {backend: simulated, simulated: {workers: [{host: x}]}}", "launcher.simulated.workers[0].host: chosen by the launcher"),
        ("launcher: {backend: simulated, simulated: {task_type: T3I}}", "launcher.simulated.task_type: must be one of T2V"),
        ("launcher: {backend: simulated, simulated: {workers: [{}, {speed: fast}]}}", "launcher.simulated.workers[1].speed: expected a number, got 'fast'"),
        ("launcher: {backend: simulated, simulated: {workers: [{speed: 0}]}}", "launcher.simulated.workers[0]: speed must be positive"),
        ("launcher: {backend: simulated, simulated: {fail_rate: 2}}", "launcher.simulated: fail-rate must be between 0 and 1"),
        ("launcher: {backend: simulated, simulated: {fail_update: 1}}", "launcher.simulated.fail_update: expected true or false"),
        ("launcher: {backend: simulated, simulated: {workers: []}}", "launcher.simulated.workers: expected a non-empty list"),
        ("launcher: {backend: simulated, simulated: {workers: [T2I]}}", "launcher.simulated.workers[0]: expected a mapping"),
        (
            "launcher: {backend: simulated, num_workers: 4, simulated: {workers: [{}, {}]}}",
            "launcher.simulated.workers: has 2 entries but launcher.num_workers is 4",
        ),
        ("launcher: {backend: simulated, simulated: [1]}", "launcher.simulated: expected a mapping, got a list"),
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_restart_threshold_equal_to_min_delay_is_accepted() -> None:
    config = parse_launcher_config({"launcher": {"model": "m", "restart": {"min_delay": 5, "threshold": 5}}})
    assert (config.restart.min_delay, config.restart.threshold) == (5.0, 5.0)


def test_launcher_config_error_is_a_config_error() -> None:
    """So the command line reports it like every other bad option (exit status 2)."""
    assert issubclass(LauncherConfigError, ConfigError)


# -- files --------------------------------------------------------------------------------


def test_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("launcher:\n  model: Qwen/Qwen-Image\n  num_workers: 8\n")
    config = load_launcher_config(str(path))
    assert config.num_workers == 8 and config.source == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(LauncherConfigError, match=r"launcher config .*nope\.yaml: file not found"):
        load_launcher_config(str(path))


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(LauncherConfigError, match="cannot read"):
        load_launcher_config(str(tmp_path))


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("launcher:\n  model: m\n  num_workers: [1,\n")
    with pytest.raises(LauncherConfigError) as info:
        load_launcher_config(str(path))
    message = str(info.value)
    assert message.startswith(f"launcher config {path}: invalid YAML at line")
    assert "\n" not in message


def test_file_errors_start_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("launcher: {model: m, num_workers: two}\n")
    with pytest.raises(LauncherConfigError) as info:
        load_launcher_config(str(path))
    assert str(info.value) == f"launcher config {path}: launcher.num_workers: expected an integer, got 'two'"


# -- the command line and twistd -------------------------------------------------------------


def test_router_config_keeps_the_path() -> None:
    assert config_from_args(["--launcher-config", "fleet.yaml"]).launcher_config == "fleet.yaml"


def test_console_script_exits_2_with_one_line_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("launcher: {backend: simulated, num_workers: two}\n")

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reactor must not start for a bad launcher file")

    monkeypatch.setattr(cli.task, "react", must_not_run)
    with pytest.raises(SystemExit) as info:
        cli.main(["--launcher-config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"sglang-d-router: error: launcher config {path}: launcher.num_workers: expected an integer, got 'two'\n"


def test_console_script_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--launcher-config", str(tmp_path / "missing.yaml")])
    assert info.value.code == 2
    assert "file not found" in capsys.readouterr().err


def test_twistd_options_raise_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("launcher: {model: m, num_worker: 2}\n")
    options = tap.Options()
    with pytest.raises(usage.UsageError, match=r"launcher\.num_worker: unknown key"):
        options.parseOptions(["--launcher-config", str(path)])


def test_twistd_options_plan_the_fleet(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("launcher: {backend: simulated, num_workers: 2, worker_base_port: 10090}\n")
    options = tap.Options()
    options.parseOptions(["--launcher-config", str(path)])
    assert options.launch_plan is not None
    assert len(options.launch_plan.workers) == 2
    assert options.launch_plan.config.source == str(path)


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("how", ["--port", "--listen"])
def test_twistd_options_keep_workers_off_the_routers_port(how: str, tmp_path: Path) -> None:
    port = _unused_port()
    path = tmp_path / "fleet.yaml"
    path.write_text(f"launcher: {{backend: simulated, num_workers: 2, worker_base_port: {port}}}\n")
    options = tap.Options()
    listen = ["--port", str(port)] if how == "--port" else ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    options.parseOptions(["--host", "127.0.0.1", *listen, "--launcher-config", str(path)])
    assert options.launch_plan is not None
    taken = {p for w in options.launch_plan.workers for p in (w.port, w.port + 1)}
    assert port not in taken


def test_console_script_keeps_workers_off_the_routers_port(tmp_path: Path) -> None:
    port = _unused_port()
    path = tmp_path / "fleet.yaml"
    path.write_text(f"launcher: {{backend: simulated, worker_base_port: {port}}}\n")
    launch_plan = cli.plan_launch(config_from_args(["--port", str(port), "--launcher-config", str(path)]))
    assert launch_plan is not None
    assert launch_plan.workers[0].port > port


def test_twistd_options_without_launcher_have_no_plan() -> None:
    options = tap.Options()
    options.parseOptions([])
    assert options.launch_plan is None
