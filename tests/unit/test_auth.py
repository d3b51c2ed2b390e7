"""
Authentication (issue 13): C{--api-key}, C{--admin-api-key}, C{--catch-all},
keys from files and the environment, and the one check in the router's
Klein application, exercised on every endpoint in memory.
"""

from __future__ import annotations

import json
import re
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python import usage

from tests.support.fleet import RouterHarness, make_router
from twisted_router import auth, tap
from twisted_router.app import Router
from twisted_router.auth import (
    BASIC_ENDPOINTS,
    ENDPOINT_ACCESS,
    Access,
    Forbidden,
    Keys,
    Unauthorized,
    access_of,
    basic_password,
    bearer_token,
    open_access_warning,
)
from twisted_router.config import ConfigError, RouterConfig, config_from_args
from twisted_router.service import _StartupWorkers

API = "client-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
WRONG = "wrong-key-0123456789abcdef"

# ---------------------------------------------------------------- the endpoint classes


def test_every_router_endpoint_has_an_explicit_class() -> None:
    """A new route must be classified on purpose; an unknown endpoint would be admin."""
    assert set(Router.app.endpoints) == set(ENDPOINT_ACCESS)
    assert access_of("some_new_route") is Access.ADMIN


def test_health_alone_is_open() -> None:
    assert [name for name, access in ENDPOINT_ACCESS.items() if access is Access.OPEN] == ["health"]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        (b"", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Basic abc", None),
        (b"Basic " + b64encode(b"u:" + API.encode()), None),  # Basic is not Bearer
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER  abc ", b"abc"),
    ],
)
def test_bearer_token(header: bytes | None, token: bytes | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "password"),
    [
        (None, None),
        (b"Basic", None),
        (b"Basic " + b64encode(b"user:secret"), b"secret"),
        (b"basic  " + b64encode(b":secret") + b" ", b"secret"),  # any (even no) user name
        (b"BASIC " + b64encode(b"u:pa:ss"), b"pa:ss"),  # the password may contain ':'
        (b"Basic " + b64encode(b"secret"), None),  # no user:password pair
        (b"Basic " + b64encode(b"user:"), None),
        (b"Basic not*base64", None),
        (b"Bearer " + b64encode(b"user:secret"), None),
    ],
)
def test_basic_password(header: bytes | None, password: bytes | None) -> None:
    assert basic_password(header) == password


def test_keys_check_takes_basic_only_when_asked() -> None:
    both = Keys(api=API, admin=ADMIN)
    as_basic = b"Basic " + b64encode(f"operator:{API}".encode())
    both.check(Access.CLIENT, as_basic, basic=True)
    both.check(Access.CLIENT, b"Basic " + b64encode(f"x:{ADMIN}".encode()), basic=True)
    with pytest.raises(Unauthorized, match="HTTP Basic"):
        both.check(Access.CLIENT, b"Basic " + b64encode(f"x:{WRONG}".encode()), basic=True)
    with pytest.raises(Unauthorized):
        both.check(Access.CLIENT, as_basic)  # not a BASIC_ENDPOINTS endpoint
    assert BASIC_ENDPOINTS == {"dashboard", "list_worker_payloads"}
    assert all(ENDPOINT_ACCESS[name] is Access.CLIENT for name in BASIC_ENDPOINTS)


def test_keys_check() -> None:
    both = Keys(api=API, admin=ADMIN)
    for access in Access:
        both.check(access, f"Bearer {ADMIN}".encode())  # admin grants everything
        Keys().check(access, None)  # no keys: everything open
    both.check(Access.OPEN, None)
    both.check(Access.CLIENT, f"Bearer {API}".encode())
    with pytest.raises(Forbidden):
        both.check(Access.ADMIN, f"Bearer {API}".encode())
    for header in (None, f"Bearer {WRONG}".encode(), f"Basic {API}".encode(), API.encode()):
        for access in (Access.CLIENT, Access.ADMIN):
            with pytest.raises(Unauthorized):
                both.check(access, header)
    # Only the API key: it guards the admin endpoints too.
    only_api = Keys(api=API)
    only_api.check(Access.ADMIN, f"Bearer {API}".encode())
    with pytest.raises(Unauthorized):
        only_api.check(Access.ADMIN, None)
    # Only the admin key: the client endpoints need it as well.
    only_admin = Keys(admin=ADMIN)
    with pytest.raises(Unauthorized):
        only_admin.check(Access.CLIENT, None)
    only_admin.check(Access.CLIENT, f"Bearer {ADMIN}".encode())


