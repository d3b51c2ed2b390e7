"""Tests for L{twisted_router.urls}: worker URL validation, normalisation and ids."""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.strategies import blocked_spellings, mixed_case
from twisted_router.urls import (
    BlockedWorkerURL,
    WorkerURLError,
    display_id_for,
    normalize_worker_url,
    redact_userinfo,
    worker_id_for,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://127.0.0.1:30000", "http://127.0.0.1:30000"),
        ("http://127.0.0.1:30000/", "http://127.0.0.1:30000"),
        ("  http://127.0.0.1:30000/ \n", "http://127.0.0.1:30000"),
        ("HTTP://LocalHost:8000", "http://localhost:8000"),
        ("https://Worker-1.Example.COM:443/", "https://worker-1.example.com:443"),
        ("http://worker.:8000", "http://worker:8000"),
        ("http://gpu_node_3.svc:8000", "http://gpu_node_3.svc:8000"),
        ("http://h:08000", "http://h:8000"),
        ("http://10.0.0.7:1", "http://10.0.0.7:1"),
        ("http://192.168.1.20:65535", "http://192.168.1.20:65535"),
        ("http://172.16.0.1:8000", "http://172.16.0.1:8000"),
        ("http://100.64.0.1:8000", "http://100.64.0.1:8000"),  # CGNAT, not the Alibaba host
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("http://[0:0:0:0:0:0:0:1]:8000/", "http://[::1]:8000"),
        ("http://[FD12:3456::AB]:8000", "http://[fd12:3456::ab]:8000"),
        ("http://[::ffff:127.0.0.1]:80", "http://[::ffff:127.0.0.1]:80"),
        ("http://[::ffff:7f00:1]:80", "http://[::ffff:127.0.0.1]:80"),
        # Numeric spellings a resolver accepts become the dotted quad they mean.
        ("http://127.1:80", "http://127.0.0.1:80"),
        ("http://2130706433:80", "http://127.0.0.1:80"),
        ("http://0x7f.0.0.1:80", "http://127.0.0.1:80"),
        ("http://0x0A000001:80", "http://10.0.0.1:80"),
    ],
)
def test_normalize_accepts(raw: str, expected: str) -> None:
    assert normalize_worker_url(raw) == expected


def test_trailing_slash_is_the_same_worker() -> None:
    assert normalize_worker_url("http://h:1/") == normalize_worker_url("http://h:1")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("ftp://h:1", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://h:70", "scheme"),
        ("localhost:8000", "http://"),
        ("127.0.0.1:8000", "http://"),
        ("//h:1", "http://"),
        ("http://h", "port"),
        ("http://h:", "port"),
        ("http://h/", "port"),
        ("http://[::1]", "port"),
        ("http://h:0", "out of range"),
        ("http://h:65536", "out of range"),
        ("http://h:99999999", "out of range"),
        ("http://h:+80", "not a number"),
        ("http://h:8_0", "not a number"),
        ("http://h:٨٠", "not a number"),  # Arabic-Indic digits
        ("http://h:abc", "not a number"),
        ("http://user:pw@h:1", "credentials"),
        ("http://user@h:1", "credentials"),
        ("http://h:1/v1", "path"),
        ("http://h:1//", "path"),
        ("http://h:1/?", "query"),
        ("http://h:1?x=1", "query"),
        ("http://h:1#frag", "fragment"),
        ("http://h:1/#", "fragment"),
        ("http://:1", "host"),
        ("http://-bad-:1", "host name"),
        ("http://bad..name:1", "host name"),
        ("http://ex ample:1", "whitespace"),
        ("http://h\t:1", "whitespace"),
        ("http://h:1\n/x", "whitespace"),
        ("http://é.example:1", "non-ASCII"),
        ("http://::1:8000", "brackets"),
        ("http://[::1:8000", "IPv6"),
        ("http://[nope]:80", "nope"),
        ("http://[::1]x:80", "unexpected"),
        ("http://[fe80::1%25eth0]:80", "zone"),
        ("http://foo.123:1", "IPv4"),
        ("http://1.2.3.4.5:1", "IPv4"),
        ("http://256.0.0.1:1", "IPv4"),
        ("http://010.0.0.1:1", "leading zeros"),
        ("http://10.0.0.01:1", "leading zeros"),
        ("http://" + "a" * 3000 + ":1", "too long"),
    ],
)
def test_normalize_refuses(raw: str, fragment: str) -> None:
    with pytest.raises(WorkerURLError) as info:
        normalize_worker_url(raw)
    assert not isinstance(info.value, BlockedWorkerURL)
    assert fragment.lower() in str(info.value).lower()


@pytest.mark.parametrize("raw", [None, 8000, b"http://h:1", ["http://h:1"]])
def test_non_string_refused(raw: object) -> None:
    with pytest.raises(WorkerURLError, match="string"):
        normalize_worker_url(raw)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["", "   ", "\n"])
def test_empty_refused(raw: str) -> None:
    with pytest.raises(WorkerURLError, match="empty"):
        normalize_worker_url(raw)


