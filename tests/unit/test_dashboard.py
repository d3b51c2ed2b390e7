"""
The live fleet page (issue 14, point 4), in memory: how C{GET /dashboard} is
served (self-contained, strict Content-Security-Policy, never cached), that
it is behind the read key with HTTP Basic as a second spelling of the same
keys, and that its script never hands data to an HTML parser. The browser
test (tests/integration/test_dashboard_browser.py) runs the page itself.
"""

from __future__ import annotations

import hashlib
import re
from base64 import b64encode
from typing import Any

import pytest

from tests.support.fleet import RouterHarness, make_router
from twisted_router.dashboard import content_security_policy, load_page, page_for

API = "client-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
WRONG = "wrong-key-0123456789abcdef"


def basic(password: str, user: str = "operator") -> str:
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


def bearer(key: str) -> str:
    return f"Bearer {key}"


def get(h: RouterHarness, path: str, authorization: str | None = None, method: str = "GET") -> tuple[int, bytes, Any]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return h.call(method, path, headers=headers)


def header(response: Any, name: str) -> str:
    values = response.headers.getRawHeaders(name)
    assert values is not None and len(values) == 1, (name, values)
    return str(values[0])


# ---------------------------------------------------------------- the page and its headers


def test_the_page_is_served_self_contained_and_uncached() -> None:
    h, _ = make_router(1)
    code, body, response = get(h, "/dashboard")
    assert code == 200
    assert body == load_page().body
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert header(response, "cache-control") == "no-store"
    assert header(response, "x-content-type-options") == "nosniff"
    assert header(response, "x-frame-options") == "DENY"
    policy = header(response, "content-security-policy")
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    # Nothing from anywhere else, and no blanket permission for inline code.
    assert "http" not in policy and "*" not in policy and "unsafe" not in policy


