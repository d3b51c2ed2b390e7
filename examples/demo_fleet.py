#!/usr/bin/env python3
"""
Start a router in front of simulated workers on this machine, for trying the
API by hand: an image worker, a video worker and the router. Ctrl-C stops all
three.

    python examples/demo_fleet.py --port 30081

Everything binds to 127.0.0.1. The workers are CPU simulators that speak the
real SGLang diffusion worker API (see docs/simulator.md).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")


def start(argv: list[str], label: str) -> tuple[subprocess.Popen[str], str]:
    """Start one server on an ephemeral port and return it with the URL it reports."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        sys.stdout.write(f"[{label}] {line}")
        match = LISTENING.search(line)
        if match:
            return proc, match.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"{label} did not start: {' '.join(argv)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=30081, help="router port")
    args = parser.parse_args()
    python = sys.executable
    procs: list[subprocess.Popen[str]] = []
    try:
        image, image_url = start(
            [python, "-m", "twisted_router.simulator", "--host", "127.0.0.1", "--port", "0",
             "--task-type", "T2I", "--worker-id", "sim-image"],
            "sim-image",
        )
        procs.append(image)
        video, video_url = start(
            [python, "-m", "twisted_router.simulator", "--host", "127.0.0.1", "--port", "0",
             "--task-type", "T2V", "--worker-id", "sim-video"],
            "sim-video",
        )
        procs.append(video)
        router, router_url = start(
            [python, "-m", "twisted_router", "--host", "127.0.0.1", "--port", str(args.port),
             "--worker-urls", image_url, video_url],
            "router",
        )
        procs.append(router)
        print(f"\nRouter ready at {router_url}. Try:\n"
              f"  curl -s {router_url}/health\n"
              f"  curl -s {router_url}/workers\n"
              f"  curl -s {router_url}/v1/images/generations -H 'content-type: application/json' "
              f"-d '{{\"prompt\": \"a red fox\", \"size\": \"512x512\"}}'\n"
              "Ctrl-C stops the router and the workers.\n", flush=True)
        assert router.stdout is not None
        for line in router.stdout:
            sys.stdout.write(f"[router] {line}")
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
