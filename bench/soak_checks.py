"""What the soak run expects of each service, and how it reads the answers.

Pure functions (no sockets, no server), tested in ``tests/test_soak.py``. They
restate the README's promises independently of the server's own code: a soak
that computed its expectations with the functions it checks would agree with
any bug in them.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# -- strip ------------------------------------------------------------------------

WHITESPACE = b" \t\r\n"
STRIP_OVERFLOW = b"too many users\r\n"
STRIP_TOO_LONG = b"error: line too long\r\n"
_STRIP_ALPHABET = b"abcXYZ019 \t\t  \r.,;:-_/\\\x00\x01\x7f\x80\xc3\xa9\xff"
# Random bytes onto that alphabet in one C-level pass (no LF in it).
_ONTO_STRIP = bytes(_STRIP_ALPHABET[i % len(_STRIP_ALPHABET)] for i in range(256))


def strip_answers(lines: Iterable[bytes]) -> bytes:
    """What the strip server sends back for these lines (each without its LF):
    whitespace and NULs removed, one NUL after each answer."""
    return b"".join(line.translate(None, WHITESPACE + b"\0") + b"\0" for line in lines)


def closes_strip(line: bytes) -> bool:
    """``exit``/``quit`` in any case, with whitespace around: the server hangs up."""
    return line.strip(WHITESPACE).lower() in (b"exit", b"quit")


def strip_line(rng: random.Random, longest: int = 200) -> bytes:
    """A random line (no LF) of spaces, tabs, CRs, controls, NULs and bytes >= 0x80."""
    line = rng.randbytes(rng.randrange(0, longest + 1)).translate(_ONTO_STRIP)
    return b"x" + line if closes_strip(line) else line


# -- chat -------------------------------------------------------------------------

CHAT_OVERFLOW = b"error: too many users, try again later\r\n"
CHAT_TOO_LONG = b"error: line too long\r\n"
_NICK = r"[A-Za-z0-9_-]{1,32}"
_CHAT_LINE = re.compile(
    rf"<(?P<nick>{_NICK})> (?P<text>.*)|\* (?P<actor>{_NICK}) (?P<action>.*)|\*\*\* (?P<notice>.*)"
    r"|error: (?P<error>.*)",
    re.DOTALL,
)
_WELCOME = re.compile(rf"\*\*\* welcome to sockproto chat, you are ({_NICK});")


# The characters the README says are never relayed: C0 but TAB, DEL, C1 (the
# Cc category), every format character (Cf: bidi controls, zero-width and
# other invisible characters, tags), the line and paragraph separators (Zl,
# Zp) and the Hangul fillers. The joiners U+200C/U+200D, kept between visible
# characters, are left to the server's own tests; so are the tags of the
# three subdivision flags, kept whole.
_NEVER_RELAYED = "".join(
    re.escape(char)
    for char in map(chr, range(sys.maxunicode + 1))
    if (unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") and char not in "\t\u200c\u200d")
    or char in "\u115f\u1160\u3164\uffa0"
)
_CONTROLS = re.compile(f"[{_NEVER_RELAYED}]")
_FLAG_TAGS = re.compile(
    "(?<=\U0001f3f4)\U000e0067\U000e0062(?:\U000e0065\U000e006e\U000e0067|\U000e0073\U000e0063\U000e0074"
    "|\U000e0077\U000e006c\U000e0073)\U000e007f"
)


def terminal_controls(text: str) -> list[str]:
    return _CONTROLS.findall(_FLAG_TAGS.sub("", text))


def chat_relayed(raw: bytes) -> str:
    """What the others see of a line a client said: UTF-8 (else U+FFFD), controls removed."""
    text = raw.decode("utf-8", "replace")
    parts = _FLAG_TAGS.split(text)
    flags = _FLAG_TAGS.findall(text)
    kept = [_CONTROLS.sub("", part) for part in parts]
    return "".join(part + flag for part, flag in zip(kept, [*flags, ""], strict=True))


@dataclass(frozen=True)
class ChatLine:
    kind: str  # said, acted, notice, error
    who: str
    text: str


def parse_chat(line: bytes) -> ChatLine | str:
    """A line from the chat server (with its CRLF), or a string saying what is wrong with it."""
    if not line.endswith(b"\r\n"):
        return f"line does not end in CRLF: {line[-40:]!r}"
    try:
        text = line[:-2].decode("utf-8")
    except UnicodeDecodeError:
        return f"not UTF-8: {line[:80]!r}"
    bad = terminal_controls(text)
    if bad:
        return f"relays control characters {bad[:5]!r}: {line[:80]!r}"
    match = _CHAT_LINE.fullmatch(text)
    if match is None:
        return f"not a chat line: {line[:80]!r}"
    if match["nick"] is not None:
        return ChatLine("said", match["nick"], match["text"])
    if match["actor"] is not None:
        return ChatLine("acted", match["actor"], match["action"])
    if match["notice"] is not None:
        return ChatLine("notice", "", match["notice"])
    return ChatLine("error", "", match["error"])


def welcome_nick(line: bytes) -> str | None:
    match = _WELCOME.match(line.decode("utf-8", "replace"))
    return match[1] if match else None


def tagged(tag: str, seq: int, body: str) -> str:
    """A chat text that carries its own checksum, so every reader can verify it."""
    return tagged_said(tag, seq, body.encode()).decode()


def tagged_said(tag: str, seq: int, said: bytes) -> bytes:
    """``tagged`` around bytes a client says as they are (maybe dirty): the checksum
    covers what the others get of them once the server has cleaned them."""
    head = f"{tag} {seq} "
    crc = zlib.crc32((head + chat_relayed(said)).encode())
    return b"soak " + head.encode() + said + f" #{crc:08x}".encode()


@dataclass(frozen=True)
class Tagged:
    tag: str
    seq: int


def parse_tagged(text: str) -> Tagged | str | None:
    """None for text that is not ours; a problem string if it is ours but damaged."""
    if not text.startswith("soak "):
        return None
    core, sep, crc = text[5:].rpartition(" #")
    parts = core.split(" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        return f"damaged soak line: {text[:80]!r}"
    if f"{zlib.crc32(core.encode()):08x}" != crc:
        return f"soak line with a bad checksum: {text[:80]!r}"
    return Tagged(parts[0], int(parts[1]))


# -- UDP --------------------------------------------------------------------------


def udp_payload(rng: random.Random, tag: bytes, seq: int) -> bytes:
    """A datagram that names its sender and sequence, then random bytes."""
    size = rng.choice((0, 1, 16, 100, 512, 1400, 4000, 9000)) if rng.random() > 0.02 else 65000
    return b"%s %d " % (tag, seq) + rng.randbytes(size)


# -- HTTP -------------------------------------------------------------------------

HTTP_OVERFLOW_STATUS = 503


def http_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    close: bool = False,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: sockproto-soak"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    status: int
    reason: bytes
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


def parse_head(head: bytes) -> Response | str:
    """Status line and headers (up to and including the blank line)."""
    lines = head.split(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
    if match is None:
        return f"not an HTTP status line: {lines[0][:80]!r}"
    response = Response(int(match[1]), match[2])
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return f"malformed header line: {line[:80]!r}"
        response.headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return response


def body_length(response: Response, method: str) -> int | str | None:
    """Bytes of body to read: a count, ``"chunked"``, or None (until the close)."""
    if method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
        return 0
    if "chunked" in (response.header("transfer-encoding") or "").lower():
        return "chunked"
    length = response.header("content-length")
    if length is not None:
        return int(length)
    return None


# -- POP3 -------------------------------------------------------------------------

POP3_OVERFLOW = b"-ERR [SYS/TEMP] too many sessions, try again later\r\n"
POP3_TOO_LONG = b"-ERR line too long\r\n"


def pop3_lines(message: bytes) -> list[bytes]:
    """The message's lines as a client sees them (stored LF or CRLF, last LF optional)."""
    text = message.replace(b"\r\n", b"\n")
    if text.endswith(b"\n"):
        text = text[:-1]
    return text.split(b"\n") if text else []