def test_keys_repr_hides_keys() -> None:
    assert API not in repr(Keys(api=API, admin=ADMIN))
    assert ADMIN not in repr(RouterConfig(api_key=API, admin_api_key=ADMIN))


# ---------------------------------------------------------------- every endpoint, in memory

#: One request per Router endpoint (Klein's name), with its class.
REQUESTS: list[tuple[str, Access, str, str, dict[str, Any]]] = [
    ("health", Access.OPEN, "GET", "/health", {}),
    ("images_generations", Access.CLIENT, "POST", "/v1/images/generations", {"json": {"prompt": "x"}}),
    ("legacy_generate", Access.CLIENT, "POST", "/generate", {"json": {"prompt": "x"}}),
    ("images_edits", Access.CLIENT, "POST", "/v1/images/edits", {"json": {"prompt": "x"}}),
    ("image_content", Access.CLIENT, "GET", "/v1/images/img-unknown/content", {}),
    ("diffusion_generate", Access.CLIENT, "POST", "/v1/diffusion/generate", {"json": {"prompt": "x"}}),
    ("rollout_generate", Access.CLIENT, "POST", "/rollout/generate", {"json": {"prompt": "x"}}),
    ("create_video", Access.CLIENT, "POST", "/v1/videos", {"json": {"prompt": "x"}}),
    ("legacy_generate_video", Access.CLIENT, "POST", "/generate_video", {"json": {"prompt": "x"}}),
    ("video_job", Access.CLIENT, "GET", "/v1/videos/video-unknown", {}),
    ("video_content", Access.CLIENT, "GET", "/v1/videos/video-unknown/content", {}),
    ("list_videos", Access.CLIENT, "GET", "/v1/videos", {}),
    ("models", Access.CLIENT, "GET", "/v1/models", {}),
    ("prometheus_metrics", Access.CLIENT, "GET", "/metrics", {}),
    ("health_workers", Access.CLIENT, "GET", "/health_workers", {}),
    ("list_worker_payloads", Access.CLIENT, "GET", "/workers", {}),
    ("get_worker", Access.CLIENT, "GET", "/workers/w0", {}),
    ("legacy_list_workers", Access.CLIENT, "GET", "/list_workers", {}),
    ("dashboard", Access.CLIENT, "GET", "/dashboard", {}),
    ("add_worker", Access.ADMIN, "POST", "/workers", {"json": {}}),
    ("update_worker", Access.ADMIN, "PUT", "/workers/w0", {"json": {}}),
    ("delete_worker", Access.ADMIN, "DELETE", "/workers/nobody", {}),
    ("legacy_add_worker", Access.ADMIN, "POST", "/add_worker", {"json": {}}),
    ("legacy_remove_worker", Access.ADMIN, "POST", "/remove_worker", {"json": {}}),
    ("update_weights", Access.ADMIN, "POST", "/update_weights_from_disk", {"json": {}}),
    ("release_memory", Access.ADMIN, "POST", "/release_memory_occupation", {"json": {"tags": "bogus"}}),
    ("resume_memory", Access.ADMIN, "POST", "/resume_memory_occupation", {"json": {"tags": "bogus"}}),
    ("catch_all_branch", Access.ADMIN, "GET", "/get_server_info", {}),
]


def test_the_table_covers_every_endpoint() -> None:
    assert {name for name, *_ in REQUESTS} | {"catch_all"} == set(ENDPOINT_ACCESS)


