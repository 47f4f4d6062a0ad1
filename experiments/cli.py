"""The ``optdyn`` command line. Each subcommand lives with its library module, which
exposes ``add_command(subparsers)``; the handler it sets as ``func`` gets the parsed args.

Bad input (a ValueError from the library, or an argparse error) prints one line on
stderr and exits with status 2.
"""

import argparse
import importlib
import sys

# module defining add_command(subparsers) -- one line per subcommand group
COMMAND_MODULES = [
    "experiments.train",
    "experiments.sweep",
    "experiments.link",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="optdyn", description="optimizer dynamics: train, sweep, collect, link")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as err:
        print(f"optdyn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