def pop3_size(message: bytes) -> int:
    """LIST/STAT octets: the message with CRLF line ends, without dot-stuffing."""
    return sum(len(line) + 2 for line in pop3_lines(message))


def pop3_maildrop(user: str, messages: Sequence[bytes]) -> bytes:
    """The answer to a successful login: what the mailbox holds, in messages and octets."""
    sizes = [pop3_size(message) for message in messages]
    return b"+OK %s's maildrop has %d messages (%d octets)\r\n" % (user.encode(), len(sizes), sum(sizes))


def pop3_wire(lines: Iterable[bytes]) -> bytes:
    """Lines as they follow ``+OK``: CRLF, dot-stuffed, then the ``.`` line."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def pop3_retr(message: bytes) -> bytes:
    return pop3_wire(pop3_lines(message))


def pop3_top(message: bytes, body_lines: int) -> bytes:
    lines = pop3_lines(message)
    blank = lines.index(b"") if b"" in lines else len(lines)
    return pop3_wire(lines[: blank + 1 + body_lines])


_ONTO_TEXT = bytes(b"abc .-\t"[i % 7] for i in range(256))


def pop3_message(rng: random.Random, number: int, body_lines: int) -> bytes:
    """A message that tests the wire format: dot-led lines, a lone dot, CRLF or LF ends."""
    header = [b"From: soak@example.org", b"To: user@example.org", b"Subject: soak message %d" % number]
    body = [b".", b"..", b".leading dot", b"trailing dot.", b""]
    for i in range(body_lines):
        body.append(b"line %d " % i + rng.randbytes(rng.randrange(0, 100)).translate(_ONTO_TEXT))
    end = b"\r\n" if number % 2 else b"\n"
    message = end.join([*header, b"", *body])
    return message if number % 3 == 0 else message + end  # some end without a line end


# -- memory and log ---------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """RSS in KiB: at start, at the end of the warm-up, at the peak, and the
    largest seen after the warm-up."""

    start: int
    baseline: int
    peak: int
    late: int

    @property
    def growth(self) -> int:
        return max(0, self.late - self.baseline)


def memory_summary(samples: Sequence[tuple[float, int]], warm_until: float) -> Memory | None:
    """Samples are (seconds since start, RSS KiB); growth is measured after ``warm_until``."""
    if not samples:
        return None
    before = [kib for t, kib in samples if t <= warm_until] or [samples[0][1]]
    after = [kib for t, kib in samples if t > warm_until] or [samples[-1][1]]
    return Memory(
        start=samples[0][1],
        baseline=before[-1],
        peak=max(kib for _, kib in samples),
        late=max(after),
    )


_PROBLEM = re.compile(r"Traceback|Unhandled|\[[^\]#]*#(error|critical)\]")


def log_problems(lines: Iterable[str]) -> list[str]:
    """Log lines that mean the server failed: tracebacks, unhandled errors,
    anything logged at error or critical level."""
    return [line for line in lines if _PROBLEM.search(line)]
