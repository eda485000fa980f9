"""The benchmark harness's pure parts: statistics, tables, arguments, parsers.

The measurements themselves never run in the test suite (``scripts/bench``).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import cli, wrk
from bench.chart import ratios_by_service
from bench.harness import MAX_RESTARTS, Context, Metric, interleaved_rounds
from bench.report import TARGETS, cell, format_value, generator_checks, render_markdown
from bench.scenarios.chat import Case as ChatCase
from bench.scenarios.chat import chat_values
from bench.scenarios.memory import HTTP, STRIP
from bench.scenarios.strip import CASES as STRIP_CASES
from bench.scenarios.workers import without_workers
from bench.servers import several_workers, split_cores, suite_arguments
from bench.stats import OURS, Figure, Summary, median, percentile, ratio, summarize


def figure(server: str, values: list[float], case: str = "1 conn", **kwargs) -> Figure:
    fields = {"service": "strip", "metric": "round trips/s", "unit": "/s", "better": "higher"}
    fields.update(kwargs)
    return Figure(case=case, server=server, values=values, **fields)


class StatisticsTests(SynchronousTestCase):
    def test_median(self) -> None:
        self.assertEqual(median([3, 1, 2]), 2)
        self.assertEqual(median([4, 1, 3, 2]), 2.5)
        self.assertRaises(ValueError, median, [])

    def test_summary_is_median_and_range(self) -> None:
        summary = summarize([10.0, 12.0, 11.0])
        self.assertEqual(summary, Summary(median=11.0, low=10.0, high=12.0, rounds=3))
        self.assertAlmostEqual(summary.spread, 1 / 11)

    def test_summary_ignores_missing_rounds(self) -> None:
        self.assertEqual(summarize([math.nan, 5.0]), Summary(5.0, 5.0, 5.0, 1))
        self.assertIsNone(summarize([]))
        self.assertIsNone(summarize([math.nan]))

    def test_percentile_is_nearest_rank(self) -> None:
        values = list(range(1, 101))
        self.assertEqual(percentile(values, 50), 50)
        self.assertEqual(percentile(values, 99), 99)
        self.assertEqual(percentile(values, 100), 100)
        self.assertEqual(percentile([7], 99), 7)

    def test_ratio_says_how_many_times_better_ours_is(self) -> None:
        ours, peer = Summary(200, 200, 200, 1), Summary(100, 100, 100, 1)
        self.assertEqual(ratio(ours, peer, "higher"), 2.0)
        self.assertEqual(ratio(ours, peer, "lower"), 0.5)
        self.assertIsNone(ratio(None, peer, "higher"))

    def test_ratio_to_a_stalled_peer_is_infinite(self) -> None:
        ours, stalled = Summary(5, 5, 5, 1), Summary(0, 0, 0, 1)
        self.assertEqual(ratio(ours, stalled, "higher"), math.inf)
        self.assertIsNone(ratio(stalled, stalled, "higher"))

    def test_figure_survives_json(self) -> None:
        original = figure(OURS, [1.0, 2.0], note="errors seen: 3")
        self.assertEqual(Figure.from_json(original.to_json()), original)


class RenderingTests(SynchronousTestCase):
    def test_format_value(self) -> None:
        self.assertEqual(format_value(45123, "/s"), "45.1k/s")
        self.assertEqual(format_value(1234567, "/s"), "1.23M/s")
        self.assertEqual(format_value(512, "/s"), "512/s")
        self.assertEqual(format_value(0.0512, "ms"), "51.2 µs")
        self.assertEqual(format_value(12.34, "ms"), "12.3 ms")
        self.assertEqual(format_value(0.25, "s"), "250 ms")
        self.assertEqual(format_value(1.5, "KiB"), "1.50 KiB")
        self.assertEqual(format_value(math.nan, "s"), "n/a")

    def test_cells_give_ours_its_value_and_peers_the_ratio(self) -> None:
        ours = figure(OURS, [100.0, 110.0, 90.0])
        peer = figure("Twisted LineReceiver", [50.0])
        self.assertEqual(cell(ours, ours), "100/s ±10%")
        self.assertEqual(cell(peer, ours), "**2.00x** (50.0/s)")
        self.assertEqual(cell(figure(OURS, [], note="not in the suite yet"), None), "not in the suite yet")
        self.assertEqual(cell(figure("peer", [0.0]), ours), "**∞x** (0/s)")

    def test_markdown_has_a_table_per_metric_and_the_notes(self) -> None:
        figures = [
            figure(OURS, [100.0, 100.0]),
            figure("Twisted LineReceiver", [80.0, 80.0]),
            figure(OURS, [1.0, 1.0], metric="p99 latency", unit="ms", better="lower"),
            figure("Twisted LineReceiver", [2.0, 2.0], metric="p99 latency", unit="ms", better="lower"),
            figure(OURS, [], service="udp", metric="answers/s", case="1 source", note="not in the suite yet"),
        ]
        text = render_markdown(figures, {"note": "Quick run on a loaded machine", "notes": ["a note"]})
        self.assertIn("> **Quick run on a loaded machine**", text)
        self.assertIn("| case | sockproto | Twisted LineReceiver |", text)
        self.assertIn("| 1 conn | 100/s ±0% | **1.25x** (80.0/s ±0%) |", text)
        self.assertIn("| 1 conn | 1.00 ms ±0% | **2.00x** (2.00 ms ±0%) |", text)
        self.assertIn("| 1 source | not in the suite yet |", text)
        self.assertIn("- a note", text)
        self.assertIn("| strip at least as fast as the Twisted LineReceiver peer (>= 1.0x) | 1.25x", text)

    def test_targets_report_the_worst_case(self) -> None:
        figures = [
            figure(OURS, [100.0], case="1 conn"),
            figure("Twisted LineReceiver", [80.0], case="1 conn"),
            figure(OURS, [100.0], case="10 conns"),
            figure("Twisted LineReceiver", [125.0], case="10 conns"),
        ]
        measured, met = TARGETS[0].check(figures)
        self.assertEqual((measured, met), ("0.80x (worst case: 10 conns)", False))
        self.assertEqual(TARGETS[1].check(figures), ("not measured", None))

    def test_chat_non_reader_target_compares_ours_with_itself(self) -> None:
        chat = {"service": "chat", "metric": "deliveries/s"}
        figures = [
            figure(OURS, [1000.0], case="100 clients", **chat),
            figure(OURS, [950.0], case="100 clients + non-reader", **chat),
        ]
        measured, met = TARGETS[2].check(figures)
        self.assertTrue(met)
        self.assertIn("0.95", measured)

    def test_generator_check_compares_the_fastest_reference_with_ours(self) -> None:
        figures = [figure(OURS, [100.0]), figure("C server (generator check)", [400.0])]
        (line,) = generator_checks(figures)
        self.assertIn("4.0x what it got from sockproto", line)
        self.assertIn("not the bottleneck", line)

    def test_chart_data_is_the_ratio_of_the_main_metric(self) -> None:
        figures = [
            figure(OURS, [100.0]),
            figure("peer", [50.0]),
            figure(OURS, [1.0], metric="p99 latency", unit="ms", better="lower"),
        ]
        self.assertEqual(ratios_by_service(figures), {"strip": (["1 conn"], {"peer": [2.0]})})


class ArgumentTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        plan = cli.parse([])
        self.assertEqual(plan.services, cli.SERVICES)
        self.assertEqual((plan.duration, plan.rounds), (cli.DEFAULT_DURATION, cli.DEFAULT_ROUNDS))
        self.assertEqual(plan.out, cli.RESULTS)

    def test_quick_shortens_unless_told_otherwise(self) -> None:
        plan = cli.parse(["--quick"])
        self.assertEqual((plan.duration, plan.rounds), (cli.QUICK_DURATION, cli.QUICK_ROUNDS))
        plan = cli.parse(["--quick", "--rounds", "5", "--duration", "1.5"])
        self.assertEqual((plan.duration, plan.rounds), (1.5, 5))

    def test_only_and_skip(self) -> None:
        self.assertEqual(cli.parse(["--only", "strip,http"]).services, ("strip", "http"))
        self.assertNotIn("chat", cli.parse(["--skip", "chat"]).services)
        self.assertEqual(cli.parse(["--ours-arg=--workers", "--ours-arg=2"]).ours_args, ("--workers", "2"))

    def test_bad_arguments_stop_with_a_message(self) -> None:
        for argv in (
            ["--only", "smtp"],
            ["--rounds", "0"],
            ["--duration", "soon"],
            ["--only", "chat", "--skip", "chat"],
        ):
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                self.assertRaises(SystemExit, cli.parse, argv)
            self.assertIn("error:", stderr.getvalue())

    def test_runs_fit_their_time_budget(self) -> None:
        self.assertLess(cli.estimate_seconds(cli.parse([])), 15 * 60)
        self.assertLess(cli.estimate_seconds(cli.parse(["--quick"])), 3 * 60)

    def test_warmup_is_a_slice_of_the_duration(self) -> None:
        self.assertEqual(cli.parse(["--quick"]).warmup, 0.125)
        self.assertEqual(cli.parse(["--duration", "10"]).warmup, 0.5)

    def test_suite_arguments_turn_every_other_service_off(self) -> None:
        args = suite_arguments("chat", 4242, ["--chat-rate", "0"])
        self.assertEqual(args[args.index("--chat-port") + 1], "4242")
        self.assertEqual(args[args.index("--port") + 1], "off")
        self.assertEqual(args[-2:], ["--chat-rate", "0"])


WRK_REPORT = """\
Running 2s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.65ms    1.20ms  30.00ms   90.00%
    Req/Sec     8.14k   500.00     9.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    6.00ms
     90%    7.00ms
     99%    1.20s
  16280 requests in 2.00s, 2.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   8140.25
