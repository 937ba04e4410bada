"""absl flag parsing for the programs built on bdjax (launch/, checkpoints_convert/, bench/):
a bad flag ends the program with one line and exit status 2, like any other bad input."""

from __future__ import annotations

import sys

USAGE_ERROR = 2  # exit status for bad command-line flags, as for any other bad input


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for `app.run(..., flags_parser=parse_flags)`: a bad flag (unknown, a
    value of the wrong type, not one of the choices, missing) ends the program with one line on
    stderr and exit status 2, instead of absl's usage text and status 1. Used by every program
    of launch/, checkpoints_convert/ and bench/."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = " ".join(str(e).split())
        for python, plain in (("invalid literal for int() with base 10", "not an integer"),
                              ("could not convert string to float", "not a number")):
            message = message.replace(python, plain)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)
