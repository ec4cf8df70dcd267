"""`cmrp sandbox make --seed N OUT`: write a procedurally generated character in the native format."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "sandbox",
        help="generate procedural characters with exact ground truth",
        description="The sandbox world: characters whose images and facts are generated, so every answer is known.",
    )
    commands = group.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND")
    commands.required = True
    p = commands.add_parser(
        "make",
        help="write a sandbox character directory (native format)",
        description="Generate the character for a seed (the same seed always gives the same files) into OUT.",
    )
    p.add_argument("out", help="output directory (created; must be empty or hold a character)")
    p.add_argument("--seed", type=int, default=0, help="which character (default: 0)")
    p.add_argument("--images", type=_positive_int, default=10, help="reference images in the train split (default: 10)")
    p.add_argument("--scenes", type=_positive_int, default=160, help="train dialogue scenes (default: 160)")
    p.add_argument("--image-size", type=_positive_int, default=32, help="image side in pixels (default: 32)")
    p.set_defaults(handler=_make)


def _make(args: argparse.Namespace) -> int:
    from cmrp.data.native import CHARACTER_FILE, read_character
    from cmrp.errors import DataError
    from cmrp.sandbox.world import MAX_REFERENCE_IMAGES
    from cmrp.sandbox.writer import write_sandbox_character

    out = Path(args.out).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / CHARACTER_FILE).is_file()):
        raise DataError(f"{out}: exists and is not empty (choose a new directory, or an existing character to overwrite)")
    if args.images > MAX_REFERENCE_IMAGES:
        raise DataError(f"--images {args.images}: at most {MAX_REFERENCE_IMAGES} reference images")
    if args.image_size < 8:
        raise DataError(f"--image-size {args.image_size}: must be at least 8 pixels")
    path = write_sandbox_character(
        args.seed, out, n_reference_images=args.images, n_scenes=args.scenes, image_size=args.image_size
    )
    character = read_character(path)
    print(f"sandbox character {character.name} (seed {args.seed}): {path}")
    return 0
