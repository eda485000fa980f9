"""The chat room and protocol, driven with StringTransports and a Clock (no sockets)."""

from __future__ import annotations

import sys
import unicodedata
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sockproto import chat
from sockproto.config import ChatSettings
from sockproto.limits import LOGIN_DELAY_CAP, ConnectionPolicy, GuardedFactory, suite_logins
from sockproto.stats import ServiceStats
from sockproto.text import MAX_TELNET_COMMANDS, TOO_MANY_COMMANDS

# What the README says is never relayed, beyond the C0 and C1 controls.
NOT_RELAYED = {
    "bidi embedding or override": "\u202a\u202b\u202c\u202d\u202e",
    "bidi isolate": "\u2066\u2067\u2068\u2069",
    "bidi mark": "\u200e\u200f\u061c",
    "zero-width character": "\u200b\u2060\ufeff",
    "line or paragraph separator": "\u2028\u2029",
    "other format character": "\u00ad\u180e\u2061\u2062\u2063\u2064\u206a\u206f\ufff9\ufffa\ufffb",
    "tag character": "\U000e0001\U000e0020\U000e0041\U000e0067\U000e007e\U000e007f",
    "Hangul filler": "\u115f\u1160\u3164\uffa0",
}
# The three subdivision flags Unicode recommends: U+1F3F4, tags, CANCEL TAG.
SUBDIVISION_FLAGS = [
    "\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in f"gb{name}") + "\U000e007f"
    for name in ("eng", "sct", "wls")
]


class TextTests(SynchronousTestCase):
    def test_controls_removed_tab_kept(self) -> None:
        self.assertEqual(chat.clean(b"a\x1b[31mb\x07c\x08d\te\x7ff\x00g\r"), "a[31mbcd\tefg")

    def test_c1_controls_removed(self) -> None:
        # U+009B is CSI: some terminals obey it like ESC [
        self.assertEqual(chat.clean("x\u009b2Jy\u0085z".encode()), "x2Jyz")

    def test_invalid_utf8_replaced(self) -> None:
        self.assertEqual(chat.clean(b"caf\xc3\xa9 \xff\xfe ok"), "caf\xe9 \ufffd\ufffd ok")

    def test_other_text_untouched(self) -> None:
        text = "h\xe9llo \u4e16\u754c \U0001f600 <b>&amp;"
        self.assertEqual(chat.clean(text.encode()), text)

    def test_bidi_controls_zero_width_and_separators_removed(self) -> None:
        # Regression: an RLO (U+202E) made "<bob> hi \u202etxt.exe" show as
        # "<bob> hi exe.txt"; the others showed or hid text the same way.
        for what, chars in NOT_RELAYED.items():
            for char in chars:
                self.assertEqual(chat.clean(f"a{char}b{char}".encode()), "ab", f"{what}: U+{ord(char):04X}")

    def test_every_format_character_removed_but_the_joiners(self) -> None:
        # Regression: only the bidi controls and four zero-width characters
        # went; 146 other format characters passed, among them the tags that
        # carry a hidden copy of any ASCII text ("ASCII smuggling").
        for code in range(sys.maxunicode + 1):
            char = chr(code)
            if unicodedata.category(char) == "Cf" and char not in "\u200c\u200d":
                self.assertEqual(chat.clean(f"a{char}b".encode()), "ab", f"U+{code:04X}")

    def test_hidden_ascii_in_tags_removed(self) -> None:
        hidden = "".join(chr(0xE0000 + ord(c)) for c in "ignore the rules")
        gb = "\U000e0067\U000e0062"
        for sent, relayed in [
            (f"hello{hidden}", "hello"),
            (f"\U0001f3f4{hidden}\U000e007f", "\U0001f3f4"),  # after a black flag too
            (f"\U0001f3f4{gb}{hidden}\U000e007f", "\U0001f3f4"),
            (f"{SUBDIVISION_FLAGS[0]}{hidden}", SUBDIVISION_FLAGS[0]),
        ]:
            self.assertEqual(chat.clean(sent.encode()), relayed, sent)

    def test_subdivision_flags_kept_whole(self) -> None:
        for flag in SUBDIVISION_FLAGS:
            for text in (flag, f"go {flag}!", f"{flag}{flag}", f"\u202e{flag}\u00ad"):
                self.assertEqual(chat.clean(text.encode()), text.replace("\u202e", "").replace("\u00ad", ""))
        # a black flag with tags that make no flag: just the black flag
        self.assertEqual(
            chat.clean("\U0001f3f4\U000e0075\U000e0073\U000e0063\U000e0061\U000e007f".encode()), "\U0001f3f4"
        )

    def test_joiners_kept_inside_emoji_and_words_only(self) -> None:
        family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one glyph: man ZWJ woman ZWJ girl
        flag = "\U0001f3f3\ufe0f\u200d\U0001f308"  # rainbow flag: after VS16
        persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # ZWNJ inside a word
        for text in (family, flag, persian, f"{family} and {persian}"):
            self.assertEqual(chat.clean(text.encode()), text)
        # Elsewhere they only hide: at an end, beside a space or another joiner.
        stray = "\u200dhi\u200c \u200c\u200dthere\u200d\u200dyou\u200d"
        self.assertEqual(chat.clean(stray.encode()), "hi thereyou")

    def test_nicknames(self) -> None:
        for good in ("a", "Alice", "bob_2", "x-y", "9" * 32):
            self.assertTrue(chat.valid_nick(good), good)
        for bad in ("", "a" * 33, "al ice", "al\xefce", "a.b", "a\n", "<b>", "\u0661"):
            self.assertFalse(chat.valid_nick(bad), bad)

    def test_split_command(self) -> None:
        self.assertEqual(chat.split_command("/NICK  bob "), ("nick", "bob"))
        self.assertEqual(chat.split_command("/me\twaves  at you"), ("me", "waves  at you"))
        self.assertEqual(chat.split_command("/quit"), ("quit", ""))
        self.assertEqual(chat.split_command("/"), ("", ""))
        self.assertEqual(chat.split_command("/ x"), ("", "x"))

    def test_formats(self) -> None:
        self.assertEqual(chat.said("bob", "hi \u4e16"), "<bob> hi \u4e16\r\n".encode())
        self.assertEqual(chat.acted("bob", "waves"), b"* bob waves\r\n")
        self.assertEqual(chat.notice("x"), b"*** x\r\n")
        self.assertEqual(chat.error("x"), b"error: x\r\n")


