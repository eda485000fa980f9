"""Client input made safe: for one log line, for relaying to other clients,
and with the telnet commands a telnet client mixes into it taken out."""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable

from twisted.conch.telnet import DO, DONT, IAC, SB, SE, WILL, WONT

# Printable ASCII stays as it is; everything else (CR, LF, ESC, bytes >= 0x80)
# becomes a visible escape, so a client cannot start a new log line or drive
# the operator's terminal.
_ESCAPES = {i: f"\\x{i:02x}" for i in range(256)}
_ESCAPES.update({i: chr(i) for i in range(0x20, 0x7F)})
_ESCAPES.update({0x5C: "\\\\", 0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def loggable(data: bytes | str, limit: int = 200) -> str:
    """Escape ``data`` for a log line, cut to ``limit`` bytes with a marker."""
    raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
    shown = "".join(_ESCAPES[b] for b in raw[:limit])
    return shown + (f"...(+{len(raw) - limit} bytes)" if len(raw) > limit else "")


# The characters a client may not relay to others: the one definition, for
# everything that passes one client's text on to another. Built from the
# Unicode database, so a character it adds is covered without a change here.
# - C0 controls but TAB, DEL, and the C1 controls (U+0080-U+009F, which some
#   terminals obey as ESC sequences even in UTF-8): they drive a terminal.
# - Every format character (category Cf): the bidi controls (embeddings,
#   overrides, isolates, marks), which reorder what follows in a
#   bidi-capable terminal, so a line can show text other than what it holds
#   or seem to come from someone else; and the invisible ones (zero-width
#   space, word joiner, BOM, soft hyphen, invisible operators, the tag
#   characters U+E0000-U+E007F, which can carry a hidden copy of any ASCII
#   text), which make different texts look the same or hide text.
# - The line and paragraph separators U+2028, U+2029 (Zl, Zp): some clients
#   start a new line at them, so one line could show as two (a forged one).
# - The Hangul fillers U+115F, U+1160, U+3164, U+FFA0: letters to Unicode,
#   but blank or invisible, and outside decomposed archaic Hangul used only to
#   make a line or a name that looks empty.
# The joiners U+200C, U+200D (Cf too) have their own rule below, and the three
# subdivision flags (tags after U+1F3F4) theirs.
_JOINERS = "\u200c\u200d"
# Only planes 0-3 and 14 hold anything but private use (scanning all 17
# would cost a quarter of a second at every start).
NOT_RELAYED: dict[int, None] = dict.fromkeys(
    [
        *range(0x00, 0x09),
        *range(0x0A, 0x20),
        *range(0x7F, 0xA0),
        *(
            ord(char)
            for char in map(chr, itertools.chain(range(0x40000), range(0xE0000, 0xF0000)))
            if unicodedata.category(char) in ("Cf", "Zl", "Zp")
        ),
        0x115F,
        0x1160,
        0x3164,
        0xFFA0,
    ]
)
for _joiner in _JOINERS:
    del NOT_RELAYED[ord(_joiner)]
# The zero-width non-joiner and joiner (U+200C, U+200D) are part of writing:
# ZWJ inside emoji sequences (a family, a rainbow flag), both inside words in
# Persian and the Indic scripts. So they stay between two visible characters
# and go everywhere else (at an end, beside a space or another joiner), where
# they only hide.
_STRAY_JOINER = re.compile(
    rf"(?<![^\s{_JOINERS}])[{_JOINERS}]|[{_JOINERS}](?![^\s{_JOINERS}])",
)
# Tag characters show as something only in the three subdivision flags
# Unicode recommends (England, Scotland, Wales: U+1F3F4, "gb" and "eng",
# "sct" or "wls" in tags, then CANCEL TAG): those stay whole; any other tag
# would be invisible, so it goes.
_SUBDIVISION_FLAG = re.compile(
    "(\U0001f3f4"
    + "".join(chr(0xE0000 + ord(c)) for c in "gb")
    + "(?:"
    + "|".join("".join(chr(0xE0000 + ord(c)) for c in name) for name in ("eng", "sct", "wls"))
    + ")\U000e007f)"
)


def relayable(line: bytes) -> str:
    """A client's line as text fit to relay: UTF-8 (bad bytes become U+FFFD),
    without the characters of :data:`NOT_RELAYED` (but in a subdivision flag)
    and stray joiners."""
    text = line.decode("utf-8", "replace")
    if "\U0001f3f4" in text:  # a black flag: maybe a subdivision flag's base
        parts = _SUBDIVISION_FLAG.split(text)  # the flags at the odd places
        text = "".join(part if i % 2 else part.translate(NOT_RELAYED) for i, part in enumerate(parts))
    else:
        text = text.translate(NOT_RELAYED)
    if "\u200c" in text or "\u200d" in text:
        text = _STRAY_JOINER.sub("", text)
    return text


# Telnet (RFC 854). What may follow IAC in a command: SE (0xF0) to DONT (0xFE).
_SE, _SB = SE[0], SB[0]
_NEGOTIATION = frozenset({WILL[0], WONT[0], DO[0], DONT[0]})
# The answer to an offer or a request: no. We enable no option, so WONT and
# DONT need no answer (answering them is how negotiation loops start).
_REFUSAL = {WILL[0]: IAC + DONT, DO[0]: IAC + WONT}
# Runs of data, matched in C however long: bytes but 0xFF, and 0xFF with the
# byte after it when that is no command byte (IAC IAC among them). What a
# match stops at is a command, a last lone 0xFF, or the end.
# (Written as "normal* (special normal*)*", which sre runs fastest: 64 KiB of
# IAC IAC in 0.8 ms, four times what strip takes for text.)
_DATA = re.compile(rb"[^\xff]*(?:\xff[^\xf0-\xfe][^\xff]*)*")
# Inside a subnegotiation only IAC IAC goes on; any other IAC ends it.
_SUBNEGOTIATION = re.compile(rb"[^\xff]*(?:\xff\xff[^\xff]*)*")
# Commands one connection may send: a telnet client sends two per Ctrl-C
# (and none at the start, on a port other than 23). Past it the client is not
# telnet but a flood of commands, each one costing a turn of a Python loop:
# it is closed.
MAX_TELNET_COMMANDS = 1000
# The one line a service sends before it closes such a connection.
TOO_MANY_COMMANDS = b"error: too many telnet commands\r\n"


class TelnetFilter:
    """Takes the telnet commands out of a client's byte stream, before it is
    split into lines, so they neither show as garbage to the others nor
    count as text.

    A byte 0xFF (IAC) followed by a command byte (0xF0-0xFE) is a command:
    ``IAC WILL|WONT|DO|DONT x`` (three bytes), ``IAC SB ... IAC SE`` (a
    subnegotiation, skipped as it comes, never buffered) or a two-byte one
    such as ``IAC IP``, the Ctrl-C of a telnet client (``IAC IP IAC DO TM``),
    which is ignored: there is no process to interrupt, and in the line mode
    we leave telnet in it has discarded the typed line itself. Offers are
    refused (``DO x`` gets ``WONT x``, ``WILL x`` gets ``DONT x``): the
    client waits for that answer to its ``DO TM`` and shows no output until
    it comes.

    0xFF followed by anything else is data, ``IAC IAC`` too (both bytes): a
    client that is not telnet (``nc`` sending bytes) keeps them, and a service
    that sends them back unchanged sends a telnet client its 0xFF correctly
    escaped. 0xFF never appears in UTF-8, so a text client never meets this.

    Data goes to ``data_received`` and answers to ``reply``, each in stream
    order; an unfinished command waits for the next :meth:`feed` (at most two
    bytes), so the result does not depend on how the stream is cut. Data is
    scanned in C; only commands cost Python work, so past ``limit`` of them
    ``too_many`` is called once and nothing more is passed on or answered.
    """

    __slots__ = ("_data_received", "_held", "_in_subnegotiation", "_limit", "_reply", "_too_many", "commands")

    def __init__(
        self,
        data_received: Callable[[bytes], object],
        reply: Callable[[bytes], object],
        too_many: Callable[[], object],
        limit: int = MAX_TELNET_COMMANDS,
    ) -> None:
        self._data_received = data_received
        self._reply = reply
        self._too_many = too_many
        self._limit = limit
        self._held = b""
        self._in_subnegotiation = False
        self.commands = 0  # taken out so far (a subnegotiation is one)

    def feed(self, data: bytes) -> None:
        """Pass ``data`` on without its telnet commands, answering them."""
        if self.commands > self._limit:
            return
        if self._held:
            data, self._held = self._held + data, b""
        elif not self._in_subnegotiation and IAC not in data:
            self._data_received(data)  # the usual case: one C-level scan
            return
        size = len(data)
        pos = 0  # data[pos:] is not passed on yet
        while pos < size:
            if self._in_subnegotiation:
                at = _SUBNEGOTIATION.match(data, pos).end()
                if at >= size - 1:  # it goes on (a last IAC: what it is, the next byte says)
                    self._held = data[at:]
                    return
                self._in_subnegotiation = False
                # IAC SE ends it as it should, another command as a client that forgot SE.
                pos = at + 2 if data[at + 1] == _SE else at
                continue
            at = _DATA.match(data, pos).end()
            if at > pos:
                self._data_received(data[pos:at])
            if at >= size - 1 or (data[at + 1] in _NEGOTIATION and at + 2 == size):
                self._held = data[at:]  # a last 0xFF (data or command?) or half a negotiation
                return
            self.commands += 1
            if self.commands > self._limit:
                self._too_many()
                return
            verb = data[at + 1]
            if verb in _NEGOTIATION:
                refusal = _REFUSAL.get(verb)
                if refusal is not None:
                    self._reply(refusal + data[at + 2 : at + 3])
                pos = at + 3
            else:
                self._in_subnegotiation = verb == _SB
                pos = at + 2

    def end(self) -> None:
        """The stream ended: a last lone 0xFF was data after all."""
        held, self._held = self._held, b""
        if held == IAC and not self._in_subnegotiation and self.commands <= self._limit:
            self._data_received(held)
        self._in_subnegotiation = False


class TelnetInput:
    """Mixin for a line protocol: its input without telnet's commands, which
    are answered (:class:`TelnetFilter`), before ``_bytes_received`` splits it.

    The filter is made at the first 0xFF: until a telnet client sends a
    command (Ctrl-C), a read costs one ``in`` test and nothing more, the path
    the benchmarks measure. The protocol gives ``_bytes_received(data)``,
    ``_telnet_reply(reply)`` (how an answer is written) and
    ``_telnet_flood()`` (past MAX_TELNET_COMMANDS: close with one line), and
    calls :meth:`_telnet_end` at the end of its input.
    """

    _telnet: TelnetFilter | None = None

    def dataReceived(self, data: bytes) -> None:
        telnet = self._telnet
        if telnet is None:
            if IAC not in data:
                self._bytes_received(data)
                return
            telnet = self._telnet = TelnetFilter(self._bytes_received, self._telnet_reply, self._telnet_flood)
        telnet.feed(data)

    def _telnet_end(self) -> None:
        """The input ended: a 0xFF held last is data, into the last line."""
        if self._telnet is not None:
            self._telnet.end()

    def _bytes_received(self, data: bytes) -> object:
        raise NotImplementedError

    def _telnet_reply(self, reply: bytes) -> None:
        raise NotImplementedError

    def _telnet_flood(self) -> None:
        raise NotImplementedError
