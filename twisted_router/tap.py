"""
twistd plugin support: C{twistd -n sglang-d-router ...}.

The options are the console script's argparse options, parsed into the same
L{RouterConfig}; argparse errors become C{usage.UsageError} so twistd reports
them its own way.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from twisted.application.service import IService
from twisted.python import usage

from twisted_router.config import ConfigError, RouterConfig, build_parser, config_from_args


class _UsageErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise usage.UsageError(message)


class Options(usage.Options):
    """The router's options under twistd (same flags as C{sglang-d-router})."""

    config: RouterConfig

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            self.config = config_from_args(options or [], build_parser(_UsageErrorParser))
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None

    def getUsage(self, width: int | None = None) -> str:
        return build_parser().format_help()

    def __str__(self) -> str:
        return self.getUsage()


def makeService(options: Options) -> IService:
    """Build the router service for twistd on the running reactor."""
    from twisted.internet import reactor  # late import: twistd picks the reactor first

    from twisted_router.service import make_router_service, stop_reactor_on_failure

    service, _, _ = make_router_service(
        options.config, reactor, on_listen_failure=stop_reactor_on_failure(reactor)
    )
    return service
