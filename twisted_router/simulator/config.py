# -*- test-case-name: tests.unit.test_simulator_cli -*-
"""
The simulated worker's configuration: one frozen object, validated once.

The same object is built by the command line (L{twisted_router.simulator.cli}),
by the router's launcher (from a YAML file, then handed to the worker process
as flags) and by tests (L{twisted_router.simulator.testing}), so the options,
their defaults, their flags and their help live here and nowhere else:
L{OPTIONS} lists them, L{SimulatorConfig.from_options} builds a config from
option values (parsed flags or YAML), and L{SimulatorConfig.to_argv} turns a
config back into the flags that rebuild it. Defaults are chosen for tests: a
default request takes a few milliseconds of (fake or real) time and payloads
are a few kB.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted_router.simulator.model import PROFILES, ModelProfile
from twisted_router.tasks import TaskType

__all__ = ["API_VERSIONS", "OPTIONS", "ROLLOUT_FORMATS", "Option", "SimulatorConfig"]

#: The worker versions the simulator can imitate (see docs/worker-api.md).
API_VERSIONS = ("pinned", "upstream")

#: Bodies of C{/rollout/generate}: upstream's current msgpack, or its earlier JSON.
ROLLOUT_FORMATS = ("msgpack", "json")


@dataclass(frozen=True)
class Option:
    """
    One option of the simulated worker.

    @ivar name: its name in option mappings and launcher files; the flag is
        C{--name} with dashes.
    @ivar attribute: the L{SimulatorConfig} attribute it sets.
    @ivar kind: C{str}, C{int}, C{float}, C{bool} (a flag without a value),
        C{task} (a L{TaskType} name) or C{str_list} (a repeatable flag).
    @ivar help: the C{--help} text; C{%(default)s} is the default.
    @ivar metavar: the value's name in C{--help}, for repeatable flags.
    """

    name: str
    attribute: str
    kind: str
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _option(name: str, kind: str, help: str, *, attribute: str | None = None, metavar: str | None = None) -> Option:
    return Option(name, attribute or name, kind, help, metavar)


#: Every option, in C{--help} order.
OPTIONS: tuple[Option, ...] = (
    _option("host", "str", "interface to listen on (default: %(default)s)"),
    _option("port", "int", "TCP port, 0 for any free one (default: %(default)s)"),
    _option("model_path", "str",
            "served model id/path reported by /v1/models (default: the task type's usual model)"),
    _option("task_type", "task", "model task type (default: %(default)s)"),
    _option("num_gpus", "int", "reported in the model card; does not change speed (default: %(default)s)"),
    _option("step_ms", "float", "ms per denoising step of one 1024x1024 frame (default: %(default)s)"),
    _option("base_ms", "float", "fixed ms added to every generation (default: %(default)s)"),
    _option("speed", "float", "divides every generation time; 2 = twice as fast (default: %(default)s)"),
    _option("default_steps", "int",
            "steps when a request gives none (default: 8 for T2I, I2I and I2M; "
            "4 for TI2I and the video task types)"),
    _option("startup_delay", "float",
            "seconds before the port opens, like model loading (default: %(default)s)"),
    _option("fail_rate", "float",
            "probability 0..1 that a generation fails with a text/plain 500 (default: %(default)s)"),
    _option("fail_update", "bool", "make /update_weights_from_disk fail with the real 'rolled back' 400"),
    _option("seed", "int", "seed of the failure draws (default: %(default)s)"),
    _option("image_bytes", "int", "size of every generated image file (default: %(default)s)"),
    _option("video_bytes", "int", "size of every generated MP4 (default: %(default)s)"),
    _option("update_ms", "float", "GPU time of a weight update (default: %(default)s)"),
    _option("sleep_ms", "float", "GPU time of a release or resume that changes state (default: %(default)s)"),
    _option("worker_id", "str",
            "value of the X-Worker-Id header on every answer (default: HOST:PORT once bound)"),
    _option("output_path", "str",
            "directory named in file_path fields; nothing is written (default: %(default)s)"),
    _option("disable_endpoint", "str_list",
            "answer this exact path with 404, like a version without it (repeatable), "
            "e.g. --disable-endpoint /rollout/generate",
            attribute="disabled_endpoints", metavar="PATH"),
    _option("keep_alive_timeout", "float",
            "seconds before an idle keep-alive connection is closed, like uvicorn's "
            "--timeout-keep-alive (default: %(default)s)"),
    _option("api_version", "str",
            "worker version to imitate: 'pinned' (the RL fork: /v1/diffusion/generate) or "
            "'upstream' (/rollout/generate, /server_info, /model_info) (default: %(default)s)"),
    _option("rollout_format", "str",
            "body of /rollout/generate: msgpack with raw tensor bytes (upstream now) or "
            "JSON with base64 tensors (earlier upstream) (default: %(default)s)"),
    _option("warmup_seconds", "float",
            "after the port opens, /health answers 503 for this long, like upstream's "
            "warm-up (default: %(default)s)"),
    _option("weights_prefix", "str_list",
            "accept weight updates from model paths starting with PREFIX (repeatable); "
            "paths that exist on disk and the served model are always accepted, others are "
            "the real 400",
            attribute="weights_prefixes", metavar="PREFIX"),
    _option("verbose", "bool", "log every request and debug events"),
)

_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class SimulatorConfig:
    """
    Every option of the simulated worker.

    @ivar host: interface to listen on.
    @ivar port: TCP port; 0 picks a free one (the log line tells which).
    @ivar model_path: the served model; C{None} means the task type's usual model.
    @ivar task_type: what the model does; decides video capability and defaults.
    @ivar num_gpus: reported in the model card; does not change speed.
    @ivar step_ms: milliseconds per denoising step of one 1024² frame.
    @ivar base_ms: fixed milliseconds added to every generation.
    @ivar speed: divides every service time (2.0 is a GPU twice as fast).
    @ivar default_steps: steps when a request gives none; C{None} uses the
        task type's simulator default (8 for T2I, I2I and I2M; 4 for TI2I,
        whose real model, FLUX.2-klein, runs 4, and for the video types).
    @ivar startup_delay: seconds before the port opens (model loading).
    @ivar fail_rate: probability (0..1) that a generation fails.
    @ivar fail_update: make every C{/update_weights_from_disk} fail with the
        real "rolled back" 400.
    @ivar seed: seeds the failure draws, so a run is reproducible.
    @ivar image_bytes: size of every generated image file.
    @ivar video_bytes: size of every generated MP4.
    @ivar update_ms: GPU time of a weight update.
    @ivar sleep_ms: GPU time of a release or resume that changes state.
    @ivar worker_id: echoed in the C{X-Worker-Id} header of every answer;
        empty means C{host:port} once the port is bound.
    @ivar output_path: the directory named in C{file_path} fields (nothing
        is written there).
    @ivar disabled_endpoints: exact paths answered with 404, to imitate
        versions that lack an endpoint (e.g. C{/rollout/generate}).
    @ivar keep_alive_timeout: seconds an idle keep-alive connection is kept
        before the worker closes it (uvicorn's C{--timeout-keep-alive},
        default 5 s).
    @ivar api_version: which worker version's endpoints to serve:
        C{"pinned"} (the RL fork pinned in C{sglang/requirements.txt}:
        C{/v1/diffusion/generate}, no C{/rollout/generate}) or C{"upstream"}
        (current sglang: C{/rollout/generate}, C{/server_info},
        C{/model_info}, no C{/v1/diffusion/generate}). It also picks the
        answer to a weight update while sleeping (see docs/worker-api.md).
    @ivar rollout_format: body of C{/rollout/generate}: C{"msgpack"} (raw
        tensor bytes, what upstream sends now) or C{"json"} (base64
        safetensors, upstream before the msgpack transport).
    @ivar warmup_seconds: after the port opens, C{/health} answers 503 for
        this long (upstream's warm-up); C{/liveness} answers 200 at once.
    @ivar weights_prefixes: C{/update_weights_from_disk} accepts a
        C{model_path} that exists on disk, the served model, or one starting
        with one of these prefixes; anything else is the real 400 ("Failed
        to download model").
    @ivar verbose: log every request.
    """

    host: str = "127.0.0.1"
    port: int = 30000
    model_path: str | None = None
    task_type: TaskType = TaskType.T2I
    num_gpus: int = 1
    step_ms: float = 1.0
    base_ms: float = 0.0
    speed: float = 1.0
    default_steps: int | None = None
    startup_delay: float = 0.0
    fail_rate: float = 0.0
    fail_update: bool = False
    seed: int = 0
    image_bytes: int = 2048
    video_bytes: int = 65536
    update_ms: float = 0.0
    sleep_ms: float = 0.0
    worker_id: str = ""
    output_path: str = "/tmp/sglang-sim/outputs"
    disabled_endpoints: tuple[str, ...] = field(default_factory=tuple)
    keep_alive_timeout: float = 5.0
    api_version: str = "pinned"
    rollout_format: str = "msgpack"
    warmup_seconds: float = 0.0
    weights_prefixes: tuple[str, ...] = field(default_factory=tuple)
    verbose: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be 0..65535, got {self.port}")
        if not 0.0 <= self.fail_rate <= 1.0:
            problems.append(f"fail-rate must be between 0 and 1, got {self.fail_rate}")
        # NaN passes every comparison below and inf makes times NaN or 0:
        # refuse both, naming the command-line flag.
        for name in (
            "step_ms", "base_ms", "speed", "startup_delay", "update_ms", "sleep_ms",
            "keep_alive_timeout", "warmup_seconds",
        ):
            value = getattr(self, name)
            if not math.isfinite(value):
                problems.append(f"{name.replace('_', '-')} must be a finite number, got {value}")
            elif name in ("speed", "keep_alive_timeout"):
                if value <= 0:
                    problems.append(f"{name.replace('_', '-')} must be positive, got {value}")
            elif value < 0:
                problems.append(f"{name.replace('_', '-')} must not be negative, got {value}")
        for name in ("image_bytes", "video_bytes"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must not be negative")
        if self.default_steps is not None and self.default_steps <= 0:
            problems.append(f"default-steps must be positive, got {self.default_steps}")
        if self.num_gpus <= 0:
            problems.append(f"num-gpus must be positive, got {self.num_gpus}")
        if self.model_path == "":
            problems.append("model-path must not be empty")
        if self.api_version not in API_VERSIONS:
            problems.append(f"api-version must be one of {', '.join(API_VERSIONS)}, got {self.api_version!r}")
        if self.rollout_format not in ROLLOUT_FORMATS:
            problems.append(
                f"rollout-format must be one of {', '.join(ROLLOUT_FORMATS)}, got {self.rollout_format!r}"
            )
        if any(not prefix for prefix in self.weights_prefixes):
            problems.append("weights-prefix must not be empty")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def profile(self) -> ModelProfile:
        """The defaults of the configured task type."""
        return PROFILES[self.task_type]

    @property
    def served_model(self) -> str:
        """The model path as reported by C{/v1/models} and C{/v1/model_info}."""
        return self.model_path or self.profile.model_path

    @property
    def steps(self) -> int:
        """Denoising steps of a request that names none."""
        return self.default_steps or self.profile.default_steps

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SimulatorConfig:
        """
        The config that C{options} (option name to value, as parsed from the
        command line or read from a launcher file) describe; options not given
        keep their defaults, and a C{None} value counts as not given.

        @raise ValueError: an unknown option, or a value the config refuses
            (the message names the option as its flag does).
        """
        unknown = sorted(set(options) - set(_BY_NAME))
        if unknown:
            raise ValueError(f"unknown simulator option(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            if value is None:
                continue
            option = _BY_NAME[name]
            if option.kind == "task" and not isinstance(value, TaskType):
                text = str(value).strip().upper()
                if text not in TaskType.__members__:
                    raise ValueError(f"task-type must be one of {', '.join(TaskType.__members__)}, got {value!r}")
                value = TaskType[text]
            elif option.kind == "str_list":
                value = tuple(value)
            values[option.attribute] = value
        return cls(**values)

    def to_argv(self, explicit: Iterable[str] = ()) -> list[str]:
        """
        The flags that rebuild this config: C{--host} and C{--port} always,
        then every other option whose value is not the default, or whose name
        is in C{explicit} (so a command line shows what its launcher file
        said, defaults included), in L{OPTIONS} order.
        """
        shown = {"host", "port", *explicit}
        defaults = SimulatorConfig()
        argv: list[str] = []
        for option in OPTIONS:
            value = getattr(self, option.attribute)
            if value is None or (option.name not in shown and value == getattr(defaults, option.attribute)):
                continue
            if option.kind == "bool":
                if value:
                    argv.append(option.flag)
            elif option.kind == "str_list":
                for item in value:
                    argv += [option.flag, item]
            elif option.kind == "task":
                argv += [option.flag, value.name]
            else:
                argv += [option.flag, str(value)]
        return argv
