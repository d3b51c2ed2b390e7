"""C{python -m twisted_router}: the same program as the C{sglang-d-router} console script."""

from twisted_router.cli import main

main()
