"""python -m numba_attn [info | selftest | bench | warmup]; with no subcommand: the first
three, quick.

info      versions, CPU, threads and threading layer, BLAS, every backend and why one
          cannot serve; which kernel variants are in the disk cache.
warmup    compile the common kernel variants (float32 / float16 / bfloat16 / float64 x
          forward / varlen / decode / backward) into the disk cache, in parallel
          processes: run it once per machine (or in a Docker build).
selftest  every available backend against numba_attn.reference; exit code 1 on a failure.
bench     the benchmark shapes against numpy and torch (when installed).
"""
from __future__ import annotations

import argparse
import sys


def parser():
    p = argparse.ArgumentParser(prog="python -m numba_attn",
                                description=__doc__,  # plain text: argparse shows it as is
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    inf = sub.add_parser("info", help="versions, threads, BLAS and backends")
    inf.add_argument("--startup", action="store_true",
                     help="also time import + first call in fresh processes, cold and warm "
                          "on-disk cache (compiles into a temporary cache: ~10-30 s)")
    st = sub.add_parser("selftest", help="every backend against the numpy reference")
    st.add_argument("--quick", action="store_true", help="a small subset of the grid")
    st.add_argument("--backend", action="append", metavar="NAME",
                    help="only this backend (repeatable)")
    wu = sub.add_parser("warmup", help="compile the common variants into the disk cache")
    wu.add_argument("--jobs", type=int, metavar="N",
                    help="parallel processes (default: one per core)")
    wu.add_argument("--only", metavar="TEXT",
                    help="only variants whose name contains TEXT, e.g. 'float32'")
    be = sub.add_parser("bench", help="benchmark table against the numpy and torch peers")
    be.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    be.add_argument("--filter", metavar="NAME", help="only shapes whose name contains NAME")
    be.add_argument("--no-peers", action="store_true", help="time numba_attn only")
    be.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': "
                    "stdout), for tracking and plotting without asv")
    be.add_argument("--plot", metavar="FILE", help="draw the peer ratios to FILE (PNG, SVG, "
                    "...; needs matplotlib: the 'plot' extra)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from . import _cli, bench

    if args.command == "info":
        _cli.info(startup=args.startup)
        return 0
    if args.command == "selftest":
        return _cli.selftest(quick=args.quick, backends=args.backend)
    if args.command == "warmup":
        from . import _warmup

        return _warmup.warmup(jobs=args.jobs, only=args.only)
    if args.command == "bench":
        bench.run_bench(quick=args.quick, name_filter=args.filter,
                        peers=() if args.no_peers else ("numpy", "torch"),
                        json_path=args.json, plot_path=args.plot)
        return 0
    _cli.info()
    print()
    rc = _cli.selftest()
    print()
    bench.run_bench(quick=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
