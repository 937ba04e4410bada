"""absl flag parsing for the programs built on bdjax (launch/, checkpoints_convert/, bench/):
a bad flag ends the program with one line and exit status 2, like any other bad input."""

from __future__ import annotations

import sys

USAGE_ERROR = 2  # exit status for bad command-line flags, as for any other bad input
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull",
              "--helpxml", "-helpxml")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser for `app.run(..., flags_parser=parse_flags)`: a bad flag (unknown, a
    value of the wrong type, not one of the choices, missing) ends the program with one line on
    stderr and exit status 2, instead of absl's usage text and status 1. Used by every program
    of launch/, checkpoints_convert/ and bench/. Asking for help (--help, -h, --helpfull) prints
    it and exits 0, where absl exits 1 (and knows no -h)."""
    from absl import flags

    argv = _spelled_for_absl(argv)
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        if e.code == 1 and _asks_for_help(argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = " ".join(str(e).split())
        for python, plain in (("invalid literal for int() with base 10", "not an integer"),
                              ("could not convert string to float", "not a number")):
            message = message.replace(python, plain)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _spelled_for_absl(argv: list[str]) -> list[str]:
    """`argv` with -h (which absl does not know) as --help, up to the end of the flags ("--")."""
    if "-h" not in argv:
        return argv
    end = argv.index("--") if "--" in argv else len(argv)
    return [("--help" if arg == "-h" and i < end else arg) for i, arg in enumerate(argv)]


def _asks_for_help(args: list[str]) -> bool:
    """Whether `args` hold a help flag before the end of the flags ("--")."""
    for arg in args:
        if arg == "--":
            return False
        if arg in HELP_FLAGS:
            return True
    return False
