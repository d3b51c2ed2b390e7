#!/usr/bin/env python3
"""
Benchmark the router against simulated workers, all on 127.0.0.1.

Two modes:

  - Request mode (default): start N fast simulated image workers and the router,
    drive small C{POST /v1/images/generations} requests at a fixed concurrency
    (one persistent C{http.client} connection per client thread) for a number
    of requests or seconds, then drive the same load straight at one worker.
    Reports requests/s, latency p50/p95/p99, errors, the router's CPU time per
    request (utime+stime from C{/proc/<pid>/stat}) and its RSS.

  - Stream mode (C{--stream-mb N}): one simulated video worker whose MP4 is
    N MB; download it through the router and straight from the worker and
    report MB/s and the router's peak-RSS (VmHWM) growth.

  - Workload mode (C{--workload FILE}): send a given list of image and video
    requests, each at its own arrival time (open loop: a request is sent at
    its time whether or not earlier ones have finished), poll every video
    job until it has completed, and report the makespan (first arrival to
    last completion), latency from each request's arrival time, and the
    router's CPU. C{bench_routing_algorithms.py} writes these files for its
    batch and Poisson scenarios.

The router is started as C{python -m twisted_router}, or with C{--router-launcher demo} as
C{examples/diffusion_router/demo.py} (the demo router's script, same flags). C{--output-file}
writes the request-mode figures as JSON for C{bench_routing_algorithms.py}.

Stdlib only (plus this package, which provides the router and the simulator).
Every process is started in its own process group on an ephemeral port and is
always stopped, whatever happens (try/finally, SIGTERM then SIGKILL).

    python examples/diffusion_router/bench_router.py --requests 3000 --concurrency 16
    python examples/diffusion_router/bench_router.py --stream-mb 200
    python examples/diffusion_router/bench_router.py --workload batch.json --worker-speeds 1,1,1,0.25
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
MB = 1_000_000
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEMO = Path(__file__).resolve().with_name("demo.py")


# -- processes --------------------------------------------------------------------------------


@dataclass
class Server:
    """A child process in its own process group, serving at C{url}."""

    name: str
    popen: subprocess.Popen[str]
    url: str = ""
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    seen_url: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            if not self.url:
                match = LISTENING.search(line)
                if match:
                    self.url = match.group(1)
                    self.seen_url.set()

    def stop(self, grace: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is not None and sig == signal.SIGTERM:
                continue
            try:
                os.killpg(self.popen.pid, sig)  # the whole group: children too
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


class Fleet:
    """Starts servers and stops every one of them on exit."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, name: str, argv: Sequence[str], timeout: float = 30.0) -> Server:
        return self.wait(self.spawn(name, argv), timeout)

    def spawn(self, name: str, argv: Sequence[str]) -> Server:
        """Start a server without waiting for it to listen (see L{wait})."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        server = Server(name, popen)
        self.servers.append(server)
        threading.Thread(target=server.pump, daemon=True).start()
        return server

    def wait(self, server: Server, timeout: float = 30.0) -> Server:
        """Wait until C{server} reports its listening URL."""
        if not server.seen_url.wait(timeout):
            raise RuntimeError(
                f"{server.name} did not report a listening URL within {timeout}s "
                f"(exit={server.popen.poll()}):\n{''.join(server.lines)}"
            )
        return server

    def worker(self, name: str, *args: str) -> Server:
        return self.start(name, self.worker_argv(name, *args))

    def workers(self, specs: Sequence[tuple[str, Sequence[str]]]) -> list[Server]:
        """Start several simulated workers at once (they start in parallel), then wait for each."""
        started = [self.spawn(name, self.worker_argv(name, *args)) for name, args in specs]
        return [self.wait(server) for server in started]

    @staticmethod
    def worker_argv(name: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "twisted_router.simulator", "--host", HOST, "--port", "0",
                "--worker-id", name, *args]

    def router(self, workers: Sequence[Server], *args: str, launcher: str = "module") -> Server:
        program = [sys.executable, str(DEMO)] if launcher == "demo" else [sys.executable, "-m", "twisted_router"]
        argv = [*program, "--host", HOST, "--port", "0", *args, "--worker-urls", *(w.url for w in workers)]
        router = self.start("router", argv)
        wait_for_workers(router.url, len(workers))
        return router

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()


@contextmanager
def fleet() -> Iterator[Fleet]:
    procs = Fleet()
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield procs
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid}, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" closing comm, field 3 (state) is index 0, so utime (14) is 11, stime (15) 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of C{pid}, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


# -- HTTP -------------------------------------------------------------------------------------


def connect(url: str, timeout: float = 60.0) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(url: str, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = connect(url, timeout)
    try:
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_workers(router_url: str, count: int, timeout: float = 30.0) -> None:
    """Poll C{GET /workers} until C{count} workers are registered with a known task type."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = call(router_url, "GET", "/workers", timeout=5.0)
            workers = json.loads(body)["workers"] if status == 200 else []
            if len(workers) == count and all(w.get("task_type") for w in workers):
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the router at {router_url} did not know its {count} workers within {timeout}s")


