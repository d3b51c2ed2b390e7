"""
Logs: one access line per request (with its id, worker and weight version),
worker state changes, C{--log-format json} lines that parse, and twistd's
JSON observer.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.application.service import Application, MultiService
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from tests.support.fleet import Fleet
from tests.support.site import SiteHarness, parse_answer
from twisted_router import tap
from twisted_router.logformat import event_as_json_line, log_observer

IMAGES = "/v1/images/generations"


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def access_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == "twisted_router.access"]


def router(n: int = 1, **config: Any) -> SiteHarness:
    config.setdefault("access_log", True)
    fleet = Fleet()
    harness = SiteHarness(fleet, **config)
    for i in range(n):
        url, _ = fleet.add(f"w{i}")
        harness.register(url)
    return harness


def test_one_access_line_per_request_with_its_fields(events: list[dict[str, Any]]) -> None:
    h = router(1)
    h.fleet.workers["w0:8000"].hold(b"POST", IMAGES.encode())
    transport = h.open(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\nX-Request-ID: abc-1\r\n\r\n{}"
    )
    h.clock.advance(1.25)
    held = h.fleet.workers["w0:8000"].held.pop()
    held.write(b"12345")
    held.finish()
    h.pump()
    assert transport.value().startswith(b"HTTP/1.1 200")
    h.send("GET", "/health", headers={"X-Request-ID": "abc-2"})

    lines = access_lines(events)
    assert len(lines) == 2
    first, second = lines
    assert first["log_level"] is LogLevel.info
    assert {k: first[k] for k in ("method", "path", "route", "status", "worker", "request_id", "weight_version")} == {
        "method": "POST",
        "path": IMAGES,
        "route": IMAGES,
        "status": 200,
        "worker": "http://w0:8000",
        "request_id": "abc-1",
        "weight_version": "0",
    }
    assert first["duration_ms"] == 1250.0 and first["ttfb_ms"] == 1250.0
    assert (first["bytes_in"], first["bytes_out"]) == (2, 5)
    assert second["worker"] == "-" and second["request_id"] == "abc-2" and second["route"] == "/health"

    record = json.loads(event_as_json_line(first))
    assert record["request_id"] == "abc-1"
    assert record["level"] == "info" and record["namespace"] == "twisted_router.access"
    assert "POST /v1/images/generations 200 http://w0:8000" in record["message"]
    assert "id=abc-1" in record["message"] and "version=0" in record["message"]
    assert record["time"].endswith("+00:00")


def test_a_client_that_hangs_up_is_logged_499(events: list[dict[str, Any]]) -> None:
    h = router(1)
    h.fleet.workers["w0:8000"].hold(b"POST", IMAGES.encode())
    channel = h.site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
    h.pump()
    channel.connectionLost(Failure(ConnectionDone()))
    h.pump()
    h.fleet.workers["w0:8000"].held.pop().finish()
    h.pump()
    lines = access_lines(events)
    assert [line["status"] for line in lines] == [499]


def test_a_request_cut_by_the_client_timeout_is_answered_and_logged_408_with_its_id(
    events: list[dict[str, Any]],
) -> None:
    h = router(1, client_timeout=20.0)
    h.clock.advance(100)
    transport = h.open(b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nX-Request-ID: slow-1\r\nAccept: */*\r\nContent-Le")
    h.clock.advance(20)
    answer = parse_answer(transport.value())
    assert answer.status == 408 and answer.header(b"x-request-id") == b"slow-1"
    assert "--client-timeout" in answer.json()["error"]
    (line,) = access_lines(events)
    assert {k: line[k] for k in ("method", "path", "route", "status", "worker", "request_id")} == {
        "method": "-",  # never read whole: nothing of it is trusted
        "path": "-",
        "route": "-",
        "status": 408,
        "worker": "-",
        "request_id": "slow-1",
    }
    assert line["duration_ms"] == 20000.0  # from its first byte


def test_a_request_line_that_never_arrives_gets_a_new_id_and_is_logged_408(events: list[dict[str, Any]]) -> None:
    h = router(1, client_timeout=20.0)
    transport = h.open(b"GET /hea")
    h.clock.advance(20)
    answer = parse_answer(transport.value())
    request_id = answer.header(b"x-request-id")
    assert answer.status == 408 and request_id is not None
    (line,) = access_lines(events)
    assert (line["status"], line["path"], line["request_id"]) == (408, "-", request_id.decode())


def test_a_client_that_hangs_up_after_an_early_413_is_logged_413(events: list[dict[str, Any]]) -> None:
    h = router(1, max_request_body=16)
    channel = h.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /v1/images/generations HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n")
    assert parse_answer(transport.value()).status == 413
    channel.connectionLost(Failure(ConnectionDone()))  # before sending its body
    (line,) = access_lines(events)
    assert (line["status"], line["method"], line["path"]) == (413, "-", "-")
    assert line["request_id"] == parse_answer(transport.value()).header(b"x-request-id").decode()  # type: ignore[union-attr]


def test_no_access_lines_when_off_but_with_verbose(events: list[dict[str, Any]]) -> None:
    h = router(1, access_log=False)
    h.send("GET", "/health")
    assert access_lines(events) == []
    h = router(1, access_log=False, verbose=True)
    h.send("GET", "/health")
    assert len(access_lines(events)) == 1


def test_quarantine_is_logged_as_a_state_change(events: list[dict[str, Any]]) -> None:
    h = router(2)
    h.fleet.down.add("w0:8000")
    h.send("POST", IMAGES, body=b"{}", headers={"X-Request-ID": "q-1"})
    changes = [e for e in events if e.get("log_format", "").startswith("worker {worker} is now")]
    # Each worker came up (from starting: the first one too), then w0 was quarantined.
    assert [(e["worker"], e["state"], e["previous"]) for e in changes] == [
        ("http://w0:8000", "ready", "starting"),
        ("http://w1:8001", "ready", "starting"),
        ("http://w0:8000", "dead", "ready"),
    ]
    quarantined = [e for e in events if "quarantined: unreachable" in e.get("log_format", "")]
    assert [e["request_id"] for e in quarantined] == ["q-1"]
    access = access_lines(events)
    assert access[-1]["request_id"] == "q-1" and access[-1]["worker"] == "http://w1:8001"


def test_json_lines_carry_plain_fields_and_failures() -> None:
    out = io.StringIO()
    observer = log_observer(out, log_format="json", level_name="info")
    log = Logger(namespace="test.ns", observer=observer)
    log.debug("dropped {x}", x=1)
    log.info("hello {who}", who="world", request_id="r-1", raw=b"\xffbytes", obj=object(), items=(1, 2))
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("it broke for {request_id}", request_id="r-2")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    info, failure = (json.loads(line) for line in lines)
    assert info["message"] == "hello world" and info["level"] == "info" and info["namespace"] == "test.ns"
    assert info["request_id"] == "r-1" and info["who"] == "world" and info["items"] == [1, 2]
    assert info["raw"] == "\ufffdbytes" and info["obj"].startswith("<object object")
    assert not [k for k in info if k.startswith("log_")]
    assert failure["level"] == "critical" and failure["request_id"] == "r-2"
    assert "ZeroDivisionError" in failure["traceback"]


def test_text_format_is_twisteds_line() -> None:
    out = io.StringIO()
    log = Logger(namespace="test.ns", observer=log_observer(out, log_format="text", level_name="info"))
    log.info("hello {who}", who="world")
    assert out.getvalue().rstrip().endswith("[test.ns#info] hello world")


def test_twistd_gets_the_json_observer_as_the_application_component() -> None:
    out = io.StringIO()
    inner = MultiService()
    wrapped = tap.JSONLogging(inner, out, "info")
    application = Application("sglang-d-router")
    wrapped.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is wrapped.observer
    Logger(namespace="x", observer=observer).info("hi {request_id}", request_id="t-1")
    assert json.loads(out.getvalue())["request_id"] == "t-1"
    assert inner.parent is wrapped


def test_twistd_make_service_wraps_only_for_json() -> None:
    options = tap.Options()
    options.parseOptions(["--log-format", "json", "--port", "0", "--host", "127.0.0.1"])
    assert isinstance(tap.makeService(options), tap.JSONLogging)
    options = tap.Options()
    options.parseOptions(["--port", "0", "--host", "127.0.0.1"])
    assert not isinstance(tap.makeService(options), tap.JSONLogging)


def test_a_broadcast_is_logged_with_the_request_id(events: list[dict[str, Any]]) -> None:
    h = router(2)
    h.fleet.workers["w1:8001"].on(
        b"POST", b"/release_memory_occupation", lambda request: b'{"success": false, "message": "no"}'
    )
    h.send("POST", "/release_memory_occupation", body=b"{}", headers={"X-Request-ID": "sleep-1"})
    lines = [e for e in events if str(e.get("log_format", "")).startswith("{operation} by request")]
    assert len(lines) == 1
    line = lines[0]
    assert (line["operation"], line["request_id"], line["outcome"]) == ("sleep", "sleep-1", "partial")
    assert line["failed_workers"] == ["http://w1:8001"]
