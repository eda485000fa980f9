"""Client input made safe: for one log line, for relaying to other clients,
and with the telnet commands a telnet client mixes into it taken out."""

from __future__ import annotations

import re
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
# everything that passes one client's text on to another.
# - C0 controls but TAB, DEL, and the C1 controls (U+0080-U+009F, which some
#   terminals obey as ESC sequences even in UTF-8): they drive a terminal.
# - Every Bidi_Control character: the embeddings and overrides U+202A-U+202E,
#   the isolates U+2066-U+2069, the marks U+200E, U+200F and U+061C: in a
#   bidi-capable terminal they reorder what follows, so a line can show text
#   other than what it holds, or seem to come from someone else.
# - The zero-width space U+200B, word joiner U+2060 and BOM U+FEFF: invisible,
#   they make different texts look the same.
# - The line and paragraph separators U+2028, U+2029: some clients start a new
#   line at them, so one line could show as two (the second a forged one).
NOT_RELAYED: dict[int, None] = dict.fromkeys(
    [
        *range(0x00, 0x09),
        *range(0x0A, 0x20),
        *range(0x7F, 0xA0),
        0x061C,
        0x200B,
        0x200E,
        0x200F,
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        0x2060,
        *range(0x2066, 0x206A),
        0xFEFF,
    ]
)
# The zero-width non-joiner and joiner (U+200C, U+200D) are part of writing:
# ZWJ inside emoji sequences (a family, a rainbow flag), both inside words in
# Persian and the Indic scripts. So they stay between two visible characters
# and go everywhere else (at an end, beside a space or another joiner), where
# they only hide.
_JOINERS = "\u200c\u200d"
_STRAY_JOINER = re.compile(
    rf"(?<![^\s{_JOINERS}])[{_JOINERS}]|[{_JOINERS}](?![^\s{_JOINERS}])",
)


def relayable(line: bytes) -> str:
    """A client's line as text fit to relay: UTF-8 (bad bytes become U+FFFD),
    without the characters of :data:`NOT_RELAYED` and stray joiners."""
    text = line.decode("utf-8", "replace").translate(NOT_RELAYED)
    if "\u200c" in text or "\u200d" in text:
        text = _STRAY_JOINER.sub("", text)
    return text


# Telnet (RFC 854). What may follow IAC in a command: SE (0xF0) to DONT (0xFE).
_FIRST_COMMAND, _LAST_COMMAND = SE[0], DONT[0]
_IAC, _SB, _SE = IAC[0], SB[0], SE[0]
_NEGOTIATION = frozenset({WILL[0], WONT[0], DO[0], DONT[0]})
# The answer to an offer or a request: no. We enable no option, so WONT and
# DONT need no answer (answering them is how negotiation loops start).
_REFUSAL = {WILL[0]: IAC + DONT, DO[0]: IAC + WONT}


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
    bytes), so the result does not depend on how the stream is cut.
    """

    __slots__ = ("_data_received", "_held", "_in_subnegotiation", "_reply")

    def __init__(self, data_received: Callable[[bytes], object], reply: Callable[[bytes], object]) -> None:
        self._data_received = data_received
        self._reply = reply
        self._held = b""
        self._in_subnegotiation = False

    def feed(self, data: bytes) -> None:
        """Pass ``data`` on without its telnet commands, answering them."""
        if self._held:
            data, self._held = self._held + data, b""
        elif not self._in_subnegotiation and IAC not in data:
            self._data_received(data)  # the usual case: one C-level scan
            return
        start = pos = 0  # data[start:] is not passed on yet; IAC is looked for from pos
        end = size = len(data)
        while pos < size:
            if self._in_subnegotiation:
                pos = start = self._skip_subnegotiation(data, pos)
                continue
            at = data.find(IAC, pos)
            if at < 0:
                break
            if at + 1 == size:  # is it a command? the next byte says
                self._held, end = IAC, at
                break
            verb = data[at + 1]
            if verb == _IAC or not _FIRST_COMMAND <= verb <= _LAST_COMMAND:
                pos = at + 2  # data, both bytes
                continue
            if verb in _NEGOTIATION and at + 2 == size:
                self._held, end = data[at:], at
                break
            if at > start:
                self._data_received(data[start:at])
            if verb in _NEGOTIATION:
                refusal = _REFUSAL.get(verb)
                if refusal is not None:
                    self._reply(refusal + data[at + 2 : at + 3])
                pos = start = at + 3
            else:
                self._in_subnegotiation = verb == _SB
                pos = start = at + 2
        if end > start:
            self._data_received(data[start:end])

    def _skip_subnegotiation(self, data: bytes, pos: int) -> int:
        """Where the data after the subnegotiation starts (``len(data)`` if it
        goes on). ``IAC IAC`` is part of it; any other IAC ends it: ``IAC SE``
        as it should, another command as a client that forgot ``SE``."""
        while True:
            at = data.find(IAC, pos)
            if at < 0:
                return len(data)
            if at + 1 == len(data):
                self._held = IAC
                return at + 1
            if data[at + 1] != _IAC:
                self._in_subnegotiation = False
                return at + 2 if data[at + 1] == _SE else at
            pos = at + 2

    def end(self) -> None:
        """The stream ended: a last lone 0xFF was data after all."""
        held, self._held = self._held, b""
        if held == IAC and not self._in_subnegotiation:
            self._data_received(held)
        self._in_subnegotiation = False
