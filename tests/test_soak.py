"""The soak run's own checks: if they were wrong, the soak would pass a broken
server or fail a correct one. The run itself is ``python -m bench.soak``
(``scripts/test`` runs it for 15 s after the test suite)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random

from twisted.trial.unittest import SynchronousTestCase

from bench import soak
from bench import soak_checks as expect


def detached(pipe: soak.Pipe) -> soak.Conn:
    """A Conn on a bare pipe, taken back off soak's open-connection count at
    once: it has no transport to close, and the count is the soak's own."""
    conn = soak.Conn(pipe)
    conn.closed = True
    soak.Conn.open_now -= 1
    return conn


class StripTests(SynchronousTestCase):
    def test_answers_drop_whitespace_and_end_in_nul(self) -> None:
        self.assertEqual(expect.strip_answers([b"a b\tc\r", b"", b" x "]), b"abc\0\0x\0")

    def test_random_lines_have_no_lf_and_never_close(self) -> None:
        rng = random.Random(1)
        for _ in range(2000):
            line = expect.strip_line(rng, 30)
            self.assertNotIn(b"\n", line)
            self.assertFalse(expect.closes_strip(line))
        self.assertTrue(expect.closes_strip(b" \tQuIt\r"))


class ChatTests(SynchronousTestCase):
    def test_line_kinds(self) -> None:
        self.assertEqual(expect.parse_chat(b"<bob> hi there\r\n"), expect.ChatLine("said", "bob", "hi there"))
        self.assertEqual(expect.parse_chat(b"* bob waves\r\n"), expect.ChatLine("acted", "bob", "waves"))
        self.assertEqual(expect.parse_chat(b"*** bob joined\r\n").kind, "notice")  # type: ignore[union-attr]
        self.assertEqual(expect.parse_chat(b"error: nope\r\n").kind, "error")  # type: ignore[union-attr]

    def test_malformed_lines_are_named(self) -> None:
        for line in (b"<bob> hi\n", b"<bob> \x1b[31mred\r\n", b"<bo b> hi\r\n", b"\xff\r\n", b"hello\r\n"):
            self.assertIsInstance(expect.parse_chat(line), str, line)

    def test_relayed_text_loses_controls_and_bad_utf8(self) -> None:
        self.assertEqual(expect.chat_relayed(b"a\x1b[1mb\x07\tc\xc2\x9b\xffd"), "a[1mb\tc\ufffdd")

    def test_tagged_lines_carry_a_checksum(self) -> None:
        text = expect.tagged("p1a", 7, "héllo wörld")
        self.assertEqual(expect.parse_tagged(text), expect.Tagged("p1a", 7))
        self.assertIsInstance(expect.parse_tagged(text.replace("wörld", "world")), str)
        self.assertIsInstance(expect.parse_tagged("soak p1a x"), str)
        self.assertIsNone(expect.parse_tagged("someone else's line"))

    def test_welcome_names_the_nick(self) -> None:
        line = b"*** welcome to sockproto chat, you are guest12; /nick NAME changes it\r\n"
        self.assertEqual(expect.welcome_nick(line), "guest12")
        self.assertIsNone(expect.welcome_nick(b"error: too many users, try again later\r\n"))


