"""
C{examples/diffusion_router/demo.py} takes the demo router's flags and serves
its endpoints (issue 8 point 5).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.live import call, wait_until

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

DEMO = Path(__file__).resolve().parents[2] / "examples" / "diffusion_router" / "demo.py"


def test_demo_runs_the_router_with_the_demo_flags(processes: Processes) -> None:
    first, second = processes.workers([], ["--task-type", "T2V"])
    router = processes.start([
        sys.executable, str(DEMO),
        "--host", "127.0.0.1", "--port", "0",
        "--worker-urls", first.url,
        "--max-connections", "8",
        "--timeout", "30",
        "--health-check-interval", "1",
        "--health-check-failure-threshold", "2",
        "--routing-algorithm", "round-robin",
        "--verbose",
    ])
    wait_until("the worker to be routable", lambda: call(router.url, "GET", "/health").json()["healthy_workers"] == 1 or None)
    added = call(router.url, "POST", f"/add_worker?url={second.url}")
    assert added.status == 200 and added.json()["worker_urls"] == [first.url, second.url]
    assert call(router.url, "GET", "/list_workers").json() == {"urls": [first.url, second.url]}
    image = call(router.url, "POST", "/generate", {"prompt": "a cat", "size": "256x256", "num_inference_steps": 2})
    assert image.status == 200, image.body
    wait_until("the video worker to be routable", lambda: call(router.url, "GET", "/health").json()["healthy_workers"] == 2 or None)
    video = call(router.url, "POST", "/generate_video", {"prompt": "waves", "seconds": 1})
    assert video.status == 200, video.body
    assert "GET /list_workers" in router.output()  # --verbose: the access log
