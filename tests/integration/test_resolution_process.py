"""
A worker registered by host name, for real: the router resolves C{localhost}
(getaddrinfo in its thread pool) at registration and at every connection,
and serves through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import requests

if TYPE_CHECKING:
    from tests.integration.conftest import Processes

pytestmark = pytest.mark.integration


def test_a_worker_registered_as_localhost_is_resolved_and_served(processes: Processes) -> None:
    (worker,) = processes.workers([])
    router = processes.router([])
    port = urlsplit(worker.url).port
    registered = requests.post(f"{router.url}/workers", json={"url": f"http://localhost:{port}"}, timeout=30)
    assert registered.status_code == 200, registered.text
    assert registered.json()["worker"]["url"] == f"http://localhost:{port}"
    router.wait_for_line(rf"worker localhost:{port} is up")
    reply = requests.post(
        f"{router.url}/v1/images/generations",
        json={"prompt": "a fox", "size": "256x256", "response_format": "b64_json"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    # A spelling of a metadata address is refused before any lookup.
    refused = requests.post(f"{router.url}/workers", json={"url": "http://169.254.169.254.nip.io:80"}, timeout=30)
    assert refused.status_code == 400 and "blocked" in refused.json()["error"]
