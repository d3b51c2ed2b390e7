# -*- test-case-name: tests.unit.test_urls -*-
"""
Validate and normalise worker URLs.

A worker URL is an address the router will connect to on behalf of whoever
registered it, so C{POST /workers} is a server-side request forgery vector:
without these rules anyone who can reach the admin API could point the router
at a cloud metadata service and read credentials through the catch-all proxy.
The rules are therefore strict and explain themselves, because their messages
go straight into a C{400} JSON error.

Everything here is pure: no DNS resolution, no I/O. An address is refused
in every spelling that reaches it: numeric IPv4 forms (C{2852039166},
C{0xa9.0xfe.0xa9.0xfe}, C{0251.0376.0251.0376}, C{169.254.43518}), IPv6
forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, NAT64,
Teredo, ISATAP), and the public wildcard-DNS names that answer with the
address written inside them (C{169.254.169.254.nip.io}, C{a9fea9fe.sslip.io}).
Any other name that I{resolves} to a blocked address is caught by
L{twisted_router.resolution}, which resolves host names at registration and
again at every connection and asks L{address_blocked_reason} about each
address it gets (see docs/security.md).

The canonical form is C{scheme://host:port}: scheme and host lowercased, IPv6
literals compressed and in brackets, numeric IPv4 spellings (C{2130706433},
C{0x7f.1}) rewritten as dotted quads, an explicit port, and nothing else. Two
spellings of one worker therefore always map to one registry entry.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote, urlsplit

__all__ = [
    "BlockedWorkerURL",
    "WorkerURLError",
    "address_blocked_reason",
    "display_id_for",
    "host_name_of",
    "normalize_worker_url",
    "worker_id_for",
]

_ALLOWED_SCHEMES = ("http", "https")

#: Longest URL we accept; far beyond any real worker address, short enough
#: that a hostile value cannot bloat error messages or logs.
_MAX_URL_LENGTH = 2048

#: Host names that are cloud instance-metadata endpoints. Matched after
#: lowercasing and dropping a trailing dot (C{"metadata."} is the same name).
_BLOCKED_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

#: C{metadata.<anything>.internal} and C{instance-data.<anything>.internal}
#: are the naming pattern every cloud uses for its metadata service.
_BLOCKED_HOSTNAME_PATTERN = re.compile(r"^(metadata|instance-data)(\.[a-z0-9-]+)*\.internal$")

#: Networks that are never a legitimate worker and that reach either the
#: host's own metadata service or something that is not a single host.
_BLOCKED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("169.254.0.0/16"), "a link-local address (cloud metadata lives here)"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "the AWS instance metadata address"),
    (ipaddress.ip_network("100.100.100.200/32"), "the Alibaba Cloud metadata address"),
    (ipaddress.ip_network("192.0.0.192/32"), "the Oracle Cloud metadata address"),
    (ipaddress.ip_network("0.0.0.0/8"), "an unspecified ('this network') address"),
    (ipaddress.ip_network("::/128"), "the unspecified address"),
    (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address"),
    (ipaddress.ip_network("224.0.0.0/4"), "a multicast address"),
    (ipaddress.ip_network("ff00::/8"), "a multicast address"),
)

#: The NAT64 well-known prefix embeds an IPv4 address in its low 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: The NAT64 local-use prefix (RFC 8215): the operator picks the prefix
#: length, so every RFC 6052 position an address may sit at is checked.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")

#: RFC 6052 positions of the IPv4 bytes for prefix lengths 48, 56, 64 and 96
#: (bits 64-71 are the reserved "u" octet and never hold address bits).
_RFC6052_SLICES: tuple[tuple[slice, ...], ...] = (
    (slice(6, 8), slice(9, 11)),
    (slice(7, 8), slice(9, 12)),
    (slice(9, 13),),
    (slice(12, 16),),
)

#: ISATAP interface identifiers (C{::0:5efe:a.b.c.d}, C{::200:5efe:a.b.c.d})
#: tunnel to the IPv4 address in the low 32 bits, under any prefix.
_ISATAP_IDS = (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe")

#: Public wildcard-DNS services that answer a name with the address written
#: inside it (C{10.0.0.1.nip.io}, C{app-10-0-0-1.sslip.io},
#: C{0a000001.nip.io}, C{fe80--1.sslip.io} for C{fe80::1}).
_WILDCARD_DNS_SUFFIXES = ("nip.io", "sslip.io", "xip.io")

_HEX_IPV4_LABEL = re.compile(r"^[0-9a-f]{8}$")

_HOSTNAME_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_IPV4_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


class _AmbiguousIPv4(Exception):
    """A numeric host with a leading-zero (octal to a resolver) component."""


class WorkerURLError(ValueError):
    """
    A worker URL that cannot be used.

    C{str(error)} is a complete, user-facing sentence naming the URL and what
    is wrong with it; the HTTP layer returns it verbatim in a C{400}.
    """


class BlockedWorkerURL(WorkerURLError):
    """
    A well-formed worker URL that points somewhere the router must never
    connect to (cloud metadata, link-local, unspecified, multicast).

    Scripts match on the word C{blocked} in the message, so it always has it.
    """


def redact_userinfo(raw: str) -> str:
    """
    C{raw} with any C{user:password@} in its authority replaced by C{***@}:
    a refused URL is quoted back in 400 answers and logs, and a password
    in it must not be (with or without a scheme, whatever else is wrong).
    """
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return raw
    return f"{scheme}{sep}***@{authority.rpartition('@')[2]}{rest[end:]}"


def _show(raw: str) -> str:
    """Quote a user-supplied value for an error message, cut to a sane length, without credentials."""
    raw = redact_userinfo(raw)
    if len(raw) > 200:
        raw = raw[:200] + "..."
    return repr(raw)


def _parse_ipv4_number(part: str) -> int | None:
    """
    Parse one component of a numeric IPv4 host the way C{inet_aton} does
    (decimal or C{0x} hex), since that is how the resolver used at connect
    time reads it; C{None} if it is not a number.

    @raise _AmbiguousIPv4: a leading zero (octal to C{inet_aton}).
    """
    if not _IPV4_NUMBER.match(part):
        return None
    if part[:2].lower() == "0x":
        return int(part[2:], 16) if len(part) > 2 else 0
    if len(part) > 1 and part.startswith("0"):
        # inet_aton reads "010" as octal 8, a person means 10: refuse rather
        # than guess either way.
        raise _AmbiguousIPv4()
    return int(part, 10)


def _ends_in_number(host: str) -> bool:
    """
    Whether a host must be read as an IPv4 address (the WHATWG rule: its last
    label is numeric). No DNS name ends in an all-numeric label, and resolvers
    turn such hosts into addresses, so they are validated as addresses too.
    """
    last = host.rsplit(".", 1)[-1] if host else ""
    return bool(_IPV4_NUMBER.match(last))


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """
    Parse the C{inet_aton} spellings of an IPv4 address (C{127.1},
    C{2130706433}, C{0x7f.0.0.1}); C{None} if it is not one. Refusing them
    instead would not be safer: the resolver would still accept them, and
    only by parsing them can the blocking rules see the real address.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    *head, last = values
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(values)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (5 - len(values)) + last
    return ipaddress.IPv4Address(value)


