"""The listen backlog of every stream service (found by the soak run,
bench/soak.py: with Twisted's default of 50, a burst of connections lost some
that their clients believed open)."""

from __future__ import annotations

import asyncio

from twisted.trial.unittest import SynchronousTestCase

from sockproto.endpoints import LISTEN_BACKLOG, with_backlog
from tests.support import ALL_OFF, DEADLINE, Suite

BURST = 500  # well over Twisted's 50, well under ours


class WithBacklogTests(SynchronousTestCase):
    def test_added_where_twisted_takes_one(self) -> None:
        for description in (
            "tcp:9000:interface=127.0.0.1",
            "tcp6:9000",
            "ssl:995:privateKey=k.pem",
            "unix:/s",
        ):
            self.assertEqual(with_backlog(description), f"{description}:backlog={LISTEN_BACKLOG}")

    def test_an_explicit_backlog_wins(self) -> None:
        self.assertEqual(with_backlog("tcp:9000:backlog=4096"), "tcp:9000:backlog=4096")
        self.assertEqual(
            with_backlog("ssl:995:backlog=8:privateKey=k.pem"), "ssl:995:backlog=8:privateKey=k.pem"
        )
        # Given by position: Twisted would be given the backlog twice, a TypeError.
        for description in ("tcp:9000:127.0.0.1:4096", "tcp6:9000:4096", "unix:/s:660:4096"):
            self.assertEqual(with_backlog(description), description)

    def test_other_endpoints_are_left_alone(self) -> None:
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_an_escaped_colon_is_not_a_parameter(self) -> None:
        self.assertTrue(
            with_backlog("tcp:9000:interface=a\\:backlog=3").endswith(f":backlog={LISTEN_BACKLOG}")
        )


class BurstTests(SynchronousTestCase):
    def test_a_burst_of_clients_is_greeted_at_once(self) -> None:
        # Chat speaks first: a connection lost from a full accept queue would
        # wait for its welcome for ever (or a SYN retry, a second, later).
        async def burst(address: tuple[str, int]) -> list[bytes]:
            async def join() -> bytes:
                reader, writer = await asyncio.open_connection(*address)
                try:
                    return await reader.readline()
                finally:
                    writer.close()
                    await writer.wait_closed()

            async with asyncio.timeout(DEADLINE):
                return await asyncio.gather(*(join() for _ in range(BURST)))

        with Suite([*ALL_OFF, "--chat-port", "0", "--chat-history", "0"]) as suite:
            welcomes = asyncio.run(burst(suite.address("chat")))
        self.assertEqual(len(welcomes), BURST)
        self.assertTrue(all(line.startswith(b"*** welcome to sockproto chat") for line in welcomes))
