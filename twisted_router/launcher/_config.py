# -*- test-case-name: tests.unit.test_launcher_config -*-
"""
The launcher's YAML file, read with pyyaml and validated into frozen objects.

An operator's typo must never start a half-configured fleet, so everything is
checked before a single process is spawned, and every problem is reported as
one line that names the offending key (C{launcher.num_workers: expected an
integer, got 'two'}). The command line turns that line into exit status 2.

Nothing here touches the network, the GPUs or the process table: whether the
machine can actually run the fleet (free ports, enough GPUs, C{sglang} on
PATH) is decided later, by L{twisted_router.launcher.plan_fleet}.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from twisted_router.config import ConfigError
from twisted_router.simulator.config import OPTIONS as SIMULATOR_OPTION_TABLE
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.tasks import TaskType

__all__ = [
    "BACKENDS",
    "RAY_STRATEGIES",
    "RAY_WORKERS",
    "SIMULATOR_OPTIONS",
    "LauncherConfig",
    "LauncherConfigError",
    "RestartPolicy",
    "SimulatedWorker",
    "default_state_dir",
    "launcher_state_dir",
    "load_launcher_config",
    "parse_launcher_config",
]

#: The process backends: real C{sglang serve} workers, CPU simulators, or
#: either of them as Ray actors across a cluster.
BACKENDS = ("local", "simulated", "ray")

#: Ray placement-group strategies (one bundle per worker).
RAY_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")

#: What a C{ray} backend's actors run.
RAY_WORKERS = ("sglang", "simulated")

#: The simulator's options a launcher file may set (see
#: L{twisted_router.simulator.config.OPTIONS}). C{host} and C{port} are
#: missing on purpose: the launcher chooses them.
SIMULATOR_OPTIONS: tuple[str, ...] = tuple(
    option.name for option in SIMULATOR_OPTION_TABLE if option.name not in ("host", "port")
)
_SIMULATOR_KINDS: Mapping[str, str] = {option.name: option.kind for option in SIMULATOR_OPTION_TABLE}


class LauncherConfigError(ConfigError):
    """The launcher file is unusable; the one-line message names the key and why."""


@dataclass(frozen=True)
class RestartPolicy:
    """
    What happens when a managed worker's process exits.

    The backoff is L{twisted.runner.procmon.ProcessMonitor}'s, with one
    rule added: a worker that exits before it was ever ready in that start
    (its C{/health} never answered 200) or less than C{threshold} seconds
    after it was started waits C{min_delay} seconds before its restart, and
    each further such death doubles the wait up to C{max_delay}; only one
    that became ready and ran longer than C{threshold} is restarted at once
    (and its wait reset). So a model that crashes at the end of a long load
    backs off however long the load took. C{threshold} is at least
    C{min_delay}.

    @ivar enabled: restart exited workers at all.
    @ivar min_delay: first wait, in seconds, after a quick death.
    @ivar max_delay: longest wait, in seconds.
    @ivar threshold: a death of a ready worker within this many seconds of
        start counts as quick.
    """

    enabled: bool = True
    min_delay: float = 1.0
    max_delay: float = 300.0
    threshold: float = 60.0


@dataclass(frozen=True)
class SimulatedWorker:
    """
    The simulator options of one simulated worker (shared options merged in).

    @ivar options: C{(name, value)} pairs in L{SIMULATOR_OPTIONS} order, only
        the options that were set; the simulator's defaults apply to the rest.
    """

    options: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        """The value of option C{name}, or C{default} when it was not set."""
        for key, value in self.options:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class LauncherConfig:
    """
    The validated C{launcher:} mapping of a launcher file.

    @ivar backend: C{local} (C{sglang serve}) or C{simulated}.
    @ivar model: the model path or id served by every local worker.
    @ivar worker_gpu_ids: per-worker C{CUDA_VISIBLE_DEVICES} values, or
        C{None} to take GPUs from the environment or C{nvidia-smi -L}.
    @ivar worker_extra_args: appended to every worker's command line (already
        split the way a shell would).
    @ivar wait_timeout: seconds one start of a worker may take until its
        C{/health} answers 200.
    @ivar shutdown_grace: seconds between SIGTERM and SIGKILL of a worker's
        process group.
    @ivar simulated: one entry per worker for the C{simulated} backend (or
        C{ray} with C{worker: simulated}), empty otherwise.
    @ivar ray_address: C{ray} backend: the cluster to join (C{auto}, an
        address), or C{local} for a private single-node cluster on loopback.
    @ivar strategy: C{ray} backend: the placement group's strategy.
    @ivar worker: C{ray} backend: what each actor runs (C{sglang} or C{simulated}).
    @ivar num_cpus_per_worker: C{ray} backend: the CPUs of each bundle.
    @ivar ray_temp_dir: C{ray_address: local}: Ray's session directory.
    @ivar source: the file the config came from, for messages.
    @ivar state_dir: the C{state_dir} key: where the router keeps its durable
        state (relative to the file's directory), C{None} for the default
        (L{default_state_dir}); see L{launcher_state_dir}.
    @ivar keep_state: C{state_dir: false} turns the durable state off.
    """

    backend: str = "local"
    model: str | None = None
    num_workers: int = 1
    num_gpus_per_worker: int = 1
    worker_host: str = "127.0.0.1"
    worker_base_port: int = 10090
    worker_gpu_ids: tuple[str, ...] | None = None
    worker_extra_args: tuple[str, ...] = ()
    master_port_base: int = 30005
    scheduler_port_base: int = 5555
    internal_port_stride: int = 1000
    wait_timeout: float = 600.0
    shutdown_grace: float = 15.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    simulated: tuple[SimulatedWorker, ...] = ()
    ray_address: str = "auto"
    strategy: str = "PACK"
    worker: str = "sglang"
    num_cpus_per_worker: float = 1.0
    ray_temp_dir: str | None = None
    source: str | None = None
    state_dir: str | None = None
    keep_state: bool = True

    @property
    def runs_simulator(self) -> bool:
        """Whether the workers are simulators (C{simulated}, or C{ray} with C{worker: simulated})."""
        return self.backend == "simulated" or (self.backend == "ray" and self.worker == "simulated")


# -- reading values ------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as an error message shows it: short, and quoted when it is text."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _show(value)


def _check_keys(data: Mapping[Any, Any], known: Sequence[str], where: str) -> None:
    """Refuse unknown keys, suggesting the closest known one (typos are the usual cause)."""
    for key in data:
        if not isinstance(key, str):
            raise LauncherConfigError(f"{where}: keys must be text, got {_show(key)}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
            raise LauncherConfigError(f"{where}.{key}: unknown key{hint}")


def _int(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    # bool is an int in Python, but "num_workers: yes" is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise LauncherConfigError(f"{where}: expected an integer, got {_kind_name(value)}")
    if minimum is not None and value < minimum:
        raise LauncherConfigError(f"{where}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise LauncherConfigError(f"{where}: must be at most {maximum}, got {value}")
    return value


def _float(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LauncherConfigError(f"{where}: expected a number, got {_kind_name(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise LauncherConfigError(f"{where}: must be a finite number, got {value}")
    if positive and number <= 0:
        raise LauncherConfigError(f"{where}: must be a positive number of seconds, got {value}")
    if number < 0:
        raise LauncherConfigError(f"{where}: must not be negative, got {value}")
    return number


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise LauncherConfigError(f"{where}: expected true or false, got {_kind_name(value)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise LauncherConfigError(f"{where}: expected a string, got {_kind_name(value)}")
    if not value.strip():
        raise LauncherConfigError(f"{where}: must not be empty")
    return value


def _mapping(value: Any, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise LauncherConfigError(f"{where}: expected a mapping, got {_kind_name(value)}")
    return value


def _gpu_ids(value: Any, where: str, num_workers: int, gpus_per_worker: int) -> tuple[str, ...]:
    """Per-worker C{CUDA_VISIBLE_DEVICES} strings; C{[0, 1]} and C{["0,1"]} style entries both work."""
    if not isinstance(value, list):
        raise LauncherConfigError(f"{where}: expected a list with one entry per worker, got {_kind_name(value)}")
    if len(value) != num_workers:
        raise LauncherConfigError(
            f"{where}: has {len(value)} entries but launcher.num_workers is {num_workers}"
        )
    groups = []
    for i, entry in enumerate(value):
        here = f"{where}[{i}]"
        parts: list[Any] = entry if isinstance(entry, list) else [entry]
        ids: list[str] = []
        for part in parts:
            if isinstance(part, bool) or not isinstance(part, (int, str)):
                raise LauncherConfigError(
                    f"{here}: expected GPU ids like \"0,1\" or [0, 1], got {_kind_name(part)}"
                )
            ids.extend(token.strip() for token in str(part).split(","))
        if not ids or any(not token for token in ids):
            raise LauncherConfigError(f"{here}: expected GPU ids like \"0,1\", got {_show(entry)}")
        if len(ids) != gpus_per_worker:
            raise LauncherConfigError(
                f"{here}: names {len(ids)} GPU(s) but launcher.num_gpus_per_worker is {gpus_per_worker}"
            )
        if len(set(ids)) != len(ids):
            raise LauncherConfigError(f"{here}: names a GPU twice: {_show(entry)}")
        groups.append(",".join(ids))
    return tuple(groups)


def _extra_args(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise LauncherConfigError(
            f"{where}: expected one string of arguments (split like a shell does), got {_kind_name(value)}"
        )
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise LauncherConfigError(f"{where}: cannot split {_show(value)}: {exc}") from None


_RESTART_KEYS = ("enabled", "min_delay", "max_delay", "threshold")


def _restart(value: Any, where: str) -> RestartPolicy:
    """C{restart: false} is shorthand for C{restart: {enabled: false}}."""
    if isinstance(value, bool):
        return RestartPolicy(enabled=value)
    data = _mapping(value, where)
    _check_keys(data, _RESTART_KEYS, where)
    defaults = RestartPolicy()
    enabled = _bool(data["enabled"], f"{where}.enabled") if "enabled" in data else defaults.enabled
    min_delay = (
        _float(data["min_delay"], f"{where}.min_delay", positive=True) if "min_delay" in data else defaults.min_delay
    )
    max_delay = (
        _float(data["max_delay"], f"{where}.max_delay", positive=True) if "max_delay" in data else defaults.max_delay
    )
    threshold = _float(data["threshold"], f"{where}.threshold") if "threshold" in data else defaults.threshold
    if max_delay < min_delay:
        raise LauncherConfigError(
            f"{where}.max_delay: must be at least min_delay ({min_delay:g}), got {max_delay:g}"
        )
    if threshold < min_delay:
        # A threshold of 0 would make every death of a serving worker "old"
        # and restart it at once, however often it dies.
        given = f"{threshold:g}" if "threshold" in data else f"the default {threshold:g}"
        raise LauncherConfigError(
            f"{where}.threshold: must be at least min_delay ({min_delay:g}), got {given}"
        )
    return RestartPolicy(enabled=enabled, min_delay=min_delay, max_delay=max_delay, threshold=threshold)


# -- the simulated backend ------------------------------------------------------------


def _simulator_value(name: str, value: Any, where: str) -> Any:
    kind = _SIMULATOR_KINDS[name]
    if kind == "int":
        return _int(value, where)
    if kind == "float":
        return _float(value, where)
    if kind == "bool":
        return _bool(value, where)
    if kind == "task":
        text = _str(value, where).strip().upper()
        if text not in TaskType.__members__:
            raise LauncherConfigError(f"{where}: must be one of {', '.join(TaskType.__members__)}, got {_show(value)}")
        return text
    if kind == "str_list":
        items = value if isinstance(value, list) else [value]
        return tuple(_str(item, where) for item in items)
    return _str(value, where)


def _simulator_options(data: Mapping[Any, Any], where: str, *, allow: Sequence[str] = ()) -> dict[str, Any]:
    for key in ("host", "port"):
        if key in data:
            raise LauncherConfigError(
                f"{where}.{key}: chosen by the launcher (see launcher.worker_host and launcher.worker_base_port)"
            )
    _check_keys(data, [*SIMULATOR_OPTIONS, *allow], where)
    return {
        name: _simulator_value(name, data[name], f"{where}.{name}")
        for name in SIMULATOR_OPTIONS
        if name in data
    }


def _check_simulator_ranges(options: Mapping[str, Any], where: str) -> None:
    """Let the simulator's own config judge the values, so a bad one fails here and not in every worker."""
    try:
        SimulatorConfig.from_options(options)
    except ValueError as exc:
        raise LauncherConfigError(f"{where}: {exc}") from None


def _simulated(
    value: Any, where: str, num_workers: int | None, gpus_per_worker: int
) -> tuple[tuple[SimulatedWorker, ...], int]:
    """The per-worker simulator options, and the number of workers they imply."""
    data = _mapping(value if value is not None else {}, where)
    shared = _simulator_options(data, where, allow=("workers",))
    entries: list[dict[str, Any]]
    if "workers" in data:
        raw = data["workers"]
        if not isinstance(raw, list) or not raw:
            raise LauncherConfigError(
                f"{where}.workers: expected a non-empty list of option mappings, got {_kind_name(raw)}"
            )
        entries = []
        for i, entry in enumerate(raw):
            here = f"{where}.workers[{i}]"
            entries.append(_simulator_options(_mapping(entry if entry is not None else {}, here), here))
        if num_workers is not None and num_workers != len(entries):
            raise LauncherConfigError(
                f"{where}.workers: has {len(entries)} entries but launcher.num_workers is {num_workers}"
            )
    else:
        entries = [{} for _ in range(num_workers if num_workers is not None else 1)]
    workers = []
    for i, own in enumerate(entries):
        merged = {"num_gpus": gpus_per_worker, **shared, **own}
        here = f"{where}.workers[{i}]" if "workers" in data else where
        _check_simulator_ranges(merged, here)
        workers.append(SimulatedWorker(tuple((name, merged[name]) for name in SIMULATOR_OPTIONS if name in merged)))
    return tuple(workers), len(entries)


# -- the whole file -----------------------------------------------------------------------

_KEYS = (
    "backend",
    "model",
    "num_workers",
    "num_gpus_per_worker",
    "worker_host",
    "worker_base_port",
    "worker_gpu_ids",
    "worker_extra_args",
    "master_port_base",
    "scheduler_port_base",
    "internal_port_stride",
    "wait_timeout",
    "shutdown_grace",
    "restart",
    "simulated",
    "state_dir",
    "ray_address",
    "ray_temp_dir",
    "strategy",
    "worker",
    "num_cpus_per_worker",
)

#: Keys only the C{ray} backend reads.
_RAY_KEYS = ("ray_address", "ray_temp_dir", "strategy", "worker", "num_cpus_per_worker")

#: Keys the C{ray} backend refuses: each worker picks its ports on its node, and Ray gives out GPUs.
_NOT_RAY_KEYS = {
    "worker_host": "each worker listens on its node's Ray address",
    "worker_base_port": "each worker picks a free port on its node",
    "master_port_base": "each worker picks free ports on its node",
    "scheduler_port_base": "each worker picks free ports on its node",
    "internal_port_stride": "each worker picks free ports on its node",
    "worker_gpu_ids": "Ray gives each worker num_gpus_per_worker GPUs of its node",
}


def _choice(choices: Sequence[str]) -> Callable[[Any, str], str]:
    def read(value: Any, where: str) -> str:
        text = _str(value, where)
        if text not in choices:
            raise LauncherConfigError(f"{where}: must be one of {', '.join(choices)}, got {_show(value)}")
        return text

    return read


def default_state_dir(source: str, environ: Mapping[str, str]) -> str:
    """
    Where a launcher run keeps its durable state when the file does not say:
    C{$XDG_STATE_HOME/sglang-d-router/<file stem>-<hash of its absolute path>}
    (C{~/.local/state} without C{XDG_STATE_HOME}). One directory per launcher
    file, so two fleets never share a state, and the same file finds its
    state again after a restart.
    """
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    absolute = os.path.abspath(source)
    stem = os.path.splitext(os.path.basename(absolute))[0]
    digest = hashlib.sha256(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(base, "sglang-d-router", f"{stem}-{digest}")


def launcher_state_dir(config: LauncherConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """
    The router's C{--state-dir} for a launcher run that gave none: the file's
    C{state_dir} (relative to the file's directory), else L{default_state_dir};
    C{None} with C{state_dir: false} (or for a config not read from a file).
    """
    if not config.keep_state:
        return None
    if config.state_dir is not None:
        if config.source is None or os.path.isabs(config.state_dir):
            return config.state_dir
        return os.path.join(os.path.dirname(os.path.abspath(config.source)), config.state_dir)
    if config.source is None:
        return None
    return default_state_dir(config.source, os.environ if environ is None else environ)


def _state_dir(value: Any, where: str) -> str | bool:
    if value is False:
        return False
    return _str(value, where)  # a path: never empty


def parse_launcher_config(document: Any, source: str | None = None) -> LauncherConfig:
    """
    Validate a parsed launcher document (C{{"launcher": {...}}}).

    @param source: the file name, kept for messages.
    @raise LauncherConfigError: with one line naming the first bad key.
    """
    if document is None:
        raise LauncherConfigError("the file is empty; expected a mapping with a 'launcher' key")
    top = _mapping(document, "the file")
    if "launcher" not in top:
        raise LauncherConfigError("launcher: missing; the file must be a mapping with a 'launcher' key")
    _check_keys(top, ("launcher",), "(top level)")
    data = _mapping(top["launcher"], "launcher")
    _check_keys(data, _KEYS, "launcher")
    defaults = LauncherConfig()
    values: dict[str, Any] = {}

    def take(key: str, read: Callable[[Any, str], Any]) -> None:
        if key in data:
            values[key] = read(data[key], f"launcher.{key}")

    take("backend", _str)
    backend = values.get("backend", defaults.backend)
    if backend not in BACKENDS:
        raise LauncherConfigError(f"launcher.backend: must be one of {', '.join(BACKENDS)}, got {_show(backend)}")
    if backend == "ray":
        for key, why in _NOT_RAY_KEYS.items():
            if key in data:
                raise LauncherConfigError(f"launcher.{key}: not used with 'backend: ray' ({why})")
        take("ray_address", _str)
        take("ray_temp_dir", _str)
        take("strategy", _choice(RAY_STRATEGIES))
        take("worker", _choice(RAY_WORKERS))
        take("num_cpus_per_worker", lambda v, w: _float(v, w, positive=True))
        if "ray_temp_dir" in values and values.get("ray_address", defaults.ray_address) != "local":
            raise LauncherConfigError(
                "launcher.ray_temp_dir: only used with 'ray_address: local' (a cluster you started has its own)"
            )
    else:
        for key in _RAY_KEYS:
            if key in data:
                raise LauncherConfigError(f"launcher.{key}: only used with 'backend: ray'")
    simulators = backend == "simulated" or (backend == "ray" and values.get("worker", defaults.worker) == "simulated")
    take("model", _str)
    take("num_workers", lambda v, w: _int(v, w, minimum=1))
    # A simulated worker on Ray needs no GPU; everything else runs on GPUs.
    take("num_gpus_per_worker", lambda v, w: _int(v, w, minimum=0 if backend == "ray" and simulators else 1))
    take("worker_host", _str)
    take("worker_base_port", lambda v, w: _int(v, w, minimum=1, maximum=65534))
    take("worker_extra_args", _extra_args)
    take("master_port_base", lambda v, w: _int(v, w, minimum=1, maximum=65535))
    take("scheduler_port_base", lambda v, w: _int(v, w, minimum=1, maximum=65535))
    take("internal_port_stride", lambda v, w: _int(v, w, minimum=1))
    take("wait_timeout", lambda v, w: _float(v, w, positive=True))
    take("shutdown_grace", lambda v, w: _float(v, w, positive=True))
    take("restart", _restart)
    take("state_dir", _state_dir)
    if values.get("state_dir") is False:
        values["state_dir"], values["keep_state"] = None, False
    gpus_per_worker = values.get("num_gpus_per_worker", defaults.num_gpus_per_worker)

    if simulators:
        simulated, implied = _simulated(
            data.get("simulated"), "launcher.simulated", values.get("num_workers"), max(1, gpus_per_worker)
        )
        values["simulated"] = simulated
        values["num_workers"] = implied
    else:
        if "simulated" in data:
            raise LauncherConfigError(
                "launcher.simulated: only used with 'backend: simulated' (or 'backend: ray' with 'worker: simulated')"
            )
        if "model" not in values:
            what = "the local backend" if backend == "local" else "Ray sglang workers"
            raise LauncherConfigError(
                f"launcher.model: required for {what} (the model path or id every worker serves)"
            )
    num_workers = values.get("num_workers", defaults.num_workers)
    take("worker_gpu_ids", lambda v, w: _gpu_ids(v, w, num_workers, gpus_per_worker))

    if backend == "local":
        stride = values.get("internal_port_stride", defaults.internal_port_stride)
        for key in ("master_port_base", "scheduler_port_base"):
            base = values.get(key, getattr(defaults, key))
            last = base + (num_workers - 1) * stride
            if last > 65535:
                raise LauncherConfigError(
                    f"launcher.{key}: worker {num_workers - 1} would get port {last} "
                    f"({base} + {num_workers - 1} x internal_port_stride {stride}), above 65535"
                )
    return LauncherConfig(**values, source=source)


def load_launcher_config(path: str) -> LauncherConfig:
    """
    Read and validate a launcher file.

    @raise LauncherConfigError: the file is missing, unreadable, not YAML or
        not a valid launcher config; the message starts with the path.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise LauncherConfigError(f"launcher config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LauncherConfigError(f"launcher config {path}: cannot read: {reason}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise LauncherConfigError(f"launcher config {path}: invalid YAML{where}: {problem}") from None
    try:
        return parse_launcher_config(document, source=path)
    except LauncherConfigError as exc:
        raise LauncherConfigError(f"launcher config {path}: {exc}") from None