def _number_readings(part: str) -> set[int]:
    """
    Every value a resolver might give one numeric host component: decimal,
    C{0x} hex, and octal when it has a leading zero; empty if not a number.
    """
    if not _IPV4_NUMBER.match(part):
        return set()
    if part[:2].lower() == "0x":
        return {int(part[2:], 16) if len(part) > 2 else 0}
    readings = {int(part, 10)}
    if len(part) > 1 and part.startswith("0") and all(c in "01234567" for c in part):
        readings.add(int(part, 8))
    return readings


def _ipv4_readings(parts: list[str]) -> list[ipaddress.IPv4Address]:
    """
    Every IPv4 address the C{inet_aton}-style host C{".".join(parts)} may
    mean, under each reading of an ambiguous (leading-zero) component.
    """
    if not 1 <= len(parts) <= 4:
        return []
    combos: list[list[int]] = [[]]
    for part in parts:
        readings = _number_readings(part)
        if not readings:
            return []
        combos = [combo + [r] for combo in combos for r in sorted(readings)]
    out = []
    for values in combos:
        *head, last = values
        if any(n > 255 for n in head) or last >= 256 ** (5 - len(values)):
            continue
        value = 0
        for n in head:
            value = value * 256 + n
        out.append(ipaddress.IPv4Address(value * 256 ** (5 - len(values)) + last))
    return out


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """
    The IPv4 addresses an IPv6 address tunnels or translates to: a packet
    to it reaches (or may reach) that IPv4 host, so it meets the same rules.
    """
    packed = address.packed
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if packed[:12] == bytes(12) and int(address) > 1:
        # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks),
        # but not ::1, the IPv6 loopback, nor ::.
        found.append(ipaddress.IPv4Address(packed[12:]))
    if packed[:10] == bytes(8) + b"\xff\xff" and packed[10:12] == bytes(2):
        # IPv4-translated ::ffff:0:a.b.c.d (RFC 2765 SIIT).
        found.append(ipaddress.IPv4Address(packed[12:]))
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(packed[12:]))
    if address in _NAT64_LOCAL:
        for slices in _RFC6052_SLICES:
            found.append(ipaddress.IPv4Address(b"".join(packed[s] for s in slices)))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)  # (server, client), client de-obfuscated
    if packed[8:12] in _ISATAP_IDS:
        found.append(ipaddress.IPv4Address(packed[12:]))
    return found


