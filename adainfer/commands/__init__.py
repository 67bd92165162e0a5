"""Subcommands of `adainfer`: one module each, with `register(subparsers)` and `main(args)`.

Modules import heavy dependencies inside `main`, so `adainfer --help` stays fast and
`adainfer run` never imports torch.
"""

from . import bench, build_engines, calib, eval, fetch, run

#: the subcommands in help order; add a module here to add a subcommand
COMMANDS = [run, fetch, calib, eval, build_engines, bench]