class HttpTests(SynchronousTestCase):
    def test_request(self) -> None:
        request = expect.http_request("POST", "/anything", [("X-A", "1")], b"hi", close=True)
        self.assertTrue(request.startswith(b"POST /anything HTTP/1.1\r\nHost: 127.0.0.1\r\n"))
        self.assertIn(b"\r\nX-A: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi", request)

    def test_head_and_body_length(self) -> None:
        response = expect.parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX: a:b\r\n\r\n")
        assert isinstance(response, expect.Response)
        self.assertEqual((response.status, response.header("x")), (200, "a:b"))
        self.assertEqual(expect.body_length(response, "GET"), 12)
        self.assertEqual(expect.body_length(response, "HEAD"), 0)
        chunked = expect.parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(expect.body_length(chunked, "GET"), "chunked")  # type: ignore[arg-type]
        self.assertIsInstance(expect.parse_head(b"SSH-2.0-x\r\n\r\n"), str)

    def test_read_response_with_chunks_then_the_next_one(self) -> None:
        async def read() -> tuple[expect.Response, expect.Response]:
            pipe = soak.Pipe()
            pipe.data_received(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                b"HTTP/1.1 204 No Content\r\n\r\n"
            )
            pipe.eof_received()
            conn = detached(pipe)
            return await soak.read_response(conn, "GET"), await soak.read_response(conn, "GET")

        first, second = asyncio.run(read())
        self.assertEqual((first.status, first.body), (200, b"abcde"))
        self.assertEqual((second.status, second.body), (204, b""))


