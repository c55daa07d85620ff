"""Command line: ``replace-wrap demo`` / ``replace-wrap bench`` (or ``python -m replace_wrap ...``).

Not imported by ``import replace_wrap``: the demo and the benchmark are tools around the library.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``replace-wrap`` console script."""
    from .._version import __version__
    from ..errors import ReplaceWrapError

    parser = argparse.ArgumentParser(
        prog="replace-wrap", description="Replacement Learning for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"replace_wrap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small ViT on digits end-to-end and with convert(every=2), and compare",
        description="Train a small ViT (timm, built from a config) on scikit-learn's digits twice, end-to-end "
        "and converted with replace_wrap.convert(model, every=K), with the same seed and budget, each in a "
        "fresh subprocess; print test accuracy, trainable parameters, training time and peak memory.",
    )
    demo.add_argument(
        "--epochs", type=int, default=None, help="training epochs of each run (default 20; 2 with --quick)"
    )
    demo.add_argument("--every", type=int, default=2, help="replace every K-th block (default 2)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights and the data order (default 0)"
    )
    demo.add_argument(
        "--plot",
        metavar="PNG",
        default=None,
        help="draw accuracy vs training time and the a, b trajectory of every replaced block",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a tiny run of a few seconds (smaller model and data)"
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default 1: fastest for a model this small)",
    )
    demo.add_argument("--json", metavar="PATH", default=None, help="also write every measurement as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        try:
            return run_demo(
                epochs=args.epochs,
                every=args.every,
                seed=args.seed,
                plot=args.plot,
                quick=args.quick,
                threads=args.threads,
                json_path=args.json,
                progress=not args.no_progress,
            )
        except (ReplaceWrapError, ValueError) as exc:
            parser.exit(2, f"replace-wrap demo: error: {exc}\n")
    if args.command == "bench":
        from .bench import main_bench

        return main_bench(args)
    return 2  # pragma: no cover - argparse rejects unknown commands

