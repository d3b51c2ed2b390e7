#!/usr/bin/env python3
"""
An RL controller driving a diffusion fleet through twisted_router, the way a
trainer does: rollout -> sleep -> train -> wake -> refit, N times.

It uses only `requests` (`pip install requests`). Every sample's `X-Weight-Version` header is checked
against the version the rollout should be using, so an off-policy sample (one
generated with stale weights) is caught and reported.

    python examples/rl_loop.py --router http://127.0.0.1:30081 --iterations 3

"Training" is a pause and a made-up checkpoint path: simulated workers load
paths under their weights_prefix (examples/simulated_launcher.yaml sets
/tmp/rl-loop/, this script's default). Against real workers, pass --checkpoint-template with
a path each worker can read (e.g. a shared filesystem).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests


class LoopError(RuntimeError):
    """A control call failed or a sample came from the wrong weights."""


def post(session: requests.Session, url: str, payload: dict, timeout: float) -> dict:
    response = session.post(url, json=payload, timeout=timeout)
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:200]}
    if response.status_code != 200:
        raise LoopError(f"POST {url} -> {response.status_code}: {body}")
    return body


def rollout(router: str, batch: int, concurrency: int, steps: int, timeout: float) -> tuple[Counter[str], float]:
    """Generate `batch` samples concurrently; return the weight versions seen and the elapsed time."""

    def one(i: int) -> str:
        response = requests.post(
            f"{router}/v1/diffusion/generate",
            json={"prompt": f"sample {i}", "get_log_probs": True, "num_inference_steps": steps,
                  "width": 256, "height": 256, "seed": i},
            timeout=timeout,
        )
        if response.status_code != 200:
            raise LoopError(f"generation {i} -> {response.status_code}: {response.text[:200]}")
        sample = response.json()
        if not sample.get("trajectory") or not sample["trajectory"].get("log_probs"):
            raise LoopError(f"generation {i} returned no log-probs")
        return response.headers.get("X-Weight-Version", "<missing>")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        versions = Counter(pool.map(one, range(batch)))
    return versions, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="http://127.0.0.1:30081")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="generations per rollout")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per generation")
    parser.add_argument("--train-seconds", type=float, default=0.5, help="stand-in for the training step")
    parser.add_argument("--checkpoint-template", default="/tmp/rl-loop/checkpoint-{step}")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for any one call")
    args = parser.parse_args()
    router = args.router.rstrip("/")
    session = requests.Session()

    health = session.get(f"{router}/health", timeout=30).json()
    if health.get("status") != "healthy":
        print(f"router is not healthy: {health}", file=sys.stderr)
        return 1
    expected = str(health["weight_version"])
    print(f"fleet: {health['healthy_workers']} routable worker(s), weights version {expected}")

    try:
        for step in range(1, args.iterations + 1):
            versions, rollout_s = rollout(router, args.batch, args.concurrency, args.steps, args.timeout)
            off_policy = {v: n for v, n in versions.items() if v != expected}
            if off_policy:
                raise LoopError(f"iteration {step}: off-policy samples {off_policy} (expected version {expected})")

            t = time.monotonic()
            slept = post(session, f"{router}/release_memory_occupation", {}, args.timeout)
            sleep_s = time.monotonic() - t
            if not slept.get("success"):
                raise LoopError(f"sleep failed: {slept}")

            time.sleep(args.train_seconds)  # the trainer owns the GPUs now
            checkpoint = args.checkpoint_template.format(step=step)

            t = time.monotonic()
            woke = post(session, f"{router}/resume_memory_occupation", {}, args.timeout)
            wake_s = time.monotonic() - t
            if not woke.get("success"):
                raise LoopError(f"wake failed: {woke}")

            t = time.monotonic()
            refit = post(session, f"{router}/update_weights_from_disk",
                         {"model_path": checkpoint, "weight_version": step}, args.timeout)
            refit_s = time.monotonic() - t
            expected = str(refit["weight_version"])

            print(
                f"iteration {step}: rollout {args.batch} samples in {rollout_s:.2f}s "
                f"({args.batch / rollout_s:.1f}/s) on versions {dict(versions)}; "
                f"sleep {sleep_s:.2f}s, train {args.train_seconds:.2f}s, wake {wake_s:.2f}s, "
                f"refit {refit_s:.2f}s -> version {expected} on {len(refit['results'])} worker(s)",
                flush=True,
            )
        versions, rollout_s = rollout(router, args.batch, args.concurrency, args.steps, args.timeout)
        if set(versions) != {expected}:
            raise LoopError(f"final rollout: versions {dict(versions)}, expected {expected}")
        print(f"final rollout: {args.batch} samples in {rollout_s:.2f}s, all on version {expected}")
    except (LoopError, requests.RequestException) as exc:
        print(f"RL loop failed: {exc}", file=sys.stderr)
        return 1
    print(f"completed {args.iterations} iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
