"""
A CPU stand-in for an SGLang diffusion worker that speaks the real HTTP API.

It answers every endpoint the router relies on with the real worker's status
codes, bodies and timing behaviour (one FIFO "GPU" queue, a service-time
model, sleeping, weight versions), with payloads of realistic size, so the
router can be developed, tested and benchmarked without GPUs. Run it with
C{python -m twisted_router.simulator} or C{sglang-d-sim-worker}; see
C{docs/simulator.md}.

Modules: C{model} (pure rules), C{payloads} (valid files of any size),
C{queue} (the GPU queue), C{state} (sleep, weights, faults), C{app} (the
Klein app), C{config}, C{cli}, C{testing} (an in-memory harness for tests).
"""

from typing import Any

__all__ = ["SimulatedWorker", "SimulatorConfig", "TaskType"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the router's launcher reads the simulator's
    # options (config) without loading the simulated worker's web app.
    if name == "SimulatedWorker":
        from twisted_router.simulator.app import SimulatedWorker

        return SimulatedWorker
    if name == "SimulatorConfig":
        from twisted_router.simulator.config import SimulatorConfig

        return SimulatorConfig
    if name == "TaskType":
        from twisted_router.tasks import TaskType

        return TaskType
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
