"""
A client that talks raw HTTP to the router's real Site (L{RouterSite}) over
an in-memory transport, with the router wired to a fake fleet: what the
Site adds (request ids, the access log, request metrics, 413/400/503
answers) is exercised, which a StubTreq over the Klein resource skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from tests.support.fleet import FakeWorker, Fleet, RouterHarness
from twisted_router.service import router_site
from twisted_router.site import RouterSite


@dataclass
class RawAnswer:
    """A response as read off the wire: status, headers and body (de-chunked)."""

    status: int
    headers: Headers
    body: bytes
    complete: bool

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


def parse_answer(raw: bytes) -> RawAnswer:
    """Parse one HTTP/1.1 response (Content-Length or chunked)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = Headers()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    if headers.getRawHeaders(b"transfer-encoding") == [b"chunked"]:
        body = b""
        complete = False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                complete = True
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return RawAnswer(status, headers, body, complete)
    length = headers.getRawHeaders(b"content-length")
    body = rest if length is None else rest[: int(length[0])]
    return RawAnswer(status, headers, body, length is None or len(body) == int(length[0]))


class SiteHarness(RouterHarness):
    """A L{RouterHarness} whose requests go through the router's real Site, byte for byte."""

    def __init__(self, fleet: Fleet | None = None, **config: Any) -> None:
        super().__init__(fleet, **config)
        self.site: RouterSite = router_site(self.parts, self.clock)

    def open(self, raw: bytes) -> StringTransport:
        """Send one raw request on a new connection; its answer accumulates in the returned transport."""
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        self.pump()
        return transport

    def send(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> RawAnswer:
        """One request, pumped to its end."""
        lines = [f"{method} {path} HTTP/1.1", "Host: router", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        transport = self.open(raw)
        return parse_answer(transport.value())


def site_router(n: int = 2, **config: Any) -> tuple[SiteHarness, list[str], list[FakeWorker]]:
    """
    A L{SiteHarness} over C{n} registered fake workers w0, w1, ... (round-robin
    unless C{config} says otherwise), their URLs, and the workers.
    """
    fleet = Fleet()
    config.setdefault("routing_algorithm", "round-robin")
    harness = SiteHarness(fleet, **config)
    urls, workers = [], []
    for i in range(n):
        url, worker = fleet.add(f"w{i}")
        harness.register(url)
        urls.append(url)
        workers.append(worker)
    return harness, urls, workers
