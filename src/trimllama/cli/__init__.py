"""The `trimllama` command line: one module per subcommand, each with `register(subparsers)` and `run(args)`.

Adding a subcommand: one module here, plus one line in `COMMANDS`. The other modules (`options`, `answer`)
are shared by the commands and are not commands themselves.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import TrimllamaError
from .options import CommandError, OneLineParser

COMMANDS = [
    "bench",
    "demo",
    "eval",
    "generate",
    "methods",
    "serve",
    "sglang",
    "show",
]


def subcommand_modules() -> list:
    """The modules of `COMMANDS`, in that order (the order of `trimllama --help`)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in COMMANDS]


def build_parser() -> OneLineParser:
    parser = OneLineParser(
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, e.g. for `bench` to record
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