# -- request load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    label: str
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    error_samples: list[str]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mean(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else float("nan")

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank]


def drive(
    label: str,
    url: str,
    payload: dict[str, Any],
    concurrency: int,
    requests: int,
    duration: float,
) -> LoadResult:
    """C{concurrency} threads, each with one persistent connection, until C{requests} or C{duration}."""
    body = json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration

    def take() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.monotonic() >= deadline:
                return False
            issued += 1
            return True

    def client() -> None:
        conn = connect(url)
        try:
            while take():
                started = time.perf_counter()
                try:
                    conn.request("POST", "/v1/images/generations", body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    elapsed = time.perf_counter() - started
                    if response.status != 200:
                        with lock:
                            errors.append(f"{response.status} {data[:200]!r}")
                        continue
                    with lock:
                        latencies.append(elapsed)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors.append(repr(exc))
                    conn.close()
                    conn = connect(url)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    seconds = time.perf_counter() - started
    return LoadResult(label, len(latencies) + len(errors), len(errors), seconds, latencies, errors[:5])


def report_load(result: LoadResult, extra: str = "") -> None:
    ms = 1000
    print(
        f"  {result.label:<28} {result.requests:>6} req in {result.seconds:6.2f}s = "
        f"{result.rate:8.1f} req/s | latency p50 {result.percentile(50) * ms:6.1f} ms  "
        f"p95 {result.percentile(95) * ms:6.1f} ms  p99 {result.percentile(99) * ms:6.1f} ms | "
        f"errors {result.errors}{extra}"
    )
    for sample in result.error_samples:
        print(f"    error: {sample}")


def request_mode(args: argparse.Namespace) -> int:
    payload = {
        "prompt": "benchmark",
        "size": args.size,
        "num_inference_steps": 8,
        "response_format": "b64_json",
    }
    worker_args = ["--step-ms", str(args.step_ms), "--image-bytes", str(args.image_bytes)]
    speeds = args.worker_speeds or [1.0] * args.workers
    print(f"machine: {machine()}")
    print(
        f"load: {args.concurrency} connections, up to {args.requests} requests or {args.duration}s, "
        f"{len(speeds)} workers (speeds {', '.join(f'{v:g}' for v in speeds)}; --step-ms {args.step_ms}, "
        f"{args.size}, --image-bytes {args.image_bytes}), routing {args.routing_algorithm}, "
        f"router started {'by demo.py' if args.router_launcher == 'demo' else 'as python -m twisted_router'}"
    )
    warmup = args.warmup if args.warmup is not None else max(args.concurrency * 4, 50)
    direct: LoadResult | None = None
    with fleet() as procs:
        workers = procs.workers([(f"w{i}", [*worker_args, "--speed", str(v)]) for i, v in enumerate(speeds)])
        router = procs.router(
            workers, "--routing-algorithm", args.routing_algorithm, *shlex.split(args.router_args),
            launcher=args.router_launcher,
        )

        drive("warm-up", router.url, payload, args.concurrency, warmup, args.duration)
        served0 = served_per_worker(router.url)
        cpu0 = cpu_seconds(router.pid)
        worker_cpu0 = sum(cpu_seconds(w.pid) for w in workers)
        via_router = drive("through the router", router.url, payload, args.concurrency,
                           args.requests, args.duration)
        router_cpu = cpu_seconds(router.pid) - cpu0
        worker_cpu = sum(cpu_seconds(w.pid) for w in workers) - worker_cpu0
        mem = memory_kb(router.pid)
        served = {url: n - served0.get(url, 0) for url, n in served_per_worker(router.url).items()}

        if not args.no_direct:
            drive("warm-up", workers[0].url, payload, args.concurrency, warmup, args.duration)
            direct_cpu0 = cpu_seconds(workers[0].pid)
            direct = drive("direct to one worker", workers[0].url, payload, args.concurrency,
                           args.requests, args.duration)
            direct_cpu = cpu_seconds(workers[0].pid) - direct_cpu0

    done = max(1, via_router.requests)
    print("results:")
    report_load(via_router)
    if direct is not None:
        report_load(direct)
    print(
        f"  router CPU: {router_cpu:.2f}s for {via_router.requests} requests = "
        f"{router_cpu / done * 1e3:.3f} ms/request "
        f"({router_cpu / via_router.seconds * 100:.0f}% of one core)"
    )
    print(f"  worker CPU: {worker_cpu / done * 1e3:.3f} ms/request behind the router"
          + (f", {direct_cpu / max(1, direct.requests) * 1e3:.3f} ms/request direct" if direct is not None else ""))
    print(f"  router memory after the run: VmRSS {mem['VmRSS'] / 1024:.1f} MiB, "
          f"VmHWM {mem['VmHWM'] / 1024:.1f} MiB")
    print("  requests per worker: " + ", ".join(
        f"{w.name} (speed {v:g}) {served.get(w.url, 0)}" for w, v in zip(workers, speeds, strict=True)
    ))
    if direct is not None and direct.rate:
        print(f"  router/direct throughput: {via_router.rate / direct.rate:.2f}x; "
              f"added p50 latency {1000 * (via_router.percentile(50) - direct.percentile(50)):+.1f} ms")
    if args.output_file:
        summary = {
            "mode": "request",
            "routing_algorithm": args.routing_algorithm,
            "router_args": shlex.split(args.router_args),
            "router_launcher": args.router_launcher,
            "concurrency": args.concurrency,
            "requests": via_router.requests,
            "completed_requests": via_router.requests - via_router.errors,
            "failed_requests": via_router.errors,
            "duration_s": via_router.seconds,
            "throughput_rps": via_router.rate,
            "latency_mean_s": via_router.mean,
            "latency_p50_s": via_router.percentile(50),
            "latency_p95_s": via_router.percentile(95),
            "latency_p99_s": via_router.percentile(99),
            "router_cpu_ms_per_request": router_cpu / done * 1e3,
            "workers": [
                {"name": w.name, "speed": v, "requests": served.get(w.url, 0)}
                for w, v in zip(workers, speeds, strict=True)
            ],
            "error_samples": via_router.error_samples,
        }
        Path(args.output_file).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"  figures written to {args.output_file}")
    return 1 if via_router.errors or (direct is not None and direct.errors) else 0


