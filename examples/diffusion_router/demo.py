#!/usr/bin/env python3
"""
The demo router's script: start the router with the demo's flags.

Scripts written for the earlier demo router keep working: the same flags, the
same meaning, the same endpoints (C{/add_worker}, C{/list_workers},
C{/generate}, ...). It runs this package's router, so every other option of
C{sglang-d-router} (C{--launcher-config}, C{--log-level}, ...) is accepted too.

    # no workers yet (add them with POST /add_worker?url=...)
    python examples/diffusion_router/demo.py --port 30080

    # with workers
    python examples/diffusion_router/demo.py --port 30080 \\
        --worker-urls http://localhost:10090 http://localhost:10092

    curl -s localhost:30080/health
    curl -s -X POST 'localhost:30080/add_worker?url=http://localhost:10094'
    curl -s localhost:30080/list_workers
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted_router.cli import main as run_router


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the router. Its flags are a superset of the demo's, with the same
    meanings, so they are passed on as they are; only the demo's "no
    C{--timeout} means no limit" differs: the router's default applies.
    """
    run_router(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
