"""
The C{sglang-d-router} console script (also C{python -m twisted_router}).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from twisted_router.config import PROGRAM_NAME, ConfigError, RouterConfig, config_from_args


def start_logging(level_name: str) -> None:
    """Send log events at C{level_name} and above to stdout."""
    level = LogLevel.levelWithName(level_name)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])],
        redirectStandardIO=False,
    )


async def _run(reactor: object, config: RouterConfig) -> None:
    from twisted_router.service import make_router_service

    start_logging(config.effective_log_level)
    service, _, listener = make_router_service(config, reactor)  # type: ignore[arg-type]
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    await listener.when_listening()  # a port that cannot be bound ends the process with status 1
    await Deferred()  # run until SIGINT/SIGTERM stops the reactor


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the router until it is stopped."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        sys.stderr.write(f"{PROGRAM_NAME}: error: {exc}\n")
        raise SystemExit(2) from None
    task.react(_run, (config,))
