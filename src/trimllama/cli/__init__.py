"""The `trimllama` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import TrimllamaError
from .options import CommandError



def subcommand_modules() -> list:
    """Every module of this package that defines `register(subparsers)` and `run(args) -> int`.

    Adding a subcommand is adding a module here; no list to edit.
    """
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register") and hasattr(module, "run"):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimllama",
        description="Trim the cross-attended image features of Llama-3.2-Vision (HF Mllama) without training.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in subcommand_modules():
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
    except BrokenPipeError:  # e.g. `trimllama generate --json | head -c 100`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"trimllama {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
