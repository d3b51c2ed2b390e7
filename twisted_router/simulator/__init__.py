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

from twisted_router.simulator.app import SimulatedWorker
from twisted_router.simulator.config import SimulatorConfig
from twisted_router.simulator.model import TaskType

__all__ = ["SimulatedWorker", "SimulatorConfig", "TaskType"]