class Member:
    def __init__(self, nick: str, room: chat.Room | None = None) -> None:
        self.nick = nick
        self.got: list[bytes] = []
        self.room = room

    def send(self, data: bytes) -> None:
        self.got.append(data)


class Quitter(Member):
    """Leaves the room when it is sent anything, like a client found too slow."""

    def send(self, data: bytes) -> None:
        super().send(data)
        if self.room is not None and self in self.room and data.startswith(b"<"):
            self.room.leave(self, "too slow")


class RoomTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.room = chat.Room(history=3)
        self.a, self.b, self.c = Member("a"), Member("b"), Member("c")
        for member in (self.a, self.b, self.c):
            self.room.join(member)

    def test_join_announced_to_the_others(self) -> None:
        self.assertEqual(self.a.got, [b"*** b joined\r\n", b"*** c joined\r\n"])
        self.assertEqual(self.c.got, [])
        self.assertEqual(self.room.nicks(), ["a", "b", "c"])

    def test_say_reaches_everyone_else(self) -> None:
        self.room.say(self.b, "hi")
        self.assertEqual(self.a.got[-1], b"<b> hi\r\n")
        self.assertEqual(self.c.got[-1], b"<b> hi\r\n")
        self.assertNotIn(b"<b> hi\r\n", self.b.got)

    def test_leave_announced_with_reason(self) -> None:
        self.room.leave(self.b, "quit: bye")
        self.assertEqual(self.a.got[-1], b"*** b left (quit: bye)\r\n")
        self.assertNotIn(self.b, self.room)
        self.room.leave(self.b, "again")  # a second leave is nothing
        self.assertEqual(self.a.got[-1], b"*** b left (quit: bye)\r\n")

    def test_no_announcements_while_closing(self) -> None:
        self.room.closing = True
        self.room.leave(self.b, "server shutting down")
        self.assertEqual(self.a.got[-1], b"*** c joined\r\n")

    def test_rename(self) -> None:
        self.room.rename(self.b, "Bob")
        self.assertEqual(self.a.got[-1], b"*** b is now known as Bob\r\n")
        self.assertEqual(self.b.got, [b"*** c joined\r\n"])
        self.assertTrue(self.room.taken("bob"))
        self.assertFalse(self.room.taken("b"))

    def test_names_are_unique_regardless_of_case(self) -> None:
        self.assertTrue(self.room.taken("A"))

    def test_guest_names_skip_taken_ones(self) -> None:
        self.room.join(Member("guest2"))
        self.assertEqual([self.room.guest_nick() for _ in range(3)], ["guest1", "guest3", "guest4"])

    def test_history_keeps_the_last_lines_said(self) -> None:
        for i in range(5):
            self.room.say(self.a, f"line {i}")
        self.room.act(self.b, "waves")
        self.assertEqual(list(self.room.history), [b"<a> line 3\r\n", b"<a> line 4\r\n", b"* b waves\r\n"])

    def test_held_lines_go_out_together_in_order(self) -> None:
        for member in (self.a, self.b, self.c):
            member.got.clear()
        self.room.hold()
        self.room.say(self.a, "one")
        self.room.say(self.b, "two")
        self.room.act(self.a, "three")
        self.assertEqual((self.a.got, self.b.got, self.c.got), ([], [], []))
        self.room.release()
        # one write each, in the order said, never a member's own lines
        self.assertEqual(self.c.got, [b"<a> one\r\n<b> two\r\n* a three\r\n"])
        self.assertEqual(self.a.got, [b"<b> two\r\n"])
        self.assertEqual(self.b.got, [b"<a> one\r\n* a three\r\n"])

    def test_nested_holds_release_once(self) -> None:
        self.a.got.clear()
        self.room.hold()
        self.room.hold()
        self.room.say(self.b, "x")
        self.room.release()
        self.assertEqual(self.a.got, [])
        self.room.release()
        self.assertEqual(self.a.got, [b"<b> x\r\n"])

    def test_joining_while_lines_wait_gets_only_later_ones(self) -> None:
        self.room.hold()
        self.room.say(self.a, "before")  # in the history the newcomer is shown
        d = Member("d")
        self.room.join(d)
        self.room.say(self.b, "after")
        self.room.release()
        self.assertEqual(d.got, [b"<b> after\r\n"])
        self.assertEqual(self.c.got[-1], b"<a> before\r\n*** d joined\r\n<b> after\r\n")

    def test_leaving_while_lines_wait_gets_none_of_them(self) -> None:
        self.b.got.clear()
        self.room.hold()
        self.room.say(self.a, "bye b")
        self.room.leave(self.b, "quit")
        self.room.release()
        self.assertEqual(self.b.got, [])
        self.assertEqual(self.c.got[-1], b"<a> bye b\r\n*** b left (quit)\r\n")

    def test_leaving_while_delivering_does_not_nest(self) -> None:
        room = chat.Room(history=0)
        first, slow, last = Member("first"), Quitter("slow", room), Member("last")
        for member in (first, slow, last):
            room.join(member)
        first.got.clear()
        last.got.clear()
        room.say(first, "hello")
        # everyone gets the line first, then the leave, in that order
        self.assertEqual(last.got, [b"<first> hello\r\n", b"*** slow left (too slow)\r\n"])
        self.assertEqual(first.got, [b"*** slow left (too slow)\r\n"])


PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Client:
    """One connection: lines in, lines out."""

    def __init__(self, protocol: Any, transport: StringTransport, clock: Clock) -> None:
        self.protocol = protocol
        self.transport = transport
        self.clock = clock
        self.seen = 0

    @property
    def chat(self) -> chat.ChatProtocol:
        return self.protocol.wrappedProtocol

    def send(self, *lines: str | bytes) -> None:
        for line in lines:
            self.protocol.dataReceived(line.encode() + b"\n" if isinstance(line, str) else line)
            self.clock.advance(0)  # the reactor's turn ends: what the room held goes out

    def received(self) -> list[str]:
        """The lines received since the last call, once the reactor's turn ended."""
        self.clock.advance(0)
        data = self.transport.value()
        new, self.seen = data[self.seen :], len(data)
        return new.decode("utf-8", "replace").splitlines()

    def lose(self, reason: type[Exception] = ConnectionDone) -> None:
        self.protocol.connectionLost(Failure(reason()))


class ChatTestCase(SynchronousTestCase):
    settings: dict[str, Any] = {"rate": (0.0, 0.0)}
    accounts: dict[bytes, bytes] | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = ServiceStats("chat", "lines")
        settings = ChatSettings(**self.settings)
        checkers = []
        if self.accounts is not None:
            memory = InMemoryUsernamePasswordDatabaseDontUse()
            memory.users = dict(self.accounts)
            checkers.append(memory)
        self.chat_factory = chat.ChatFactory(settings, self.stats, self.clock, checkers)
        policy = ConnectionPolicy(
            max_clients=settings.max_clients,
            overflow_message=chat.OVERFLOW_MESSAGE,
            idle_timeout=settings.idle_timeout,
            max_output=settings.max_output,
        )
        self.factory = GuardedFactory(self.chat_factory, policy, self.stats, self.clock)
        self.port = 40000

    def connect(self, host: str = "127.0.0.1") -> Client:
        self.port += 1
        peer = IPv4Address("TCP", host, self.port)
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return Client(protocol, transport, self.clock)

    def clients(self, count: int) -> list[Client]:
        made = [self.connect() for _ in range(count)]
        for client in made:
            client.received()
        return made


class JoinAndTalkTests(ChatTestCase):
    def test_welcome_names_the_nick_and_help(self) -> None:
        alice = self.connect()
        (welcome,) = alice.received()
        self.assertIn("guest1", welcome)
        self.assertIn("/help", welcome)
        self.assertTrue(welcome.startswith("*** "))

    def test_others_see_the_join(self) -> None:
        first = self.connect()
        first.received()
        self.connect()
        self.assertEqual(first.received(), ["*** guest2 joined"])

    def test_lines_reach_everyone_else_in_order(self) -> None:
        a, b, c = self.clients(3)
        b.send("one", "two\r", b"thr", b"ee\nfour\n")
        expected = ["<guest2> one", "<guest2> two", "<guest2> three", "<guest2> four"]
        self.assertEqual(a.received(), expected)
        self.assertEqual(c.received(), expected)
        self.assertEqual(b.received(), [])
        self.assertEqual(self.stats.handled, 4)

    def test_what_a_turn_brings_goes_out_once_it_ends(self) -> None:
        a, b, c = self.clients(3)
        # Two reads in one reactor turn: nothing goes out until the turn ends,
        # then each client gets the turn's lines in one write.
        writes: list[bytes] = []
        a.transport.write = writes.append  # type: ignore[method-assign]
        b.protocol.dataReceived(b"one\n")
        c.protocol.dataReceived(b"two\nthree\n")
        self.assertEqual(writes, [])
        self.clock.advance(0)
        self.assertEqual(writes, [b"<guest2> one\r\n<guest3> two\r\n<guest3> three\r\n"])
        self.assertEqual(b.received(), ["<guest3> two", "<guest3> three"])
        self.assertEqual(c.received(), ["<guest2> one"])

    def test_empty_lines_are_not_relayed(self) -> None:
        a, b = self.clients(2)
        b.send("", "   ", "\t")
        self.assertEqual(a.received(), [])

    def test_control_characters_stripped_from_relayed_text(self) -> None:
        a, b = self.clients(2)
        b.send(b"\x1b]0;pwned\x07hi\x08\x08\x1b[2J\tthere\x9b\r\n")
        self.assertEqual(a.received(), ["<guest2> ]0;pwnedhi[2J\tthere\ufffd"])
        b.send(b"/me \x1b[5mblinks\n")
        self.assertEqual(a.received(), ["* guest2 [5mblinks"])

    def test_invalid_utf8_relayed_with_replacement(self) -> None:
        a, b = self.clients(2)
        b.send(b"caf\xe9 \xc3\xa9\n")
        self.assertEqual(a.received(), ["<guest2> caf\ufffd \xe9"])

    def test_double_slash_sends_a_slash(self) -> None:
        a, b = self.clients(2)
        b.send("//shrug")
        self.assertEqual(a.received(), ["<guest2> /shrug"])

    def test_history_replayed_to_a_newcomer(self) -> None:
        a, b = self.clients(2)
        for i in range(25):
            a.send(f"line {i}")
        b.send("/me waves")
        c = self.connect()
        lines = c.received()
        self.assertIn("guest3", lines[0])
        self.assertEqual(lines[1:], [f"<guest1> line {i}" for i in range(6, 25)] + ["* guest2 waves"])


class TextHygieneTests(ChatTestCase):
    def test_bidi_and_invisible_characters_not_relayed(self) -> None:
        a, b = self.clients(2)
        for what, chars in NOT_RELAYED.items():
            for char in chars:
                b.send(f"pay{char}lap", f"/me {char}waves")
                self.assertEqual(
                    a.received(), ["<guest2> paylap", "* guest2 waves"], f"{what}: U+{ord(char):04X}"
                )
        b.send("/quit \u202egone")
        self.assertEqual(a.received(), ["*** guest2 left (quit: gone)"])

    def test_emoji_sequences_relayed_whole(self) -> None:
        a, b = self.clients(2)
        b.send("\U0001f468\u200d\U0001f469\u200d\U0001f467 \u200d")
        self.assertEqual(a.received(), ["<guest2> \U0001f468\u200d\U0001f469\u200d\U0001f467 "])


