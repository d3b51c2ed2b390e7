"""
The router's one configuration object, and the command line that builds it.

Both entry points (the C{sglang-d-router} console script and the
C{twistd -n sglang-d-router} plugin) parse the same argparse parser into the
same frozen L{RouterConfig}, so an option can never mean one thing under
twistd and another on the command line.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from twisted_router.urls import WorkerURLError, normalize_worker_url

PROGRAM_NAME = "sglang-d-router"
#: The earlier router's --log-level names (uvicorn's), most severe first.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: Other spellings accepted for a level (Twisted names "warning" "warn").
LOG_LEVEL_ALIASES = {"warn": "warning"}
#: The Twisted level each name logs at: Twisted has no level below debug.
_TWISTED_LEVELS = {"warning": "warn", "trace": "debug"}
#: Environment variables read for the keys when neither the option nor its file option is given.
API_KEY_ENV = "SGLANG_D_ROUTER_API_KEY"
ADMIN_API_KEY_ENV = "SGLANG_D_ROUTER_ADMIN_API_KEY"
WORKER_API_KEY_ENV = "SGLANG_D_ROUTER_WORKER_API_KEY"
CATCH_ALL_CHOICES = ("on", "off")
ROUTING_ALGORITHMS = ("least-request", "round-robin", "random", "power-of-two", "least-work")
LOG_FORMATS = ("text", "json")
ACCESS_LOG_CHOICES = ("on", "off")


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the option and why."""


