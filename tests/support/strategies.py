"""
Hypothesis strategies shared by test modules: the many spellings of a
blocked address (L{twisted_router.urls}), which both the URL rules' own
tests and the hostile-input tests of the whole router draw from.
"""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

#: A blocked IPv4 address: metadata and link-local, cloud metadata singletons, "this network", multicast, broadcast.
BLOCKED_V4 = st.one_of(
    st.integers(0xA9FE0000, 0xA9FEFFFF),  # 169.254.0.0/16, the metadata network
    st.sampled_from([0x646464C8, 0xC00000C0, 0xFFFFFFFF]),  # Alibaba, Oracle, broadcast
    st.integers(0, 0x00FFFFFF),  # 0.0.0.0/8
    st.integers(0xE0000000, 0xEFFFFFFF),  # multicast
).map(ipaddress.IPv4Address)


def mixed_case(draw: st.DrawFn, text: str) -> str:
    """C{text} with each letter's case drawn (hosts and schemes are case-insensitive)."""
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c for c, f in zip(text, flips, strict=True))


def _v6(value: int) -> str:
    return f"[{ipaddress.IPv6Address(value)}]"


@st.composite
def blocked_spellings(draw: st.DrawFn) -> str:
    """A spelling (IPv4 form, IPv6 carrier or wildcard-DNS name) of a blocked IPv4 address."""
    address = draw(BLOCKED_V4)
    n = int(address)
    octets = list(address.packed)
    kind = draw(st.integers(0, 14))
    if kind == 0:
        host = str(n)
    elif kind == 1:
        host = hex(n)
    elif kind == 2:
        host = ".".join(hex(o) for o in octets)
    elif kind == 3:
        host = ".".join(f"0{o:o}" for o in octets)  # octal, each with a leading zero
    elif kind == 4:
        host = f"{octets[0]}.{octets[1]}.{n & 0xFFFF}"
    elif kind == 5:
        host = f"{octets[0]}.{n & 0xFFFFFF}"
    elif kind == 6:
        host = _v6(0xFFFF << 32 | n)  # IPv4-mapped
    elif kind == 7:
        host = _v6(n) if n > 1 else _v6(0xFFFF << 32 | n)  # IPv4-compatible
    elif kind == 8:
        host = _v6(0x2002 << 112 | n << 80 | draw(st.integers(0, 2**80 - 1)))  # 6to4
    elif kind == 9:
        host = _v6(0x64FF9B << 96 | n)  # NAT64 well-known prefix
    elif kind == 10:
        # NAT64 local-use prefix at /48: address bits around the "u" octet.
        host = _v6(0x0064FF9B0001 << 80 | (n >> 16) << 64 | (n & 0xFFFF) << 40)
    elif kind == 11:
        server = draw(st.integers(0, 2**32 - 1))
        host = _v6(0x20010000 << 96 | server << 64 | (n ^ 0xFFFFFFFF))  # Teredo client
    elif kind == 12:
        host = _v6(draw(st.integers(0, 2**64 - 1)) << 64 | 0x5EFE << 32 | n)  # ISATAP
    else:
        suffix = draw(st.sampled_from(["nip.io", "sslip.io", "xip.io"]))
        inner = draw(st.sampled_from([str(address), str(address).replace(".", "-"), f"{n:08x}"]))
        prefix = draw(st.sampled_from(["", "app.", "app-", "a.b."]))
        if prefix.endswith("-") and "." in inner:
            prefix = "app."
        host = f"{prefix}{inner}.{suffix}"
    if kind < 6 or kind > 12:
        host = mixed_case(draw, host)
    return f"http://{host}:{draw(st.integers(1, 65535))}"
