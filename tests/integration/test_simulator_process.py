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
    argv = python_module(SIM, "--port", "0", "--task-type", task, "--weights-prefix", "/ckpt/")
    with running(argv) as proc:
        result = _check_worker(proc.url, "--update-model-path", "/ckpt/probe", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: PASS" in result.stdout
    assert "\nFAIL" not in result.stdout
    assert "PASS  diffusion.generate" in result.stdout
    assert "PASS  sleep.generation_rejected" in result.stdout
    assert "PASS  update_weights.refused" in result.stdout
    assert "INFO  version: pinned fork" in result.stdout
    if task == "T2V":
        assert "PASS  videos.range" in result.stdout and "PASS  videos.list_order" in result.stdout
    else:
        assert "PASS  images.range" in result.stdout and "PASS  images.bad_size" in result.stdout


@pytest.mark.parametrize("rollout_format", ["msgpack", "json"])
def test_check_worker_passes_against_the_upstream_simulator_warming_up(rollout_format: str) -> None:
    argv = python_module(
        SIM, "--port", "0", "--api-version", "upstream", "--rollout-format", rollout_format,
        "--warmup-seconds", "1", "--weights-prefix", "/ckpt/",
    )
    with running(argv) as proc:
        result = _check_worker(proc.url, "--update-model-path", "/ckpt/probe", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\nFAIL" not in result.stdout
    for line in (
        "PASS  rollout.generate", "PASS  rollout.no_seed", "PASS  liveness", "PASS  server_info",
        "INFO  diffusion.generate: not available", "INFO  version: upstream",
    ):
        assert line in result.stdout, line


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


def _read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length body (none for HEAD is up to the caller)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-headers: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (ln.partition(b":") for ln in lines)}
    return status, headers, rest


def test_idle_keep_alive_connections_are_closed_like_uvicorn() -> None:
    argv = python_module(SIM, "--port", "0", "--keep-alive-timeout", "0.5")
    with running(argv) as proc:
        port = int(proc.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: w\r\n\r\n")
            status, headers, body = _read_response(sock)
            assert status.startswith(b"HTTP/1.1 200") and headers["content-length"] == str(len(body))
            started = time.monotonic()
            assert sock.recv(1) == b"", "the worker should close the idle connection"
            assert 0.3 < time.monotonic() - started < 4
        output = proc.output()
    assert "Timing out client" not in output


def test_head_is_a_bodiless_405_on_the_wire() -> None:
    with running(python_module(SIM, "--port", "0")) as proc:
        port = int(proc.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: w\r\n\r\n")
            status, headers, rest = _read_response(sock)
            assert status.startswith(b"HTTP/1.1 405 ")
            assert headers["allow"] == "GET" and headers["content-length"] == "31"
            assert rest == b""
            # No body followed the headers: the next answer on the same connection is intact.
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: w\r\n\r\n")
            status, headers, body = _read_response(sock)
            while len(body) < int(headers["content-length"]):
                body += sock.recv(65536)
            assert status.startswith(b"HTTP/1.1 200") and body == b'{"status":"ok"}'
        output = proc.output()
    assert "HEAD request" not in output


def test_a_form_encoded_generation_is_a_422_on_the_wire() -> None:
    """What C{curl -d '{"prompt": "x"}'} gets from the real (FastAPI) worker."""
    with running(python_module(SIM, "--port", "0")) as proc:
        req = urllib.request.Request(proc.url + "/v1/images/generations", data=b'{"prompt": "x"}')
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        with info.value as err:
            assert err.code == 422
            assert json.loads(err.read())["detail"][0]["type"] == "model_attributes_type"
