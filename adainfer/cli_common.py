"""What every command-line entry point shares: one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from .errors import AdainferError

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT_ERROR = 1
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `PROG: error: MESSAGE (see PROG --help)`, exit code 2.

    Subparsers made with `add_subparsers` are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Run a command's body: `AdainferError` -> one line and exit 2, Ctrl-C -> one line and 130."""
    if sys.stdout is None:  # started with file descriptor 1 closed (`adainfer run ... >&-`)
        if sys.stderr is not None:
            print(f"{prog}: error: standard output is closed; nothing to write the result to", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return main() or 0
    except AdainferError as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return EXIT_ENVIRONMENT_ERROR
    except OSError as exc:  # the machine, not the input: disk full, I/O error
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {name}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT_ERROR
