"""sockproto's benchmark harness: every service against its peers, in one run.

``scripts/bench`` (or ``python -m bench``) starts the suite and each peer on
loopback, drives them with the same load generator in interleaved rounds, and
writes ``bench/results/RESULTS.md`` (medians, spreads, ratios to the peers) and
``bench/results/chart.png``. The pure parts (statistics, tables, arguments)
are tested in ``tests/test_bench.py``; the measurements never run in tests.
"""
