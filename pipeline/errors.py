"""User-facing errors: one short line and a non-zero exit, no traceback.

Set ``RNNLM_DEBUG=1`` (or pass ``--debug``) to see the traceback anyway.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (recipe, data, checkpoint, flags), not a bug."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes are a :class:`UserError` — one line under
    :func:`cli`, not a usage block — pointing at ``--help``."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def cli(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI ``main(argv)``: ``UserError`` → ``error: ...`` on stderr and exit code 2.

    ``--debug`` anywhere in argv (removed before ``main`` sees it) or ``RNNLM_DEBUG=1``
    re-raises instead, with the full traceback.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get("RNNLM_DEBUG", "") not in ("", "0")
        argv = [a for a in argv if a != "--debug"]
        try:
            return main(argv) or 0
        except UserError as e:
            if debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