def test_error_is_a_value_error_with_the_url() -> None:
    with pytest.raises(ValueError) as info:
        normalize_worker_url("ftp://h:1")
    assert "ftp://h:1" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        "http://169.254.169.254:80",
        "http://169.254.169.254:80/",
        "https://169.254.0.1:443",
        "http://169.254.255.255:1",
        "http://[fe80::1]:80",
        "http://[FE80::abcd]:80",
        "http://[febf::1]:80",
        "http://[fd00:ec2::254]:80",
        "http://100.100.100.200:80",
        "http://192.0.0.192:80",
        "http://metadata:80",
        "http://METADATA:80",
        "http://metadata.google.internal:80",
        "http://metadata.google.internal.:80",
        "http://metadata.goog:80",
        "http://metadata.azure.internal:80",
        "http://metadata.foo.internal:80",
        "http://instance-data:80",
        "http://instance-data.ec2.internal:80",
        "http://[::ffff:169.254.169.254]:80",
        "http://[::ffff:a9fe:a9fe]:80",
        "http://[::ffff:100.100.100.200]:80",
        "http://[64:ff9b::169.254.169.254]:80",
        "http://0.0.0.0:80",
        "http://0:80",
        "http://0.1.2.3:80",
        "http://[::]:80",
        "http://[::ffff:0.0.0.0]:80",
        "http://224.0.0.1:80",
        "http://239.255.255.250:1900",
        "http://[ff02::1]:80",
        "http://255.255.255.255:80",
        # Alternative numeric spellings of the metadata address.
        "http://2852039166:80",
        "http://0xA9FEA9FE:80",
        "http://169.16689662:80",
        "http://0xa9.0xfe.0xa9.0xfe:80",
        "http://0251.0376.0251.0376:80",  # octal
        "http://169.254.43518:80",
        # IPv6 spellings that carry the metadata address.
        "http://[::a9fe:a9fe]:80",  # IPv4-compatible
        "http://[::169.254.169.254]:80",
        "http://[::ffff:0:a9fe:a9fe]:80",  # IPv4-translated (SIIT)
        "http://[2002:a9fe:a9fe::]:80",  # 6to4
        "http://[2002:a9fe:a9fe:1::5]:80",
        "http://[64:ff9b:1::a9fe:a9fe]:80",  # NAT64 local-use, /96
        "http://[64:ff9b:1:a9fe:a9:fe00::]:80",  # NAT64 local-use, /48
        "http://[2001:0:4136:e378:8000:63bf:5601:5601]:80",  # Teredo, client 169.254.169.254
        "http://[2001:db8::5efe:a9fe:a9fe]:80",  # ISATAP
        # Wildcard-DNS names that answer with the address inside them.
        "http://169.254.169.254.nip.io:80",
        "http://app.169.254.169.254.nip.io:80",
        "http://app-169-254-169-254.sslip.io:80",
        "http://169-254-169-254.xip.io:80",
        "http://a9fea9fe.nip.io:80",
        "http://app-A9FEA9FE.sslip.io:80",
        "http://0251.0376.0251.0376.nip.io:80",
        "http://fe80--1.sslip.io:80",
        "http://0.0.0.0.nip.io:80",
    ],
)
def test_blocked(raw: str) -> None:
    with pytest.raises(BlockedWorkerURL) as info:
        normalize_worker_url(raw)
    assert "blocked" in str(info.value)
    assert isinstance(info.value, WorkerURLError)


@pytest.mark.parametrize(
    "raw",
    [
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
        "http://10.1.2.3:8000",
        "http://192.168.0.10:8000",
        "http://[fd12::1]:8000",
        "http://metadata-service.example.com:8000",  # not a metadata host
        "http://my-metadata:8000",
        "http://169.255.0.1:8000",
        "http://10.0.0.1.nip.io:8000",  # wildcard DNS for an allowed address
        "http://app-192-168-0-10.sslip.io:8000",
        "http://nip.io:8000",
        "http://[2002:a00:1::]:8000",  # 6to4 for 10.0.0.1
        "http://[64:ff9b::a00:1]:8000",  # NAT64 for 10.0.0.1
    ],
)
def test_loopback_and_private_allowed(raw: str) -> None:
    assert normalize_worker_url(raw) == raw  # accepted, and already canonical


def test_worker_id_and_display_id() -> None:
    url = "http://127.0.0.1:30000"
    assert worker_id_for(url) == "http%3A%2F%2F127.0.0.1%3A30000"
    assert display_id_for(url) == "127.0.0.1:30000"
    v6 = normalize_worker_url("http://[::1]:8000")
    assert display_id_for(v6) == "[::1]:8000"
    assert "/" not in worker_id_for(v6) and ":" not in worker_id_for(v6)
    assert unquote(worker_id_for(v6)) == v6


# -- properties ------------------------------------------------------------

_hostnames = st.from_regex(r"\A[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z][a-z0-9]{0,8}){0,3}\Z")
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
_hosts = st.one_of(_hostnames, _ipv4, _ipv6)