Transfer/sec:      1.05MB
"""


class CoreTests(SynchronousTestCase):
    def test_servers_get_the_last_core_the_generator_the_others(self) -> None:
        self.assertEqual(split_cores([1, 0]), ({0}, {1}))
        self.assertEqual(split_cores(range(4)), ({0, 1, 2}, {3}))
        self.assertIsNone(split_cores([0]))

    def test_several_workers_get_every_core(self) -> None:
        self.assertTrue(several_workers(["twistd", "sockproto", "--workers", "2"]))
        self.assertTrue(several_workers(["--workers=4"]))
        self.assertFalse(several_workers(["--workers", "1"]))
        self.assertFalse(several_workers(["twistd", "sockproto", "--port", "9000"]))

    def test_the_results_say_how_cores_were_used(self) -> None:
        meta = {"pinning": "each server pinned to core 1"}
        self.assertIn("Cores: each server pinned to core 1.", render_markdown([], meta))


class ParserTests(SynchronousTestCase):
    def test_wrk_report(self) -> None:
        self.assertEqual(
            wrk.parse(WRK_REPORT), {"rate": 8140.25, "p50_ms": 0.812, "p99_ms": 1200.0, "errors": 7.0}
        )

    def test_wrk_report_without_a_rate_is_an_error(self) -> None:
        self.assertRaises(RuntimeError, wrk.parse, "unable to connect to 127.0.0.1:1 Connection refused")

    def test_chat_run_that_stalled(self) -> None:
        run = {"rate": 0.0, "ops": 0, "errors": 0, "closed": 0, "joined": 100, "join_s": 0.1}
        values = chat_values(run, 100)
        self.assertTrue(values["stalled"])
        self.assertEqual(values["note"], "stalled: nothing delivered")
        self.assertNotIn("p99_ms", values)
        joined = chat_values(dict(run, joined=40), 100)
        self.assertEqual(joined["note"], "stalled: 40 of 100 joined")
        self.assertNotIn("join_s", joined)

    def test_chat_run_that_delivered(self) -> None:
        run = {"rate": 5e5, "ops": 10, "p50_us": 900.0, "p99_us": 4000.0, "errors": 0, "closed": 1}
        values = chat_values(dict(run, joined=10, join_s=0.01), 10)
        self.assertEqual(values, {"rate": 5e5, "errors": 1, "p50_ms": 0.9, "p99_ms": 4.0, "join_s": 0.01})

    def test_case_names(self) -> None:
        self.assertEqual([str(c) for c in STRIP_CASES][:2], ["1 conn", "10 conns"])
        self.assertEqual(str(STRIP_CASES[-1]), "100 conns, pipelined x16")
        self.assertEqual(
            (str(ChatCase(1000, True)), ChatCase(1000, True).senders), ("1000 clients + non-reader", 10)
        )
        self.assertEqual(ChatCase(10, False).senders, 1)

    def test_workers_scenario_sets_workers_itself(self) -> None:
        given = ("--workers", "4", "--idle-timeout", "9", "--workers=3")
        self.assertEqual(without_workers(given), ["--idle-timeout", "9"])

    def test_memory_answers_are_recognised(self) -> None:
        self.assertTrue(STRIP.done(b"helloworld\0"))
        self.assertFalse(HTTP.done(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"))
        self.assertTrue(HTTP.done(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabcde"))

    def test_results_folder_is_in_the_repository(self) -> None:
        self.assertEqual(cli.RESULTS, Path(__file__).resolve().parent.parent / "bench" / "results")


class FakeProcess:
    def tail(self, lines: int = 15) -> str:
        return "Ncat: getpeername failed. QUITTING."


class FakeServer:
    """Crashes after every measurement; can be started again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process = FakeProcess()
        self.up = True
        self.restarts = 0

    def alive(self) -> bool:
        return self.up

    def restart(self) -> bool:
        self.restarts += 1
        self.up = True
        return True


