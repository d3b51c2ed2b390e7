"""
Who may call what: the router's endpoint classes and the bearer-key check.

Pure: no Twisted, no I/O. L{ENDPOINT_ACCESS} names the class of every Klein
endpoint of L{twisted_router.app.Router} (an endpoint missing from it is
treated as admin: fail closed), and L{Keys.check} decides one request from
its C{Authorization} header. The check itself runs in one place, the
router's Klein application (L{twisted_router.app.GuardedKlein}), after
Klein has matched the route, so the class is that of the route that will
really run, whatever the spelling of the path.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["BASIC_ENDPOINTS", "BROWSER_ENDPOINTS", "ENDPOINT_ACCESS", "Access", "Forbidden", "Keys", "Unauthorized", "access_of", "open_access_warning", "worker_authorization"]


class Access(Enum):
    """The key an endpoint class requires."""

    #: No key ever (C{/health}: load balancers and orchestrators probe it).
    OPEN = "open"
    #: Generation and read endpoints: the API key or the admin key.
    CLIENT = "client"
    #: Worker management, weight updates, sleep/wake, the catch-all: the admin key.
    ADMIN = "admin"


#: Every Router endpoint (Klein's endpoint names) and its class.
ENDPOINT_ACCESS: dict[str, Access] = {
    "health": Access.OPEN,
    # generation
    "images_generations": Access.CLIENT,
    "legacy_generate": Access.CLIENT,
    "images_edits": Access.CLIENT,
    "image_content": Access.CLIENT,
    "diffusion_generate": Access.CLIENT,
    "rollout_generate": Access.CLIENT,
    "create_video": Access.CLIENT,
    "legacy_generate_video": Access.CLIENT,
    "video_job": Access.CLIENT,
    "video_content": Access.CLIENT,
    "list_videos": Access.CLIENT,
    # reads
    "models": Access.CLIENT,
    "prometheus_metrics": Access.CLIENT,
    "health_workers": Access.CLIENT,
    "list_worker_payloads": Access.CLIENT,
    "get_worker": Access.CLIENT,
    "legacy_list_workers": Access.CLIENT,
    "dashboard": Access.CLIENT,
    # worker management
    "add_worker": Access.ADMIN,
    "update_worker": Access.ADMIN,
    "delete_worker": Access.ADMIN,
    "legacy_add_worker": Access.ADMIN,
    "legacy_remove_worker": Access.ADMIN,
    # control plane
    "update_weights": Access.ADMIN,
    "release_memory": Access.ADMIN,
    "resume_memory": Access.ADMIN,
    # anything else reaches a worker's internal paths
    "catch_all": Access.ADMIN,
    "catch_all_branch": Access.ADMIN,
}

#: Endpoints that also take the keys as HTTP Basic credentials (any user
#: name, the key as password): the fleet page and the one read it polls
#: that is not open (C{GET /workers}). A browser cannot add a Bearer header
#: to a page it navigates to, but it asks for Basic credentials on a 401
#: and then sends them on the page's own same-origin requests. It also
#: sends them on requests other sites make it send (cross-site request
#: forgery), so Basic is accepted only on reads, whose answers another
#: site's page cannot read (the router sends no CORS headers), never on an
#: endpoint that generates or changes anything.
BASIC_ENDPOINTS = frozenset({"dashboard", "list_worker_payloads"})

#: Endpoints a browser navigates to: their 401 challenges C{Basic} (not
#: C{Bearer}), so the browser asks its user for the key. The reads the page
#: polls keep the Bearer challenge: a script's request must not prompt.
BROWSER_ENDPOINTS = frozenset({"dashboard"})

#: Klein endpoint names of the catch-all route (C{--catch-all off} answers them 404).
CATCH_ALL_ENDPOINTS = frozenset({"catch_all", "catch_all_branch"})


def access_of(endpoint: str) -> Access:
    """The class of Klein endpoint C{endpoint}; an unknown one is admin (fail closed)."""
    return ENDPOINT_ACCESS.get(endpoint, Access.ADMIN)


class Unauthorized(Exception):
    """No key, or not a key the router knows (401)."""


class Forbidden(Exception):
    """A valid API key on an endpoint that needs the admin key (403)."""


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an C{Authorization: Bearer <token>} header (scheme case-insensitive), else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def basic_password(authorization: bytes | None) -> bytes | None:
    """
    The password of an C{Authorization: Basic <base64(user:password)>} header
    (scheme case-insensitive; the user name is ignored), else None.
    """
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    _, colon, password = decoded.partition(b":")
    if not colon or not password:
        return None
    return password


@dataclass(frozen=True)
class Keys:
    """
    The router's keys (None: not set). Never shown in a repr.

    Without C{admin} the admin endpoints are as open as the client ones:
    guarded by C{api} when it is set, open when no key is set at all.
    """

    api: str | None = field(default=None, repr=False)
    admin: str | None = field(default=None, repr=False)

    @property
    def any(self) -> bool:
        return self.api is not None or self.admin is not None

    def check(
        self, access: Access, authorization: bytes | Sequence[bytes] | None, *, basic: bool = False
    ) -> None:
        """
        Let the request through or raise.

        @param authorization: the C{Authorization} header, or all of its
            values (C{getRawHeaders}): more than one is refused, since which
            one a proxy in front, the router and a worker would each read
            is anyone's guess.
        @param basic: also take a key sent as HTTP Basic credentials (only
            for L{BASIC_ENDPOINTS}: a browser sends those by itself).

        @raise Unauthorized: a key is required and the header carries none,
            a wrong one, or is sent more than once.
        @raise Forbidden: the API key was given where only the admin key will do.
        """
        if access is Access.OPEN or not self.any:
            return
        repeated = False
        if authorization is not None and not isinstance(authorization, bytes):
            repeated = len(authorization) > 1
            authorization = authorization[0] if len(authorization) == 1 else None
        token = bearer_token(authorization) or (basic_password(authorization) if basic else None) or b""
        # Both comparisons always run, each in constant time (a repeated header too, with no token).
        is_admin = _matches(token, self.admin)
        is_api = _matches(token, self.api)
        if repeated:
            raise Unauthorized("send one Authorization header, not several")
        if is_admin:
            return
        if access is Access.ADMIN and self.admin is not None:
            if is_api:
                raise Forbidden("this endpoint requires the admin API key")
            raise Unauthorized("a valid admin API key is required (Authorization: Bearer ...)")
        if is_api:
            return
        if basic:
            raise Unauthorized(
                "a valid API key is required (Authorization: Bearer ..., or HTTP Basic with the key as password)"
            )
        raise Unauthorized("a valid API key is required (Authorization: Bearer ...)")


def worker_authorization(key: str) -> bytes:
    """The C{Authorization} value the router sends to every worker with C{--worker-api-key}."""
    return b"Bearer " + key.encode("ascii")


def open_access_warning(keys: Keys) -> str | None:
    """The warning logged once at start when the control plane is open (None: it is guarded)."""
    if keys.admin is not None:
        return None
    if keys.api is None:
        return (
            "no --api-key or --admin-api-key: every endpoint is open, including worker management, "
            "weight updates, sleep/wake and the catch-all to worker paths"
        )
    return "no --admin-api-key: the API key also grants worker management, weight updates and sleep/wake"


def _matches(token: bytes, key: str | None) -> bool:
    if key is None:
        hmac.compare_digest(token, token)  # same work whether or not the key is set
        return False
    return hmac.compare_digest(token, key.encode("utf-8"))
