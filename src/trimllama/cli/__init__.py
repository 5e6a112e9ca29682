"""The `trimllama` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import TrimllamaError

# subcommand name -> module in this package that defines `register(subparsers)` and `run(args) -> int`
SUBCOMMANDS = {
    "demo": "demo",
    "methods": "methods",
}


class CommandError(Exception):
    """A bad input the CLI reports as one line on stderr with a non-zero exit."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimllama",
        description="Trim the cross-attended image features of Llama-3.2-Vision (HF Mllama) without training.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        sub = module.register(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, TrimllamaError, NotImplementedError) as error:
        print(f"trimllama {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trimllama {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