class RoundsTests(SynchronousTestCase):
    def context(self, rounds: int) -> Context:
        ctx = Context(cli.parse(["--rounds", str(rounds)]), Path("/nonexistent"), Path("/nonexistent"))
        ctx.say = lambda message: None
        return ctx

    def test_rounds_rotate_the_order_and_collect_every_value(self) -> None:
        order = []

        def measure(server, case):
            order.append(server.name)
            return {"rate": float(len(order))}

        servers = [FakeServer("a"), FakeServer("b")]
        metric = Metric("round trips/s", "/s", "higher", "rate")
        figures = interleaved_rounds(self.context(3), "strip", ["1 conn"], servers, [metric], measure)
        self.assertEqual(order, ["a", "b", "b", "a", "a", "b"])
        self.assertEqual([f.values for f in figures], [[1.0, 4.0, 5.0], [2.0, 3.0, 6.0]])

    def test_a_crashed_server_is_started_again_a_few_times(self) -> None:
        server = FakeServer("ncat --chat")

        def measure(server, case):
            server.up = False
            return {"rate": 1.0}

        ctx = self.context(MAX_RESTARTS + 3)
        metric = Metric("deliveries/s", "/s", "higher", "rate")
        (result,) = interleaved_rounds(ctx, "chat", ["10 clients"], [server], [metric], measure)
        self.assertEqual(server.restarts, MAX_RESTARTS)
        self.assertEqual(len(result.values), MAX_RESTARTS + 1)
        self.assertEqual(result.note, "server exited")
        self.assertIn("getpeername failed", ctx.notes[0])

    def test_a_stalled_server_is_not_measured_again_in_that_case(self) -> None:
        calls = []

        def measure(server, case):
            calls.append(case)
            return {"rate": 0.0, "stalled": True, "note": "stalled: nothing delivered"}

        metric = Metric("deliveries/s", "/s", "higher", "rate")
        (result,) = interleaved_rounds(
            self.context(3), "chat", ["10 clients"], [FakeServer("x")], [metric], measure
        )
        self.assertEqual((calls, result.values), (["10 clients"], [0.0]))
        self.assertEqual(result.note, "stalled: nothing delivered; not repeated")