def _wildcard_dns_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """
    The addresses written inside a name of a wildcard-DNS service
    (C{_WILDCARD_DNS_SUFFIXES}); empty for any other name.

    Every way those services read a name is tried, and a few more (octal
    and hex components, IPv6 embeddings), since refusing a name that never
    meant a blocked address costs nothing.
    """
    suffix = next((s for s in _WILDCARD_DNS_SUFFIXES if host == s or host.endswith("." + s)), None)
    if suffix is None:
        return []
    prefix = host[: -len(suffix)].rstrip(".")
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    # Four numbers in a row, dots and dashes mixed (10.0.0.1.nip.io,
    # app-10-0-0-1.sslip.io, 10-0.0-1.nip.io), each read every way.
    parts = re.split(r"[.-]", prefix) if prefix else []
    for start in range(len(parts) - 3):
        found.extend(_ipv4_readings(parts[start : start + 4]))
    for label in prefix.split(".") if prefix else []:
        dashed = label.split("-")
        # Eight hex digits (0a000001.nip.io, app-0a000001.nip.io).
        for part in dashed:
            if _HEX_IPV4_LABEL.match(part):
                found.append(ipaddress.IPv4Address(int(part, 16)))
        # sslip.io IPv6: dashes for colons (fe80--1.sslip.io), any prefix dropped.
        for start in range(len(dashed)):
            try:
                found.append(ipaddress.IPv6Address(":".join(dashed[start:])))
            except ValueError:
                pass
    return found


def _blocked_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why C{address} is refused, or C{None} if it may be a worker."""
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address tunnelled through an IPv6 spelling reaches the same
        # host, so it must meet the same rules.
        candidates.extend(_embedded_ipv4(address))
    for candidate in candidates:
        for network, why in _BLOCKED_NETWORKS:
            if candidate.version == network.version and candidate in network:
                return why if candidate is address else f"a carrier for {candidate}, {why}"
    return None


def _split_host_port(netloc: str, raw: str) -> tuple[str, str]:
    """Split C{host:port} (C{[v6]:port} for IPv6) without trusting urlsplit's port parsing."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end == -1:
            raise WorkerURLError(f"invalid worker URL {_show(raw)}: unterminated IPv6 literal")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if not rest:
            raise WorkerURLError(
                f"invalid worker URL {_show(raw)}: an explicit port is required "
                "(e.g. http://[::1]:30000)"
            )
        if not rest.startswith(":"):
            raise WorkerURLError(f"invalid worker URL {_show(raw)}: unexpected text after the host")
        return host, rest[1:]
    host, sep, port = netloc.rpartition(":")
    if not sep:
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: an explicit port is required "
            "(e.g. http://127.0.0.1:30000)"
        )
    if ":" in host:
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: IPv6 addresses must be in brackets "
            "(e.g. http://[::1]:30000)"
        )
    return host, port


