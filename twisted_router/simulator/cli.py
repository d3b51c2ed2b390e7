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
from typing import Any, cast

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
from twisted_router.simulator.config import API_VERSIONS, ROLLOUT_FORMATS, SimulatorConfig
from twisted_router.simulator.model import PROFILES, TaskType

PROG = "sglang-d-sim-worker"

_log = Logger(namespace="twisted_router.simulator")


class _QuietSite(Site):
    """
    A Site without the per-request access log (C{--verbose} logs requests
    instead), nor the C{Starting factory <... object at 0x...>} line.
    """

    noisy = False

    def log(self, request: Request) -> None:
        pass


def _not_idle_timeout_noise(event: dict[str, Any]) -> PredicateResult:
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
    add = parser.add_argument
    add("--host", default=d.host, help="interface to listen on (default: %(default)s)")
    add("--port", type=int, default=d.port, help="TCP port, 0 for any free one (default: %(default)s)")
    add("--model-path", default=None,
        help="served model id/path reported by /v1/models (default: the task type's usual model)")
    add("--task-type", default=d.task_type.name, choices=[t.name for t in TaskType],
        type=str.upper, help="model task type (default: %(default)s)")
    add("--num-gpus", type=int, default=d.num_gpus,
        help="reported in the model card; does not change speed (default: %(default)s)")
    add("--step-ms", type=float, default=d.step_ms,
        help="ms per denoising step of one 1024x1024 frame (default: %(default)s)")
    add("--base-ms", type=float, default=d.base_ms,
        help="fixed ms added to every generation (default: %(default)s)")
    add("--speed", type=float, default=d.speed,
        help="divides every generation time; 2 = twice as fast (default: %(default)s)")
    add("--default-steps", type=int, default=None,
        help="steps when a request gives none (default: 8 for T2I, I2I and I2M; "
        "4 for TI2I and the video task types)")
    add("--startup-delay", type=float, default=d.startup_delay,
        help="seconds before the port opens, like model loading (default: %(default)s)")
    add("--fail-rate", type=float, default=d.fail_rate,
        help="probability 0..1 that a generation fails with a text/plain 500 (default: %(default)s)")
    add("--fail-update", action="store_true",
        help="make /update_weights_from_disk fail with the real 'rolled back' 400")
    add("--seed", type=int, default=d.seed, help="seed of the failure draws (default: %(default)s)")
    add("--image-bytes", type=int, default=d.image_bytes,
        help="size of every generated image file (default: %(default)s)")
    add("--video-bytes", type=int, default=d.video_bytes,
        help="size of every generated MP4 (default: %(default)s)")
    add("--update-ms", type=float, default=d.update_ms,
        help="GPU time of a weight update (default: %(default)s)")
    add("--sleep-ms", type=float, default=d.sleep_ms,
        help="GPU time of a release or resume that changes state (default: %(default)s)")
    add("--worker-id", default=d.worker_id,
        help="value of the X-Worker-Id header on every answer (default: HOST:PORT once bound)")
    add("--output-path", default=d.output_path,
        help="directory named in file_path fields; nothing is written (default: %(default)s)")
    add("--disable-endpoint", action="append", default=[], metavar="PATH",
        help="answer this exact path with 404, like a version without it (repeatable), "
        "e.g. --disable-endpoint /rollout/generate")
    add("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
        help="seconds before an idle keep-alive connection is closed, like uvicorn's "
        "--timeout-keep-alive (default: %(default)s)")
    add("--api-version", default=d.api_version, choices=API_VERSIONS,
        help="worker version to imitate: 'pinned' (the RL fork: /v1/diffusion/generate) or "
        "'upstream' (/rollout/generate, /server_info, /model_info) (default: %(default)s)")
    add("--rollout-format", default=d.rollout_format, choices=ROLLOUT_FORMATS,
        help="body of /rollout/generate: msgpack with raw tensor bytes (upstream now) or "
        "JSON with base64 tensors (earlier upstream) (default: %(default)s)")
    add("--warmup-seconds", type=float, default=d.warmup_seconds,
        help="after the port opens, /health answers 503 for this long, like upstream's "
        "warm-up (default: %(default)s)")
    add("--weights-prefix", action="append", default=[], metavar="PREFIX",
        help="accept weight updates from model paths starting with PREFIX (repeatable); "
        "paths that exist on disk and the served model are always accepted, others are "
        "the real 400")
    add("--verbose", action="store_true", help="log every request and debug events")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> SimulatorConfig:
    """
    Parse the command line into a validated config.

    Exits with status 2 and a usage message on bad values, like argparse.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return SimulatorConfig(
            host=args.host,
            port=args.port,
            model_path=args.model_path,
            task_type=TaskType[args.task_type],
            num_gpus=args.num_gpus,
            step_ms=args.step_ms,
            base_ms=args.base_ms,
            speed=args.speed,
            default_steps=args.default_steps,
            startup_delay=args.startup_delay,
            fail_rate=args.fail_rate,
            fail_update=args.fail_update,
            seed=args.seed,
            image_bytes=args.image_bytes,
            video_bytes=args.video_bytes,
            update_ms=args.update_ms,
            sleep_ms=args.sleep_ms,
            worker_id=args.worker_id,
            output_path=args.output_path,
            disabled_endpoints=tuple(args.disable_endpoint),
            keep_alive_timeout=args.keep_alive_timeout,
            api_version=args.api_version,
            rollout_format=args.rollout_format,
            warmup_seconds=args.warmup_seconds,
            weights_prefixes=tuple(args.weights_prefix),
            verbose=args.verbose,
        )
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
    site = _QuietSite(worker.resource(), timeout=config.keep_alive_timeout, reactor=reactor)
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
    # cast(Any, ...): mypy cannot see that these classes provide their
    # interfaces without the mypy-zope plugin.
    predicates: list[Any] = [cast(Any, LogLevelFilterPredicate(defaultLogLevel=level))]
    if not config.verbose:
        predicates.insert(0, _not_idle_timeout_noise)
    observer = FilteringLogObserver(cast(Any, textFileLogObserver(sys.stdout)), predicates)
    globalLogBeginner.beginLoggingTo([cast(Any, observer)])
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
