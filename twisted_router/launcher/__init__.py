"""
Managed workers: one YAML file starts, supervises and registers a worker fleet.

C{sglang-d-router --launcher-config fleet.yaml} reads the file
(L{load_launcher_config}), decides every worker's port, GPUs and command line
(L{plan_fleet}) and runs them under a L{LauncherService}: spawned on the
reactor, each in its own process group, registered with the router once
healthy, taken out of rotation the moment it dies, restarted with backoff,
and stopped with the router. See C{docs/launcher.md}.
"""

from twisted_router.launcher._config import (
    BACKENDS,
    SIMULATOR_OPTIONS,
    LauncherConfig,
    LauncherConfigError,
    RestartPolicy,
    SimulatedWorker,
    default_state_dir,
    launcher_state_dir,
    load_launcher_config,
    parse_launcher_config,
)
from twisted_router.launcher._plan import (
    FleetPlan,
    LaunchPlanError,
    WorkerSpec,
    assign_gpus,
    choose_ports,
    list_nvidia_gpus,
    plan_fleet,
    port_is_free,
    process_group_argv,
    router_listen_ports,
)
from twisted_router.launcher._service import (
    STARTUP_EXIT_LIMIT,
    TAIL_LINES,
    FleetHooks,
    LauncherService,
    LaunchFailed,
    make_launcher_service,
)
from twisted_router.launcher._supervisor import ProcessEvents, WorkerMonitor, describe_exit

__all__ = [
    "BACKENDS",
    "SIMULATOR_OPTIONS",
    "STARTUP_EXIT_LIMIT",
    "TAIL_LINES",
    "FleetHooks",
    "FleetPlan",
    "LaunchFailed",
    "LaunchPlanError",
    "LauncherConfig",
    "LauncherConfigError",
    "LauncherService",
    "ProcessEvents",
    "RestartPolicy",
    "SimulatedWorker",
    "WorkerMonitor",
    "WorkerSpec",
    "assign_gpus",
    "choose_ports",
    "default_state_dir",
    "describe_exit",
    "launcher_state_dir",
    "list_nvidia_gpus",
    "load_launcher_config",
    "make_launcher_service",
    "parse_launcher_config",
    "plan_fleet",
    "port_is_free",
    "process_group_argv",
    "router_listen_ports",
]
