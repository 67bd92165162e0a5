"""What every command-line entry point shares: one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import AdainferError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_main(prog: str, main: Callable[[], int]) -> int:
    try:
        return main() or 0
    except AdainferError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return 1
