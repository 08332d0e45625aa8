"""User-facing errors: one short line and a non-zero exit, no traceback.

Set ``RNNLM_DEBUG=1`` (or pass ``--debug``) to see the traceback anyway. Every CLI builds
its parser with :class:`ArgumentParser`, so command-line mistakes (an unknown flag, a
missing argument, a value of the wrong type) follow the same rule.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import textwrap
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (recipe, data, checkpoint, flags), not a bug."""


class HelpFormatter(argparse.HelpFormatter):
    """Paragraphs of a description or epilog that start at column 0 are wrapped; indented
    ones (tables, lists) keep their line breaks. An option's help ends with its default
    (unless the default is ``None``/``False``/empty, which the help text explains)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for p in text.split("\n\n"):
            indented = any(line.startswith(" ") for line in p.splitlines())
            out.append(textwrap.indent(p, indent) if indented else super()._fill_text(p, width, indent))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS or default in ([], ""))
        if shown and "%(default)" not in help and "default" not in help.lower() and action.option_strings:
            help += " (default: %(default)s)"
        return help


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the toolkit's error contract.

    A command-line mistake raises :class:`UserError` (``error: <what> (see PROG --help)``,
    exit 2 through :func:`cli`) instead of printing the usage block; ``--help`` shows
    each option's default and the ``--debug`` switch that :func:`cli` handles.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="on an error, show the full traceback instead of one line (or set RNNLM_DEBUG=1)")

    def error(self, message: str):  # argparse's hook for every parse error; it must not return
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
