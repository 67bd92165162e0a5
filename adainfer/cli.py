"""`adainfer`: run, calibrate, evaluate and benchmark bundles (see `adainfer COMMAND --help`)."""

from __future__ import annotations

import argparse
import sys

from .cli_common import ArgumentParser, run_main
from .commands import COMMANDS


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adainfer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    handler = {c.NAME: c.main for c in COMMANDS}[args.command]
    return run_main("adainfer", lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