# -- workload mode -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """One workload request: when it was due, when it finished, and whether it failed."""

    index: int
    kind: str
    due: float
    finished: float | None = None
    error: str | None = None


#: Workload mode's warm-up request: one large image of few steps, so its time is GPU time.
WARMUP_PAYLOAD: dict[str, Any] = {
    "prompt": "warm-up", "size": "1024x1024", "num_inference_steps": 4, "response_format": "b64_json",
}


def load_workload(path: str) -> list[dict[str, Any]]:
    """
    The requests of a workload file, in arrival order.

    The file is C{{"requests": [{"at": s, "kind": "image"|"video", "size": "WxH", "steps": n,
    "num_frames": f (videos), "n": k (images, optional)}, ...]}}; C{at} is seconds after the
    first request.
    """
    document = json.loads(Path(path).read_text())
    requests = document.get("requests") if isinstance(document, dict) else None
    if not isinstance(requests, list) or not requests:
        raise ValueError(f"{path}: expected {{\"requests\": [...]}} with at least one request")
    for i, item in enumerate(requests):
        if not isinstance(item, dict) or item.get("kind") not in ("image", "video"):
            raise ValueError(f"{path}: request {i} has no kind 'image' or 'video'")
        if not isinstance(item.get("at", 0), (int, float)) or item.get("at", 0) < 0:
            raise ValueError(f"{path}: request {i} has a negative or non-numeric 'at'")
    return sorted(requests, key=lambda r: float(r.get("at", 0)))


