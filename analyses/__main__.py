"""``python -m analyses NAME [ARGS]``: run ``analyses/NAME.py``'s ``main(ARGS)``;
``python -m analyses`` lists them."""

import importlib
import pkgutil
import sys
from pathlib import Path


def names():
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv):
    if not argv or argv[0] not in names():
        print(f"usage: python -m analyses NAME [ARGS]; NAME one of: {', '.join(names())}", file=sys.stderr)
        return 2
    return importlib.import_module(f"analyses.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
