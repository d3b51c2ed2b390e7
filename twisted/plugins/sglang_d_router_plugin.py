# The twistd plugin: `twistd -n sglang-d-router --port 30080 --worker-urls ...`.
# Kept import-light (no reactor import) so twistd can still choose the reactor.
from twisted.application.service import ServiceMaker

sglang_d_router = ServiceMaker(
    "sglang-d-router",
    "twisted_router.tap",
    "Load-balancing router for SGLang diffusion workers",
    "sglang-d-router",
)
