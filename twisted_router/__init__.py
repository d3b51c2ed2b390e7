"""
twisted_router: a load-balancing router for SGLang diffusion workers.

The public surface is the command line (C{sglang-d-router}), the twistd plugin
(C{twistd -n sglang-d-router}) and the HTTP API; the modules below are the
pieces they are built from.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
