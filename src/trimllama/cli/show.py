"""`trimllama show`: draw which image patches the method keeps for a prompt, on the processor's tiles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import answer as run_model
from .options import CommandError, add_method_options, add_model_options


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "show",
        help="render the image(s) with the kept patches highlighted, to check where the method looks",
        description="Runs the prompt like `generate`, then writes a PNG of each image as the model saw it (the "
        "processor's tiles laid out in their grid, white gaps between tiles): kept patches in colour with a cyan "
        "outline, dropped patches dimmed to grey, and per image the kept token count and fraction. The caption holds the "
        "method, the prompt and the model's answer.",
        epilog="example: trimllama show --image photo.jpg --prompt 'What colour is the car?' --out kept.png",
    )
    run_model.add_prompt_options(parser)
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the figure (a .png path)")
    parser.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help=f"displayed tile size in pixels, 16 to {MAX_TILE_PX} (default: enlarged to >= 320)",
    )
    add_model_options(parser)
    add_method_options(parser)
    return parser


MAX_TILE_PX = 1024  # a figure holds up to images x 4 tiles of this size: tens of MB of RGB, not tens of GB


def check_output(path: str, tile_px: int | None) -> Path:
    """The output path, refused before any model loading if it cannot be written."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out {path}: the figure is a PNG, give a path ending in .png")
    if not out.parent.is_dir():
        raise CommandError(f"--out {path}: directory {out.parent} does not exist")
    if tile_px is not None and not 16 <= tile_px <= MAX_TILE_PX:
        raise CommandError(f"--tile-px must be between 16 and {MAX_TILE_PX}, got {tile_px}")
    return out


def run(args: argparse.Namespace) -> int:
    from ..harness.visualize import render_kept

    if not args.image:
        raise CommandError("show draws the kept patches on the image(s): give at least one --image")
    out = check_output(args.out, args.tile_px)
    generation = run_model.run(args)
    record = generation.record()
    figure = render_kept(
        generation.inputs,
        generation.kept,
        generation.processor,
        num_patches=generation.num_patches,
        title=_title(generation, args.prompt),
        tile_px=args.tile_px,
    )
    try:
        figure.image.save(out, format="PNG")
    except OSError as error:
        raise CommandError(f"--out {args.out}: cannot write it ({error})") from None
    if args.json:
        print(json.dumps(dict(record, out=str(out), kept=generation.kept.tolist(), figure=figure.layout())))
    else:
        print(f"wrote {out} ({figure.image.width}x{figure.image.height})")
        print(generation.answer)
        print(generation.summary())
    return 0


def _title(generation, prompt: str) -> list[str]:
    stats, label = generation.stats, run_model.method_record(generation.method)["label"]
    after, valid = stats.image_tokens_after[0], stats.image_tokens_valid[0]
    extra = f" + {stats.extra_tokens[0]} remainder tokens" if stats.extra_tokens[0] else ""
    kept = "all image tokens" if generation.method is None else f"kept {after} of {valid} image tokens ({after / valid:.1%}){extra}"
    return [f"prompt: {prompt}", f"answer: {generation.answer}", f"method: {label}, {kept}"]
