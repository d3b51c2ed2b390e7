"""
A listening-port service that says where it listens.

C{StreamServerEndpointService} hides the bound port; operators and the
integration tests (which start servers on port 0) need the real address, so
this service logs C{listening on http://HOST:PORT} once the port is bound and
exposes the bound port as a Deferred.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure


def describe_address(port: IListeningPort, scheme: str = "http") -> str:
    """C{scheme://host:port} for a bound TCP port (IPv6 hosts in brackets)."""
    address = port.getHost()
    host = getattr(address, "host", None)
    number = getattr(address, "port", None)
    if host is None or number is None:
        name = getattr(address, "name", address)
        return f"{scheme}+unix://{os.fsdecode(name) if isinstance(name, bytes) else name}"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{number}"


class ListenerService(Service):
    """
    Listens on an endpoint while running.

    Call L{when_listening} to learn the bound port (or why binding failed);
    C{on_failure} lets an unattended process (twistd) react to a port that
    cannot be bound instead of running on without a listener.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        *,
        name: str,
        scheme: str = "http",
        on_failure: Callable[[Failure], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._label = name
        self._scheme = scheme
        self._on_failure = on_failure
        self._port: IListeningPort | None = None
        self._outcome: IListeningPort | Failure | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def when_listening(self) -> Deferred[IListeningPort]:
        """A Deferred that fires with the bound port, or fails if binding failed."""
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        if self._outcome is not None:
            return succeed(self._outcome)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def _settle(self, outcome: IListeningPort | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def startService(self) -> None:
        super().startService()
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._bound, self._failed)

    def _bound(self, port: IListeningPort) -> None:
        if not self.running:  # stopped while binding: do not keep a port nobody will close
            port.stopListening()
            self._settle(port)
            return
        self._port = port
        self.log.info(
            "{name} listening on {address}",
            name=self._label,
            address=describe_address(port, self._scheme),
        )
        self._settle(port)

    def _failed(self, failure: Failure) -> None:
        self.log.critical(
            "{name} could not listen: {reason}", name=self._label, reason=failure.getErrorMessage()
        )
        if self._on_failure is not None:
            self._on_failure(failure)
        self._settle(failure)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        result = port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)
