"""
The C{sglang-d-router} console script (also C{python -m twisted_router}).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogBeginner

from twisted_router.config import PROGRAM_NAME, ConfigError, RouterConfig, config_from_args
from twisted_router.logformat import log_observer

if TYPE_CHECKING:
    from twisted_router.launcher import FleetPlan
    from twisted_router.statefile import LoadedState


def start_logging(level_name: str, log_format: str = "text") -> None:
    """Send log events at C{level_name} and above to stdout, as text or JSON lines (C{--log-format})."""
    globalLogBeginner.beginLoggingTo(
        [log_observer(sys.stdout, log_format=log_format, level_name=level_name)],
        redirectStandardIO=False,
    )


async def _run(
    reactor: object, config: RouterConfig, launch_plan: FleetPlan | None = None, state: LoadedState | None = None
) -> None:
    from twisted_router.launcher import LauncherService, LaunchFailed
    from twisted_router.listener import ListenerService
    from twisted_router.service import make_router_service

    start_logging(config.effective_log_level, config.log_format)
    service, _, listener = make_router_service(
        config, reactor, launch_plan=launch_plan, state=state  # type: ignore[arg-type]
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    try:
        await listener.when_listening()
    except Exception:  # noqa: BLE001 - any bind failure: status 1, no traceback
        # The listener has logged the one line saying where and why; no
        # managed worker was started (the launcher waits for the port).
        raise SystemExit(1) from None
    metrics_listener = service.namedServices.get("metrics")
    if isinstance(metrics_listener, ListenerService):
        try:
            await metrics_listener.when_listening()
        except Exception:  # noqa: BLE001 - logged by the listener, as for the main port
            raise SystemExit(1) from None
    launcher = service.namedServices.get("launcher")
    if isinstance(launcher, LauncherService):
        try:
            await launcher.when_failed()  # fires only if no managed worker ever becomes ready
        except LaunchFailed:
            raise SystemExit(1) from None  # the launcher has logged why; the workers are stopped on the way out
    await Deferred()  # run until SIGINT/SIGTERM stops the reactor


def plan_launch(config: RouterConfig) -> FleetPlan | None:
    """
    Read, validate and plan C{--launcher-config} before anything starts.

    @raise ConfigError: one line naming the bad key, or what this machine lacks.
    """
    if config.launcher_config is None:
        return None
    from twisted_router.launcher import load_launcher_config, plan_fleet, router_listen_ports

    # The router binds its port only after planning: keep the workers off it.
    return plan_fleet(load_launcher_config(config.launcher_config), reserved_ports=router_listen_ports(config))


def open_state(config: RouterConfig, launch_plan: FleetPlan | None) -> tuple[RouterConfig, LoadedState | None]:
    """
    The config with its state directory (a launcher run keeps state by
    default: L{twisted_router.launcher.launcher_state_dir}), and that
    directory checked and its state file read, before anything starts.

    @raise ConfigError: the directory cannot be written, or the state file is
        corrupt, truncated or foreign (one line).
    """
    if config.state_dir is None and launch_plan is not None:
        from twisted_router.launcher import launcher_state_dir

        config = dataclasses.replace(config, state_dir=launcher_state_dir(launch_plan.config))
    if config.state_dir is None:
        return config, None
    from twisted_router.statefile import StateFileError, open_state_dir

    try:
        return config, open_state_dir(config.state_dir)
    except StateFileError as exc:
        raise ConfigError(str(exc)) from None


def check_listen_endpoints(config: RouterConfig, reactor: object) -> None:
    """
    Build the router's server endpoints (C{--listen}, or C{--host}/C{--port},
    and C{--metrics-listen}) once before anything starts, so a mistyped
    endpoint, an unknown endpoint type or a missing or unreadable TLS key or
    certificate (C{ssl:} loads them as it is parsed) is one line and status 2,
    not a traceback. A port that is only found busy when bound is still the
    listener's one log line and status 1.

    @raise ConfigError: one line naming the option, the endpoint and why.
    """
    from twisted.internet.endpoints import serverFromString

    main_option = "--listen" if config.listen else "--host/--port"
    for option, description in ((main_option, config.endpoint_description), ("--metrics-listen", config.metrics_listen)):
        if description is None:
            continue
        try:
            serverFromString(reactor, description)
        except Exception as exc:  # noqa: BLE001 - every parse or load error of an endpoint plugin is a bad option
            raise ConfigError(f"{option} {description!r} cannot be used: {_endpoint_error(exc)}") from None


def _endpoint_error(exc: Exception) -> str:
    """One readable line for an endpoint parse error (OpenSSL's come as nested tuples)."""
    from OpenSSL import SSL, crypto

    if isinstance(exc, (SSL.Error, crypto.Error)):
        parts = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        reasons = [": ".join(str(p) for p in part if p) for part in parts if isinstance(part, tuple)]
        return "the TLS key or certificate was rejected (OpenSSL: " + ("; ".join(reasons) or "no reason") + ")"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the router until it is stopped."""
    try:
        config = config_from_args(argv)
        from twisted.internet import reactor

        check_listen_endpoints(config, reactor)
        launch_plan = plan_launch(config)
        config, state = open_state(config, launch_plan)
    except ConfigError as exc:
        sys.stderr.write(f"{PROGRAM_NAME}: error: {exc}\n")
        raise SystemExit(2) from None
    task.react(_run, (config, launch_plan, state))
