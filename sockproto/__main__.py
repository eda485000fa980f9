"""``python -m sockproto COMMAND``: small tools that go with the servers."""

from __future__ import annotations

import argparse
import sys

from sockproto import __version__, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sockproto", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sockproto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("example-config", help="print a sockproto.toml with every key and its default")
    args = parser.parse_args(argv)
    if args.command == "example-config":
        sys.stdout.write(config.example_toml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
