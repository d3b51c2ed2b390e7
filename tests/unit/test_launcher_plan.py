"""
Tests for L{twisted_router.launcher.plan_fleet} and its parts: exact command
lines and environments, GPU groups from each source, port selection (a port
is taken only if it and the next one are free), and the refusals.

The machine is never asked: ports, GPUs and PATH come from injected fakes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from twisted_router.config import RouterConfig
from twisted_router.launcher import (
    FleetPlan,
    LauncherConfig,
    LaunchPlanError,
    RestartPolicy,
    SimulatedWorker,
    assign_gpus,
    choose_ports,
    list_nvidia_gpus,
    plan_fleet,
    port_is_free,
    process_group_argv,
    router_listen_ports,
)

SGLANG = "/opt/sglang/bin/sglang"
PY = "/usr/bin/python3"


def busy(*ports: int) -> Callable[[str, int], bool]:
    taken = set(ports)
    return lambda host, port: port not in taken


def no_gpus() -> list[str] | None:
    raise AssertionError("nvidia-smi must not be asked")


def local(**kwargs: Any) -> LauncherConfig:
    return LauncherConfig(**{"model": "Qwen/Qwen-Image", **kwargs})


def plan(config: LauncherConfig, *, environ: dict[str, str] | None = None, **kwargs: Any) -> FleetPlan:
    defaults: dict[str, Any] = {
        "environ": {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"} if environ is None else environ,
        "which": lambda name: SGLANG if name == "sglang" else None,
        "is_port_free": busy(),
        "list_gpus": no_gpus,
        "python": PY,
    }
    defaults.update(kwargs)
    return plan_fleet(config, **defaults)


# -- the local backend ---------------------------------------------------------------------


def test_local_argv_is_exact() -> None:
    fleet = plan(local(num_workers=2, worker_extra_args=("--output-path", "/tmp/out dir")))
    assert [w.argv for w in fleet.workers] == [
        (
            SGLANG, "serve",
            "--model-path", "Qwen/Qwen-Image",
            "--num-gpus", "1",
            "--host", "127.0.0.1",
            "--port", "10090",
            "--master-port", "30005",
            "--scheduler-port", "5555",
            "--output-path", "/tmp/out dir",
        ),
        (
            SGLANG, "serve",
            "--model-path", "Qwen/Qwen-Image",
            "--num-gpus", "1",
            "--host", "127.0.0.1",
            "--port", "10092",
            "--master-port", "31005",
            "--scheduler-port", "6555",
            "--output-path", "/tmp/out dir",
        ),
    ]
    assert [w.url for w in fleet.workers] == ["http://127.0.0.1:10090", "http://127.0.0.1:10092"]
    assert [w.name for w in fleet.workers] == ["worker 0", "worker 1"]


def test_local_internal_ports_follow_the_stride() -> None:
    fleet = plan(local(num_workers=3, master_port_base=40000, scheduler_port_base=7000, internal_port_stride=10))
    masters = [w.argv[w.argv.index("--master-port") + 1] for w in fleet.workers]
    schedulers = [w.argv[w.argv.index("--scheduler-port") + 1] for w in fleet.workers]
    assert masters == ["40000", "40010", "40020"]
    assert schedulers == ["7000", "7010", "7020"]


def test_environment_is_inherited_with_gpus_and_unbuffered_output() -> None:
    environ = {"PATH": "/usr/bin", "HF_HOME": "/data/hf", "CUDA_VISIBLE_DEVICES": "4,5"}
    fleet = plan(local(num_workers=2), environ=environ)
    for worker, gpu in zip(fleet.workers, ["4", "5"], strict=True):
        assert dict(worker.env) == {
            "PATH": "/usr/bin",
            "HF_HOME": "/data/hf",
            "CUDA_VISIBLE_DEVICES": gpu,
            "PYTHONUNBUFFERED": "1",
        }
        assert worker.gpu_ids == gpu
    assert environ["CUDA_VISIBLE_DEVICES"] == "4,5"  # the caller's mapping is not changed


def test_listen_on_every_interface_but_register_loopback() -> None:
    fleet = plan(local(worker_host="0.0.0.0"))
    assert fleet.workers[0].url == "http://127.0.0.1:10090"
    assert fleet.workers[0].argv[fleet.workers[0].argv.index("--host") + 1] == "0.0.0.0"


def test_sglang_missing_from_path_is_refused() -> None:
    with pytest.raises(LaunchPlanError, match="'sglang' is not on PATH"):
        plan(local(), which=lambda name: None)


def test_blocked_worker_host_is_refused_before_anything_starts() -> None:
    with pytest.raises(LaunchPlanError, match=r"launcher\.worker_host: .*blocked"):
        plan(local(worker_host="169.254.169.254"))


def test_internal_port_clash_with_a_worker_port_is_refused() -> None:
    with pytest.raises(LaunchPlanError, match="also a master or scheduler port"):
        plan(local(num_workers=2, worker_base_port=5554))


# -- GPUs -------------------------------------------------------------------------------


def test_gpus_from_worker_gpu_ids_win() -> None:
    config = local(num_workers=2, num_gpus_per_worker=2, worker_gpu_ids=("3,2", "1,0"))
    groups, source = assign_gpus(config, {"CUDA_VISIBLE_DEVICES": "0"}, no_gpus)
    assert groups == ["3,2", "1,0"]
    assert source == "launcher.worker_gpu_ids"


def test_gpus_from_cuda_visible_devices_in_consecutive_groups() -> None:
    config = local(num_workers=3, num_gpus_per_worker=2)
    groups, source = assign_gpus(config, {"CUDA_VISIBLE_DEVICES": "7, 6,5,4,3,2,1"}, no_gpus)
    assert groups == ["7,6", "5,4", "3,2"]  # the spare GPU 1 stays unused
    assert source == "CUDA_VISIBLE_DEVICES=7, 6,5,4,3,2,1"


def test_gpus_from_cuda_visible_devices_uuids() -> None:
    config = local(num_workers=2)
    groups, _ = assign_gpus(config, {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}, no_gpus)
    assert groups == ["GPU-aaa", "GPU-bbb"]


def test_gpus_from_nvidia_smi_when_the_environment_says_nothing() -> None:
    config = local(num_workers=4, num_gpus_per_worker=2)
    groups, source = assign_gpus(config, {}, lambda: [str(i) for i in range(8)])
    assert groups == ["0,1", "2,3", "4,5", "6,7"]
    assert source == "nvidia-smi -L"


def test_too_few_gpus_is_refused_with_the_count_and_source() -> None:
    with pytest.raises(LaunchPlanError, match=r"too few GPUs: 8 worker\(s\) x 1 GPU\(s\) need 8, but nvidia-smi -L gives 4"):
        assign_gpus(local(num_workers=8), {}, lambda: ["0", "1", "2", "3"])
    with pytest.raises(LaunchPlanError, match="too few GPUs.*CUDA_VISIBLE_DEVICES= gives 0"):
        assign_gpus(local(), {"CUDA_VISIBLE_DEVICES": ""}, no_gpus)


def test_no_gpu_source_at_all_is_refused() -> None:
    with pytest.raises(LaunchPlanError, match="no GPUs found"):
        assign_gpus(local(), {}, lambda: None)


def test_nvidia_smi_output_is_parsed() -> None:
    out = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"

    def run(*a: Any, **k: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(a, 0, stdout=out, stderr="")

    assert list_nvidia_gpus(which=lambda name: "/usr/bin/nvidia-smi", run=run) == ["0", "1"]
    assert list_nvidia_gpus(which=lambda name: None, run=run) is None


# -- ports ------------------------------------------------------------------------------


def test_worker_i_prefers_base_plus_2i() -> None:
    assert choose_ports("127.0.0.1", 4, 10090, busy()) == [10090, 10092, 10094, 10096]


def test_a_busy_port_is_skipped() -> None:
    assert choose_ports("127.0.0.1", 2, 10090, busy(10090)) == [10091, 10093]


def test_a_busy_port_plus_one_is_skipped_too() -> None:
    """A real worker binds its ZMQ broker on port + 1."""
    assert choose_ports("127.0.0.1", 3, 10090, busy(10093)) == [10090, 10094, 10096]
    assert choose_ports("127.0.0.1", 1, 10090, busy(10091, 10092)) == [10093]


def test_port_probes_use_the_worker_host() -> None:
    seen: list[tuple[str, int]] = []

    def free(host: str, port: int) -> bool:
        seen.append((host, port))
        return True

    choose_ports("10.1.2.3", 1, 20000, free)
    assert seen == [("10.1.2.3", 20000), ("10.1.2.3", 20001)]


def test_running_out_of_ports_is_refused() -> None:
    with pytest.raises(LaunchPlanError, match="no free port pair for worker 1"):
        choose_ports("127.0.0.1", 2, 65532, busy(65534))


def test_plan_uses_the_port_probe() -> None:
    fleet = plan(local(num_workers=2), is_port_free=busy(10091))
    assert [w.port for w in fleet.workers] == [10092, 10094]
    assert [w.url for w in fleet.workers] == ["http://127.0.0.1:10092", "http://127.0.0.1:10094"]


# -- the router's own port ----------------------------------------------------------------


def test_reserved_ports_count_as_busy_whatever_the_probe_says() -> None:
    """The router binds its port only after planning: a probe then finds it free."""
    assert choose_ports("127.0.0.1", 2, 30080, busy(), reserved={30080}) == [30081, 30083]
    assert choose_ports("127.0.0.1", 2, 30079, busy(), reserved={30080}) == [30081, 30083]  # nor port + 1
    assert choose_ports("127.0.0.1", 2, 10090, busy(), reserved={30080}) == [10090, 10092]


def test_plan_keeps_workers_off_reserved_ports() -> None:
    fleet = plan(local(num_workers=2, worker_base_port=30080), reserved_ports={30080})
    assert [w.port for w in fleet.workers] == [30081, 30083]
    assert fleet.workers[0].url == "http://127.0.0.1:30081"


@pytest.mark.parametrize(
    ("config", "ports"),
    [
        (RouterConfig(port=30080), {30080}),
        (RouterConfig(port=0), set()),  # any free port: nothing to keep clear
        (RouterConfig(port=30080, listen="tcp:8080:interface=127.0.0.1"), {8080}),  # --listen wins
        (RouterConfig(listen="tcp:port=8081:interface=127.0.0.1"), {8081}),
        (RouterConfig(listen=r"tcp6:8082:interface=\:\:1"), {8082}),
        (RouterConfig(listen="ssl:443:privateKey=key.pem:certKey=cert.pem"), {443}),
        (RouterConfig(listen="TCP:8083"), {8083}),
        (RouterConfig(listen="tcp:0"), set()),
        (RouterConfig(listen="unix:/run/router.sock"), set()),
        (RouterConfig(listen="tcp:interface=127.0.0.1"), set()),
    ],
)
def test_router_listen_ports(config: RouterConfig, ports: set[int]) -> None:
    assert router_listen_ports(config) == ports


# -- master and scheduler ports -----------------------------------------------------------


def test_busy_master_port_is_refused_naming_the_key() -> None:
    with pytest.raises(LaunchPlanError, match=r"^launcher\.master_port_base: worker 1's master port 31005 is already in use on 127\.0\.0\.1"):
        plan(local(num_workers=2), is_port_free=busy(31005))


def test_busy_scheduler_port_is_refused_naming_the_key() -> None:
    with pytest.raises(LaunchPlanError, match=r"^launcher\.scheduler_port_base: worker 0's scheduler port 5555 is already in use"):
        plan(local(num_workers=2), is_port_free=busy(5555))


def test_internal_ports_are_probed_on_the_worker_host_and_loopback() -> None:
    seen: list[tuple[str, int]] = []

    def free(host: str, port: int) -> bool:
        seen.append((host, port))
        return True

    plan(local(worker_host="0.0.0.0"), is_port_free=free)
    assert {(h, p) for h, p in seen if p in (30005, 5555)} == {
        ("0.0.0.0", 30005), ("127.0.0.1", 30005), ("0.0.0.0", 5555), ("127.0.0.1", 5555)
    }


def test_an_internal_port_on_the_routers_own_port_is_refused() -> None:
    with pytest.raises(LaunchPlanError, match=r"^launcher\.master_port_base: worker 0's master port 30005 is the router's own port"):
        plan(local(), reserved_ports={30005})


def test_simulated_workers_have_no_internal_ports_to_probe() -> None:
    seen: list[int] = []

    def free(host: str, port: int) -> bool:
        seen.append(port)
        return True

    plan(LauncherConfig(backend="simulated", simulated=(SimulatedWorker(),)), is_port_free=free)
    assert seen == [10090, 10091]


def test_port_is_free_really_binds() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_is_free("127.0.0.1", port) is False
    assert port_is_free("127.0.0.1", port) is True


def test_port_is_free_on_an_address_that_is_not_ours() -> None:
    with pytest.raises(LaunchPlanError, match=r"launcher\.worker_host: cannot listen on 192\.0\.2\.1"):
        port_is_free("192.0.2.1", 10090)


# -- the simulated backend ---------------------------------------------------------------------


def test_simulated_argv_is_exact_and_needs_no_gpus_or_sglang() -> None:
    config = LauncherConfig(
        backend="simulated",
        num_workers=2,
        worker_base_port=20000,
        worker_extra_args=("--verbose",),
        simulated=(
            SimulatedWorker((("task_type", "T2I"), ("num_gpus", 1), ("step_ms", 20))),
            SimulatedWorker(
                (("task_type", "T2V"), ("num_gpus", 2), ("speed", 0.5), ("fail_update", True), ("disable_endpoint", ("/a", "/b")))
            ),
        ),
    )
    fleet = plan(config, which=lambda name: None, environ={"PATH": "/bin"})
    assert [w.argv for w in fleet.workers] == [
        (PY, "-m", "twisted_router.simulator", "--host", "127.0.0.1", "--port", "20000",
         "--task-type", "T2I", "--num-gpus", "1", "--step-ms", "20", "--verbose"),
        (PY, "-m", "twisted_router.simulator", "--host", "127.0.0.1", "--port", "20002",
         "--task-type", "T2V", "--num-gpus", "2", "--speed", "0.5", "--fail-update",
         "--disable-endpoint", "/a", "--disable-endpoint", "/b", "--verbose"),
    ]
    assert all("CUDA_VISIBLE_DEVICES" not in w.env for w in fleet.workers)
    assert fleet.gpu_source is None


def test_simulated_model_becomes_the_default_model_path() -> None:
    config = LauncherConfig(
        backend="simulated",
        model="my/model",
        num_workers=2,
        simulated=(SimulatedWorker(), SimulatedWorker((("model_path", "other/model"),))),
    )
    fleet = plan(config)
    assert fleet.workers[0].argv[-2:] == ("--model-path", "my/model")
    assert "my/model" not in fleet.workers[1].argv
    assert fleet.workers[1].argv[-2:] == ("--model-path", "other/model")


def test_simulated_gpu_ids_are_passed_on_when_given() -> None:
    config = LauncherConfig(
        backend="simulated", num_workers=2, worker_gpu_ids=("0", "1"), simulated=(SimulatedWorker(), SimulatedWorker())
    )
    fleet = plan(config)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in fleet.workers] == ["0", "1"]


def test_the_simulated_argv_is_accepted_by_the_simulator() -> None:
    from twisted_router.launcher import load_launcher_config
    from twisted_router.simulator.cli import parse_config

    config = load_launcher_config(str(Path(__file__).resolve().parents[2] / "examples" / "simulated_launcher.yaml"))
    for worker in plan(config, which=lambda name: None).workers:
        simulator = parse_config(list(worker.argv[3:]))
        assert simulator.port == worker.port


# -- process groups ------------------------------------------------------------------------


def test_process_group_argv_wraps_the_command() -> None:
    argv = process_group_argv(["sglang", "serve", "--port", "1"], python=PY, parent_pid=1234)
    assert argv[:2] == [PY, "-c"]
    assert argv[3:] == ["1234", "sglang", "serve", "--port", "1"]


def test_the_wrapper_makes_a_new_process_group_and_execs() -> None:
    import os

    argv = process_group_argv(
        [sys.executable, "-c", "import os; print(os.getpid(), os.getpgid(0))"],
        python=sys.executable,
        parent_pid=os.getpid(),
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    pid, pgid = map(int, done.stdout.split())
    assert pid == pgid  # the worker leads its own group, and exec kept the pid
    assert pgid != os.getpgid(0)


def test_the_wrapper_refuses_to_start_for_a_dead_router() -> None:
    argv = process_group_argv([sys.executable, "-c", "print('ran')"], python=sys.executable, parent_pid=1)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "ran" not in done.stdout


def test_restart_policy_defaults_back_off_model_loads() -> None:
    assert RestartPolicy() == RestartPolicy(enabled=True, min_delay=1.0, max_delay=300.0, threshold=60.0)