@st.composite
def _urls(draw: st.DrawFn) -> str:
    scheme = mixed_case(draw, draw(st.sampled_from(["http", "https"])))
    host = mixed_case(draw, draw(_hosts))
    port = draw(st.integers(1, 65535))
    zeros = "0" * draw(st.integers(0, 2))
    slash = draw(st.sampled_from(["", "/"]))
    pad = draw(st.sampled_from(["", " ", "\t", "\n "]))
    return f"{pad}{scheme}://{host}:{zeros}{port}{slash}{pad}"


@given(_urls())
def test_normalisation_is_idempotent(raw: str) -> None:
    try:
        once = normalize_worker_url(raw)
    except BlockedWorkerURL:
        return
    assert normalize_worker_url(once) == once
    assert once == once.strip().lower()
    assert not once.endswith("/")


@given(_urls())
def test_worker_id_round_trips(raw: str) -> None:
    try:
        url = normalize_worker_url(raw)
    except BlockedWorkerURL:
        return
    wid = worker_id_for(url)
    assert unquote(wid) == url
    assert "/" not in wid and "?" not in wid and "#" not in wid
    assert display_id_for(url) in url


@given(
    st.one_of(
        st.ip_addresses(),
        # ULAs with an ISATAP interface id, which a plain draw almost never hits.
        st.tuples(
            st.integers(0, 2**57 - 1),
            st.sampled_from([0x5EFE, 0x2005EFE]),
            st.integers(0, 2**32 - 1),
        ).map(lambda t: ipaddress.IPv6Address(0xFD << 120 | t[0] << 64 | t[1] << 32 | t[2])),
    )
)
def test_every_address_is_either_accepted_or_blocked(address: ipaddress._BaseAddress) -> None:
    host = f"[{address}]" if address.version == 6 else str(address)
    try:
        url = normalize_worker_url(f"http://{host}:80")
    except BlockedWorkerURL:
        blocked = True
    else:
        blocked = False
        assert normalize_worker_url(url) == url
    plain = address
    if isinstance(plain, ipaddress.IPv6Address) and plain.ipv4_mapped is not None:
        plain = plain.ipv4_mapped
    if plain.is_link_local or plain.is_multicast or plain.is_unspecified:
        assert blocked
    workers_live_here = [
        ipaddress.ip_network(n)
        for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128")
    ]
    if any(plain.version == n.version and plain in n for n in workers_live_here):
        assert not blocked
    if isinstance(plain, ipaddress.IPv6Address) and plain in ipaddress.ip_network("fc00::/7"):
        # A ULA is a worker unless it is the AWS metadata address or its
        # interface id is ISATAP's (it then tunnels to the IPv4 address).
        isatap = plain.packed[8:12] in (b"\x00\x00\x5e\xfe", b"\x02\x00\x5e\xfe")
        carried = ipaddress.IPv4Address(plain.packed[12:])
        carried_blocked = any(
            carried in ipaddress.ip_network(n)
            for n in (
                "169.254.0.0/16",
                "0.0.0.0/8",
                "224.0.0.0/4",
                "255.255.255.255/32",
                "100.100.100.200/32",
                "192.0.0.192/32",
            )
        )
        expected = plain == ipaddress.ip_address("fd00:ec2::254") or (isatap and carried_blocked)
        assert blocked == expected


@given(st.text(max_size=60))
def test_arbitrary_text_only_raises_worker_url_error(text: str) -> None:
    try:
        url = normalize_worker_url(text)
    except WorkerURLError:
        return
    assert normalize_worker_url(url) == url


@given(blocked_spellings())
def test_no_spelling_of_a_blocked_address_is_accepted(raw: str) -> None:
    with pytest.raises(BlockedWorkerURL) as info:
        normalize_worker_url(raw)
    assert "blocked" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("http://user:pw@127.0.0.1:41001", "http://***@127.0.0.1:41001"),
        ("HTTPS://user@h:1/x", "HTTPS://***@h:1/x"),
        ("user:pw@127.0.0.1:41001", "***@127.0.0.1:41001"),
        ("http://u:p@ss@h:1", "http://***@h:1"),
        ("http://h:1/a@b", "http://h:1/a@b"),
        ("http://h:1?next=a@b", "http://h:1?next=a@b"),
        ("http://127.0.0.1:1", "http://127.0.0.1:1"),
    ],
)
def test_redact_userinfo(raw: str, shown: str) -> None:
    assert redact_userinfo(raw) == shown


@pytest.mark.parametrize(
    "raw",
    [
        "http://user:s3cret@127.0.0.1:41001",
        "s3cret@127.0.0.1:41001",
        "ftp://u:s3cret@h:1",
        "http://u:s3cret@h:1/path",
        "http://u:s3cret@[fe80::1%25eth0]:1",
        "http://u:s3cret@169.254.169.254:80",
    ],
)
def test_no_error_quotes_a_password(raw: str) -> None:
    with pytest.raises(WorkerURLError) as caught:
        normalize_worker_url(raw)
    assert "s3cret" not in str(caught.value) and "***@" in str(caught.value)
