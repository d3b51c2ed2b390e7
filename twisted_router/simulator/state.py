# -*- test-case-name: tests.unit.test_simulator_control -*-
"""
The mutable state of one simulated worker: sleep, weights, faults, counters.

Kept apart from the HTTP layer so the rules (what a checksum is, when it
changes, how failures are drawn) are plain methods. All of it lives on the
reactor thread; the GPU queue decides I{when} each change happens.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import Any

from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.model import MODULES


class WorkerState:
    """
    Sleeping flag, weights, fault switches and counters of a worker.

    Weights are tracked per module as C{(path, version)}: an update that
    names C{target_modules} changes only those modules, so only their
    checksums change, as on the real worker. C{weights_version} counts
    successful updates of any module.

    @ivar sleeping: C{True} between a release and a resume.
    @ivar weights_path: the path of the last successful update (the launch
        path until then).
    @ivar weights_version: successful updates so far.
    @ivar fail_rate: probability that a generation fails; settable at run time.
    @ivar fail_update: make weight updates fail; settable at run time.
    @ivar served: generations answered successfully.
    @ivar failed: generations that failed by injection.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.sleeping = False
        self.weights_path = config.served_model
        self.weights_version = 0
        self._modules: dict[str, tuple[str, int]] = {
            name: (self.weights_path, 0) for name in MODULES
        }
        self.fail_rate = config.fail_rate
        self.fail_update = config.fail_update
        self._rng = random.Random(config.seed)
        self.served = 0
        self.failed = 0

    @property
    def modules(self) -> tuple[str, ...]:
        """The module names an update or checksum may name."""
        return tuple(self._modules)

    def draw_failure(self) -> bool:
        """
        Decide whether the next generation fails.

        One draw per generation, in arrival order, whatever the rate: a run
        with the same C{--seed} and the same requests fails the same ones.
        """
        return self._rng.random() < self.fail_rate

    def unknown_modules(self, names: Iterable[str]) -> list[str]:
        """The names in C{names} that are not modules of the pipeline."""
        return [name for name in names if name not in self._modules]

    def update(self, path: str, names: Iterable[str] | None = None) -> list[str]:
        """
        Load new weights from C{path} into C{names} (all modules by default).

        @return: the updated module names, in pipeline order.
        """
        wanted = set(self._modules if names is None else names)
        self.weights_version += 1
        self.weights_path = path
        updated = [name for name in self._modules if name in wanted]
        for name in updated:
            self._modules[name] = (path, self.weights_version)
        return updated

    def checksum(self, name: str) -> str | None:
        """
        The sha256 hex of a module's weights, or C{None} for an unknown module.

        It is a hash of the module name, the path it was loaded from and the
        update that loaded it, so it changes on every update of that module
        and is equal across workers that loaded the same path in the same
        update.
        """
        if name not in self._modules:
            return None
        path, version = self._modules[name]
        return hashlib.sha256(f"{name}\0{path}\0{version}".encode()).hexdigest()

    def snapshot(self) -> dict[str, Any]:
        """The state fields of the simulator-only C{/sim/state} answer."""
        return {
            "weights_path": self.weights_path,
            "weights_version": self.weights_version,
            "sleeping": self.sleeping,
            "served": self.served,
            "failed": self.failed,
            "fail_rate": self.fail_rate,
            "fail_update": self.fail_update,
        }