# Telnet shapes: (what the client sends, what the others see, what it gets back).
TELNET = [
    # Ctrl-C: IAC IP, then IAC DO TIMING-MARK; the client shows nothing until its answer
    (b"hi\xff\xf4\xff\xfd\x06there\r\n", ["<guest2> hithere"], b"\xff\xfc\x06"),
    (b"\xff\xfb\x18\xff\xfb\x1fok\n", ["<guest2> ok"], b"\xff\xfe\x18\xff\xfe\x1f"),  # WILL x: DONT x
    (b"\xff\xfc\x01\xff\xfe\x03ok\n", ["<guest2> ok"], b""),  # WONT, DONT: nothing to answer
    (b"\xff\xfa\x18\x00xterm\xff\xff\n\xff\xf0ok\n", ["<guest2> ok"], b""),  # a subnegotiation
    (b"\xff\xfa\x1fno end\xff\xf4ok\n", ["<guest2> ok"], b""),  # one without SE ends at a command
    # NOP, DM, BRK, IP, AO, AYT, EC, EL, GA: two bytes each
    (b"o" + b"".join(bytes([0xFF, c]) for c in range(0xF1, 0xFA)) + b"k\n", ["<guest2> ok"], b""),
    # not commands: IAC IAC and IAC before a non-command byte are data (not UTF-8)
    (b"a\xff\xffb\xffc\n", ["<guest2> a\ufffd\ufffdb\ufffdc"], b""),
]


class TelnetTests(ChatTestCase):
    def sent_back(self, client: Client) -> bytes:
        client.clock.advance(0)
        data = client.transport.value()
        new, client.seen = data[client.seen :], len(data)
        return new

    def test_commands_answered_never_relayed_however_cut(self) -> None:
        # Regression: telnet's Ctrl-C reached the others as four U+FFFD of
        # garbage, and the telnet client showed no output for want of an answer.
        a, b = self.clients(2)
        for sent, relayed, answer in TELNET:
            for cut in range(len(sent)):
                b.send(sent[:cut], sent[cut:])
                self.assertEqual(a.received(), relayed, (sent, cut))
                self.assertEqual(self.sent_back(b), answer, (sent, cut))

    def test_commands_byte_by_byte(self) -> None:
        a, b = self.clients(2)
        for sent, relayed, answer in TELNET:
            b.send(*(sent[i : i + 1] for i in range(len(sent))))
            self.assertEqual(a.received(), relayed, sent)
            self.assertEqual(self.sent_back(b), answer, sent)

    def test_commands_inside_a_chat_command(self) -> None:
        a, b = self.clients(2)
        b.send(b"\xff\xfd\x06/nick\xff\xf4 bob\n")
        self.assertEqual(self.sent_back(b), b"\xff\xfc\x06*** you are now bob\r\n")
        self.assertEqual(a.received(), ["*** guest2 is now known as bob"])

    def test_a_last_lone_0xff_is_data_an_unfinished_command_is_dropped(self) -> None:
        a, b, c = self.clients(3)
        b.send(b"last\xff")
        b.protocol.readConnectionLost()
        self.assertEqual(a.received(), ["<guest2> last\ufffd", "*** guest2 left (EOF)"])
        c.received()
        c.send(b"end\xff\xfd")
        c.protocol.readConnectionLost()
        self.assertEqual(a.received(), ["<guest3> end", "*** guest3 left (EOF)"])
        self.assertEqual(self.sent_back(c), b"")


