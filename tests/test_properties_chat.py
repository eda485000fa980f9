"""Properties of the chat room under arbitrary byte streams, cut anywhere,
from several clients at once (StringTransports behind the real guard, a
Clock), with and without logins. Whatever the clients send or do (stop
reading, half-close, reset, wait):

- nothing raises out of the protocol and nothing is logged as a failure;
- everything a client receives is whole lines of UTF-8 (beside the answers
  to its telnet commands) with no character that may not be relayed (C0 but
  TAB, DEL, C1, bidi controls, zero-width ones, stray joiners): no client
  drives another's terminal or reorders or hides what it shows;
- no client ever gets its own line relayed back (``<nick> ...``, ``* nick ...``);
- per connection, the unhandled input stays under ``--chat-max-line`` plus
  one read, and the unsent output under ``--chat-max-pending``;
- a client held back (over its rate, a login being checked) is read again
  once the clock allows, and at a stop every open client is told.
"""

from __future__ import annotations

import re
import sys
import unicodedata
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
from tests.support import cut
from tests.test_properties_strip import telnet

MAX_LINE = 64
MAX_PENDING = 600
MAX_CHUNK = 120
ACCOUNTS = {b"alice": b"secret", b"bob": b"hunter 2", b"carol": b"x"}
RELAYED = re.compile(r"<([^>]*)> |\* (\S+) ")
SHUTDOWN = "*** server shutting down"


# Never relayed (the README): C0 but TAB, DEL, C1 (all of Cc), every format
# character (Cf) but the joiners, the line and paragraph separators, the
# Hangul fillers; the joiners only between two visible characters; tag
# characters only in the three subdivision flags.
_NEVER = "".join(
    re.escape(chr(code))
    for code in range(sys.maxunicode + 1)
    if (unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp") and chr(code) not in "\t\u200c\u200d")
    or code in (0x115F, 0x1160, 0x3164, 0xFFA0)
)
NEVER_RELAYED = f"[{_NEVER}]"


def _tags(text: str) -> str:
    return "".join(chr(0xE0000 + ord(c)) for c in text)


WALES = f"\U0001f3f4{_tags('gbwls')}\U000e007f"
FLAG = f"\U0001f3f4{_tags('gb')}(?:{_tags('eng')}|{_tags('sct')}|{_tags('wls')})\U000e007f"
STRAY_JOINER = "(?:^|(?<=[\\s\u200c\u200d]))[\u200c\u200d]|[\u200c\u200d](?=[\\s\u200c\u200d]|$)"
NOT_RELAYED = re.compile(f"{NEVER_RELAYED}|{STRAY_JOINER}")
# What the server answers to telnet's DO and WILL: IAC WONT x, IAC DONT x.
TELNET_ANSWER = re.compile(rb"\xff[\xfc\xfe].", re.DOTALL)


def controls(text: str) -> list[str]:
    return NOT_RELAYED.findall(re.sub(FLAG, "", text))


# What reorders or hides text, the joiners, telnet commands.
hostile = st.sampled_from(
    [
        *(chr(c).encode() for c in [0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0x2060, 0xFEFF]),
        *(chr(c).encode() for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]),
        *(chr(c).encode() for c in [0x00AD, 0x180E, 0x2061, 0x206A, 0xFFF9, 0x115F, 0x3164, 0xFFA0]),
        *(
            chr(c).encode() for c in [0xE0001, 0xE0041, 0xE0067, 0xE0062, 0xE007F, 0x1F3F4]
        ),  # tags, a black flag
        WALES.encode(),
        "\u200d".encode(),
        "\u200c".encode(),
        "\U0001f468\u200d\U0001f469".encode(),
        b"\xff\xf4\xff\xfd\x06",  # telnet's Ctrl-C
        b"\xff\xfb\x18",
        b"\xff\xfa\x18\x00",
        b"\xff\xf0",
        b"\xff\xff",
        b"\xff",
    ]
)
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
    hostile,
    st.integers(1, 100).map(lambda n: b"y" * n),  # up to and past --chat-max-line
)
JOINERS = "\u200c\u200d"
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
            for line in TELNET_ANSWER.sub(b"", data).decode("utf-8").split("\r\n"):
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
        """What it got, but answers to its telnet commands: lines of UTF-8."""
        return TELNET_ANSWER.sub(b"", self.transport.value()).decode("utf-8").split("\r\n")


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


def relayed_text(line: bytes) -> tuple[str | None, bytes]:
    """What the README says the others see of ``line`` sent with its LF (None
    if the LF went into an unended telnet subnegotiation), and the telnet
    answers its sender gets: its data without telnet commands, as UTF-8
    (else U+FFFD), a CR before the LF dropped, without what is never relayed
    and the joiners not between two visible characters."""
    events = telnet(line + b"\n", eof=False)
    answers = b"".join(e for e in events if isinstance(e, bytes))
    data = bytes(e for e in events if isinstance(e, int))
    if not data.endswith(b"\n"):
        return None, answers
    text = data[:-1].removesuffix(b"\r").decode("utf-8", "replace")
    kept = [
        c
        for i, part in enumerate(re.split(f"({FLAG})", text))
        for c in part
        if i % 2 or not re.fullmatch(NEVER_RELAYED, c)  # the flags at the odd places, kept whole
    ]
    visible = [c not in JOINERS and not c.isspace() for c in kept]
    shown = (
        c
        for i, c in enumerate(kept)
        if c not in JOINERS or (0 < i < len(kept) - 1 and visible[i - 1] and visible[i + 1])
    )
    return "".join(shown), answers


class ChatTextPropertyTests(SynchronousTestCase):
    @given(
        st.lists(st.one_of(hostile, st.text(max_size=4).map(str.encode), st.binary(max_size=4)), max_size=12),
        st.data(),
    )
    def test_what_is_relayed_of_any_line(self, parts: list[bytes], data: Any) -> None:
        line = b"x" + b"".join(parts).replace(b"\n", b"")  # one line, not a command
        clock = Clock()
        factory = chat.ChatFactory(ChatSettings(rate=(0.0, 0.0)), ServiceStats("chat", "lines"), clock)
        transports = [StringTransport(), StringTransport()]
        sender, _receiver = [factory.buildProtocol(None) for _ in transports]
        for protocol, transport in zip((sender, _receiver), transports, strict=True):
            protocol.makeConnection(transport)
        clock.advance(0)
        for transport in transports:
            transport.clear()  # the welcome, the join
        for chunk in data.draw(cut(line + b"\n", 6)):
            sender.dataReceived(chunk)
        clock.advance(0)
        text, answers = relayed_text(line)
        self.assertEqual(transports[0].value(), answers)
        self.assertEqual(transports[1].value(), b"" if text is None else f"<guest1> {text}\r\n".encode())
