"""
The simulator as a real process on 127.0.0.1, and the conformance probe against it.

Few and fast: every wait has a timeout and every process is stopped (its
whole process group) by L{running}, whatever happens.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ServerProcess, python_module, running

REPO = Path(__file__).resolve().parents[2]
CHECK_WORKER = REPO / "sglang" / "check_worker.py"
SIM = "twisted_router.simulator"


def _request(url: str, body: Any = None, method: str | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _check_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_WORKER), *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def _rss_kb(proc: ServerProcess) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_serves_the_api_and_names_itself() -> None:
    with running(python_module(SIM, "--port", "0", "--worker-id", "w-int")) as proc:
        code, headers, body = _request(proc.url + "/health")
        assert (code, json.loads(body)) == (200, {"status": "ok"})
        assert headers["x-worker-id"] == "w-int"
        code, _, body = _request(proc.url + "/v1/images/generations", {"prompt": "x", "response_format": "b64_json"})
        assert code == 200 and len(json.loads(body)["data"]) == 1


def test_startup_delay_refuses_connections_until_the_port_opens() -> None:
    port = _free_port()
    argv = python_module(SIM, "--port", str(port), "--startup-delay", "1.0")
    with running(argv, wait_url=False) as proc:
        proc.wait_for_line(r"the port opens in", timeout=20)
        seen_loading = time.monotonic()
        assert _refused(port)
        proc.wait_for_line(r"listening on http://127\.0\.0\.1:\d+", timeout=20)
        assert time.monotonic() - seen_loading >= 0.8
        assert proc.url == f"http://127.0.0.1:{port}"
        assert _request(proc.url + "/health")[0] == 200


@pytest.mark.parametrize("task", ["T2I", "I2I", "T2V"])
def test_check_worker_passes_against_the_simulator(task: str) -> None:
    with running(python_module(SIM, "--port", "0", "--task-type", task)) as proc:
        result = _check_worker(proc.url, "--update-model-path", "/ckpt/probe", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: PASS" in result.stdout
    assert "\nFAIL" not in result.stdout
    assert "PASS  diffusion.generate" in result.stdout
    assert "PASS  sleep.generation_rejected" in result.stdout


def test_check_worker_reports_a_missing_rollout_endpoint_as_info() -> None:
    argv = python_module(SIM, "--port", "0", "--disable-endpoint", "/rollout/generate")
    with running(argv) as proc:
        result = _check_worker(proc.url, "--skip-control")
    assert result.returncode == 0, result.stdout
    assert "INFO  rollout.generate: not available in this version" in result.stdout


def test_check_worker_fails_against_a_non_conformant_worker() -> None:
    argv = python_module(SIM, "--port", "0", "--disable-endpoint", "/v1/model_info")
    with running(argv) as proc:
        result = _check_worker(proc.url, "--skip-control")
    assert result.returncode == 1
    assert "FAIL  model_info: expected status 200, got 404" in result.stdout
    assert "RESULT: FAIL" in result.stdout


def test_check_worker_fails_when_nothing_listens() -> None:
    result = _check_worker(f"http://127.0.0.1:{_free_port()}", "--timeout", "5")
    assert result.returncode == 1
    assert "FAIL  health: connection refused" in result.stdout
    assert "RESULT: FAIL" in result.stdout


def test_sigstop_hangs_the_worker_and_sigcont_resumes_it() -> None:
    with running(python_module(SIM, "--port", "0")) as proc:
        proc.popen.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises((TimeoutError, urllib.error.URLError)):
                _request(proc.url + "/health", timeout=0.5)
        finally:
            proc.popen.send_signal(signal.SIGCONT)
        assert _request(proc.url + "/health")[0] == 200


def test_a_200_mb_video_streams_with_bounded_memory() -> None:
    size = 200_000_000
    argv = python_module(SIM, "--port", "0", "--task-type", "T2V", "--video-bytes", str(size))
    with running(argv) as proc:
        code, _, body = _request(proc.url + "/v1/videos", {"prompt": "x", "num_frames": 1, "size": "64x64"})
        assert code == 200
        video_id = json.loads(body)["id"]
        deadline = time.monotonic() + 20
        while json.loads(_request(f"{proc.url}/v1/videos/{video_id}")[2])["status"] != "completed":
            assert time.monotonic() < deadline, "video job did not complete"
            time.sleep(0.02)
        baseline = _rss_kb(proc)
        peak = baseline
        total = 0
        with urllib.request.urlopen(f"{proc.url}/v1/videos/{video_id}/content", timeout=30) as resp:
            assert resp.headers["Content-Type"] == "video/mp4"
            assert int(resp.headers["Content-Length"]) == size
            first = resp.read(16)
            assert first[4:8] == b"ftyp"
            total = len(first)
            while chunk := resp.read(1 << 20):
                total += len(chunk)
                if total % (16 << 20) < (1 << 20):
                    peak = max(peak, _rss_kb(proc))
        peak = max(peak, _rss_kb(proc))
    assert total == size
    # The body is produced 64 KiB at a time from one shared zero block.
    assert peak - baseline < 40_000, f"RSS grew from {baseline} kB to {peak} kB"
