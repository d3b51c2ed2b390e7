"""
Authentication under twistd, for real: the admin key from a file, the API key
from the environment (neither on the command line), and each endpoint class
with no key, a wrong key, the client key on an admin endpoint and the right
keys.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

API_KEY = "client-key-from-env-0123456789"
ADMIN_KEY = "admin-key-from-file-0123456789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_from_a_file_and_the_environment_under_twistd(processes: Processes, tmp_path: Path) -> None:
    (worker,) = processes.workers([])
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o600)
    router = processes.twistd_router(
        [worker], "--admin-api-key-file", str(key_file), env={"SGLANG_D_ROUTER_API_KEY": API_KEY}
    )
    assert API_KEY not in " ".join(router.argv) and ADMIN_KEY not in " ".join(router.argv)
    router.wait_for_line(r"worker 127\.0\.0\.1:\d+ is up")
    url = router.url

    # Open: /health needs no key.
    assert requests.get(f"{url}/health", timeout=10).status_code == 200

    # A client endpoint: no key, a wrong key → 401; the API key and the admin key → 200.
    for headers in ({}, bearer("wrong-key-0123456789abcdef")):
        answer = requests.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert answer.status_code == 401, answer.text
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in answer.json()
    for key in (API_KEY, ADMIN_KEY):
        assert requests.get(f"{url}/v1/models", headers=bearer(key), timeout=10).status_code == 200
    image = requests.post(
        f"{url}/v1/images/generations",
        json={"prompt": "a fox", "size": "256x256", "response_format": "b64_json"},
        headers=bearer(API_KEY),
        timeout=30,
    )
    assert image.status_code == 200, image.text

    # An admin endpoint: no key, a wrong key → 401; the API key → 403; the admin key → 200.
    wake = f"{url}/resume_memory_occupation"
    assert requests.post(wake, json={}, timeout=10).status_code == 401
    assert requests.post(wake, json={}, headers=bearer("wrong-key-0123456789abcdef"), timeout=10).status_code == 401
    forbidden = requests.post(wake, json={}, headers=bearer(API_KEY), timeout=10)
    assert forbidden.status_code == 403 and "insufficient_scope" in forbidden.headers["WWW-Authenticate"]
    assert requests.post(wake, json={}, headers=bearer(ADMIN_KEY), timeout=30).status_code == 200
    assert requests.get(f"{url}/workers", headers=bearer(API_KEY), timeout=10).status_code == 200
    remove = requests.post(f"{url}/remove_worker", json={"url": worker.url}, headers=bearer(API_KEY), timeout=10)
    assert remove.status_code == 403

    # A body without a key is refused before it is sent: 401 instead of 100 Continue.
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
        )
        early = b""
        while chunk := sock.recv(65536):
            early += chunk
    assert early.startswith(b"HTTP/1.1 401") and b"100 Continue" not in early, early

    # The keys never show in the log.
    assert API_KEY not in router.output() and ADMIN_KEY not in router.output()
    assert os.environ.get("SGLANG_D_ROUTER_API_KEY") is None  # only the child had it
