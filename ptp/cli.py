"""The `ptp` command: a thin argparse layer over the Python API.

Each subcommand has an ``add_<name>(subparsers)`` that declares its arguments and sets
``func`` to the function that runs it. Bad input raises ``ConfigError``: one line on
stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptp", description="Post-training pruning of causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args) or 0
    except ConfigError as err:
        print(f"ptp: error: {err}", file=sys.stderr)
        return 2


COMMANDS: list = []

if __name__ == "__main__":
    sys.exit(main())
