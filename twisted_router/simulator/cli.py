# -*- test-case-name: tests.unit.test_simulator_cli -*-
"""
C{sglang-d-sim-worker} / C{python -m twisted_router.simulator}: run one worker.

Like the real C{sglang serve}, the port only opens once the "model" is
loaded (C{--startup-delay}): until then connections are refused, never
answered with 503 (§1). Once bound, the process logs
C{listening on http://HOST:PORT} with the real port, which is how tests
find a worker started with C{--port 0}.

This is the only module of the simulator that touches the global reactor.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTCP, IReactorTime
from twisted.internet.task import deferLater, react
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.web.http import Request
from twisted.web.server import Site

from twisted_router.simulator.app import SimulatedWorker
from twisted_router.simulator.config import (
    API_VERSIONS,
    OPTIONS,
    ROLLOUT_FORMATS,
    Option,
    SimulatorConfig,
)
from twisted_router.simulator.model import PROFILES
from twisted_router.tasks import TaskType

__all__ = ["PROG", "QuietSite", "build_parser", "main", "not_idle_timeout_noise", "parse_config", "serve"]

PROG = "sglang-d-sim-worker"

_log = Logger(namespace="twisted_router.simulator")


class QuietSite(Site):
    """
    A Site without the per-request access log (C{--verbose} logs requests
    instead), nor the C{Starting factory <... object at 0x...>} line.
    """

    noisy = False

    def log(self, request: Request) -> None:
        pass


def not_idle_timeout_noise(event: dict[str, Any]) -> PredicateResult:
    """
    Drop C{HTTPChannel}'s "Timing out client" lines below C{--verbose}.

    Every idle keep-alive connection is closed after C{--keep-alive-timeout}
    seconds (uvicorn logs nothing for it either), so a busy test would
    otherwise fill the log with them.
    """
    noise = str(event.get("log_format", "")).startswith(("Timing out client", "Forcibly timing out client"))
    # (constantly's constants are Any to mypy.)
    result: PredicateResult = PredicateResult.no if noise else PredicateResult.maybe
    return result


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every default comes from L{SimulatorConfig}."""
    d = SimulatorConfig()
    tasks = ", ".join(f"{t.name} ({PROFILES[t].model_path})" for t in TaskType)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "A CPU-only simulated SGLang diffusion worker speaking the real HTTP API "
            "(one FIFO GPU queue, a service-time model, sleep/wake, weight updates). "
            "Simulate a hang with SIGSTOP and SIGCONT."
        ),
        epilog=(
            "Service time per request: (base_ms/1000 + step_ms/1000 x steps x "
            "(width*height/1024^2) x max(1, frames) x n) / speed. "
            "Real-world calibration: Qwen-Image --step-ms 286 --default-steps 50; "
            "Wan2.1-T2V-1.3B --step-ms 12 --default-steps 50. "
            f"Task types and their default models: {tasks}."
        ),
    )
    for option in OPTIONS:
        _add_option(parser, option, getattr(d, option.attribute))
    return parser


def _add_option(parser: argparse.ArgumentParser, option: Option, default: Any) -> None:
    """One flag of L{OPTIONS}; its destination is the option's name, as L{SimulatorConfig.from_options} wants."""
    if option.kind == "bool":
        parser.add_argument(option.flag, dest=option.name, action="store_true", help=option.help)
    elif option.kind == "str_list":
        parser.add_argument(
            option.flag, dest=option.name, action="append", default=[], metavar=option.metavar, help=option.help
        )
    elif option.kind == "task":
        parser.add_argument(
            option.flag, dest=option.name, default=default.name, choices=[t.name for t in TaskType],
            type=str.upper, help=option.help,
        )
    else:
        kinds: dict[str, Any] = {"str": str, "int": int, "float": float}
        choices = _CHOICES.get(option.name)
        parser.add_argument(
            option.flag, dest=option.name, type=kinds[option.kind], default=default, choices=choices, help=option.help
        )


#: Options whose values are one of a few words.
_CHOICES: dict[str, tuple[str, ...]] = {"api_version": API_VERSIONS, "rollout_format": ROLLOUT_FORMATS}


def parse_config(argv: Sequence[str] | None = None) -> SimulatorConfig:
    """
    Parse the command line into a validated config.

    Exits with status 2 and a usage message on bad values, like argparse.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return SimulatorConfig.from_options(vars(args))
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


class _Reactor(IReactorTCP, IReactorTime, IReactorCore):
    """The reactor interfaces L{serve} needs (for type checking only)."""


async def serve(reactor: _Reactor, config: SimulatorConfig) -> tuple[SimulatedWorker, IListeningPort]:
    """
    Wait out the startup delay, then listen; return the worker and its port.

    Split from L{main} so a test or the router's launcher can start a worker
    on a reactor of its own choosing.
    """
    worker = SimulatedWorker(config, reactor)
    _log.info(
        "loading {model} ({task}); the port opens in {delay}s",
        model=config.served_model, task=config.task_type.name, delay=config.startup_delay,
    )
    if config.startup_delay > 0:
        await deferLater(reactor, config.startup_delay, lambda: None)
    endpoint = TCP4ServerEndpoint(reactor, config.port, interface=config.host)
    # uvicorn closes a keep-alive connection idle for --timeout-keep-alive
    # (5 s); Twisted's idle timeout (HTTPFactory.timeOut) is the same rule:
    # it is suspended while a request is being served and re-armed after
    # each answer.
    site = QuietSite(worker.resource(), timeout=config.keep_alive_timeout, reactor=reactor)
    port = await endpoint.listen(site)
    bound = port.getHost().port
    host = f"[{config.host}]" if ":" in config.host else config.host  # an IPv6 literal, as in a URL
    worker.port_opened()
    if not worker.worker_id:
        worker.worker_id = f"{host}:{bound}"
    _log.info("listening on http://{host}:{port}", host=host, port=bound)
    return worker, port


async def _run(reactor: _Reactor, config: SimulatorConfig) -> None:
    level = LogLevel.debug if config.verbose else LogLevel.info
    predicates: list[Any] = [LogLevelFilterPredicate(defaultLogLevel=level)]
    if not config.verbose:
        predicates.insert(0, not_idle_timeout_noise)
    observer = FilteringLogObserver(textFileLogObserver(sys.stdout), predicates)
    globalLogBeginner.beginLoggingTo([observer])
    try:
        await serve(reactor, config)
    except CannotListenError as exc:  # one line and status 1, not a traceback
        stderr = sys.__stderr__ or sys.stderr  # sys.stderr is redirected into the log by now
        stderr.write(f"{PROG}: error: {exc}\n")
        raise SystemExit(1) from None
    # Serve until the reactor stops (SIGINT/SIGTERM); react then exits 0.
    await Deferred()


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    config = parse_config(argv)
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, config)))
