"""A name resolver for tests: fixed answers, no DNS."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise NotImplementedError()  # as Twisted's own GAIResolver


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Answers each name with the addresses in C{answers} (a name missing from
    it resolves to nothing, as a failed lookup does), synchronously; names
    in C{hanging} never complete. C{asked} records every name asked for.
    """

    def __init__(self, answers: dict[str, list[str]] | None = None, hanging: Sequence[str] = ()) -> None:
        self.answers = dict(answers or {})
        self.hanging = set(hanging)
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if hostName in self.hanging:
            return resolution
        for address in self.answers.get(hostName, []):
            if ":" in address:
                resolutionReceiver.addressResolved(IPv6Address("TCP", address, portNumber))
            else:
                resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution
