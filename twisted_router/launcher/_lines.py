"""
Worker output lines as the router relays them.

The router's log already stamps every line it writes; a relayed worker line
that keeps its own stamp shows two (C{2026-… [launcher] [worker 0] 2026-…
[-] listening …}). The worker's stamp is dropped, whatever writes it: a
Twisted log (the simulator), Python's logging as C{sglang serve} configures
it (C{[2026-01-02 03:04:05 TP0] …}, where the rank tag is kept), or uvicorn
with a date format.
"""

from __future__ import annotations

import re

_STAMP = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"

#: A bare stamp (Twisted: C{2026-12-01T00:00:00+0000 [-] …}; logging's
#: default C{asctime}: C{2026-12-01 00:00:00,123 …}).
_BARE = re.compile(rf"^{_STAMP}\s+")
#: A bracketed stamp, maybe followed by a tag inside the brackets (sglang:
#: C{[2026-12-01 00:00:00 TP0] …}).
_BRACKETED = re.compile(rf"^\[{_STAMP}(?:\s+(?P<tag>[^\]]*))?\]\s*")


def strip_timestamp(line: str) -> str:
    """C{line} without a leading timestamp of its own (a bracketed tag after it is kept)."""
    match = _BRACKETED.match(line)
    if match is not None:
        tag = match.group("tag")
        rest = line[match.end() :]
        return f"[{tag}] {rest}" if tag else rest
    return _BARE.sub("", line, count=1)
