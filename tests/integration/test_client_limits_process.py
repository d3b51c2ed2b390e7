"""
Client limits on a real router process, over raw sockets: an oversized body
under C{Expect: 100-continue} is refused before it is sent, a slowloris
client is cut after C{--client-timeout}, and an answer that takes longer than
that still arrives.
"""

from __future__ import annotations

import json
import select
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.integration.conftest import Processes

pytestmark = pytest.mark.integration


def open_socket(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_expect_continue_gets_413_without_sending_the_body(processes: Processes) -> None:
    router = processes.router([], "--max-request-body", "1000")
    with open_socket(router.url) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = read_until_closed(sock)  # the router closes: no body was sent, none is awaited
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert b"100 Continue" not in answer
    assert "--max-request-body" in json.loads(body)["error"]


def test_a_slowloris_client_is_cut_and_a_slow_answer_is_not(processes: Processes) -> None:
    (worker,) = processes.workers(["--base-ms", "3000"])
    router = processes.router([worker], "--client-timeout", "2")
    router.wait_for_line(r"worker 127\.0\.0\.1:\d+ is up")
    request = b"GET /health HTTP/1.1\r\nHost: r\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n"
    sent = 0
    started = time.monotonic()
    with open_socket(router.url) as sock:
        try:
            while sent < len(request):
                sock.sendall(request[sent : sent + 1])
                sent += 1
                # One byte every 0.25 s (which resets any idle timeout), until the router answers.
                if select.select([sock], [], [], 0.25)[0]:
                    break
        except ConnectionError:
            pass
        answer = read_until_closed(sock)
    assert sent < len(request), "the whole slow request went through"
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 20
    # A generation whose answer takes 3 s (longer than --client-timeout) arrives whole.
    reply = requests.post(
        f"{router.url}/v1/images/generations",
        json={"prompt": "a fox", "size": "256x256", "response_format": "b64_json"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["data"]