def _call(h: RouterHarness, method: str, path: str, key: str | None, kwargs: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    code, body, response = h.call(method, path, headers=headers, **kwargs)
    if code in (401, 403):
        # The page a browser navigates to asks for Basic credentials (it cannot send Bearer).
        scheme = "Basic" if code == 401 and path == "/dashboard" else "Bearer"
        assert response.headers.getRawHeaders("www-authenticate")[0].startswith(scheme)
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert "error" in json.loads(body)
    return code, body


@pytest.fixture(scope="module")
def guarded() -> RouterHarness:
    h, _ = make_router(1, api_key=API, admin_api_key=ADMIN)
    return h


@pytest.mark.parametrize(("endpoint", "access", "method", "path", "kwargs"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_endpoint_with_no_wrong_client_and_admin_key(
    guarded: RouterHarness, endpoint: str, access: Access, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    assert ENDPOINT_ACCESS[endpoint] is access
    refused = {None: 401, WRONG: 401, API: 403 if access is Access.ADMIN else None, ADMIN: None}
    for key, expected in refused.items():
        code, body = _call(guarded, method, path, key, kwargs)
        if access is Access.OPEN or expected is None:
            assert code not in (401, 403), (key, code, body)
        else:
            assert code == expected, (key, code, body)


@pytest.mark.parametrize(("endpoint", "access", "method", "path", "kwargs"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_without_keys_every_endpoint_is_open(
    endpoint: str, access: Access, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    h, _ = make_router(1)
    code, body = _call(h, method, path, None, kwargs)
    assert code not in (401, 403), (code, body)


def test_generation_reaches_the_worker_only_with_a_key(guarded: RouterHarness) -> None:
    code, body = _call(guarded, "POST", "/v1/images/generations", None, {"json": {"prompt": "x"}})
    assert code == 401
    assert json.loads(body) == {"error": "a valid API key is required (Authorization: Bearer ...)"}
    code, _ = _call(guarded, "POST", "/v1/images/generations", API, {"json": {"prompt": "x"}})
    assert code == 200


@pytest.mark.parametrize(
    "path",
    [
        # Paths a route knows under another method, or another spelling, reach the catch-all: admin.
        "/v1/images/generations",
        "/update_weights_from_disk",
        "/v1//models/../../flush_cache",
    ],
)
def test_catch_all_spellings_need_the_admin_key(guarded: RouterHarness, path: str) -> None:
    method = "GET" if path != "/v1//models/../../flush_cache" else "POST"
    assert _call(guarded, method, path, API, {})[0] == 403
    assert _call(guarded, method, path, None, {})[0] == 401
    assert _call(guarded, method, path, ADMIN, {})[0] not in (401, 403)


def test_only_api_key_guards_the_control_plane() -> None:
    h, _ = make_router(1, api_key=API)
    assert _call(h, "POST", "/workers/nobody", None, {})[0] == 401
    assert _call(h, "GET", "/get_server_info", None, {})[0] == 401
    assert _call(h, "DELETE", "/workers/nobody", API, {})[0] == 404


def test_catch_all_off_is_404_json() -> None:
    h, _ = make_router(1, catch_all=False)
    code, body, response = h.call("GET", "/get_server_info")
    assert code == 404
    assert "--catch-all off" in json.loads(body)["error"]
    assert h.call("GET", "/v1/models")[0] == 200
    h2, _ = make_router(1, admin_api_key=ADMIN, catch_all=False)
    assert _call(h2, "GET", "/get_server_info", ADMIN, {})[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/workers", {}),
        ("POST", "/v1/images/generations", {"json": {"prompt": "fox"}}),
        ("POST", "/workers", {"json": {"url": "http://127.0.0.1:41001"}}),
        ("GET", "/dashboard", {}),
    ],
)
def test_more_than_one_authorization_header_is_refused(method: str, path: str, kwargs: dict[str, Any]) -> None:
    """Which of several headers counts would be up to each hop: none does, even if every one is the admin key."""
    guarded, _ = make_router(1, api_key=API, admin_api_key=ADMIN)
    before = len(guarded.pool)
    admin, wrong = bearer_of(ADMIN), bearer_of(WRONG)
    for values in ([admin, admin], [wrong, admin], [admin, wrong], [admin, basic_of(ADMIN)]):
        headers = {"Authorization": values}
        code, body, response = guarded.call(method, path, headers=headers, **kwargs)
        assert code == 401, (values, code, body)
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert "error" in json.loads(body)
    assert len(guarded.pool) == before  # nothing registered on the way
    code, _, _ = guarded.call(method, path, headers={"Authorization": [f"Bearer {ADMIN}"]}, **kwargs)
    assert code != 401


def bearer_of(key: str) -> str:
    return f"Bearer {key}"


def basic_of(key: str) -> str:
    return "Basic " + b64encode(f"operator:{key}".encode()).decode()


def test_a_repeated_header_still_costs_both_comparisons(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = Keys(api=API, admin=ADMIN)
    with pytest.raises(Unauthorized, match="one Authorization header"):
        keys.check(Access.CLIENT, [f"Bearer {API}".encode(), f"Bearer {API}".encode()])
    assert len(compared) == 2
    keys.check(Access.CLIENT, [f"Bearer {API}".encode()])  # one value in a list is the header itself
    keys.check(Access.CLIENT, f"Bearer {API}".encode())
    Keys().check(Access.ADMIN, [b"Bearer a", b"Bearer b"])  # no keys: nothing is checked, the worker decides
    Keys(api=API).check(Access.OPEN, [b"Bearer a", b"Bearer b"])


# ---------------------------------------------------------------- configuration


def test_keys_from_options_files_and_environment(tmp_path: Path) -> None:
    api_file = tmp_path / "api"
    api_file.write_text(API + "\n")
    admin_file = tmp_path / "admin"
    admin_file.write_text(f"  {ADMIN}\n")
    config = config_from_args(["--api-key-file", str(api_file), "--admin-api-key-file", str(admin_file)], environ={})
    assert (config.api_key, config.admin_api_key) == (API, ADMIN)
    config = config_from_args(["--api-key", API], environ={"SGLANG_D_ROUTER_ADMIN_API_KEY": ADMIN})
    assert (config.api_key, config.admin_api_key) == (API, ADMIN)
    env = {"SGLANG_D_ROUTER_API_KEY": WRONG, "SGLANG_D_ROUTER_ADMIN_API_KEY": ADMIN}
    config = config_from_args(["--api-key", API], environ=env)  # the option wins over the environment
    assert (config.api_key, config.admin_api_key) == (API, ADMIN)
    config = config_from_args([], environ={})
    assert (config.api_key, config.admin_api_key, config.catch_all) == (None, None, True)
    assert config_from_args(["--catch-all", "off"], environ={}).catch_all is False


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--api-key", API, "--api-key-file", "/x"], {}, "not both"),
        (["--admin-api-key-file", "/nonexistent/key"], {}, "cannot read"),
        (["--api-key", API, "--admin-api-key", API], {}, "must differ"),
        (["--api-key", "short"], {}, "at least 16"),
        (["--admin-api-key", "has a space in the key"], {}, "printable ASCII"),
        ([], {"SGLANG_D_ROUTER_API_KEY": ""}, "must not be empty"),
    ],
)
def test_bad_keys_stop_the_start(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(argv, environ=environ)


def test_a_bad_key_is_reported_under_the_name_it_came_from(tmp_path: Path) -> None:
    """An empty key file is the file's fault: the message names the file option and the file, or the variable."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    short = tmp_path / "short"
    short.write_text("short\n")
    cases = [
        (["--api-key-file", str(empty)], {}, f"^--api-key-file {re.escape(str(empty))} must not be empty$"),
        (["--admin-api-key-file", str(short)], {}, f"^--admin-api-key-file {re.escape(str(short))} must be at least 16"),
        (["--worker-api-key-file", str(empty)], {}, f"^--worker-api-key-file {re.escape(str(empty))} must not be empty$"),
        ([], {"SGLANG_D_ROUTER_ADMIN_API_KEY": ""}, r"^\$SGLANG_D_ROUTER_ADMIN_API_KEY must not be empty$"),
        ([], {"SGLANG_D_ROUTER_API_KEY": "a key"}, r"^\$SGLANG_D_ROUTER_API_KEY must be printable ASCII"),
        (["--api-key", ""], {}, "^--api-key must not be empty$"),
    ]
    for argv, environ, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_args(argv, environ=environ)
    # The workers' own key may be short (its length is theirs to choose), from any source.
    short.write_text("k\n")
    assert config_from_args(["--worker-api-key-file", str(short)], environ={}).worker_api_key == "k"
    assert config_from_args([], environ={"SGLANG_D_ROUTER_WORKER_API_KEY": "k"}).worker_api_key == "k"


def test_twistd_options_take_the_same_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "admin"
    key_file.write_text(ADMIN)
    monkeypatch.setenv("SGLANG_D_ROUTER_API_KEY", API)
    options = tap.Options()
    options.parseOptions(["--admin-api-key-file", str(key_file), "--catch-all", "off"])
    assert (options.config.api_key, options.config.admin_api_key, options.config.catch_all) == (API, ADMIN, False)
    with pytest.raises(usage.UsageError, match="not both"):
        tap.Options().parseOptions(["--admin-api-key", ADMIN, "--admin-api-key-file", str(key_file)])


@pytest.mark.parametrize(
    ("config", "warned"),
    [({}, "every endpoint is open"), ({"api_key": API}, "also grants"), ({"admin_api_key": ADMIN}, None)],
)
def test_one_warning_at_start_when_the_control_plane_is_open(config: dict[str, str], warned: str | None) -> None:
    h = RouterHarness(**config)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service = _StartupWorkers(h.parts)
        service.startService()
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    expected = open_access_warning(Keys(api=config.get("api_key"), admin=config.get("admin_api_key")))
    if warned is None:
        assert warnings == [] and expected is None
    else:
        assert len(warnings) == 1
        assert warnings[0]["warning"] == expected
        assert warned in warnings[0]["warning"]


def _authorization_seen(worker: Any) -> list[list[bytes]]:
    return [v for s in worker.seen for k, v in s.headers.items() if k.lower() == b"authorization"]


@pytest.mark.parametrize(("path", "key"), [("/v1/images/generations", API), ("/get_server_info", ADMIN)])
def test_router_keys_never_reach_a_worker(path: str, key: str) -> None:
    h, (worker,) = make_router(1, api_key=API, admin_api_key=ADMIN)
    worker.seen.clear()
    method = "POST" if path == "/v1/images/generations" else "GET"
    code, _ = _call(h, method, path, key, {"json": {"prompt": "x"}} if method == "POST" else {})
    assert code == 200
    assert worker.seen, "the request reached no worker"
    assert _authorization_seen(worker) == []


def test_without_router_keys_authorization_is_forwarded_as_before() -> None:
    h, (worker,) = make_router(1)
    worker.seen.clear()
    assert _call(h, "GET", "/get_server_info", "worker-own-key", {})[0] == 200
    assert _authorization_seen(worker) == [[b"Bearer worker-own-key"]]


# ---------------------------------------------------------------- --worker-api-key

WORKER_KEY = "sglang-worker-key"


def test_worker_api_key_reaches_every_worker_call() -> None:
    """Probes on registration, generations and the catch-all all carry the worker key, never the client's."""
    h, (worker,) = make_router(1, api_key=API, worker_api_key=WORKER_KEY)
    assert worker.seen, "registration made no worker call"
    _call(h, "POST", "/v1/images/generations", API, {"json": {"prompt": "x"}})
    h2, (worker2,) = make_router(1, worker_api_key=WORKER_KEY)
    assert _call(h2, "GET", "/get_server_info", "client-supplied", {})[0] == 200
    for w in (worker, worker2):
        seen = _authorization_seen(w)
        assert len(seen) == len(w.seen) > 1
        assert all(value == [b"Bearer " + WORKER_KEY.encode()] for value in seen)
    assert b"/v1/images/generations" in worker.paths()


def test_worker_api_key_options(tmp_path: Path) -> None:
    key_file = tmp_path / "worker"
    key_file.write_text("short\n")
    assert config_from_args(["--worker-api-key-file", str(key_file)], environ={}).worker_api_key == "short"
    assert config_from_args([], environ={"SGLANG_D_ROUTER_WORKER_API_KEY": "k"}).worker_api_key == "k"
    assert config_from_args([], environ={}).worker_api_key is None
    assert "short" not in repr(RouterConfig(worker_api_key="short"))
    with pytest.raises(ConfigError, match="printable ASCII"):
        config_from_args(["--worker-api-key", "a b"], environ={})
