# -*- test-case-name: tests.unit.test_launcher_plan -*-
"""
Turning a launcher config into the exact processes to run: ports, GPUs,
command lines and environments.

Everything the machine is asked (is this port free, which GPUs are there, is
C{sglang} installed) goes through a function the caller can replace, so the
rules are tested as plain functions and the launcher can refuse an
impossible fleet before it spawns anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted_router.launcher._config import LauncherConfig, LauncherConfigError
from twisted_router.launcher._ray_actor import (
    EXTRA_PORT_TOKENS,
    HOST_TOKEN,
    PORT_TOKEN,
    PYTHON_TOKEN,
    bindable,
)
from twisted_router.launcher._ray_client import RayUnavailable, import_ray
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.urls import WorkerURLError, normalize_worker_url

if TYPE_CHECKING:
    from twisted_router.config import RouterConfig

__all__ = [
    "FleetPlan",
    "LaunchPlanError",
    "WorkerSpec",
    "assign_gpus",
    "choose_ports",
    "list_nvidia_gpus",
    "plan_fleet",
    "port_is_free",
    "process_group_argv",
    "router_listen_ports",
]

#: Runs the worker's command in a process group of its own (so the whole
#: tree, including the scheduler processes C{sglang serve} forks, can be
#: signalled at once) and asks Linux to SIGTERM it if the router dies, so a
#: SIGKILLed router does not leave a GPU fleet behind. argv: the router's pid,
#: then the command.
_GROUP_WRAPPER = (
    "import os, sys\n"
    "os.setpgid(0, 0)\n"
    "try:\n"
    "    import ctypes, signal\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the router exited before its worker started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class LaunchPlanError(LauncherConfigError):
    """The config is valid but this machine cannot run it (ports, GPUs, missing C{sglang})."""


@dataclass(frozen=True)
class WorkerSpec:
    """
    One managed worker, fully decided.

    @ivar name: C{worker <index>}, also the process monitor's name for it.
    @ivar url: what the router registers (C{worker_host}, or loopback when it
        listens on every interface).
    @ivar argv: the worker's own command line (without the process-group wrapper).
    @ivar env: its whole environment.
    @ivar gpu_ids: its C{CUDA_VISIBLE_DEVICES}, or C{None} when not set.
    @ivar placement: for the C{ray} backend, where it runs (C{Ray bundle 2
        (1 CPU, 1 GPU)}); its node, port and URL are known only once it has
        started there, and C{argv} holds placeholders the node fills in.
    """

    index: int
    host: str
    port: int
    url: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    gpu_ids: str | None = None
    placement: str | None = None

    @property
    def name(self) -> str:
        return f"worker {self.index}"


@dataclass(frozen=True)
class FleetPlan:
    """A launcher config and the workers it becomes on this machine."""

    config: LauncherConfig
    workers: tuple[WorkerSpec, ...]
    gpu_source: str | None = None


# -- ports ------------------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    """
    Whether a server could listen on C{host:port} now, found by binding it.

    C{SO_REUSEADDR} is set like a real server sets it, so a port held only
    by connections in TIME_WAIT counts as free (the check a Ray node makes
    for its workers, L{bindable}).
    """
    try:
        return bindable(host, port)
    except OSError as exc:
        raise LaunchPlanError(f"launcher.worker_host: cannot listen on {host}: {exc.strerror}") from None


def router_listen_ports(config: RouterConfig) -> frozenset[int]:
    """
    The TCP ports the router itself will listen on, which no worker may get.

    The fleet is planned before the router binds, so probing cannot see
    them: C{--port}, or with C{--listen} the port of a C{tcp:}, C{tcp6:} or
    C{ssl:} endpoint (positional or C{port=}). Port 0 (any free port) and
    other endpoint types reserve nothing.
    """
    if not config.listen:
        return frozenset({config.port} if config.port else ())
    fields = [f.replace("\x00", ":") for f in config.listen.replace("\\:", "\x00").split(":")]
    kind, args = fields[0].strip().lower(), fields[1:]
    if kind not in ("tcp", "tcp6", "ssl"):
        return frozenset()
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    text = named.get("port", positional[0] if positional else "")
    try:
        port = int(text)
    except ValueError:
        return frozenset()
    return frozenset({port} if 0 < port <= 65535 else ())


def choose_ports(
    host: str,
    count: int,
    base: int,
    is_port_free: Callable[[str, int], bool],
    *,
    highest: int = 65534,
    reserved: Collection[int] = (),
) -> list[int]:
    """
    One port per worker such that the port and the next one up are free.

    Worker C{i} prefers C{base + 2i}; a busy port (or a busy C{port + 1},
    where a real worker binds its ZMQ broker) moves it up to the next free
    pair, and later workers start above the pairs already taken.

    @param reserved: ports that count as busy whatever the probe says (the
        router's own, which it has not bound yet).
    @raise LaunchPlanError: the ports run out below C{highest}.
    """

    def free(port: int) -> bool:
        return port not in reserved and is_port_free(host, port)

    ports: list[int] = []
    for i in range(count):
        candidate = base + 2 * i
        if ports:
            candidate = max(candidate, ports[-1] + 2)
        while not (free(candidate) and free(candidate + 1)):
            candidate += 1
            if candidate > highest:
                raise LaunchPlanError(
                    f"launcher.worker_base_port: no free port pair for worker {i} between {base} and {highest + 1} on {host}"
                )
        ports.append(candidate)
    return ports


# -- GPUs -------------------------------------------------------------------------------

_NVIDIA_SMI_GPU = re.compile(r"^GPU (\d+):")


def list_nvidia_gpus(
    *,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> list[str] | None:
    """
    The GPU indices C{nvidia-smi -L} reports, or C{None} when it is not installed
    or does not work (no driver).

    @param which: finds a program on C{PATH} (C{shutil.which}).
    @param run: runs it (C{subprocess.run}).
    """
    if which("nvidia-smi") is None:
        return None
    try:
        out = run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [m.group(1) for m in map(_NVIDIA_SMI_GPU.match, out.splitlines()) if m]


def assign_gpus(
    config: LauncherConfig,
    environ: Mapping[str, str],
    list_gpus: Callable[[], list[str] | None],
) -> tuple[list[str], str]:
    """
    One C{CUDA_VISIBLE_DEVICES} value per worker, and where the GPUs came from.

    Sources, first match wins: C{worker_gpu_ids}; the router's own
    C{CUDA_VISIBLE_DEVICES} (so a scheduler's GPU allocation is respected);
    C{nvidia-smi -L}. The GPUs are split into consecutive groups of
    C{num_gpus_per_worker}; spare ones stay unused.

    @raise LaunchPlanError: fewer GPUs than the fleet needs.
    """
    if config.worker_gpu_ids is not None:
        return list(config.worker_gpu_ids), "launcher.worker_gpu_ids"
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [token.strip() for token in visible.split(",") if token.strip()]
        source = f"CUDA_VISIBLE_DEVICES={visible}"
    else:
        found = list_gpus()
        if found is None:
            raise LaunchPlanError(
                "launcher: no GPUs found: CUDA_VISIBLE_DEVICES is not set and nvidia-smi is not "
                "available; set launcher.worker_gpu_ids or CUDA_VISIBLE_DEVICES"
            )
        gpus, source = found, "nvidia-smi -L"
    per_worker = config.num_gpus_per_worker
    needed = config.num_workers * per_worker
    if len(gpus) < needed:
        raise LaunchPlanError(
            f"launcher: too few GPUs: {config.num_workers} worker(s) x {per_worker} GPU(s) need "
            f"{needed}, but {source} gives {len(gpus)}"
        )
    return [",".join(gpus[i * per_worker : (i + 1) * per_worker]) for i in range(config.num_workers)], source


# -- commands ---------------------------------------------------------------------------


def _url_host(host: str) -> str:
    """The address the router connects to for a worker listening on C{host}."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _local_argv(sglang: str, config: LauncherConfig, index: int, port: int) -> tuple[str, ...]:
    assert config.model is not None  # the config refuses a local backend without one
    stride = config.internal_port_stride
    return (
        sglang,
        "serve",
        "--model-path", config.model,
        "--num-gpus", str(config.num_gpus_per_worker),
        "--host", config.worker_host,
        "--port", str(port),
        "--master-port", str(config.master_port_base + index * stride),
        "--scheduler-port", str(config.scheduler_port_base + index * stride),
        *config.worker_extra_args,
    )


def _simulated_argv(python: str, config: LauncherConfig, index: int, port: int) -> tuple[str, ...]:
    options = dict(config.simulated[index].options)
    if config.model is not None and options.get("model_path") is None:
        options["model_path"] = config.model
    simulator = SimulatorConfig.from_options({**options, "host": config.worker_host, "port": port})
    argv = simulator.to_argv(explicit=options)
    return (python, "-m", "twisted_router.simulator", *argv, *config.worker_extra_args)


def _ray_argv(config: LauncherConfig, index: int) -> tuple[str, ...]:
    """
    Worker C{index}'s command line for the C{ray} backend, with placeholders
    its node fills in: the node's address, free ports there, its Python.
    """
    master, scheduler = EXTRA_PORT_TOKENS
    if config.worker == "sglang":
        assert config.model is not None  # the config refuses Ray sglang workers without one
        return (
            "sglang",
            "serve",
            "--model-path", config.model,
            "--num-gpus", str(config.num_gpus_per_worker),
            "--host", HOST_TOKEN,
            "--port", PORT_TOKEN,
            "--master-port", master,
            "--scheduler-port", scheduler,
            *config.worker_extra_args,
        )
    argv = list(_simulated_argv(PYTHON_TOKEN, config, index, 1))
    # to_argv always spells --host and --port first: point them at the placeholders.
    for flag, token in (("--host", HOST_TOKEN), ("--port", PORT_TOKEN)):
        argv[argv.index(flag) + 1] = token
    return tuple(argv)


def _plan_ray(config: LauncherConfig, find_ray: Callable[[], object]) -> FleetPlan:
    """The C{ray} backend's plan: one bundle per worker; ports and GPUs are decided on the nodes."""
    try:
        find_ray()
    except RayUnavailable as exc:
        raise LaunchPlanError(str(exc)) from None
    gpus = config.num_gpus_per_worker
    cpus = f"{config.num_cpus_per_worker:g}"
    workers = tuple(
        WorkerSpec(
            index=index,
            host="",
            port=0,
            url=f"ray-bundle-{index}",  # until the worker reports where it listens
            argv=_ray_argv(config, index),
            # The node's own environment, plus line-by-line output; Ray sets
            # CUDA_VISIBLE_DEVICES to the GPUs of the worker's bundle.
            env={"PYTHONUNBUFFERED": "1"},
            placement=f"Ray bundle {index} ({cpus} CPU, {gpus} GPU)",
        )
        for index in range(config.num_workers)
    )
    return FleetPlan(config=config, workers=workers, gpu_source=f"Ray ({gpus} per worker)" if gpus else None)


def process_group_argv(argv: Sequence[str], *, python: str, parent_pid: int) -> list[str]:
    """
    The command that runs C{argv} as the leader of a new process group.

    The worker's pid is then also its process group id, so the router can
    signal everything the worker started with one C{killpg}.
    """
    return [python, "-c", _GROUP_WRAPPER, str(parent_pid), *argv]


def _check_internal_ports(
    config: LauncherConfig,
    worker_ports: Sequence[int],
    reserved: Collection[int],
    is_port_free: Callable[[str, int], bool],
) -> None:
    """
    The C{local} backend's master and scheduler ports are fixed by the
    config, so one that is taken is refused now, not after a model load.

    They are probed on C{worker_host} and on loopback, where C{sglang serve}
    binds some of them whatever its C{--host}.
    """
    pairs = {p for port in worker_ports for p in (port, port + 1)}
    hosts = list(dict.fromkeys([config.worker_host, "127.0.0.1"]))
    for key, kind in (("master_port_base", "master"), ("scheduler_port_base", "scheduler")):
        base = getattr(config, key)
        for i in range(config.num_workers):
            port = base + i * config.internal_port_stride
            if port in pairs:
                raise LaunchPlanError(
                    f"launcher.worker_base_port: worker port {port} is also a master or scheduler "
                    "port; move worker_base_port, master_port_base or scheduler_port_base apart"
                )
            if port in reserved:
                raise LaunchPlanError(
                    f"launcher.{key}: worker {i}'s {kind} port {port} is the router's own port; "
                    f"move launcher.{key} or the router's --port"
                )
            busy = next((host for host in hosts if not is_port_free(host, port)), None)
            if busy is not None:
                raise LaunchPlanError(
                    f"launcher.{key}: worker {i}'s {kind} port {port} is already in use on {busy}; "
                    f"move launcher.{key} (or internal_port_stride) to free ports"
                )


def plan_fleet(
    config: LauncherConfig,
    *,
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    is_port_free: Callable[[str, int], bool] = port_is_free,
    list_gpus: Callable[[], list[str] | None] = list_nvidia_gpus,
    python: str = sys.executable,
    reserved_ports: Collection[int] = (),
    find_ray: Callable[[], object] = import_ray,
) -> FleetPlan:
    """
    Decide every worker's port, GPUs, command line and environment.

    @param environ: the router's environment, inherited by the workers
        (default: C{os.environ}).
    @param reserved_ports: ports no worker may use although they are free
        now: the router's own (L{router_listen_ports}), which it binds only
        after planning. A worker that got one would lose the bind to the
        router, and the router's own C{/health} would answer for it.
    @raise LaunchPlanError: this machine cannot run the fleet: C{sglang} is
        not on PATH, too few GPUs, no free ports (worker, master or
        scheduler), or an address the router would refuse; for the C{ray}
        backend, only that C{ray} cannot be imported (C{find_ray}).
    """
    if config.backend == "ray":
        return _plan_ray(config, find_ray)
    env = dict(os.environ if environ is None else environ)
    # Workers' output is relayed line by line; a block-buffered Python child
    # would hold its lines back until it exits, just when they are needed.
    env["PYTHONUNBUFFERED"] = "1"
    url_host = _url_host(config.worker_host)
    try:
        normalize_worker_url(f"http://{url_host}:{config.worker_base_port}")
    except WorkerURLError as exc:
        raise LaunchPlanError(f"launcher.worker_host: {exc}") from None

    gpu_groups: list[str | None]
    gpu_source: str | None
    sglang = ""
    if config.backend == "local":
        found = which("sglang")
        if found is None:
            raise LaunchPlanError(
                "launcher.backend: local workers run 'sglang serve', but 'sglang' is not on PATH "
                "(install sglang with its diffusion extra, or activate its environment)"
            )
        sglang = found
        groups, gpu_source = assign_gpus(config, env, list_gpus)
        gpu_groups = list(groups)
    else:
        gpu_groups = list(config.worker_gpu_ids) if config.worker_gpu_ids is not None else [None] * config.num_workers
        gpu_source = "launcher.worker_gpu_ids" if config.worker_gpu_ids is not None else None

    reserved = frozenset(reserved_ports)
    ports = choose_ports(
        config.worker_host, config.num_workers, config.worker_base_port, is_port_free, reserved=reserved
    )
    if config.backend == "local":
        _check_internal_ports(config, ports, reserved, is_port_free)

    workers = []
    for index, (port, gpus) in enumerate(zip(ports, gpu_groups, strict=True)):
        if config.backend == "local":
            argv = _local_argv(sglang, config, index, port)
        else:
            argv = _simulated_argv(python, config, index, port)
        worker_env = dict(env)
        if gpus is not None:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus
        workers.append(
            WorkerSpec(
                index=index,
                host=config.worker_host,
                port=port,
                url=f"http://{url_host}:{port}",
                argv=argv,
                env=worker_env,
                gpu_ids=gpus,
            )
        )
    return FleetPlan(config=config, workers=tuple(workers), gpu_source=gpu_source)
