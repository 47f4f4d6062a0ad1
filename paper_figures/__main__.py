"""python -m paper_figures all | NAME... | --list  [--quick | --full] [--device cuda] [--out DIR]"""

import argparse
import sys
import time
from pathlib import Path

from paper_figures import style
from paper_figures.registry import Context, figures


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m paper_figures", description=__doc__)
    parser.add_argument("names", nargs="*", help="figure names, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="CPU size (default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="paper size, for a GPU")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="seconds; for tests")
    parser.add_argument("--device", default="cpu", help="torch device for the empirical figures")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default figures/)")
    parser.add_argument("--store", type=Path, default=Path("store"), help="run store (default store/)")
    parser.add_argument("--workers", type=int, default=1, help="processes for the sweeps")
    args = parser.parse_args(argv)

    registry = figures()
    if args.list:
        for name, fig in registry.items():
            print(f"{name:24s} {fig.summary}")
        return 0
    names = list(registry) if args.names in ([], ["all"]) else args.names
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"paper_figures: error: unknown figure {unknown[0]!r}; valid: {', '.join(registry)}", file=sys.stderr)
        return 2
    try:
        ctx = Context(mode=args.mode or "quick", out=args.out, store=args.store, device=args.device,
                      workers=args.workers)
        ctx.check()
    except ValueError as err:
        print(f"paper_figures: error: {err}", file=sys.stderr)
        return 2
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(names)}] {name}: computing", flush=True)
        fig = registry[name]
        paths = style.save(fig.plot(fig.data(ctx), ctx), ctx.out, name)
        print(f"[{i}/{len(names)}] {name}: wrote {', '.join(map(str, paths))} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
