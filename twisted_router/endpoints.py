"""
Client endpoints for workers, built once per worker instead of once per request.

C{Agent} builds a new C{HostnameEndpoint} for every request, IDNA-encoding the
host name each time (about 4% of the router's request-path samples under
py-spy), even when the pool then reuses a connection. Workers are a handful of
fixed C{host:port} pairs, so their endpoints are built once and reused. IP
literals (the usual case) get a plain TCP endpoint, so a new connection does
not go through a name lookup in the thread pool either. A host name's
endpoint resolves it at every connection through a resolver that drops
blocked addresses (L{twisted_router.resolution}: DNS rebinding cannot point
a registered worker at a metadata service).

With C{quiet=True} the endpoints open their connections quietly: Twisted logs
"Starting factory" and "Stopping factory" for each new client connection,
which for a router (and for the launcher's probes, one every half second) is
two log lines per connection that say nothing. The factory's public C{noisy}
flag is switched off as it is connected, so the connection pool itself is
left exactly as Twisted made it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from twisted_router.resolution import CheckedEndpoint, checked_reactor

#: More distinct workers than this in one router's life and the oldest endpoints are rebuilt.
MAX_CACHED_ENDPOINTS = 4096


@implementer(IAgentEndpointFactory)
class WorkerEndpoints:
    """An C{IAgentEndpointFactory} that keeps one endpoint per C{(scheme, host, port)}."""

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
        quiet: bool = False,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        """
        @param resolver: resolves workers' host names (default: the
            reactor's C{nameResolver}); blocked addresses it returns are
            never connected to.
        """
        self._reactor = reactor
        self._resolver = resolver
        self._quiet = quiet
        self._timeout = connect_timeout
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._build(uri)
            if self._quiet:
                endpoint = _QuietEndpoint(endpoint)
            if len(self._cache) >= MAX_CACHED_ENDPOINTS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = endpoint
        return endpoint

    def _build(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            checked, checking = checked_reactor(self._reactor, self._resolver or self._reactor.nameResolver)
            endpoint = CheckedEndpoint(
                HostnameEndpoint(checked, uri.host, uri.port, timeout=self._timeout), host, checking
            )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint whose connections do not log their factory starting and stopping."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if hasattr(protocolFactory, "noisy"):
            protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)

    def __repr__(self) -> str:
        return repr(self._endpoint)
