"""
The Ray calls of the C{ray} backend, and nothing else: connect, reserve a
placement group, start one L{WorkerHost} actor per bundle, poll it, stop and
kill it, and clean up.

Every method blocks (that is how Ray's client API works), so the router
calls them only from its own thread pool (see
L{twisted_router.launcher._ray_supervisor}); the supervision logic is tested
against a fake with the same methods (L{RayFacade}).

C{ray} is imported only here, and only when the backend is used: it is an
optional extra (C{pip install 'twisted-router[ray]'}).
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted_router.launcher._ray_actor import Polled, Started, WorkerHost

#: Longest a wait for a placement group or an actor's start blocks before it
#: checks whether the router is stopping.
_WAIT_SLICE = 1.0

__all__ = ["RAY_MISSING", "ClusterOptions", "Interrupted", "RayCluster", "RayFacade", "RayUnavailable", "import_ray"]

#: The one line C{backend: ray} fails with when Ray is not installed.
RAY_MISSING = "launcher.backend: ray needs the ray package: pip install 'twisted-router[ray]'"

#: Resources of the private cluster C{ray_address: local} starts for trying things out.
_LOCAL_OBJECT_STORE_BYTES = 80 * 1024 * 1024


class RayUnavailable(Exception):
    """Ray cannot be imported here."""


class Interrupted(Exception):
    """A wait was cut short because the router is stopping."""


def import_ray() -> Any:
    """The C{ray} module, or L{RayUnavailable} with the line to show."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise RayUnavailable(RAY_MISSING) from None


class RayFacade(Protocol):
    """The blocking Ray operations the supervisor needs (the real one is L{RayCluster})."""

    def connect(self) -> str:
        """Join (or, for C{local}, start) the cluster; a one-line description of it."""

    def reserve(self, timeout: float) -> None:
        """Create the placement group and wait until every bundle is placed."""

    def start(self, index: int, argv: Sequence[str], env: Mapping[str, str], preferred_port: int | None,
              timeout: float) -> tuple[Any, Started]:
        """A new actor in bundle C{index} with its worker started: (actor handle, what it started)."""

    def poll(self, actor: Any, timeout: float) -> Polled:
        """The actor's news; raises if the actor (its process or its node) is gone."""

    def stop(self, actor: Any, grace: float) -> None:
        """Stop the actor's worker (SIGTERM, SIGKILL after C{grace})."""

    def kill(self, actor: Any) -> None:
        """Kill the actor (and with it whatever is left of its worker)."""

    def close(self) -> None:
        """Remove the placement group and disconnect; a C{local} cluster is shut down."""

    def interrupt(self) -> None:
        """
        Make C{reserve} and C{start} calls in progress give up soon (the
        router is stopping). Does not block: called on the reactor thread.
        """


@dataclass(frozen=True)
class ClusterOptions:
    """How to reach the cluster and what to reserve there (from the launcher file)."""

    address: str
    num_workers: int
    num_cpus_per_worker: float
    num_gpus_per_worker: int
    strategy: str
    temp_dir: str | None = None
    namespace: str | None = None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """
    Fail at once when nothing listens at a C{HOST:PORT} address: C{ray.init}
    would retry for ever. (C{auto} and C{ray://} addresses are Ray's to resolve.)
    """
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except ValueError:
        raise ConnectionError(f"launcher.ray_address: expected HOST:PORT, got {address!r}") from None
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None


class RayCluster:
    """L{RayFacade} on the real Ray API. Each method blocks; call it off the reactor thread."""

    def __init__(self, options: ClusterOptions, ray: Any | None = None) -> None:
        self._options = options
        self._ray = ray if ray is not None else import_ray()
        self._group: Any = None
        self._actor_class: Any = None
        self._halt = threading.Event()

    def interrupt(self) -> None:
        self._halt.set()

    def _wait(self, ref: Any, timeout: float, what: str) -> Any:
        """C{ray.get(ref)} within C{timeout}, in slices, giving up early once interrupted."""
        deadline = time.monotonic() + timeout
        while True:
            if self._halt.is_set():
                raise Interrupted(f"{what}: the router is stopping")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} took longer than wait_timeout ({timeout:g} s)")
            ready, _ = self._ray.wait([ref], timeout=min(left, _WAIT_SLICE))
            if ready:
                return self._ray.get(ref)

    def connect(self) -> str:
        ray, options = self._ray, self._options
        if options.address == "local":
            # A private single-node cluster for trying things out: CPUs for
            # the workers and no more, no dashboard, a small object store.
            ray.init(
                num_cpus=max(1, int(options.num_workers * options.num_cpus_per_worker + 0.999)),
                # GPUs as this machine has them (none for simulated workers).
                num_gpus=0 if options.num_gpus_per_worker == 0 else None,
                include_dashboard=False,
                object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
                _temp_dir=options.temp_dir,
                namespace=options.namespace,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            _check_reachable(options.address)
            ray.init(address=options.address, namespace=options.namespace, log_to_driver=False,
                     configure_logging=False)
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        self._actor_class = ray.remote(WorkerHost)
        return (
            f"{nodes} node(s), {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s)"
        )

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self._options.num_cpus_per_worker)}
        if self._options.num_gpus_per_worker:
            bundle["GPU"] = float(self._options.num_gpus_per_worker)
        return bundle

    def reserve(self, timeout: float) -> None:
        from ray.util.placement_group import placement_group, remove_placement_group

        options = self._options
        self._group = placement_group([self._bundle() for _ in range(options.num_workers)],
                                      strategy=options.strategy)
        try:
            self._wait(
                self._group.ready(),
                timeout,
                f"placing {options.num_workers} bundle(s) of {self._bundle()} ({options.strategy})",
            )
        except BaseException:
            remove_placement_group(self._group)
            self._group = None
            raise

    def start(self, index: int, argv: Sequence[str], env: Mapping[str, str], preferred_port: int | None,
              timeout: float) -> tuple[Any, Started]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = self._options
        actor = self._actor_class.options(
            num_cpus=options.num_cpus_per_worker,
            num_gpus=options.num_gpus_per_worker,
            max_concurrency=4,  # poll blocks while stop runs
            max_restarts=0,  # a dead actor is replaced by the router, which knows the worker's state
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._group, placement_group_bundle_index=index
            ),
        # A private cluster is this machine alone: its workers listen on
        # loopback (Ray itself resolves 127.0.0.1 to the machine's address).
        ).remote("127.0.0.1" if options.address == "local" else None)
        try:
            started: Started = self._wait(
                actor.start.remote(list(argv), dict(env), preferred_port), timeout, f"starting worker {index}"
            )
        except BaseException:
            self._ray.kill(actor)
            raise
        return actor, started

    def poll(self, actor: Any, timeout: float) -> Polled:
        polled: Polled = self._ray.get(actor.poll.remote(timeout), timeout=timeout + 30)
        return polled

    def stop(self, actor: Any, grace: float) -> None:
        self._ray.get(actor.stop.remote(grace), timeout=grace + 30)

    def kill(self, actor: Any) -> None:
        self._ray.kill(actor, no_restart=True)

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._group is not None:
            try:
                remove_placement_group(self._group)
            finally:
                self._group = None
        if self._ray.is_initialized():
            self._ray.shutdown()