def request_body(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of one workload request (what an RL rollout client sends)."""
    body: dict[str, Any] = {"prompt": "benchmark", "size": item["size"], "num_inference_steps": item["steps"]}
    if item["kind"] == "video":
        body["num_frames"] = item.get("num_frames", 1)
        return "/v1/videos", body
    body["response_format"] = "b64_json"
    if "n" in item:
        body["n"] = item["n"]
    return "/v1/images/generations", body


def run_one_request(url: str, item: dict[str, Any], outcome: Outcome, poll_s: float, deadline: float) -> None:
    """
    Send one workload request at its due time; for a video job, poll it until it completes.

    An image is done when its answer has been read; a video job when a poll
    sees C{completed} (so its time is known to within C{poll_s}). Any other
    status, a failed job or the deadline is recorded as the request's error.
    """
    path, body = request_body(item)
    delay = outcome.due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    conn = connect(url, timeout=max(5.0, deadline - time.monotonic()))
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            outcome.error = f"POST {path} -> {response.status} {data[:200]!r}"
            return
        if item["kind"] == "image":
            outcome.finished = time.monotonic()
            return
        video_id = json.loads(data)["id"]
        while time.monotonic() < deadline:
            conn.request("GET", f"/v1/videos/{video_id}")
            response = conn.getresponse()
            data = response.read()
            status = json.loads(data).get("status") if response.status == 200 else None
            if status == "completed":
                outcome.finished = time.monotonic()
                return
            if status not in ("queued", "in_progress"):
                outcome.error = f"video {video_id}: GET -> {response.status} {data[:200]!r}"
                return
            time.sleep(poll_s)
        outcome.error = f"video {video_id} not completed by the deadline"
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        outcome.error = repr(exc)
    finally:
        conn.close()


def run_workload(url: str, items: Sequence[dict[str, Any]], poll_s: float, duration: float) -> list[Outcome]:
    """
    Send every request at its arrival time (open loop), each on its own thread
    and connection, and wait for all of them (at most C{duration} seconds).
    """
    start = time.monotonic() + 0.05  # every thread is started before the first is due
    deadline = start + duration
    outcomes = [Outcome(i, item["kind"], start + float(item.get("at", 0))) for i, item in enumerate(items)]
    with ThreadPoolExecutor(max_workers=min(512, len(items))) as pool:
        for item, outcome in zip(items, outcomes, strict=True):
            pool.submit(run_one_request, url, item, outcome, poll_s, deadline)
    return outcomes


def workload_mode(args: argparse.Namespace) -> int:
    items = load_workload(args.workload)
    speeds = args.worker_speeds or [1.0] * args.workers
    worker_args = ["--step-ms", str(args.step_ms), "--image-bytes", str(args.image_bytes),
                   "--task-type", args.task_type]
    router_args = shlex.split(args.router_args)
    videos = sum(1 for i in items if i["kind"] == "video")
    warmup = args.warmup or 0
    print(f"machine: {machine()}")
    print(
        f"workload: {len(items)} requests ({videos} video jobs) from {args.workload}, over "
        f"{max(float(i.get('at', 0)) for i in items):.2f}s of arrivals; {len(speeds)} {args.task_type} workers "
        f"(speeds {', '.join(f'{v:g}' for v in speeds)}; --step-ms {args.step_ms}), routing "
        f"{args.routing_algorithm} {shlex.join(router_args)}, router started "
        f"{'by demo.py' if args.router_launcher == 'demo' else 'as python -m twisted_router'}, "
        f"{warmup} warm-up requests ({WARMUP_PAYLOAD['size']}, {WARMUP_PAYLOAD['num_inference_steps']} steps)"
    )
    with fleet() as procs:
        workers = procs.workers([(f"w{i}", [*worker_args, "--speed", str(v)]) for i, v in enumerate(speeds)])
        router = procs.router(workers, "--routing-algorithm", args.routing_algorithm, *router_args,
                              launcher=args.router_launcher)
        if warmup:
            # What a router that has been serving a while knows: each worker's speed, from a few
            # completions. One connection per worker, so every worker gets some.
            drive("warm-up", router.url, WARMUP_PAYLOAD, len(workers), warmup, args.duration)
        served0 = generations_per_worker(workers)
        cpu0 = cpu_seconds(router.pid)
        outcomes = run_workload(router.url, items, args.poll_interval, args.duration)
        router_cpu = cpu_seconds(router.pid) - cpu0
        served = {url: n - served0.get(url, 0) for url, n in generations_per_worker(workers).items()}
        status, body = call(router.url, "GET", "/workers", timeout=10.0)
        router_view = json.loads(body).get("workers", []) if status == 200 else []

    done = [o for o in outcomes if o.finished is not None and o.error is None]
    failed = [o for o in outcomes if o not in done]
    first = min(o.due for o in outcomes)
    makespan = max((o.finished for o in done if o.finished is not None), default=first) - first
    result = LoadResult("through the router", len(outcomes), len(failed), makespan,
                        [o.finished - o.due for o in done if o.finished is not None],
                        [f"request {o.index} ({o.kind}): {o.error or 'unfinished'}" for o in failed[:5]])
    print("results:")
    report_load(result)
    print(f"  makespan (first arrival to last completion): {makespan:.3f}s")
    print(f"  router CPU: {router_cpu:.2f}s for {len(outcomes)} requests = "
          f"{router_cpu / len(outcomes) * 1e3:.3f} ms/request (video polls included)")
    print("  requests per worker: " + ", ".join(
        f"{w.name} (speed {v:g}) {served.get(w.url, 0)}" for w, v in zip(workers, speeds, strict=True)
    ))
    if args.output_file:
        summary = {
            "mode": "workload",
            "routing_algorithm": args.routing_algorithm,
            "router_args": router_args,
            "router_launcher": args.router_launcher,
            "warmup_requests": warmup,
            "requests": len(outcomes),
            "video_requests": videos,
            "completed_requests": len(done),
            "failed_requests": len(failed),
            "duration_s": makespan,
            "makespan_s": makespan,
            "throughput_rps": result.rate,
            "latency_mean_s": result.mean,
            "latency_p50_s": result.percentile(50),
            "latency_p95_s": result.percentile(95),
            "latency_p99_s": result.percentile(99),
            "router_cpu_ms_per_request": router_cpu / len(outcomes) * 1e3,
            "workers": [
                {"name": w.name, "speed": v, "requests": served.get(w.url, 0)}
                for w, v in zip(workers, speeds, strict=True)
            ],
            "router_workers": router_view,
            "error_samples": result.error_samples,
        }
        Path(args.output_file).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"  figures written to {args.output_file}")
    return 1 if failed else 0


def generations_per_worker(workers: Sequence[Server]) -> dict[str, int]:
    """
    Generations each simulated worker has run (its C{/sim/state} C{served}), by URL.
    The router's C{total_requests} would count the video polls too.
    """
    out: dict[str, int] = {}
    for worker in workers:
        status, body = call(worker.url, "GET", "/sim/state", timeout=10.0)
        if status != 200:
            raise RuntimeError(f"GET {worker.url}/sim/state -> {status} {body[:200]!r}")
        out[worker.url] = int(json.loads(body)["served"])
    return out


def served_per_worker(router_url: str) -> dict[str, int]:
    """The router's C{total_requests} of each worker (by URL)."""
    status, body = call(router_url, "GET", "/workers", timeout=10.0)
    if status != 200:
        raise RuntimeError(f"GET /workers -> {status} {body[:200]!r}")
    return {w["url"]: int(w["total_requests"]) for w in json.loads(body)["workers"]}


# -- streaming ---------------------------------------------------------------------------------


def download(url: str, path: str) -> tuple[int, float]:
    """GET C{path} in 1 MiB reads, discarding the data; return (bytes, seconds)."""
    conn = connect(url, timeout=120.0)
    started = time.perf_counter()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"GET {path} -> {response.status} {response.read(300)!r}")
        received = 0
        while chunk := response.read(MIB):
            received += len(chunk)
    finally:
        conn.close()
    return received, time.perf_counter() - started


