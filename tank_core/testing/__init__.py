"""Test helpers for users and for us: a fake clock, fake transports, and peers that speak real frames.

- ``FakeClock``: monotonic time that moves only when told (``clock.py``).
- ``Harness``: a ``TankServer`` whose sockets are in-memory transports (``harness.py``).
- ``FakePeer``: a WebSocket client built on wsproto over a ``Harness`` connection (``peer.py``): what
  it sends and reads are real RFC 6455 bytes, so a test says "peer sends ``sub:news``" and checks
  what the peer reads.
- ``ClientLink``: our client machine wired to a ``Harness`` server (``client_link.py``).
- ``FakeServer``: the embedding server API (``publish``, hooks...) on all of the above, for testing
  application code on the fake clock (``fake_server.py``).

Nothing here touches a socket or a clock.
"""

from .client_link import ClientLink
from .clock import FakeClock
from .fake_server import FakeServer
from .harness import (
    CloseAsked,
    Discarded,
    FakeTransport,
    Harness,
    HttpAnswer,
    OutputRecord,
    Queued,
)
from .peer import FakePeer, basic_auth_header

__all__ = [
    "ClientLink",
    "CloseAsked",
    "Discarded",
    "FakeClock",
    "FakePeer",
    "FakeServer",
    "FakeTransport",
    "Harness",
    "HttpAnswer",
    "OutputRecord",
    "Queued",
    "basic_auth_header",
]