def _normalize_port(port: str, raw: str) -> int:
    # str.isdigit() alone accepts non-ASCII digits, and int() accepts "+80"
    # and "8_0"; neither is a port anyone meant.
    if not port:
        raise WorkerURLError(f"invalid worker URL {_show(raw)}: an explicit port is required")
    if not (port.isascii() and port.isdigit()):
        raise WorkerURLError(f"invalid worker URL {_show(raw)}: port {_show(port)} is not a number")
    value = int(port)
    if not 1 <= value <= 65535:
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: port {_show(port)} is out of range (1-65535)"
        )
    return value


def _normalize_host(host: str, raw: str) -> str:
    """Return the canonical spelling of C{host}, or raise; blocking is applied here too."""
    if host.startswith("["):
        literal = host[1:-1]
        if "%" in literal:
            raise WorkerURLError(
                f"invalid worker URL {_show(raw)}: IPv6 zone identifiers are not supported"
            )
        try:
            v6 = ipaddress.IPv6Address(literal)
        except ValueError:
            raise WorkerURLError(
                f"invalid worker URL {_show(raw)}: {_show(literal)} is not an IPv6 address"
            ) from None
        why = _blocked_reason(v6)
        if why is not None:
            raise BlockedWorkerURL(f"worker URL {_show(raw)} is blocked: {v6} is {why}")
        if v6.ipv4_mapped is not None:
            # Spell IPv4-mapped addresses the readable way, the same on every
            # Python version.
            return f"[::ffff:{v6.ipv4_mapped}]"
        return f"[{v6.compressed}]"

    if not host:
        raise WorkerURLError(f"invalid worker URL {_show(raw)}: the host is missing")
    if not host.isascii():
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: non-ASCII host names are not supported "
            "(use the punycode form or an IP address)"
        )
    host = host.lower()
    # "name." and "name" are the same DNS name; keep one spelling.
    if host.endswith(".") and len(host) > 1:
        host = host[:-1]

    if _ends_in_number(host):
        try:
            v4 = _parse_ipv4(host)
        except _AmbiguousIPv4:
            # Refused either way; say "blocked" if any reading is blocked.
            for reading in _ipv4_readings(host.split(".")):
                why = _blocked_reason(reading)
                if why is not None:
                    raise BlockedWorkerURL(
                        f"worker URL {_show(raw)} is blocked: {_show(host)} may be read as "
                        f"{reading}, which is {why}"
                    ) from None
            raise WorkerURLError(
                f"invalid worker URL {_show(raw)}: {_show(host)} has components with leading "
                "zeros, which resolvers read as octal; write the address without them"
            ) from None
        if v4 is None:
            raise WorkerURLError(
                f"invalid worker URL {_show(raw)}: {_show(host)} is not a valid IPv4 address"
            )
        why = _blocked_reason(v4)
        if why is not None:
            raise BlockedWorkerURL(f"worker URL {_show(raw)} is blocked: {v4} is {why}")
        return str(v4)

    labels = host.split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in labels):
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: {_show(host)} is not a valid host name"
        )
    if host in _BLOCKED_HOSTNAMES or _BLOCKED_HOSTNAME_PATTERN.match(host):
        raise BlockedWorkerURL(
            f"worker URL {_show(raw)} is blocked: {host} is a cloud metadata host name"
        )
    for embedded in _wildcard_dns_addresses(host):
        why = _blocked_reason(embedded)
        if why is not None:
            raise BlockedWorkerURL(
                f"worker URL {_show(raw)} is blocked: {host} is a wildcard-DNS name for "
                f"{embedded}, which is {why}"
            )
    return host


def normalize_worker_url(raw: str) -> str:
    """
    Validate a worker URL and return its canonical C{scheme://host:port} form.

    @param raw: what the operator or script supplied (surrounding whitespace
        is ignored).
    @return: the canonical URL; calling this again on it returns it unchanged.
    @raise BlockedWorkerURL: the URL is well formed but points at a metadata,
        link-local, unspecified, broadcast or multicast address.
    @raise WorkerURLError: anything else is wrong with it.
    """
    if not isinstance(raw, str):
        raise WorkerURLError(f"worker URL must be a string, not {type(raw).__name__}")
    raw = raw.strip()
    if not raw:
        raise WorkerURLError("worker URL is empty")
    if len(raw) > _MAX_URL_LENGTH:
        raise WorkerURLError(f"worker URL is too long ({len(raw)} characters)")
    # urlsplit silently deletes tabs and newlines; refuse them (and any other
    # whitespace or control character) so what we store is what was meant.
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: whitespace and control characters are not allowed"
        )

    scheme, sep, _ = raw.partition("://")
    if not sep:
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: it must start with http:// or https:// "
            "(e.g. http://127.0.0.1:30000)"
        )
    scheme = scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: scheme {_show(scheme)} is not supported "
            "(use http or https)"
        )

    try:
        parts = urlsplit(raw)
    except ValueError as e:
        raise WorkerURLError(f"invalid worker URL {_show(raw)}: {e}") from None

    if "@" in parts.netloc:
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: credentials (user:password@) are not allowed"
        )
    if parts.path not in ("", "/"):
        raise WorkerURLError(
            f"invalid worker URL {_show(raw)}: a path ({_show(parts.path)}) is not allowed; "
            "give only scheme://host:port"
        )
    if "?" in raw:
        raise WorkerURLError(f"invalid worker URL {_show(raw)}: a query string is not allowed")
    if "#" in raw:
        raise WorkerURLError(f"invalid worker URL {_show(raw)}: a fragment is not allowed")

    host, port = _split_host_port(parts.netloc, raw)
    port_number = _normalize_port(port, raw)
    canonical_host = _normalize_host(host, raw)
    return f"{scheme}://{canonical_host}:{port_number}"


def address_blocked_reason(address: str) -> str | None:
    """
    Why a resolved address may not be connected to, or C{None} if it may.

    For the addresses a resolver returns for a worker's host name: the same
    rules as for an address written in the URL (embedded IPv4 forms
    included). A zone (C{fe80::1%eth0}) is ignored; anything that is not an
    IP address is refused, since the router could not tell where it leads.
    """
    text = address.partition("%")[0]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return "not an IP address"
    return _blocked_reason(parsed)


def host_name_of(url: str) -> tuple[str, int] | None:
    """
    The DNS name and port of a canonical worker URL, or C{None} when its host
    is an IP address (checked here already, and never resolved).
    """
    netloc = url.partition("://")[2]
    host, _, port = netloc.rpartition(":")
    if host.startswith("[") or _ends_in_number(host):
        return None
    return host, int(port)


def worker_id_for(url: str) -> str:
    """
    The worker's id in the admin API: its canonical URL, percent-encoded
    entirely (C{safe=""}) so that it is one path segment in
    C{/workers/{worker_id}} and C{unquote(worker_id) == url}.
    """
    return quote(url, safe="")


def display_id_for(url: str) -> str:
    """
    A short human label, C{host:port} (C{[::1]:8000} for IPv6), for logs,
    metrics labels and dashboards. Not unique across schemes; use the
    worker id for lookups.
    """
    netloc = urlsplit(url.strip()).netloc
    return netloc.rpartition("@")[2]