def stream_mode(args: argparse.Namespace) -> int:
    size = int(args.stream_mb * MB)
    print(f"machine: {machine()}")
    print(f"stream: one T2V worker, MP4 of {size} bytes, {args.stream_repeats} downloads each way")
    with fleet() as procs:
        worker = procs.worker("video", "--task-type", "T2V", "--step-ms", "0.01",
                              "--video-bytes", str(size))
        router = procs.router([worker], launcher=args.router_launcher)
        status, body = call(router.url, "POST", "/v1/videos", {"prompt": "waves", "seconds": 1})
        if status != 200:
            raise RuntimeError(f"POST /v1/videos -> {status} {body[:300]!r}")
        video_id = json.loads(body)["id"]
        deadline = time.monotonic() + 60
        while json.loads(call(router.url, "GET", f"/v1/videos/{video_id}")[1])["status"] != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError("the video job did not complete within 60s")
            time.sleep(0.05)
        path = f"/v1/videos/{video_id}/content"

        mem0 = memory_kb(router.pid)
        cpu0 = cpu_seconds(router.pid)
        routed = [download(router.url, path) for _ in range(args.stream_repeats)]
        router_cpu = cpu_seconds(router.pid) - cpu0
        mem1 = memory_kb(router.pid)
        direct = [download(worker.url, path) for _ in range(args.stream_repeats)]

    bad = [n for n, _ in routed + direct if n != size]
    if bad:
        print(f"  short download(s): {bad} bytes instead of {size}")

    def rates(runs: list[tuple[int, float]]) -> str:
        values = sorted(n / MB / s for n, s in runs)
        return f"median {values[len(values) // 2]:.0f} MB/s (runs: {', '.join(f'{v:.0f}' for v in values)})"

    print("results:")
    print(f"  through the router: {rates(routed)}")
    print(f"  direct from worker: {rates(direct)}")
    total = sum(n for n, _ in routed)
    print(f"  router CPU: {router_cpu:.2f}s for {total / MB:.0f} MB = "
          f"{router_cpu / (total / 1e9):.2f} s/GB")
    print(
        f"  router memory: VmRSS {mem0['VmRSS'] / 1024:.1f} -> {mem1['VmRSS'] / 1024:.1f} MiB, "
        f"peak VmHWM {mem0['VmHWM'] / 1024:.1f} -> {mem1['VmHWM'] / 1024:.1f} MiB "
        f"(growth {(mem1['VmHWM'] - mem0['VmHWM']) / 1024:.1f} MiB)"
    )
    return 1 if bad else 0


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=2, help="simulated image workers")
    parser.add_argument("--concurrency", type=int, default=16, help="client connections (threads)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per measured run")
    parser.add_argument("--duration", type=float, default=60.0, help="longest measured run, seconds")
    parser.add_argument("--routing-algorithm", default="least-request",
                        help="the router's --routing-algorithm (the router checks the name)")
    parser.add_argument("--router-args", default="", metavar="'ARGS'",
                        help="more router options, as one shell-quoted string "
                        "(e.g. '--max-inflight-per-worker 1')")
    parser.add_argument("--image-bytes", type=int, default=2048,
                        help="size of each generated image (returned as b64_json)")
    parser.add_argument("--size", default="256x256", help="requested image size")
    parser.add_argument("--step-ms", type=float, default=0.1,
                        help="simulated ms per step of a 1024x1024 image (small = fast workers)")
    parser.add_argument("--worker-speeds", type=_speeds, default=None, metavar="S,S,...",
                        help="one simulated worker per value, with that --speed (1 = normal, 0.5 = half "
                        "as fast); overrides --workers")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up requests before each measured run (default: 4 x concurrency, at least 50; "
                        "none in workload mode)")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the run straight at one worker (request mode)")
    parser.add_argument("--router-launcher", choices=["module", "demo"], default="module",
                        help="start the router as python -m twisted_router, or with examples/diffusion_router/demo.py")
    parser.add_argument("--output-file", default=None, metavar="PATH",
                        help="write the request-mode figures as JSON here")
    parser.add_argument("--stream-mb", type=float, default=None,
                        help="stream mode: download an N MB (10^6 bytes) video instead")
    parser.add_argument("--stream-repeats", type=int, default=3, help="downloads each way in stream mode")
    parser.add_argument("--workload", default=None, metavar="FILE",
                        help="workload mode: send the requests of this JSON file at their arrival times")
    parser.add_argument("--task-type", default="TI2V",
                        help="workload mode: the workers' simulator --task-type (TI2V serves images and videos)")
    parser.add_argument("--poll-interval", type=float, default=0.02,
                        help="workload mode: seconds between polls of a video job")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        parser.error("--workers, --concurrency, --requests and --duration must be positive")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def _speeds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every speed must be a positive number, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stream_mb is not None:
        return stream_mode(args)
    if args.workload is not None:
        return workload_mode(args)
    return request_mode(args)


if __name__ == "__main__":
    sys.exit(main())
