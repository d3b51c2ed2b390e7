"""
Hostile input to every router-owned endpoint (property test, in memory):
malformed bodies, query strings, worker URLs in every SSRF spelling, and ids.
Whatever arrives, the router answers 2xx or 4xx (never a 500, nor any other
5xx on a healthy fleet), never registers a blocked address, and gives back
every in-flight count and queue slot.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from tests.support.fleet import Fleet, RouterHarness
from tests.support.resolvers import FakeResolver
from tests.support.strategies import blocked_spellings
from twisted_router.site import RouterSite
from twisted_router.urls import address_blocked_reason, host_name_of

METADATA = "169.254.169.254"

#: Names the fake resolver knows: the fake workers, a name that resolves to
#: metadata (DNS), one that is partly metadata, and a harmless one.
ANSWERS = {
    "w0": ["10.0.0.10"],
    "w1": ["10.0.0.11"],
    "rebind.example": [METADATA],
    "mixed.example": ["10.0.0.5", "fe80::1"],
    "ok.example": ["10.0.0.9"],
    "localhost": ["127.0.0.1", "::1"],
}

#: Worker URLs beyond urls.py's own spellings: userinfo tricks, trailing
#: dots, percent-encoded and IDNA hosts, names that resolve to metadata.
TRICKY_URLS = [
    "http://a@169.254.169.254:80",
    "http://a:b@169.254.169.254:80",
    "http://169.254.169.254:80@evil.example:80",
    "http://evil.example:80#@169.254.169.254:80",
    "http://169.254.169.254.:80",
    "http://metadata.google.internal.:80",
    "http://METADATA.GOOGLE.INTERNAL:80",
    "http://%31%36%39.254.169.254:80",
    "http://169.254.169.254%2e:80",
    "http://xn--metadata-.google.internal:80",
    "http://ｍetadata.google.internal:80",
    "http://169。254。169。254:80",
    "http://[::ffff:169.254.169.254]:80",
    "http://[fe80::1%25eth0]:80",
    "http://0x7f.1:80",
    "http://rebind.example:80",
    "http://mixed.example:80",
    "http://ok.example:80",
    "http://localhost:30000",
    "http://169.254.169.254.nip.io:80",
    "http://a9fea9fe.sslip.io:80",
    "http://[64:ff9b::a9fe:a9fe]:80",
    "http://[2002:a9fe:a9fe::]:80",
    "http://[2001:0:4136:e378:8000:63bf:5601:5601]:80",
    "gopher://127.0.0.1:70",
    "file:///etc/passwd",
    "http://127.0.0.1:0",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:80/admin",
    "",
    " ",
]

worker_urls = st.one_of(blocked_spellings(), st.sampled_from(TRICKY_URLS), st.text(max_size=40))

#: Ids: anything, percent-encoded into one path segment.
ids = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["..", ".", "%2e%2e", "w0:8000", "http://w0:8000", "http%3A%2F%2Fw0%3A8000", "\x00", "a/b"]),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def bodies(draw: st.DrawFn, url: str | None = None) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return b""
    if kind == 1:
        return draw(st.binary(max_size=200))
    if kind == 2:
        return json.dumps(draw(json_values)).encode()
    if kind == 3:
        depth = draw(st.sampled_from([100, 100_000]))
        return draw(st.sampled_from([b"{" * depth, b"[" * depth + b"]" * depth]))  # unterminated, or too deep
    if kind == 4:
        fields = draw(
            st.dictionaries(
                st.sampled_from(["url", "worker_url", "model_path", "weight_version", "is_dead",
                                 "refresh_video_support", "prompt", "n", "size", "seconds"]),
                json_values,
                max_size=4,
            )
        )
        if url is not None and draw(st.booleans()):
            fields[draw(st.sampled_from(["url", "worker_url"]))] = url
        return json.dumps(fields).encode()
    if kind == 5:
        return b'{"model_path": "/ckpt/a", "weight_version": ' + draw(st.sampled_from([b"1e999", b"NaN", b"-0", b'"\xff"', b"[]"])) + b"}"
    return json.dumps({"url": url} if url is not None else {"prompt": draw(st.text(max_size=30))}).encode()


queries = st.one_of(
    st.just(""),
    st.sampled_from(["limit=3_0", "limit=+3", "limit=%203", "limit=99999999999999999999999", "limit=0",
                     "limit=101", "order=%00", "after=..", "video_id=", "id=%2F..%2F", "url=%zz", "a=%", "&&&="]),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=12)), max_size=3).map(
        lambda pairs: "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    ),
)


@st.composite
def requests_(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """One hostile request: (method, path with query, body)."""
    seg = quote(draw(ids), safe="")
    url = draw(worker_urls)
    routes: list[tuple[str, str]] = [
        ("POST", "/v1/images/generations"), ("POST", "/generate"), ("POST", "/v1/images/edits"),
        ("GET", f"/v1/images/{seg}/content"), ("HEAD", f"/v1/images/{seg}/content"),
        ("POST", "/v1/diffusion/generate"), ("POST", "/rollout/generate"),
        ("POST", "/v1/videos"), ("POST", "/generate_video"), ("GET", "/v1/videos"),
        ("GET", f"/v1/videos/{seg}"), ("DELETE", f"/v1/videos/{seg}"), ("GET", f"/v1/videos/{seg}/content"),
        ("GET", "/v1/models"), ("GET", "/health"), ("HEAD", "/health"), ("GET", "/metrics"),
        ("GET", "/health_workers"), ("GET", "/workers"), ("GET", f"/workers/{seg}"),
        ("PUT", f"/workers/{seg}"), ("DELETE", f"/workers/{seg}"), ("GET", "/list_workers"),
        ("POST", "/workers"), ("POST", "/add_worker"), ("POST", "/remove_worker"),
        ("POST", f"/workers?url={quote(url, safe='')}"), ("POST", f"/add_worker?worker_url={quote(url, safe='')}"),
        ("POST", "/update_weights_from_disk"), ("POST", "/release_memory_occupation"),
        ("POST", "/resume_memory_occupation"), ("POST", "/update_weights_from_tensor"),
        ("GET", f"/{seg}"), ("PATCH", "/workers"),
    ]
    method, path = draw(st.sampled_from(routes))
    query = draw(queries)
    if query:
        path += ("&" if "?" in path else "?") + query
    return method, path, draw(bodies(url))


def make_harness() -> tuple[RouterHarness, FakeResolver]:
    fleet = Fleet()
    resolver = FakeResolver(ANSWERS)
    harness = RouterHarness(fleet, resolver=resolver)
    for name, task_type in (("w0", "T2I"), ("w1", "T2V")):
        url, _ = fleet.add(name, port=8000, task_type=task_type)
        harness.register(url)
    return harness, resolver


def send(
    harness: RouterHarness, method: str, path: str, body: bytes, content_type: str | None
) -> tuple[int, bytes, dict[bytes, bytes]]:
    """
    One request in raw bytes through the router's own Site (its body limit,
    request-target rules and form handling included), pumped to the end:
    the status and the (de-chunked) body.
    """
    site = RouterSite(
        harness.parts.router.app.resource(),
        access_log=False,
        reactor=harness.clock,
        max_request_body=1 << 20,
        client_timeout=60,
    )
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    head = f"{method} {path} HTTP/1.1\r\nHost: router\r\nContent-Length: {len(body)}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    channel.dataReceived(head.encode() + b"\r\n" + body)
    harness.pump()
    raw = transport.value()
    status_line, _, rest = raw.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in header_block.split(b"\r\n"))
    }
    if headers.get(b"transfer-encoding") == b"chunked":
        payload = dechunk(payload)
    elif method != "HEAD":
        length = int(headers.get(b"content-length", b"-1"))
        assert length == -1 or len(payload) == length, (raw[:500], "incomplete answer")
    return int(status_line.split(b" ")[1]), payload, headers


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def assert_nothing_blocked_registered(harness: RouterHarness, resolver: FakeResolver) -> None:
    for worker in harness.pool.workers():
        name = host_name_of(worker.url)
        if name is None:
            host = worker.url.split("://", 1)[1].rpartition(":")[0].strip("[]")
            assert address_blocked_reason(host) is None, worker.url
        else:
            answers = resolver.answers.get(name[0], [])
            assert answers and all(address_blocked_reason(a) is None for a in answers), worker.url


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_(), st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain", None]))
@example(("GET", "/v1/images/%2F%0A/content", b""), None)  # was a 500: werkzeug's slash-merging redirect
def test_hostile_requests_get_2xx_or_4xx_and_leave_nothing_behind(
    request: tuple[str, str, bytes], content_type: str | None
) -> None:
    method, path, body = request
    harness, resolver = make_harness()
    code, answer, headers = send(harness, method, path, body, content_type)
    assert 200 <= code < 300 or 400 <= code < 500, (code, method, path, body[:200], answer[:300])
    if 400 <= code < 500 and method != "HEAD" and headers.get(b"content-type") == b"application/json":
        # The router's JSON error, or a worker's JSON answer relayed (a fake worker's
        # own form parser may also answer a bare 400 to a broken multipart body).
        payload = json.loads(answer)
        assert isinstance(payload, dict) and ("error" in payload or "detail" in payload), answer[:300]
    assert_nothing_blocked_registered(harness, resolver)
    harness.pump()
    assert [w.active_requests for w in harness.pool.workers()] == [0] * len(harness.pool)
    assert harness.parts.dispatcher.queue_status()["queued_requests"] == 0


@settings(max_examples=80, deadline=None)
@given(worker_urls)
def test_no_registration_route_registers_a_blocked_address(url: str) -> None:
    harness, resolver = make_harness()
    for method, path, body in (
        ("POST", f"/workers?url={quote(url, safe='')}", b""),
        ("POST", "/workers", json.dumps({"url": url}).encode()),
        ("POST", "/add_worker", json.dumps({"worker_url": url}).encode()),
    ):
        code, answer, _ = send(harness, method, path, body, "application/json")
        assert code in (200, 400), (code, url, answer[:300])
        if code == 400:
            assert "error" in json.loads(answer)
    assert_nothing_blocked_registered(harness, resolver)


#: The routes that parse a JSON body themselves (the others relay it untouched).
JSON_ROUTES = [
    ("POST", "/workers"),
    ("POST", "/add_worker"),
    ("POST", "/remove_worker"),
    ("PUT", "/workers/http%3A%2F%2Fw0%3A8000"),
    ("POST", "/update_weights_from_disk"),
    ("POST", "/release_memory_occupation"),
    ("POST", "/resume_memory_occupation"),
]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(JSON_ROUTES), bodies(), st.sampled_from(["application/json", None]))
def test_routes_that_parse_bodies_answer_malformed_ones_with_4xx(
    route: tuple[str, str], body: bytes, content_type: str | None
) -> None:
    method, path = route
    harness, resolver = make_harness()
    code, answer, _ = send(harness, method, path, body, content_type)
    assert 200 <= code < 300 or 400 <= code < 500, (code, method, path, body[:200], answer[:300])
    if code >= 400:
        assert "error" in json.loads(answer)
    assert_nothing_blocked_registered(harness, resolver)
