# -*- test-case-name: tests.unit.test_resolution -*-
"""
Worker host names, resolved and checked against the blocked addresses of
L{twisted_router.urls}.

A worker URL with a host name passes C{urls.py}'s checks by its spelling,
but the name may resolve to a cloud metadata address (an C{A} record of
C{169.254.169.254}), or resolve to a harmless address when it is registered
and to a blocked one later (DNS rebinding). So a name is checked twice:

  - at registration (L{check_worker_host}): every address it resolves to
    must be allowed, else the registration is refused (a C{400}) and nothing
    is registered; a name that does not resolve, or not within the timeout,
    is refused too;
  - at every connection (L{CheckingResolver}, given to the
    C{HostnameEndpoint} of each worker): blocked addresses are dropped from
    what the resolver returns, and a connection with none left fails with
    L{BlockedAddress}, whose message names the addresses and why.

Resolution goes through an injected L{IHostnameResolver} (the reactor's
C{nameResolver} in production: C{getaddrinfo} in the reactor's thread pool,
never on the reactor thread). IP-literal URLs are never resolved: their
address is checked by C{urls.py} already and cannot change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_router.urls import (
    BlockedWorkerURL,
    WorkerURLError,
    address_blocked_reason,
    host_name_of,
)

__all__ = [
    "RESOLVE_TIMEOUT",
    "BlockedAddress",
    "CheckingResolver",
    "check_worker_host",
    "checked_reactor",
]

#: Seconds a worker's host name may take to resolve at registration.
RESOLVE_TIMEOUT = 10.0


class BlockedAddress(ConnectError):
    """
    A worker's host name resolved only to blocked addresses when the router
    was about to connect (DNS rebinding, or a record changed since it was
    registered). A L{ConnectError}, so the worker counts as unreachable.
    """

    def __init__(self, host: str, refused: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.host = host
        self.refused = tuple(refused)

    def __str__(self) -> str:
        shown = "; ".join(f"{address} is {why}" for address, why in self.refused[:4])
        return f"{self.host} resolves only to blocked addresses ({shown}); not connecting"


def _host_of(address: IAddress) -> str:
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else repr(address)


def resolve(resolver: IHostnameResolver, host: str, port: int) -> Deferred[list[str]]:
    """The addresses C{resolver} gives for C{host} (empty if it found none)."""
    done: Deferred[list[str]] = Deferred()
    found: list[str] = []

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
            pass

        def addressResolved(self, address: IAddress) -> None:
            found.append(_host_of(address))

        def resolutionComplete(self) -> None:
            if not done.called:  # a late answer after the timeout is dropped
                done.callback(found)

    resolver.resolveHostName(Receiver(), host, portNumber=port)
    return done


async def check_worker_host(
    url: str, resolver: IHostnameResolver, clock: IReactorTime, *, timeout: float = RESOLVE_TIMEOUT
) -> None:
    """
    Refuse a canonical worker URL whose host name resolves to any blocked
    address, or does not resolve (within C{timeout} seconds). IP-literal
    URLs return at once.

    @raise BlockedWorkerURL: an address is blocked (the message says which and why).
    @raise WorkerURLError: the name does not resolve, or not in time.
    """
    name = host_name_of(url)
    if name is None:
        return
    host, port = name
    d = resolve(resolver, host, port)
    d.addTimeout(timeout, clock)
    try:
        addresses = await d
    except TimeoutError:
        raise WorkerURLError(
            f"worker URL {url!r} cannot be checked: {host} did not resolve within {timeout:g}s"
        ) from None
    if not addresses:
        raise WorkerURLError(f"worker URL {url!r} cannot be checked: {host} does not resolve to any address")
    for address in addresses:
        why = address_blocked_reason(address)
        if why is not None:
            raise BlockedWorkerURL(f"worker URL {url!r} is blocked: {host} resolves to {address}, which is {why}")


@implementer(IHostnameResolver)
class CheckingResolver:
    """
    A resolver that passes on only allowed addresses, for the connections of
    one worker; it remembers what it refused last, so a connection that
    fails for want of addresses can say why (L{CheckedEndpoint}).
    """

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver
        self.refused: list[tuple[str, str]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        refused: list[tuple[str, str]] = []
        checker = self

        @implementer(IResolutionReceiver)
        class Filter:
            def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
                resolutionReceiver.resolutionBegan(resolutionInProgress)

            def addressResolved(self, address: IAddress) -> None:
                why = address_blocked_reason(_host_of(address))
                if why is None:
                    resolutionReceiver.addressResolved(address)
                else:
                    refused.append((_host_of(address), why))

            def resolutionComplete(self) -> None:
                checker.refused = refused
                resolutionReceiver.resolutionComplete()

        return self._resolver.resolveHostName(Filter(), hostName, portNumber, addressTypes, transportSemantics)


@implementer(IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """
    The reactor, with another C{nameResolver}: C{HostnameEndpoint} takes its
    resolver from the reactor it is given, so this is how it gets the
    checking one. Everything else is the real reactor's.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        old, self.nameResolver = self.nameResolver, resolver
        return old

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def checked_reactor(reactor: Any, resolver: IHostnameResolver) -> tuple[Any, CheckingResolver]:
    """
    A reactor for one worker's C{HostnameEndpoint} whose resolver drops
    blocked addresses, and that resolver (to ask what it refused).
    """
    checking = CheckingResolver(resolver)
    return _ReactorWithResolver(reactor, checking), checking


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """
    A C{HostnameEndpoint} built on L{checked_reactor}: when every address
    was blocked, its C{DNSLookupError} ("no results") becomes
    L{BlockedAddress}, which names the addresses and why.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, host: str, resolver: CheckingResolver) -> None:
        self._endpoint = endpoint
        self._host = host
        self._resolver = resolver

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def explain(failure: Failure) -> Failure:
            if failure.check(DNSLookupError) and self._resolver.refused:
                return Failure(BlockedAddress(self._host, self._resolver.refused))
            return failure

        return self._endpoint.connect(protocolFactory).addErrback(explain)

    def __repr__(self) -> str:
        return f"<CheckedEndpoint {self._endpoint!r}>"
