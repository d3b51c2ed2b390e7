# -*- test-case-name: tests.unit.test_simulator_cli -*-
"""
The simulated worker's configuration: one frozen object, validated once.

The same object is built by the command line (L{twisted_router.simulator.cli})
and by tests (L{twisted_router.simulator.testing}), so defaults live here and
nowhere else. Defaults are chosen for tests: a default request takes a few
milliseconds of (fake or real) time and payloads are a few kB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from twisted_router.simulator.model import PROFILES, ModelProfile, TaskType

#: The worker versions the simulator can imitate (see docs/worker-api.md).
API_VERSIONS = ("pinned", "upstream")

#: Bodies of C{/rollout/generate}: upstream's current msgpack, or its earlier JSON.
ROLLOUT_FORMATS = ("msgpack", "json")


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
