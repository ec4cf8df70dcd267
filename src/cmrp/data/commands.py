"""`cmrp data validate DIR` (check a character directory, any supported format) and `cmrp data build`
(annotate raw material into a native character with an OpenAI-compatible endpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmrp.data.build import BuildOptions, build_character
from cmrp.data.validate import errors_of, inspect_character_dir

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "data",
        help="check and prepare character data",
        description="Work with character directories: native, RoleScape-20 (release layout) and MMRole-Data.",
    )
    commands = group.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    commands.required = True
    p = commands.add_parser(
        "validate",
        help="check a character directory and list every problem with its file and field",
        description="Read a character directory and report every problem (file, JSON field, what is wrong, "
        "how to fix it). Exit status 0 when there are no errors (warnings allowed), 1 otherwise.",
    )
    p.add_argument("dir", help="the character directory")
    p.add_argument("--format", default="auto",
                   help="directory format: auto (detect), native, rolescape20, mmrole or a plugin's registered "
                   "format (default: auto)")
    p.add_argument("--character", default=None, help="which character, for layouts holding several")
    p.set_defaults(handler=_validate)
    _register_build(commands)


def _register_build(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "build",
        help="annotate a profile, images and seed dialogues into a native character with an LLM endpoint",
        description="Turn raw material into a complete native character with the paper's 4-stage pipeline "
        "(expand dialogues; per image a scene with thinking and generation instruction; knowledge QA with an "
        "easy/medium/hard MCQ mix; VQA per image), using any OpenAI-compatible chat endpoint. Answers are "
        "validated, bad ones retried; finished items are cached in OUT/.build-cache so a stopped build resumes.",
    )
    p.add_argument("--profile", required=True, type=Path, help="text file describing the character")
    p.add_argument("--images", required=True, type=Path,
                   help="folder of the character's images (an optional NAME.txt beside NAME.png is its caption)")
    p.add_argument("--dialogues", required=True, type=Path,
                   help='JSON file of seed dialogues: [[{"role": "user", "text": ...}, {"role": "character", ...}], ...]')
    p.add_argument("--out", required=True, type=Path, help="directory to write the native character to")
    p.add_argument("--name", default=None, help="the character's name (default: the profile file's name)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible API base, e.g. https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="model name sent to the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: OPENAI_API_KEY); never written anywhere")
    p.add_argument("--vision", action="store_true", help="the endpoint accepts images: send them as data URLs")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="folder of prompt templates overriding the shipped ones (system, dialogues, scene, "
                   "knowledge_open, knowledge_mcq, vqa .txt)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: OUT/.build-cache)")
    p.add_argument("--new-dialogues", type=int, default=24, help="dialogues to add to the seeds (default: 24)")
    p.add_argument("--per-request", type=int, default=4, help="dialogues asked for per request (default: 4)")
    p.add_argument("--knowledge-open", type=int, default=20, help="open knowledge questions (default: 20)")
    p.add_argument("--knowledge-mcq", type=int, default=12,
                   help="knowledge MCQ, 40%% easy / 40%% medium / 20%% hard (default: 12)")
    p.add_argument("--vqa-open", type=int, default=5, help="open questions per image (default: 5)")
    p.add_argument("--vqa-mcq", type=int, default=3, help="multiple-choice questions per image (default: 3)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of images and knowledge MCQ held out as the test split (default: 0.2)")
    p.add_argument("--max-attempts", type=int, default=5, help="requests per item before giving up (default: 5)")
    p.add_argument("--retry-wait", type=float, default=1.0,
                   help="first backoff in seconds, doubled per retry (default: 1.0)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (default: 120)")
    p.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    options = BuildOptions(**{k: v for k, v in vars(args).items()
                              if k in BuildOptions.__dataclass_fields__})
    path = build_character(options)
    character, problems = inspect_character_dir(path, "native")
    if character is None:
        for problem in problems:
            print(f"{problem.severity}: {problem}")
        return 1
    print(f"OK: {character.name}: {_counts(character.train)}; test: {_counts(character.test)} -> {path}")
    return 0


def _counts(split) -> str:
    vqa = sum(len(item.open) + len(item.mcq) for item in split.vqa)
    judge = sum(len(q) for q in split.judge_questions.values())
    parts = [
        f"{len(split.images)} images",
        f"{len(split.scenes)} scenes",
        f"{len(split.knowledge_open) + len(split.knowledge_mcq)} knowledge QA",
        f"{vqa} VQA",
        f"{len(split.t2i)} T2I",
    ]
    if judge:
        parts.append(f"{judge} judge questions")
    return ", ".join(parts)


def _validate(args: argparse.Namespace) -> int:
    character, problems = inspect_character_dir(args.dir, args.format, args.character)
    for problem in problems:
        print(f"{problem.severity}: {problem}")
    errors = errors_of(problems)
    n_warnings = len(problems) - len(errors)
    if errors or character is None:
        print(f"FAILED: {args.dir}: {len(errors)} error(s), {n_warnings} warning(s)")
        return 1
    _print_sources(character)
    print(f"OK: {character.name}: {_counts(character.train)}; test: {_counts(character.test)}; {n_warnings} warning(s)")
    return 0


def _print_sources(character) -> None:
    """Per file read, what it gave (readers of multi-file releases fill `Character.sources`)."""
    if not character.sources:
        return
    print(f"files read for {character.name}:")
    for file, counts in character.sources.items():
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v]
        print(f"  {file}: {', '.join(parts) or 'nothing'}")