def test_the_policy_allows_exactly_the_pages_own_script_and_style() -> None:
    html = load_page().body
    policy = content_security_policy(html)
    (script,) = re.findall(rb"<script>(.*?)</script>", html, re.DOTALL)
    (style,) = re.findall(rb"<style>(.*?)</style>", html, re.DOTALL)
    for directive, block in (("script-src", script), ("style-src", style)):
        digest = b64encode(hashlib.sha256(block).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy
    # An edited script gets its own hash: the policy follows the file.
    edited = html.replace(b"var POLL_MS = 1000;", b"var POLL_MS = 2000;")
    assert edited != html
    assert content_security_policy(edited) != policy


@pytest.mark.parametrize(
    "html",
    [
        b"<style>a{}</style><script src='https://cdn.example/x.js'></script><script>1</script>",
        b"<style>a{}</style><script type=module>1</script>",
        b"<style>a{}</style><p>no script</p>",
    ],
)
def test_a_page_the_policy_cannot_describe_is_refused(html: bytes) -> None:
    with pytest.raises(ValueError):
        page_for(html)


def test_the_page_loads_nothing_from_elsewhere_and_never_parses_data_as_html() -> None:
    """Worker URLs and error texts are attacker-influenced: the script only ever sets textContent."""
    text = load_page().body.decode("utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute(\"style", "srcdoc"):
        assert sink not in text, sink
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert not re.search(r"""url\(\s*["']?(https?:)?//""", text)
    # It reads the router's own JSON, by paths on the page's origin, every second.
    assert 'fetchJson("/health")' in text and 'fetchJson("/workers")' in text
    # A fetch URL relative to a page opened as https://user:KEY@host/dashboard
    # would carry the credentials, and fetch refuses it: every fetch names the
    # origin (scheme, host and port, never credentials) itself.
    calls = re.findall(r"\bfetch\(\s*([^,)]*)", text)
    assert calls and all(url.startswith("location.origin + ") for url in calls), calls
    assert "var POLL_MS = 1000;" in text


def test_head_answers_the_headers_without_the_page() -> None:
    h, _ = make_router(1)
    code, body, response = get(h, "/dashboard", method="HEAD")
    assert code == 200 and body == b""
    assert header(response, "cache-control") == "no-store"


# ---------------------------------------------------------------- behind the read key


@pytest.fixture(scope="module")
def guarded() -> RouterHarness:
    h, _ = make_router(1, api_key=API, admin_api_key=ADMIN)
    return h


@pytest.mark.parametrize(
    "authorization",
    [None, bearer(WRONG), basic(WRONG), "Basic", "Basic !!!not-base64!!!",
     "Basic " + b64encode(API.encode()).decode(),  # no "user:" part
     basic(""), API],
    ids=["none", "wrong-bearer", "wrong-basic", "basic-empty", "basic-garbage",
         "basic-no-colon", "basic-no-password", "bare-key"],
)
def test_without_a_valid_key_the_browser_is_asked_for_one(guarded: RouterHarness, authorization: str | None) -> None:
    code, body, response = get(guarded, "/dashboard", authorization)
    assert code == 401
    assert header(response, "www-authenticate") == 'Basic realm="sglang-d-router", charset="UTF-8"'
    assert header(response, "content-type") == "application/json"
    assert b"HTTP Basic with the key as password" in body
    assert b"<html" not in body


@pytest.mark.parametrize(
    "authorization",
    [bearer(API), bearer(ADMIN), basic(API), basic(ADMIN), basic(API, user=""), basic(API, user="anyone")],
    ids=["bearer-api", "bearer-admin", "basic-api", "basic-admin", "basic-empty-user", "basic-any-user"],
)
def test_either_spelling_of_either_key_opens_the_page(guarded: RouterHarness, authorization: str) -> None:
    code, body, _ = get(guarded, "/dashboard", authorization)
    assert code == 200 and body == load_page().body


def test_the_reads_the_page_polls_take_basic_too(guarded: RouterHarness) -> None:
    code, body, _ = get(guarded, "/workers", basic(API))
    assert code == 200 and b'"workers"' in body
    assert get(guarded, "/health")[0] == 200  # open anyway
    # Their refusals keep the Bearer challenge: a script's request must not make the browser prompt.
    code, _, response = get(guarded, "/workers", basic(WRONG))
    assert code == 401 and header(response, "www-authenticate").startswith("Bearer ")


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/metrics", {}),
        ("GET", "/v1/models", {}),
        ("POST", "/v1/images/generations", {"json": {"prompt": "x"}}),
        ("POST", "/release_memory_occupation", {"json": {}}),
        ("POST", "/workers", {"json": {"url": "http://127.0.0.1:1"}}),
        ("PUT", "/workers/w0", {"json": {"is_dead": True}}),
    ],
)
def test_basic_is_refused_everywhere_else(guarded: RouterHarness, method: str, path: str, kwargs: dict[str, Any]) -> None:
    """A browser sends cached Basic credentials on requests other sites forge: only reads take them."""
    for key in (API, ADMIN):
        code, _, response = guarded.call(method, path, headers={"Authorization": basic(key)}, **kwargs)
        assert code == 401, (method, path, code)
        assert header(response, "www-authenticate").startswith("Bearer ")
    assert guarded.pool.workers()[0].state == "ready"  # nothing was changed on the way


def test_the_router_key_sent_as_basic_never_reaches_a_worker() -> None:
    h, workers = make_router(1, api_key=API)
    assert get(h, "/dashboard", basic(API))[0] == 200
    assert get(h, "/workers", basic(API))[0] == 200
    assert all(b"authorization" not in {k.lower() for k in seen.headers} for seen in workers[0].seen)


def test_without_keys_the_page_is_open() -> None:
    h, _ = make_router(1)
    assert get(h, "/dashboard")[0] == 200
    assert get(h, "/dashboard", basic(WRONG))[0] == 200  # no keys: nothing is checked, as everywhere
