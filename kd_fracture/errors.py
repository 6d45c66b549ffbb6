"""User-facing errors and the CLI wrapper that turns them into one-line messages.

Bad input raises `UserError`; `cli_main` prints `error: <message>` to stderr and exits with code 2.
Tracebacks are reserved for bugs.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """An error caused by input the user can fix (bad file, bad flag). Message is one line."""

    exit_code = 2


class ConfigError(UserError):
    """Unknown key, wrong type or invalid value in a config file or override."""


class DataError(UserError):
    """Invalid manifest, CSV row, image file or data layout."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a `main(argv=None)` so a `UserError` becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
            return 130
        return 0 if rc is None else int(rc)

    return wrapper
