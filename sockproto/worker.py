"""A worker process of ``--workers N``, started by the main process: ``python -m sockproto.worker``.

See :mod:`sockproto.workers`.
"""

from sockproto.workers import run_worker

if __name__ == "__main__":
    raise SystemExit(run_worker())
