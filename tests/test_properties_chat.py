"""Properties of the chat room under arbitrary byte streams, cut anywhere,
from several clients at once (StringTransports behind the real guard, a
Clock), with and without logins. Whatever the clients send or do (stop
reading, half-close, reset, wait):

- nothing raises out of the protocol and nothing is logged as a failure;
- everything a client receives is whole lines of UTF-8 with no control
  character (C0 but TAB, DEL, C1): no client drives another's terminal;
- no client ever gets its own line relayed back (``<nick> ...``, ``* nick ...``);
- per connection, the unhandled input stays under ``--chat-max-line`` plus
  one read, and the unsent output under ``--chat-max-pending``;
- a client held back (over its rate, a login being checked) is read again
  once the clock allows, and at a stop every open client is told.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sockproto import chat
from sockproto.config import ChatSettings
from sockproto.limits import ConnectionPolicy, GuardedFactory
from sockproto.stats import ServiceStats

MAX_LINE = 64
MAX_PENDING = 600
MAX_CHUNK = 120
ACCOUNTS = {b"alice": b"secret", b"bob": b"hunter 2", b"carol": b"x"}
RELAYED = re.compile(r"<([^>]*)> |\* (\S+) ")
SHUTDOWN = "*** server shutting down"


def controls(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 0x20 and c != "\t") or 0x7F <= ord(c) < 0xA0]


pieces = st.one_of(
    st.binary(max_size=10),
    st.text(max_size=6).map(str.encode),
    st.sampled_from(
        [
            b"\n",
            b"\r\n",
            b"\r",
            b"/nick ",
            b"/NICK guest1\n",
            b"/nick Alice\n",
            b"/me ",
            b"/quit",
            b"/who\n",
            b"/help\n",
            b"//",
            b"/login alice secret\n",
            b"/login bob hunter 2\n",
            b"/login alice wrong\n",
            b"/login ",
            b"\x1b[2J",
            b"\x07\x08\x00\x7f",
            "\u009b\u0085".encode(),
            b"\xc2",  # half a UTF-8 sequence
            b"\xff\xfe",
            b"\t",
        ]
    ),
    st.integers(1, 100).map(lambda n: b"y" * n),  # up to and past --chat-max-line
)
chunks = st.lists(pieces, min_size=1, max_size=8).map(lambda parts: b"".join(parts)[:MAX_CHUNK])
clients = st.integers(0, 4)
actions = st.lists(
    st.one_of(
        st.tuples(st.just("data"), clients, chunks),
        st.tuples(st.just("data"), clients, chunks),
        st.tuples(st.just("data"), clients, chunks),
        st.tuples(st.just("advance"), st.sampled_from([0.05, 0.3, 1.0, 4.0])),
        st.tuples(st.just("stall"), clients),
        st.tuples(st.just("drain"), clients),
        st.tuples(st.just("eof"), clients),
        st.tuples(st.just("reset"), clients),
        st.tuples(st.just("join"), st.sampled_from(["10.0.0.1", "10.0.0.2"])),
    ),
    max_size=40,
)


class Client:
    def __init__(self, room: Room, host: str) -> None:
        room.port += 1
        peer = IPv4Address("TCP", host, room.port)
        self.guard = room.factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.gone = False
        self.guard.makeConnection(self.transport)
        self.protocol: chat.ChatProtocol | None = getattr(self.guard, "wrappedProtocol", None)
        if self.protocol is None:  # one too many: shown the door
            assert self.transport.value() == chat.OVERFLOW_MESSAGE and self.transport.disconnecting
        else:
            self.spy_on_relays(room, self.protocol)

    def spy_on_relays(self, room: Room, protocol: chat.ChatProtocol) -> None:
        """Check each line the room hands this client: no relay of its own.

        Lines go out when the reactor turn ends, and by then the speaker may
        have left or changed its name: who spoke is looked up in what was
        said (a nick speaks through one client at a time)."""
        speakers, send = room.speakers, protocol.send

        def checked(data: bytes) -> None:
            for line in data.decode("utf-8").split("\r\n"):
                match = RELAYED.match(line)
                if match:
                    sender = speakers.get((match[1] or match[2]).lower())
                    assert sender is not None, f"relayed from no one: {line!r}"
                    assert sender is not protocol, f"echoed to its sender: {line!r}"
            send(data)

        protocol.send = checked  # type: ignore[method-assign]

    @property
    def open(self) -> bool:
        return not (self.gone or self.transport.disconnecting)

    def lines(self) -> list[str]:
        return self.transport.value().decode("utf-8").split("\r\n")


class Room:
    def __init__(self, logins: bool) -> None:
        self.clock = Clock()
        self.stats = ServiceStats("chat", "lines")
        checkers = []
        if logins:
            memory = InMemoryUsernamePasswordDatabaseDontUse()
            memory.users = dict(ACCOUNTS)
            checkers.append(memory)
        settings = ChatSettings(
            max_line=MAX_LINE,
            history=3,
            max_pending=MAX_PENDING,
            rate=(5.0, 6.0),
            auth=logins,
            login_delay=0.5,
            idle_timeout=30.0,
        )
        self.chat = chat.ChatFactory(settings, self.stats, self.clock, checkers)
        self.speakers: dict[str, Any] = {}  # nick -> the client that last spoke under it
        for name in ("say", "act"):
            self.spy_on_speakers(getattr(self.chat.room, name), name)
        policy = ConnectionPolicy(max_clients=4, overflow_message=chat.OVERFLOW_MESSAGE, idle_timeout=30.0)
        self.factory = GuardedFactory(self.chat, policy, self.stats, self.clock)
        self.port = 40000
        self.clients: list[Client] = []

    def spy_on_speakers(self, speak: Any, name: str) -> None:
        def spoken(member: Any, text: str) -> None:
            self.speakers[member.nick.lower()] = member
            speak(member, text)

        setattr(self.chat.room, name, spoken)

    def join(self, host: str) -> None:
        self.clients.append(Client(self, host))

    def client(self, index: int) -> Client | None:
        return self.clients[index] if index < len(self.clients) else None

    def feed(self, client: Client, data: bytes) -> None:
        # A real transport does not read while paused: let the clock run
        # until the client is read again (its hold must end).
        for _ in range(100):
            if client.transport.producerState != "paused" or not client.open:
                break
            self.clock.advance(1)
        else:
            raise AssertionError("a client held back for good")
        if client.open:
            client.guard.dataReceived(data)
            self.clock.advance(0)  # the reactor's turn ends: what the room held goes out

    def reap(self) -> None:
        """The reactor's part: a closing connection is soon lost."""
        for client in self.clients:
            if not client.gone and client.transport.disconnecting:
                client.gone = True
                client.guard.connectionLost(Failure(ConnectionDone()))


