# -*- test-case-name: tests.unit.test_targets -*-
"""
One spelling per path: request-targets reduced to a canonical origin form.

HTTP lets a client name one resource many ways: absolute form
(C{POST http://router/update_weights_from_disk}), dot segments, duplicate or
trailing slashes, percent-encoded letters. Klein matches the path as written,
so every odd spelling of a router-owned route used to miss it and fall
through to the catch-all, which sent it to one worker: a refit or sleep that
reached a single worker split the fleet behind the router's back.

The site rewrites each request-target with L{normalize_target} before any
routing, so the routes, the control guard and the proxy (which forwards
C{request.uri}) all see the same origin-form path. Only what cannot change
the meaning is rewritten: percent-escapes of unreserved characters are
decoded (RFC 3986 section 6.2.2.2), while escapes that carry meaning (C{%2F}
inside a worker id, C{%3F}) are kept, with upper-case hex. The query string
is passed on byte for byte.
"""

from __future__ import annotations

import re

__all__ = ["BadTarget", "normalize_target"]

_ABSOLUTE = re.compile(rb"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ESCAPE = re.compile(rb"%(?:([0-9A-Fa-f]{2})|.{0,2})", re.DOTALL)
#: RFC 3986 unreserved characters: their escaped and plain forms are the same URI.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_LONGEST_SHOWN = 200


class BadTarget(ValueError):
    """A request-target the router cannot route; C{str()} is the client-facing message."""


def _show(raw: bytes) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= _LONGEST_SHOWN else text[:_LONGEST_SHOWN] + "...")


def _canonical_escapes(segment: bytes, target: bytes) -> bytes:
    """Decode escaped unreserved characters, upper-case the other escapes, refuse broken ones."""

    def one(match: re.Match[bytes]) -> bytes:
        digits = match.group(1)
        if digits is None:
            raise BadTarget(f"invalid percent-encoding {_show(match.group(0))} in the path {_show(target)}")
        value = int(digits, 16)
        return bytes([value]) if value in _UNRESERVED else b"%" + digits.upper()

    return _ESCAPE.sub(one, segment)


def _decoded(path: bytes) -> bytes:
    return re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), path)


def normalize_target(target: bytes) -> bytes:
    """
    The canonical origin form of an HTTP request-target.

    C{http://h/a/./b/../c//d/?q=1} becomes C{/a/c/d?q=1}; C{/%61pi} becomes
    C{/api}; the root is C{/}.

    @raise BadTarget: the target is not in origin or absolute form (C{*}, a
        bare word), uses a scheme other than http(s), has a broken
        percent-escape, or decodes to something that is not UTF-8 (routes
        and workers read paths as text).
    """
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:
        if absolute.group(1).lower() not in (b"http", b"https"):
            raise BadTarget(f"unsupported request-target {_show(target)}: only http and https URLs are served")
        rest = target[absolute.end() :]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i != -1), default=len(rest))
        target = rest[cut:] if rest[cut:].startswith(b"/") else b"/" + rest[cut:]  # http://h?q is /?q
    if not target.startswith(b"/"):
        raise BadTarget(f"invalid request-target {_show(target)}: expected a path starting with '/'")
    target = target.partition(b"#")[0]  # a fragment is never sent to a server; drop one if a client does
    path, sep, query = target.partition(b"?")
    segments: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        segment = _canonical_escapes(segment, path)
        if segment in (b"", b"."):
            continue  # duplicate or trailing slash, or "this directory"
        if segment == b"..":
            if segments:
                segments.pop()
            continue  # above the root is the root
        segments.append(segment)
    canonical = b"/" + b"/".join(segments)
    try:
        _decoded(canonical).decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget(f"invalid path {_show(path)}: it does not decode to UTF-8 text") from None
    return canonical + sep + query
