"""`cmrp sandbox make --seed N OUT`: write a procedurally generated character in the native format.
`cmrp sandbox pretrain [RECIPE] --out DIR`: pretrain the sandbox base model (`cmrp.sandbox.pretrain`).
`cmrp sandbox train-probe --out DIR` / `train-features --out DIR`: retrain the sandbox's small models
(attribute probe; CLIP-style dual encoder) on renders; the package ships trained copies of both."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmrp.data.native import CHARACTER_FILE, read_character
from cmrp.errors import ConfigError, DataError
from cmrp.sandbox.world import MAX_REFERENCE_IMAGES
from cmrp.sandbox.writer import write_sandbox_character

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
        help="generate procedural characters with exact ground truth; pretrain the sandbox base; retrain the "
        "sandbox's small models",
        description="The sandbox world: characters whose images and facts are generated, so every answer is known; "
        "the pretrained sandbox base; and the small models trained on its renders (attribute probe, CLIP-style "
        "encoder). The package ships trained copies of all three.",
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

    p = commands.add_parser(
        "pretrain",
        help="pretrain the sandbox base model on many random sandbox characters",
        description="Train a BAGEL-architecture base on the sandbox world (recipe section `world`: which "
        "characters; data/sft/trainer as in any recipe) and write it, with manifest.json (recipe, seed, "
        "commit, timings, scores on held-out characters), into --out. The shipped base (weights: "
        "sandbox://base) is `cmrp sandbox pretrain --out src/cmrp/sandbox/assets/base`.",
    )
    p.add_argument("recipe", nargs="?", default="sandbox/pretrain",
                   help="recipe name or path (default: sandbox/pretrain)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=500")
    p.add_argument("--out", type=Path, default=None, help="where to write the base (default: <output_dir>/base)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(handler=_pretrain)

    for name, file, what in (
            ("train-probe", "probe", "the attribute probe (evaluation oracle; its features are the DINO stand-in)"),
            ("train-features", "clip", "the CLIP-style image/text dual encoder (sandbox rewards and CLIP-I/T)")):
        t = commands.add_parser(
            name,
            help=f"train {what.split(' (')[0]} on sandbox renders",
            description=f"Train {what} on renders of random attribute combinations (drawn on the fly from "
            f"--seed) and write {file}.safetensors + {file}.json (manifest with held-out accuracy) into --out. "
            "Point CMRP_SANDBOX_MODELS at that folder to use them, or write into src/cmrp/sandbox/assets to "
            "replace the shipped copies.",
        )
        t.add_argument("--out", required=True, type=Path, help="output folder (created)")
        t.add_argument("--seed", type=int, default=0, help="training RNG seed (default: 0)")
        t.add_argument("--steps", type=_positive_int, default=None,
                       help="optimiser steps (default: 2000 probe, 700 CLIP)")
        t.add_argument("--batch-size", type=_positive_int, default=128, help="renders per step (default: 128)")
        t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 0.003)")
        t.add_argument("--heldout", type=_positive_int, default=None,
                       help="fresh renders for the held-out accuracy in the manifest (default: 2000 probe, 1024 CLIP)")
        if name == "train-features":
            t.add_argument("--probe", default="shipped",
                           help="start the image tower from this probe: `shipped` (default), a train-probe "
                           "folder, or `none` (random init)")
        t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
        t.set_defaults(handler=_train, which=name)


def _make(args: argparse.Namespace) -> int:
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


def _train(args: argparse.Namespace) -> int:
    import json

    import torch

    if not args.lr > 0:
        raise ConfigError(f"--lr {args.lr}: must be positive")
    if args.out.is_file():
        raise ConfigError(f"--out {args.out}: is a file; give a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"seed": args.seed, "batch_size": args.batch_size, "lr": args.lr}
    if args.steps:
        kwargs["steps"] = args.steps
    if args.heldout:
        kwargs["eval_n"] = args.heldout
    if args.which == "train-probe":
        from cmrp.sandbox.probe import train_probe

        _, manifest = train_probe(args.out, **kwargs)
        accuracy = manifest["heldout"]["accuracy_clean"]
        print("held-out accuracy (clean renders): " + json.dumps({k: round(v, 4) for k, v in accuracy.items()}))
        print(f"probe: {args.out / 'probe.safetensors'} + probe.json")
    else:
        from cmrp.sandbox.clip import train_clip

        init = None if args.probe == "none" else args.probe
        _, manifest = train_clip(args.out, image_init=init, **kwargs)
        held = manifest["heldout"]
        print(f"held-out retrieval top-1 among {held['candidates']}: text->image {held['text_to_image_top1']:.3f}, "
              f"image->text {held['image_to_text_top1']:.3f}; cosine matched {held['matched_cosine_mean']:.3f} "
              f"vs mismatched {held['mismatched_cosine_mean']:.3f}")
        print(f"sandbox CLIP: {args.out / 'clip.safetensors'} + clip.json")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from cmrp.config import load_recipe  # omegaconf: only when a recipe is read
    from cmrp.sandbox.pretrain import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe, overrides = args.recipe, list(args.overrides)
    if "=" in recipe:  # no recipe given, only overrides
        recipe, overrides = "sandbox/pretrain", [recipe, *overrides]
    cfg = load_recipe(recipe, overrides)
    out = (args.out or Path(cfg.output_dir) / "base").expanduser()
    if out.is_file():
        raise ConfigError(f"--out {out}: is a file; give a folder")
    manifest = pretrain(cfg, out)
    held = manifest["heldout"]
    print(f"base:           {out} (manifest.json beside it)")
    for key, value in held["pretrained"].items():
        print(f"{key + ':':<32}{held['untrained'][key]:.3f} -> {value:.3f}  (held-out characters)")
    training = manifest["training"]
    if "loss_first" in training:
        print(f"train/loss:                     {training['loss_first']:.3f} -> {training['loss_last']:.3f}")
    print(f"time:                           {manifest['timings_s']['total_s']:.0f} s")
    return 0
