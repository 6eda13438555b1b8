"""The `nto` command (also `python -m nto_ext`)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _cmd_backend(args: argparse.Namespace) -> int:
    from . import ops

    print(ops.backend())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nto", description=(
        "nto_ext: fine-tune HuggingFace models under a hard training-state memory budget."))
    p.add_argument("--version", action="version", version=f"nto_ext {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("backend",
                       help="print which kernel path runs: cpu-ext, cuda-ext or reference")
    b.set_defaults(func=_cmd_backend)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