@dataclass(frozen=True)
class RouterConfig:
    """
    Every router option, validated once at start-up.

    @ivar listen: a Twisted server endpoint string; when given it overrides
        C{host}/C{port} (so C{ssl:...} and C{unix:...} listeners work).
    @ivar timeout: seconds the router waits for a worker's response headers,
        and the longest pause it tolerates between two chunks of a body.
    """

    host: str = "0.0.0.0"
    port: int = 30080
    listen: str | None = None
    worker_urls: tuple[str, ...] = ()
    max_connections: int = 100
    timeout: float = 120.0
    weight_update_timeout: float = 600.0
    health_check_interval: float = 10.0
    health_check_failure_threshold: int = 3
    health_check_timeout: float = 5.0
    routing_algorithm: str = "least-request"
    launcher_config: str | None = None
    verbose: bool = False
    log_level: str = "info"
    max_video_jobs: int = 10_000
    max_request_body: int = 256 * 1024 * 1024
    client_timeout: float = 60.0
    max_image_ids: int = 10_000
    shutdown_grace: float = 180.0
    max_inflight_per_worker: int = 0
    max_queue: int = 1024
    queue_timeout: float = 600.0
    #: Bearer keys (never in the repr, so never in a log line).
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    worker_api_key: str | None = field(default=None, repr=False)
    catch_all: bool = True
    # Observability (docs/metrics.md, README "Observability").
    log_format: str = "text"
    access_log: bool = True
    metrics_listen: str | None = None
    #: Where the durable state is kept (docs/state.md); C{None}: not kept.
    state_dir: str | None = None

    def __post_init__(self) -> None:
        for option, key in (("--api-key", self.api_key), ("--admin-api-key", self.admin_api_key)):
            if key is not None:
                _check_key(option, key)
        if self.worker_api_key is not None:
            # The workers' own key (SGLang's --api-key): its length is theirs to choose.
            _check_key("--worker-api-key", self.worker_api_key, min_length=1)
        if self.api_key is not None and self.api_key == self.admin_api_key:
            raise ConfigError("--api-key and --admin-api-key must differ (the API key would grant admin access)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}")
        if not _positive_finite(self.timeout):
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if not _positive_finite(self.weight_update_timeout):
            raise ConfigError(
                f"--weight-update-timeout must be a positive number of seconds, got {self.weight_update_timeout}"
            )
        if not _positive_finite(self.health_check_interval):
            raise ConfigError(
                f"--health-check-interval must be a positive number of seconds, "
                f"got {self.health_check_interval}"
            )
        if self.health_check_failure_threshold < 1:
            raise ConfigError(
                f"--health-check-failure-threshold must be at least 1, "
                f"got {self.health_check_failure_threshold}"
            )
        if not _positive_finite(self.health_check_timeout):
            raise ConfigError(
                f"--health-check-timeout must be a positive number of seconds, "
                f"got {self.health_check_timeout}"
            )
        if self.routing_algorithm not in ROUTING_ALGORITHMS:
            raise ConfigError(
                f"--routing-algorithm must be one of {', '.join(ROUTING_ALGORITHMS)}, "
                f"got {self.routing_algorithm!r}"
            )
        level = canonical_log_level(self.log_level)
        if level not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        object.__setattr__(self, "log_level", level)  # one spelling per level, whatever was typed
        for url in self.worker_urls:
            # A typo here must stop the start, not leave a router running without that worker.
            try:
                normalize_worker_url(url)
            except WorkerURLError as exc:
                raise ConfigError(f"--worker-urls: {exc}") from None
        if self.launcher_config is not None and not self.launcher_config.strip():
            # The file itself is read and validated by twisted_router.launcher
            # before anything starts (cli.main, tap.Options.parseOptions).
            raise ConfigError("--launcher-config must name a YAML file")
        if self.state_dir is not None and not self.state_dir.strip():
            raise ConfigError("--state-dir must name a directory")
        if self.max_request_body < 1:
            raise ConfigError(f"--max-request-body must be at least 1 byte, got {self.max_request_body}")
        if not _positive_finite(self.client_timeout):
            raise ConfigError(f"--client-timeout must be a positive number of seconds, got {self.client_timeout}")
        if self.max_video_jobs < 1 or self.max_image_ids < 1:
            raise ConfigError("--max-video-jobs and --max-image-ids must be at least 1")
        if self.max_inflight_per_worker < 0:
            raise ConfigError(
                f"--max-inflight-per-worker must be 0 (no queue) or more, got {self.max_inflight_per_worker}"
            )
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {self.max_queue}")
        if not _positive_finite(self.queue_timeout):
            raise ConfigError(f"--queue-timeout must be a positive number of seconds, got {self.queue_timeout}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.metrics_listen is not None and not self.metrics_listen.strip():
            raise ConfigError("--metrics-listen must be an endpoint, e.g. tcp:9100:interface=127.0.0.1")
        if not (math.isfinite(self.shutdown_grace) and self.shutdown_grace >= 0):
            raise ConfigError(f"--shutdown-grace must be 0 or a positive number of seconds, got {self.shutdown_grace}")

    @property
    def endpoint_description(self) -> str:
        """The Twisted endpoint string the router listens on."""
        if self.listen:
            return self.listen
        host = self.host.replace(":", r"\:")
        return f"tcp:{self.port}:interface={host}"

    @property
    def effective_log_level(self) -> str:
        """
        The name of the Twisted L{LogLevel} to log at. C{--verbose} is shorthand
        for C{--log-level debug}; C{trace} logs what C{debug} logs, since
        Twisted has nothing finer.
        """
        level = "debug" if self.verbose else self.log_level
        return _TWISTED_LEVELS.get(level, level)


def canonical_log_level(text: str) -> str:
    """C{--log-level} is case-insensitive and takes C{warn} for C{warning}, as the earlier router did."""
    level = text.strip().lower()
    return LOG_LEVEL_ALIASES.get(level, level)


def _check_key(option: str, key: str, min_length: int = 16) -> None:
    """A key is sent as C{Authorization: Bearer <key>}: printable ASCII, no spaces, and not trivially short."""
    if not key:
        raise ConfigError(f"{option} must not be empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise ConfigError(f"{option} must be printable ASCII without spaces (it is sent as a Bearer token)")
    if len(key) < min_length:
        raise ConfigError(f"{option} must be at least {min_length} characters long")


def resolve_key(
    option: str,
    value: str | None,
    path: str | None,
    env_name: str,
    environ: Mapping[str, str],
    min_length: int = 16,
) -> str | None:
    """
    A key from C{--option}, C{--option-file} (its content, surrounding whitespace
    stripped) or the environment variable C{env_name}, in that order; giving
    both the option and its file is an error. The key is checked here, so a
    bad one is reported under the name it came from (an empty file is the
    file's fault, not C{--option}'s).

    @raise ConfigError: both given, the file cannot be read, or the key is
        empty, not printable ASCII or shorter than C{min_length}.
    """
    if value is not None and path is not None:
        raise ConfigError(f"give {option} or {option}-file, not both")
    key, source = value, option
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                key, source = f.read().strip(), f"{option}-file {path}"
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{option}-file: cannot read {path}: {exc}") from None
    elif value is None:
        key, source = environ.get(env_name), f"${env_name}"
    if key is not None:
        _check_key(source, key, min_length=min_length)
    return key


def _positive_finite(value: float) -> bool:
    """NaN and infinity compare oddly and make timers that never fire: refuse them with the negatives."""
    return math.isfinite(value) and value > 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not _positive_finite(value):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive finite number, got {text}")
    return value


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """
    The router's command line, shared by the console script and the twistd plugin.

    @param parser_class: lets the twistd plugin substitute a parser that raises
        C{usage.UsageError} instead of exiting.
    """
    defaults = RouterConfig()
    parser = parser_class(
        prog=PROGRAM_NAME,
        description=(
            "Load-balancing router for SGLang diffusion workers: spreads image and video "
            "generation over workers, streams answers back, quarantines failing workers and "
            "broadcasts RL control calls (sleep, wake, weight refit)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to listen on (0: any free port)")
    parser.add_argument(
        "--listen",
        default=None,
        metavar="ENDPOINT",
        help="Twisted server endpoint string (e.g. tcp:30080:interface=127.0.0.1 or "
        "ssl:443:privateKey=key.pem:certKey=cert.pem); overrides --host/--port",
    )
    parser.add_argument(
        "--worker-urls",
        nargs="*",
        default=[],
        metavar="URL",
        help="workers to register at start-up, e.g. http://127.0.0.1:30000",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=defaults.max_connections,
        help="most concurrent connections from the router to one worker",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=defaults.timeout,
        help="seconds to wait for a worker's response headers (and longest pause inside a body)",
    )
    parser.add_argument(
        "--weight-update-timeout",
        type=_positive_float,
        default=defaults.weight_update_timeout,
        help="seconds one worker may take for a weight update, sleep or wake (real reloads take minutes)",
    )
    parser.add_argument(
        "--health-check-interval",
        type=_positive_float,
        default=defaults.health_check_interval,
        help="seconds between health probes of each worker",
    )
    parser.add_argument(
        "--health-check-failure-threshold",
        type=_positive_int,
        default=defaults.health_check_failure_threshold,
        help="consecutive failed probes before a worker is quarantined",
    )
    parser.add_argument(
        "--health-check-timeout",
        type=_positive_float,
        default=defaults.health_check_timeout,
        help="seconds one health probe may take",
    )
    parser.add_argument(
        "--routing-algorithm",
        choices=ROUTING_ALGORITHMS,
        default=defaults.routing_algorithm,
        help="how a worker is chosen for each request",
    )
    parser.add_argument(
        "--launcher-config",
        default=None,
        metavar="FILE",
        help="YAML file describing workers to launch and supervise",
    )
    parser.add_argument(
        "--max-request-body",
        type=_positive_int,
        default=defaults.max_request_body,
        metavar="BYTES",
        help="largest request body accepted; larger ones are answered 413 without being stored",
    )
    parser.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=defaults.client_timeout,
        metavar="SECONDS",
        help="seconds a client may take to send a whole request (headers and body, from its first byte) "
        "and to stay idle between requests; answers are not limited by it",
    )
    parser.add_argument(
        "--max-video-jobs",
        type=_positive_int,
        default=defaults.max_video_jobs,
        help="video job ids remembered for sticky routing (oldest finished ones forgotten first)",
    )
    parser.add_argument(
        "--max-image-ids",
        type=_positive_int,
        default=defaults.max_image_ids,
        help="image ids remembered for sticky GET /v1/images/{id}/content",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=_non_negative_float,
        default=defaults.shutdown_grace,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long requests in flight may take to finish before the router stops",
    )
    parser.add_argument(
        "--max-inflight-per-worker",
        type=_non_negative_int,
        default=defaults.max_inflight_per_worker,
        metavar="N",
        help="at most N generations outstanding per worker; the rest wait in the router and go to the "
        "first worker with room (0: no router-side queue)",
    )
    parser.add_argument(
        "--max-queue",
        type=_positive_int,
        default=defaults.max_queue,
        metavar="M",
        help="generations that may wait in the router-side queue; more are answered 429 with Retry-After",
    )
    parser.add_argument(
        "--queue-timeout",
        type=_positive_float,
        default=defaults.queue_timeout,
        metavar="SECONDS",
        help="how long a generation may wait in the router-side queue before a 504",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"Bearer key for generation and read endpoints (prefer --api-key-file or ${API_KEY_ENV}: "
        "an option is visible in process listings); /health stays open",
    )
    parser.add_argument("--api-key-file", default=None, metavar="FILE", help="read --api-key from FILE")
    parser.add_argument(
        "--admin-api-key",
        default=None,
        metavar="KEY",
        help="Bearer key for worker management, weight updates, sleep/wake and the catch-all to worker "
        f"paths; also grants what --api-key grants (or ${ADMIN_API_KEY_ENV})",
    )
    parser.add_argument("--admin-api-key-file", default=None, metavar="FILE", help="read --admin-api-key from FILE")
    parser.add_argument(
        "--worker-api-key",
        default=None,
        metavar="KEY",
        help="Bearer key the router sends to every worker (the workers' own --api-key), "
        f"replacing any client Authorization (or ${WORKER_API_KEY_ENV})",
    )
    parser.add_argument(
        "--worker-api-key-file", default=None, metavar="FILE", help="read --worker-api-key from FILE"
    )
    parser.add_argument(
        "--catch-all",
        choices=CATCH_ALL_CHOICES,
        default="on",
        help="forward paths no route knows to a worker (admin key required when one is set); off: 404",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="keep the fleet's weight version and last refit, worker registrations and quarantines, "
        "the refit journal and image/video owners in DIR, and restore them on start (default: off; "
        "with --launcher-config, the launcher file's state_dir)",
    )
    parser.add_argument("--verbose", action="store_true", help="log at debug level, including every request")
    parser.add_argument(
        "--log-level",
        type=canonical_log_level,
        choices=LOG_LEVELS,
        default=defaults.log_level,
        help="lowest level logged (case-insensitive; warn = warning, trace = debug)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=defaults.log_format,
        help="text: one readable line per event; json: one JSON object per line (for log shippers)",
    )
    parser.add_argument(
        "--access-log",
        choices=ACCESS_LOG_CHOICES,
        default="on",
        help="one log line per request (method, path, status, worker, duration, bytes, request id, weight "
        "version); off saves about 0.1 ms of router CPU per request",
    )
    parser.add_argument(
        "--metrics-listen",
        default=None,
        metavar="ENDPOINT",
        help="also serve /metrics, without keys, on this Twisted endpoint (e.g. tcp:9100:interface=127.0.0.1); "
        "off by default",
    )
    return parser


def config_from_args(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser | None = None,
    environ: Mapping[str, str] | None = None,
) -> RouterConfig:
    """
    Parse C{argv} into a L{RouterConfig}; bad values raise L{ConfigError} or exit via argparse.

    @param environ: where the key environment variables are read (default C{os.environ}).
    """
    parser = parser or build_parser()
    ns = parser.parse_args(list(argv) if argv is not None else None)
    env = os.environ if environ is None else environ
    return RouterConfig(
        api_key=resolve_key("--api-key", ns.api_key, ns.api_key_file, API_KEY_ENV, env),
        admin_api_key=resolve_key(
            "--admin-api-key", ns.admin_api_key, ns.admin_api_key_file, ADMIN_API_KEY_ENV, env
        ),
        worker_api_key=resolve_key(
            "--worker-api-key", ns.worker_api_key, ns.worker_api_key_file, WORKER_API_KEY_ENV, env, min_length=1
        ),
        catch_all=ns.catch_all == "on",
        host=ns.host,
        port=ns.port,
        listen=ns.listen,
        worker_urls=tuple(ns.worker_urls),
        max_connections=ns.max_connections,
        timeout=ns.timeout,
        weight_update_timeout=ns.weight_update_timeout,
        health_check_interval=ns.health_check_interval,
        health_check_failure_threshold=ns.health_check_failure_threshold,
        health_check_timeout=ns.health_check_timeout,
        routing_algorithm=ns.routing_algorithm,
        launcher_config=ns.launcher_config,
        verbose=ns.verbose,
        log_level=ns.log_level,
        max_video_jobs=ns.max_video_jobs,
        max_request_body=ns.max_request_body,
        client_timeout=ns.client_timeout,
        max_image_ids=ns.max_image_ids,
        shutdown_grace=ns.shutdown_grace,
        max_inflight_per_worker=ns.max_inflight_per_worker,
        max_queue=ns.max_queue,
        queue_timeout=ns.queue_timeout,
        log_format=ns.log_format,
        access_log=ns.access_log == "on",
        metrics_listen=ns.metrics_listen,
        state_dir=ns.state_dir,
    )
