"""Command line: ``replace-wrap demo`` / ``replace-wrap bench`` (or ``python -m replace_wrap ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``replace-wrap`` console script."""
    parser = argparse.ArgumentParser(prog="replace-wrap", description="Replacement Learning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="convert a timm ViT and an HF ViT and print what was replaced")
    demo.add_argument("--every", type=int, default=2, help="replace every k-th block (default 2)")
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(every=args.every)
    if args.command == "bench":
        from .bench import main_bench

        return main_bench(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