class ChatPropertyTests(SynchronousTestCase):
    def check(self, room: Room) -> None:
        for client in room.clients:
            *lines, rest = client.lines()
            assert rest == "", f"a partial line was sent: {rest!r}"
            for line in lines:
                assert not controls(line), f"control characters sent: {line!r}"
            protocol = client.protocol
            if protocol is not None and not client.gone:
                assert len(protocol._buffer) <= MAX_LINE, len(protocol._buffer)
                assert sum(map(len, protocol._lines)) <= MAX_CHUNK + MAX_LINE
                assert protocol.output.pending <= MAX_PENDING, protocol.output.pending

    @settings(max_examples=120)
    @given(logins=st.booleans(), script=actions)
    def test_any_traffic(self, logins: bool, script: list[tuple[Any, ...]]) -> None:
        room = Room(logins)
        with capturedLogs() as events:
            for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
                room.join(host)
            for action, *args in script:
                client = room.client(args[0]) if action not in ("advance", "join") else None
                if action == "data" and client is not None:
                    room.feed(client, args[1])
                elif action == "advance":
                    room.clock.advance(args[0])
                elif action == "join":
                    room.join(args[0])
                elif client is None or not client.open:
                    pass
                elif action == "stall" and client.transport.producer is not None:
                    client.transport.producer.pauseProducing()  # its socket buffer is full
                elif action == "drain" and client.transport.producer is not None:
                    client.transport.producer.resumeProducing()
                elif action == "eof":
                    client.guard.readConnectionLost()
                elif action == "reset":
                    client.gone = True
                    client.guard.connectionLost(Failure(ConnectionLost()))
                room.reap()
                self.check(room)
            still_open = [c for c in room.clients if c.open]
            room.factory.server_stopping()
            room.reap()
            self.check(room)
        for client in still_open:
            self.assertEqual(client.lines()[-2], SHUTDOWN)
        failures = [formatEvent(e) for e in events if "log_failure" in e]
        self.assertEqual(failures, [])
