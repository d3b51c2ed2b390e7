"""
twistd plugin support: C{twistd -n sglang-d-router ...}.

The options are the console script's argparse options, parsed into the same
L{RouterConfig}; argparse errors become C{usage.UsageError} so twistd reports
them its own way.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from twisted_router.config import ConfigError, RouterConfig, build_parser, config_from_args
from twisted_router.logformat import log_observer

if TYPE_CHECKING:
    from twisted_router.launcher import FleetPlan
    from twisted_router.statefile import LoadedState


class _UsageErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise usage.UsageError(message)


class Options(usage.Options):
    """The router's options under twistd (same flags as C{sglang-d-router})."""

    config: RouterConfig
    launch_plan: FleetPlan | None = None
    state: LoadedState | None = None

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            self.config = config_from_args(options or [], build_parser(_UsageErrorParser))
            if self.config.launcher_config is not None:
                # Imported here, not at the top: it imports the reactor, and
                # twistd must have installed the one it was asked for first.
                from twisted_router.launcher import (
                    load_launcher_config,
                    plan_fleet,
                    router_listen_ports,
                )

                self.launch_plan = plan_fleet(
                    load_launcher_config(self.config.launcher_config),
                    reserved_ports=router_listen_ports(self.config),
                )
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        from twisted.internet import reactor  # twistd has installed the one it was asked for by now

        from twisted_router.cli import check_listen_endpoints, open_state

        try:
            check_listen_endpoints(self.config, reactor)
            self.config, self.state = open_state(self.config, self.launch_plan)
        except ConfigError as exc:
            # Not a usage mistake: one line and status 2, as the console script says it
            # (twistd would print the whole usage and exit 1).
            sys.stderr.write(f"twistd sglang-d-router: error: {exc}\n")
            raise SystemExit(2) from None

    def getUsage(self, width: int | None = None) -> str:
        return build_parser().format_help()

    def __str__(self) -> str:
        return self.getUsage()


def makeService(options: Options) -> IService:
    """Build the router service for twistd on the running reactor."""
    from twisted.internet import reactor  # late import: twistd picks the reactor first

    from twisted_router.service import make_router_service, stop_reactor_on_failure

    service, _, _ = make_router_service(
        options.config,
        reactor,
        # twistd exits 0 after a plain reactor stop; a router without its port failed.
        on_listen_failure=_exit_after_shutdown(stop_reactor_on_failure(reactor), status=1),
        launch_plan=options.launch_plan,
        state=options.state,
        on_launch_failure=_exit_after_shutdown(stop_reactor_on_failure(reactor), status=1),
    )
    if options.config.log_format == "json":
        return JSONLogging(service, _twistd_log_file(options), options.config.effective_log_level)
    return service


class JSONLogging(MultiService):
    """
    The router service, handing twistd the JSON log observer
    (C{--log-format json}).

    twistd builds the application around the plugin's service and only then
    starts logging, with the application's L{ILogObserver} component when it
    has one: set it as the service joins the application.
    """

    def __init__(self, service: IService, out: IO[str], level_name: str) -> None:
        super().__init__()
        self.observer = log_observer(out, log_format="json", level_name=level_name)
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def _twistd_log_file(options: Options) -> IO[str]:
    """Where twistd would log: its C{--logfile} (C{-}: stdout), else stdout with C{-n}, else C{twistd.log}."""
    parent = options.parent
    path = parent.get("logfile") if parent is not None else None
    nodaemon = bool(parent.get("nodaemon")) if parent is not None else True
    if path == "-" or (not path and nodaemon):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return cast(IO[str], LogFile.fromFullPath(path or "twistd.log"))


def _exit_after_shutdown(stop: Callable[[Failure], None], status: int) -> Callable[[Failure], None]:
    """
    Stop the reactor, and make the process exit with C{status} once twistd has
    cleaned up (services stopped, pid file removed).

    twistd itself always exits 0 after a normal reactor stop, but a process
    manager must see that a router whose workers never came up failed.
    """

    def exit_now(code: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not keep the status from being set
                pass
        os._exit(code)

    def fail(failure: Failure) -> None:
        atexit.register(exit_now, status)
        stop(failure)

    return fail

