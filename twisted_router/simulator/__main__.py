"""C{python -m twisted_router.simulator}: run one simulated worker."""

from twisted_router.simulator.cli import main

if __name__ == "__main__":
    main()