class Pop3Tests(SynchronousTestCase):
    def test_wire_form_is_crlf_and_dot_stuffed(self) -> None:
        message = b"Subject: x\n\n.\n..a\nb.\nlast"
        self.assertEqual(expect.pop3_retr(message), b"Subject: x\r\n\r\n..\r\n...a\r\nb.\r\nlast\r\n.\r\n")
        self.assertEqual(expect.pop3_size(message), len(b"Subject: x\r\n\r\n.\r\n..a\r\nb.\r\nlast\r\n"))
        self.assertEqual(expect.pop3_retr(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n")

    def test_top_is_headers_blank_line_and_some_body(self) -> None:
        message = b"A: 1\r\nB: 2\r\n\r\none\r\ntwo\r\nthree\r\n"
        self.assertEqual(expect.pop3_top(message, 2), b"A: 1\r\nB: 2\r\n\r\none\r\ntwo\r\n.\r\n")
        self.assertEqual(expect.pop3_top(message, 0), b"A: 1\r\nB: 2\r\n\r\n.\r\n")

    def test_messages_mix_line_ends_and_dot_lines(self) -> None:
        rng = random.Random(2)
        messages = [expect.pop3_message(rng, n, 10) for n in (1, 2, 3)]
        self.assertIn(b"\r\n", messages[0])
        self.assertNotIn(b"\r\n", messages[1])
        self.assertFalse(messages[2].endswith(b"\n"))
        for message in messages:
            self.assertIn(b"\r\n..\r\n", expect.pop3_retr(message))

    def test_multiline_reader_handles_an_empty_listing(self) -> None:
        async def read() -> list[tuple[bytes, bytes]]:
            pipe = soak.Pipe()
            pipe.data_received(b"+OK 0 messages\r\n.\r\n+OK\r\n1 2\r\n.\r\n-ERR no\r\n")
            conn = detached(pipe)
            return [await soak.pop3_multiline(conn) for _ in range(3)]

        self.assertEqual(
            asyncio.run(read()),
            [(b"+OK 0 messages\r\n", b".\r\n"), (b"+OK\r\n", b"1 2\r\n.\r\n"), (b"-ERR no\r\n", b"")],
        )


class ConnTests(SynchronousTestCase):
    def test_data_before_a_reset_is_kept(self) -> None:
        async def read() -> tuple[bytes, bool]:
            pipe = soak.Pipe()
            pipe.data_received(b"error: line too long\r\n")
            pipe.connection_lost(ConnectionResetError())
            conn = detached(pipe)
            line = await conn.until(b"\r\n")
            try:
                await conn.fill()
            except soak.PeerClosedError as closed:
                return line, closed.reset
            return line, False

        self.assertEqual(asyncio.run(read()), (b"error: line too long\r\n", True))


class VerdictTests(SynchronousTestCase):
    def test_memory_growth_is_measured_after_the_warm_up(self) -> None:
        samples = [(0.0, 40_000), (1.0, 60_000), (2.0, 61_000), (3.0, 70_000), (4.0, 62_000)]
        memory = expect.memory_summary(samples, warm_until=2.0)
        self.assertEqual(memory, expect.Memory(start=40_000, baseline=61_000, peak=70_000, late=70_000))
        self.assertEqual(memory.growth, 9_000)  # type: ignore[union-attr]
        self.assertIsNone(expect.memory_summary([], 1.0))

    def test_log_problems(self) -> None:
        lines = [
            "2026-11-22T03:00:00+0000 [sockproto#info] strip listening on tcp:127.0.0.1:9000",
            "2026-11-22T03:00:01+0000 [sockproto#critical] pop3: error in RETR",
            "2026-11-22T03:00:01+0000 [twisted.internet.defer#error] boom",
            "\tTraceback (most recent call last):",
            "2026-11-22T03:00:02+0000 [-] Unhandled Error",
            "2026-11-22T03:00:03+0000 [sockproto#info] chat: guest1 said: Traceback is a word",
        ]
        self.assertEqual(expect.log_problems(lines), lines[1:])

    def outcome(self, **changes: object) -> soak.Outcome:
        outcome = soak.Outcome(
            tally=soak.Tally(),
            memory=expect.Memory(50_000, 52_000, 53_000, 53_000),
            finals=dict.fromkeys(soak.SERVICES, "answers"),
            left_open=dict.fromkeys(soak.TCP, 0),
            limits={},
            exit_status=0,
        )
        for name, value in changes.items():
            setattr(outcome, name, value)
        return outcome

    def test_a_clean_run_passes(self) -> None:
        self.assertEqual(soak.verdict(self.outcome()), [])
        self.assertTrue(soak.render(self.outcome(), 15, soak.Mix.of(1000), 1).endswith("\nPASS"))

    def test_every_failure_fails(self) -> None:
        wrong = soak.Tally()
        wrong.bad("strip", "x")
        failed = soak.Tally()
        failed.fail("http", "no answer")
        grown = expect.Memory(
            50_000, 52_000, 52_000 + soak.GROWTH_LIMIT_KIB + 1, 52_000 + soak.GROWTH_LIMIT_KIB + 1
        )
        for changes in (
            {"tally": wrong},
            {"tally": failed},
            {"problems": ["Traceback"]},
            {"memory": grown},
            {"memory": None},
            {"finals": {**dict.fromkeys(soak.SERVICES, "answers"), "udp": "no answer"}},
            {"left_open": {"pop3": 2}},
            {"exit_status": 1},
            {"exit_status": None},
        ):
            self.assertEqual(len(soak.verdict(self.outcome(**changes))), 1, changes)

    def test_refusals_by_limits_are_not_failures(self) -> None:
        tally = soak.Tally()
        tally.refused["pop3"] += 25
        tally.lost["udp"] += 3
        self.assertEqual(soak.verdict(self.outcome(tally=tally)), [])


class ArgumentTests(SynchronousTestCase):
    def test_duration_is_bounded(self) -> None:
        self.assertEqual(soak.parse_arguments([]).duration, 60.0)
        self.assertEqual(soak.parse_arguments(["--duration", "15"]).duration, 15.0)
        for bad in ("301", "0", "-1", "soon"):
            errors = io.StringIO()
            with self.assertRaises(SystemExit), contextlib.redirect_stderr(errors):
                soak.parse_arguments(["--duration", bad])
            self.assertIn("--duration", errors.getvalue())

    def test_the_mix_is_about_the_connections_asked_for(self) -> None:
        for connections in (300, 1000, 2000):
            mix = soak.Mix.of(connections)
            self.assertLess(abs(mix.well_behaved - 0.9 * connections), 0.1 * connections)
            caps = mix.server_arguments()
            self.assertGreater(caps["strip"], mix.strip_idle + mix.strip_busy)
            # The crowd always overflows the POP3 cap.
            self.assertGreater(mix.pop3_idle + mix.pop3_users + mix.crowd, caps["pop3"])