class TelnetBudgetTests(ChatTestCase):
    settings: dict[str, Any] = {"rate": (20.0, 40.0)}

    def test_a_flood_of_commands_alone_is_closed(self) -> None:
        # Regression: commands never reach the line path, so a client sending
        # nothing else was never charged to --chat-rate nor paused, while each
        # command cost a turn of a Python loop.
        a, b = self.clients(2)
        flood = b"\xff\xf1" * (4 * MAX_TELNET_COMMANDS)
        b.send(flood[:999], flood[999:], b"\xff\xfd\x06hello\n")
        b.clock.advance(0)
        self.assertEqual(b.transport.value()[b.seen :], TOO_MANY_COMMANDS)
        self.assertTrue(b.transport.disconnecting)
        self.assertEqual(a.received(), ["*** guest2 left (too many telnet commands)"])
        self.assertEqual(self.stats.limits["telnet_commands"], 1)

    def test_a_telnet_client_is_far_from_the_budget(self) -> None:
        a, b = self.clients(2)
        for _ in range(MAX_TELNET_COMMANDS // 4):  # a Ctrl-C before every other line
            b.send(b"\xff\xf4\xff\xfd\x06hi\r\n", b"ok\r\n")
            self.clock.advance(1)
        self.assertEqual(a.received(), ["<guest2> hi", "<guest2> ok"] * (MAX_TELNET_COMMANDS // 4))
        self.assertFalse(b.transport.disconnecting)


class NoHistoryTests(ChatTestCase):
    settings = {"rate": (0.0, 0.0), "history": 0}

    def test_zero_history(self) -> None:
        (a,) = self.clients(1)
        a.send("hello")
        self.assertEqual(len(self.connect().received()), 1)


class CommandTests(ChatTestCase):
    def test_nick(self) -> None:
        a, b = self.clients(2)
        b.send("/nick Bob")
        self.assertEqual(b.received(), ["*** you are now Bob"])
        self.assertEqual(a.received(), ["*** guest2 is now known as Bob"])
        b.send("hi")
        self.assertEqual(a.received(), ["<Bob> hi"])

    def test_nick_rules(self) -> None:
        a, b = self.clients(2)
        for name in ("", "a b", "x" * 33, "caf\xe9", "<admin>"):
            b.send(f"/nick {name}")
            (answer,) = b.received()
            self.assertTrue(answer.startswith("error: a nickname is 1 to 32 letters"), (name, answer))
        self.assertEqual(a.received(), [])

    def test_nick_collision_ignores_case(self) -> None:
        a, b = self.clients(2)
        a.send("/nick alice")
        b.send("/nick ALICE")
        self.assertEqual(b.received(), ["*** guest1 is now known as alice", "error: ALICE is taken"])
        a.received()
        a.send("/nick Alice")  # one's own name in another case is fine
        self.assertEqual(a.received(), ["*** you are now Alice"])
        a.send("/nick Alice")
        self.assertEqual(a.received(), ["*** you are already Alice"])

    def test_guest_name_of_someone_else_is_taken(self) -> None:
        _a, b = self.clients(2)
        b.send("/nick guest1")
        self.assertEqual(b.received(), ["error: guest1 is taken"])

    def test_who(self) -> None:
        a, b, _c = self.clients(3)
        b.send("/nick bob", "/who")
        self.assertEqual(b.received()[-1], "*** 3 here: guest1, bob (you), guest3")
        self.assertEqual(a.received(), ["*** guest2 is now known as bob"])

    def test_me(self) -> None:
        a, b = self.clients(2)
        b.send("/me waves at  everyone")
        self.assertEqual(a.received(), ["* guest2 waves at  everyone"])
        b.send("/me")
        self.assertEqual(b.received(), ["error: usage: /me ACTION"])
        self.assertEqual(a.received(), [])

    def test_help(self) -> None:
        (a,) = self.clients(1)
        a.send("/HELP")
        text = "\n".join(a.received())
        for command in ("/nick NAME", "/who", "/me ACTION", "/quit [REASON]", "/help"):
            self.assertIn(command, text)
        self.assertNotIn("/login", text)

    def test_unknown_command_is_not_broadcast(self) -> None:
        a, b = self.clients(2)
        b.send("/dance wildly", "/")
        self.assertEqual(
            b.received(),
            [
                "error: unknown command /dance (/help lists them)",
                "error: unknown command / (/help lists them)",
            ],
        )
        b.send("/login bob pw")
        self.assertEqual(b.received(), ["error: no login here; /nick NAME picks your nickname"])
        self.assertEqual(a.received(), [])


class LeavingTests(ChatTestCase):
    def test_quit_with_reason(self) -> None:
        a, b = self.clients(2)
        b.send("/quit gone fishing", "never said")
        self.assertEqual(b.received(), ["*** goodbye"])
        self.assertTrue(b.transport.disconnecting)
        self.assertEqual(a.received(), ["*** guest2 left (quit: gone fishing)"])
        b.lose()
        self.assertEqual(a.received(), [])
        self.assertEqual(self.factory.wrappedFactory.room.nicks(), ["guest1"])

    def test_quit_reason_is_cleaned(self) -> None:
        a, b = self.clients(2)
        b.send(b"/quit \x1b[1mbye\n")
        self.assertEqual(a.received(), ["*** guest2 left (quit: [1mbye)"])

    def test_quit(self) -> None:
        a, b = self.clients(2)
        b.send("/quit")
        self.assertEqual(a.received(), ["*** guest2 left (quit)"])

    def test_eof_after_a_last_line(self) -> None:
        a, b = self.clients(2)
        self.assertTrue(IHalfCloseableProtocol.providedBy(b.protocol))
        b.send(b"first\nlast without LF")
        b.protocol.readConnectionLost()
        self.assertEqual(
            a.received(), ["<guest2> first", "<guest2> last without LF", "*** guest2 left (EOF)"]
        )
        self.assertTrue(b.transport.disconnecting)

    def test_closed_connection(self) -> None:
        a, b = self.clients(2)
        b.lose(ConnectionDone)
        self.assertEqual(a.received(), ["*** guest2 left (EOF)"])

    def test_reset(self) -> None:
        a, b = self.clients(2)
        b.lose(ConnectionLost)
        self.assertEqual(a.received(), ["*** guest2 left (connection reset)"])
        self.assertEqual(self.stats.current, 1)

    def test_line_too_long(self) -> None:
        a, b = self.clients(2)
        b.send(b"fine\n" + b"x" * 5000 + b"\nnever\n")
        self.assertEqual(b.received(), ["error: line too long"])
        self.assertEqual(a.received(), ["<guest2> fine", "*** guest2 left (line too long)"])
        self.assertTrue(b.transport.disconnecting)
        self.assertEqual(self.stats.limits["max_line"], 1)

    def test_line_too_long_without_lf_is_bounded(self) -> None:
        a, b = self.clients(2)
        b.send(b"y" * 3000, b"y" * 3000)
        self.assertEqual(a.received(), ["*** guest2 left (line too long)"])
        self.assertEqual(b.chat._buffer, b"")

    def test_line_at_the_limit_is_fine(self) -> None:
        a, b = self.clients(2)
        # the limit counts every byte before the LF (a CR too)
        b.send(b"z" * 4096 + b"\n", b"y" * 4095 + b"\r\n")
        self.assertEqual(a.received(), ["<guest2> " + "z" * 4096, "<guest2> " + "y" * 4095])

    def test_overflow_line_for_one_too_many(self) -> None:
        settings = ChatSettings(max_clients=2)
        factory = GuardedFactory(
            chat.ChatFactory(settings, self.stats, self.clock),
            ConnectionPolicy(max_clients=2, overflow_message=chat.OVERFLOW_MESSAGE),
            self.stats,
            self.clock,
        )
        transports = []
        for _ in range(3):
            transport = StringTransport()
            factory.buildProtocol(PEER).makeConnection(transport)
            transports.append(transport)
        self.assertEqual(transports[2].value(), b"error: too many users, try again later\r\n")
        self.assertTrue(transports[2].disconnecting)
        self.assertFalse(transports[0].disconnecting)


class IdleTests(ChatTestCase):
    settings = {"rate": (0.0, 0.0), "idle_timeout": 60.0}

    def test_idle_client_leaves(self) -> None:
        a, b = self.clients(2)
        self.clock.advance(59)
        a.send("still here")
        self.clock.advance(2)
        self.assertEqual(b.received(), ["<guest1> still here", "*** idle for 60 s; goodbye"])
        self.assertEqual(a.received(), ["*** guest2 left (idle timeout)"])
        self.assertTrue(b.transport.disconnecting)
        self.assertEqual(self.stats.limits["idle_timeout"], 1)


class NoIdleTimeoutByDefaultTests(ChatTestCase):
    def test_never_idle(self) -> None:
        (a,) = self.clients(1)
        self.clock.advance(10**6)
        self.assertFalse(a.transport.disconnecting)


class SlowConsumerTests(ChatTestCase):
    settings = {"rate": (0.0, 0.0), "max_pending": 10_000}

    def test_a_reader_that_stops_costs_bounded_memory_then_is_dropped(self) -> None:
        talker, slow, fast = self.clients(3)
        slow.transport.producer.pauseProducing()  # its socket buffer is full
        line = "x" * 100
        for i in range(80):
            talker.send(f"{i} {line}")
        self.assertLessEqual(slow.chat.output.pending, 10_000)
        self.assertFalse(slow.transport.disconnecting)
        for i in range(80, 200):
            talker.send(f"{i} {line}")
        self.assertTrue(slow.transport.disconnected)  # aborted, not waited for
        self.assertEqual(slow.chat.output.pending, 0)
        received = fast.received()
        self.assertEqual(len([r for r in received if r.startswith("<guest1>")]), 200)
        self.assertIn("*** guest2 left (too slow)", received)
        self.assertIn("*** guest2 left (too slow)", talker.received())
        self.assertEqual(self.stats.limits["max_pending"], 1)
        self.assertEqual(self.factory.wrappedFactory.room.nicks(), ["guest1", "guest3"])

    def test_a_reader_that_catches_up_gets_everything_in_order(self) -> None:
        talker, slow = self.clients(2)
        slow.transport.producer.pauseProducing()
        for i in range(50):
            talker.send(f"line {i}")
        self.assertEqual(slow.received(), [])
        slow.transport.producer.resumeProducing()
        self.assertEqual(slow.received(), [f"<guest1> line {i}" for i in range(50)])


class FloodTests(ChatTestCase):
    # 8 lines a second (a step of 1/8 s is exact in binary), 4 at once
    settings = {"rate": (8.0, 4.0)}
    step = 0.125

    def test_over_the_rate_reading_pauses_and_nothing_is_lost(self) -> None:
        talker, reader = self.clients(2)
        talker.send(*[f"line {i}" for i in range(20)])
        self.assertEqual(reader.received(), [f"<guest1> line {i}" for i in range(4)])
        self.assertEqual(talker.transport.producerState, "paused")
        self.assertEqual(self.stats.limits["rate"], 1)
        self.clock.advance(self.step)
        self.assertEqual(reader.received(), ["<guest1> line 4"])
        self.assertEqual(talker.transport.producerState, "paused")
        self.clock.pump([self.step] * 15)
        self.assertEqual(reader.received(), [f"<guest1> line {i}" for i in range(5, 20)])
        self.clock.advance(self.step)
        self.assertEqual(talker.transport.producerState, "producing")

    def test_commands_count_too_and_quit_still_works(self) -> None:
        talker, reader = self.clients(2)
        talker.send(*["/who"] * 10, "/quit bye")
        self.assertFalse(talker.transport.disconnecting)
        self.clock.pump([self.step] * 7)
        self.assertTrue(talker.transport.disconnecting)
        self.assertEqual(reader.received(), ["*** guest1 left (quit: bye)"])
        # what is left to run is the gentle close's abort, not a rate timer
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [7 * self.step + 15])

    def test_eof_while_held_keeps_the_lines(self) -> None:
        talker, reader = self.clients(2)
        talker.send(*[f"line {i}" for i in range(8)])
        talker.protocol.readConnectionLost()
        self.clock.pump([self.step] * 5)
        lines = reader.received()
        self.assertEqual(lines, [f"<guest1> line {i}" for i in range(8)] + ["*** guest1 left (EOF)"])

    def test_connection_lost_while_held_cancels_the_timer(self) -> None:
        talker, reader = self.clients(2)
        talker.send(*[f"line {i}" for i in range(8)])
        talker.lose(ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(reader.received()[-1], "*** guest1 left (connection reset)")


class ShutdownTests(ChatTestCase):
    def test_everyone_told_and_no_leave_noise(self) -> None:
        clients = self.clients(3)
        stopping = self.factory.server_stopping()
        for client in clients:
            self.assertEqual(client.received(), ["*** server shutting down"])
            self.assertTrue(client.transport.disconnecting)
        fired: list[object] = []
        stopping.addCallback(fired.append)
        for client in clients:
            client.lose()
            self.assertEqual(client.received(), [])
        self.assertEqual(fired, [None])

    def test_slow_reader_gets_its_backlog_before_the_goodbye(self) -> None:
        talker, slow = self.clients(2)
        slow.transport.producer.pauseProducing()
        talker.send("before")
        self.factory.server_stopping()
        self.assertEqual(slow.received(), ["<guest1> before", "*** server shutting down"])


class OutputBudgetTests(ChatTestCase):
    """Issue 12: members that talk and never read held max clients x max pending
    (over 1 GiB at the defaults). The room's output together is bounded by
    --chat-max-output; over it, the members holding the most go first."""

    settings = {"rate": (0.0, 0.0), "max_pending": 0, "max_output": 10_000}
    LINE = "x" * 100  # "<guest1> " and CRLF: 111 bytes each

    def held(self, client: Client) -> int:
        return client.chat.output.pending

    def test_the_largest_holder_goes_first_and_the_room_stays_within_it(self) -> None:
        talker, first, second, reader = self.clients(4)
        first.transport.producer.pauseProducing()  # stops reading
        for i in range(40):
            talker.send(f"{i} {self.LINE}")
        second.transport.producer.pauseProducing()  # stops reading later: holds less
        with capturedLogs() as events:
            for i in range(40, 70):
                talker.send(f"{i} {self.LINE}")
                self.assertLessEqual(self.factory.output.total, 10_000)
        self.assertTrue(first.transport.disconnected)  # aborted, its output dropped
        self.assertFalse(second.transport.disconnecting)
        self.assertEqual(self.factory.output.total, self.held(second))
        self.assertEqual(self.stats.limits["max_output"], 1)
        self.assertEqual(self.stats.counters["dropped_slow"], 1)
        (dropped,) = [formatEvent(e) for e in events if "dropping" in formatEvent(e)]
        self.assertRegex(
            dropped,
            r"^chat: dropping 127\.0\.0\.1:\d+: \d+ bytes of output unread, the most while chat's clients"
            r" held over 10000 bytes \(--chat-max-output\)$",
        )
        self.assertIn("*** guest2 left (too slow)", reader.received())
        self.assertEqual(self.factory.wrappedFactory.room.nicks(), ["guest1", "guest3", "guest4"])

    def test_a_member_that_catches_up_is_not_dropped(self) -> None:
        talker, slow = self.clients(2)
        slow.transport.producer.pauseProducing()
        for i in range(60):
            talker.send(f"{i} {self.LINE}")
        slow.transport.producer.resumeProducing()  # reads it all
        for i in range(60, 150):
            talker.send(f"{i} {self.LINE}")
        self.assertFalse(slow.transport.disconnecting)
        self.assertEqual(self.factory.output.total, 0)

    def test_what_a_member_left_is_given_back(self) -> None:
        talker, slow = self.clients(2)
        slow.transport.producer.pauseProducing()
        talker.send(self.LINE)
        self.assertGreater(self.factory.output.total, 0)
        slow.lose()
        self.assertEqual(self.factory.output.total, 0)


class LoginTests(ChatTestCase):
    settings = {"rate": (0.0, 0.0), "auth": True, "login_delay": 1.0}
    accounts = {b"alice": b"secret", b"bob": b"pass word"}

    def test_nothing_before_login(self) -> None:
        (watcher,) = self.clients(1)
        watcher.send("/login bob pass word")
        watcher.received()
        guest = self.connect()
        (welcome,) = guest.received()
        self.assertIn("/login USER PASSWORD", welcome)
        guest.send("hello", "/who", "/nick x", "/me waves")
        self.assertEqual(guest.received(), ["error: log in first: /login USER PASSWORD"] * 4)
        self.assertEqual(watcher.received(), [])
        guest.send("/help")
        self.assertIn("/login USER PASSWORD", "\n".join(guest.received()))

    def test_login_joins_with_the_user_name(self) -> None:
        bob = self.connect()
        bob.send("/login bob pass word")
        self.assertEqual(bob.received()[-1], "*** welcome, bob; /help lists the commands")
        alice = self.connect()
        alice.send("/login alice secret", "hi")
        self.assertEqual(bob.received(), ["*** alice joined", "<alice> hi"])
        alice.send("/nick mallory", "/login alice secret")
        self.assertEqual(
            alice.received()[-2:],
            ["error: your nickname is your user name here", "error: you are already logged in as alice"],
        )
        self.assertEqual(self.stats.counters["logins"], 2)

    def test_failed_logins_answered_ever_later_and_lines_wait(self) -> None:
        mallory = self.connect()
        mallory.received()
        mallory.send("/login alice guess1", "/login alice guess2", "/login alice secret", "hi")
        self.assertEqual(mallory.received(), [])
        # Still read (a few lines wait), so that a hang-up is seen at once.
        self.assertEqual(mallory.transport.producerState, "producing")
        self.clock.advance(1)
        self.assertEqual(mallory.received(), ["error: login failed"])
        self.clock.advance(1.9)
        self.assertEqual(mallory.received(), [])
        self.clock.advance(0.1)  # second failure: 2 s
        self.assertEqual(mallory.received(), ["error: login failed"])
        self.clock.advance(1.9)  # the right password waits the address's penalty too: 2 s
        self.assertEqual(mallory.received(), [])
        self.clock.advance(0.1)
        self.assertEqual(mallory.received(), ["*** welcome, alice; /help lists the commands"])
        self.assertEqual(mallory.transport.producerState, "producing")
        self.assertEqual(self.stats.counters["login_failed"], 2)

    def test_penalty_is_per_address_across_connections(self) -> None:
        first, second = self.connect("10.0.0.1"), self.connect("10.0.0.1")
        elsewhere = self.connect("10.0.0.2")
        for client in (first, second, elsewhere):
            client.received()
        first.send("/login alice nope")
        second.send("/login alice nope")
        elsewhere.send("/login alice secret")
        self.assertIn("welcome, alice", elsewhere.received()[0])
        self.clock.advance(1)
        self.assertEqual((first.received(), second.received()), (["error: login failed"], []))
        self.clock.advance(2)
        self.assertEqual(second.received(), ["error: login failed"])

    def test_user_already_here(self) -> None:
        one, two = self.connect(), self.connect()
        one.send("/login alice secret")
        two.received()
        two.send("/login alice secret")
        self.assertEqual(two.received(), ["error: alice is already here"])

    def test_usage_and_unusable_names(self) -> None:
        guest = self.connect()
        guest.received()
        guest.send("/login", "/login alice")
        self.assertEqual(guest.received(), ["error: usage: /login USER PASSWORD"] * 2)
        guest.send("/login al.ice secret")
        self.assertEqual(
            guest.received(), ["error: that user name cannot be a nickname (1 to 32 letters, digits, _ or -)"]
        )

    def test_quit_before_login(self) -> None:
        (watcher,) = self.clients(1)
        watcher.send("/login alice secret")
        watcher.received()
        guest = self.connect()
        guest.send("/quit")
        self.assertTrue(guest.transport.disconnecting)
        self.assertEqual(watcher.received(), [])

    def test_disconnect_while_the_answer_waits(self) -> None:
        guest = self.connect()
        guest.send("/login alice wrong")
        guest.lose(ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_right_password_from_a_penalized_address_waits_within_the_cap(self) -> None:
        # Answered at once while a wrong one waits, it told a guesser within
        # milliseconds that its guess was wrong: hang up, try the next. (And
        # before that, 40 wrong logins at once made it wait over 1000 s.)
        self.fail_logins(40)
        self.clock.advance(0.4)
        alice = self.connect("10.0.0.1")
        alice.received()
        alice.send("/login alice secret", "/who")
        self.clock.advance(LOGIN_DELAY_CAP - 0.5)
        self.assertEqual(alice.received(), [])  # nor is /who answered before it
        self.assertEqual(self.chat_factory.login_delays.failures("10.0.0.1"), 40)
        self.clock.advance(0.5)
        self.assertEqual(alice.received()[0], "*** welcome, alice; /help lists the commands")
        self.assertEqual(self.chat_factory.login_delays.failures("10.0.0.1"), 0)  # it starts afresh

    def fail_logins(self, times: int, host: str = "10.0.0.1") -> None:
        """Wrong logins from ``host`` that hang up at once: counted, not in flight."""
        for _ in range(times):
            guess = self.connect(host)
            guess.send("/login alice nope")
            guess.lose()

    def test_right_password_waits_the_current_penalty_and_from_a_clean_address_none(self) -> None:
        self.fail_logins(3)
        clean = self.connect("10.0.0.2")
        clean.received()
        clean.send("/login bob pass word")
        self.assertEqual(clean.received(), ["*** welcome, bob; /help lists the commands"])  # at once
        alice = self.connect("10.0.0.1")
        alice.received()
        alice.send("/login alice secret")
        self.clock.advance(3.9)  # 1 s * 2**(3-1): the count is not raised
        self.assertEqual(alice.received(), [])
        self.clock.advance(0.1)
        self.assertEqual(alice.received(), ["*** welcome, alice; /help lists the commands"])

    def hang_up_while_waiting(self, guest: Client) -> None:
        """``guest`` (the only connection) hangs up while its login answer waits:
        closed at once, nothing said, its slot and its timer gone."""
        self.assertEqual(len(self.factory.protocols), 1)
        guest.protocol.readConnectionLost()  # the client hangs up: EOF
        self.assertTrue(guest.transport.disconnecting)  # at once, not after the wait
        self.assertEqual(guest.received(), [])  # nothing said about the password
        guest.lose()
        self.assertEqual((len(self.factory.protocols), self.stats.current), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hang_up_while_a_right_password_waits_frees_the_slot(self) -> None:
        guess = self.connect()
        guess.send("/login alice nope")
        guess.lose()
        guest = self.connect()
        guest.received()
        guest.send("/login alice secret")
        self.hang_up_while_waiting(guest)
        self.assertEqual(self.chat_factory.login_delays.failures("127.0.0.1"), 1)  # not cleared
        self.assertEqual(self.chat_factory.room.members, {})  # never joined

    def test_logins_in_flight_per_address_are_bounded(self) -> None:
        # Each answer waited only its own penalty: 40 connections held 40
        # guesses in flight at once, retried as each answer came.
        guesses = [self.connect("10.0.0.1") for _ in range(40)]
        for guess in guesses:
            guess.received()
        with capturedLogs() as events:
            for guess in guesses:
                guess.send("/login alice nope")
        busy = ["error: too many logins in progress from your address"]
        self.assertEqual([guess.received() for guess in guesses[2:]], [busy] * 38)  # at once
        self.assertEqual(self.stats.counters["login_failed"], 2)  # unchecked
        self.assertEqual(self.stats.limits["logins_in_flight"], 38)
        refusals = [e for e in events if "too many logins" in e.get("log_format", "")]
        self.assertEqual((len(refusals), refusals[0]["peer"]), (38, f"10.0.0.1:{self.port - 37}"))
        # The right password, refused the same way: nothing said about it.
        alice = self.connect("10.0.0.1")
        alice.received()
        alice.send("/login alice secret")
        self.assertEqual(alice.received(), busy)
        self.clock.advance(1)
        self.assertEqual(guesses[0].received(), ["error: login failed"])
        alice.send("/login alice secret")  # a slot is free again: checked
        self.clock.advance(2)  # the penalty after 2 failures: 2 s
        self.assertEqual(alice.received(), ["*** welcome, alice; /help lists the commands"])
        self.assertEqual(guesses[1].received(), ["error: login failed"])

    def test_logins_in_flight_is_an_option(self) -> None:
        # --logins-in-flight 1: the suite's one table (a factory built with it, same reactor).
        chat.ChatFactory(ChatSettings(auth=True), self.stats, self.clock, logins_in_flight=1)
        first, second = self.connect(), self.connect()
        first.received()
        second.received()
        first.send("/login alice nope")
        second.send("/login alice secret")
        self.assertEqual(second.received(), ["error: too many logins in progress from your address"])

    def test_other_services_count_the_same_failures(self) -> None:
        # One table for the suite: POP3 checks the same users.
        self.assertIs(self.chat_factory.login_delays, suite_logins(self.clock))
        suite_logins(self.clock).failed("10.0.0.1", 0.5)
        suite_logins(self.clock).failed("10.0.0.1", 0.5)
        alice = self.connect("10.0.0.1")
        alice.received()
        alice.send("/login alice secret")
        self.clock.advance(1.9)  # chat's own base: 1 s * 2**(2-1)
        self.assertEqual(alice.received(), [])
        self.clock.advance(0.1)
        self.assertEqual(alice.received(), ["*** welcome, alice; /help lists the commands"])

    def test_no_failed_login_waits_longer_than_the_cap(self) -> None:
        self.fail_logins(40)
        # The next failure from there waits the cap, not behind the others.
        late = self.connect("10.0.0.1")
        late.received()
        late.send("/login alice nope")
        self.clock.advance(LOGIN_DELAY_CAP)
        self.assertEqual(late.received(), ["error: login failed"])

    def test_hang_up_while_a_failed_answer_waits_frees_the_slot(self) -> None:
        guest = self.connect()
        guest.received()
        guest.send("/login alice wrong")
        self.hang_up_while_waiting(guest)
        self.assertEqual(self.chat_factory.login_delays.failures("127.0.0.1"), 1)  # still counted

    def test_input_behind_a_failed_login_is_bounded(self) -> None:
        guest = self.connect()
        guest.received()
        guest.send("/login alice wrong", "hi")
        self.assertEqual(guest.transport.producerState, "producing")
        guest.send("x" * 4000, "y" * 100)  # over a line's worth waits: reading pauses
        self.assertEqual(guest.transport.producerState, "paused")
        self.clock.advance(1)
        self.assertEqual(
            guest.received(), ["error: login failed", *["error: log in first: /login USER PASSWORD"] * 3]
        )
        self.assertEqual(guest.transport.producerState, "producing")
