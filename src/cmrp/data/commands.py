"""`cmrp data validate DIR [--format auto]`: check a character directory and report every problem.

`data` is a command group so that later sub-commands (`data build`) sit beside `validate`.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "data",
        help="check and prepare character data",
        description="Work with character directories (native format; more readers to come).",
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
    p.add_argument("--format", default="auto", help="directory format: auto (detect), native (default: auto)")
    p.add_argument("--character", default=None, help="which character, for layouts holding several")
    p.set_defaults(handler=_validate)


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
    from cmrp.data.validate import errors_of, inspect_character_dir

    character, problems = inspect_character_dir(args.dir, args.format, args.character)
    for problem in problems:
        print(f"{problem.severity}: {problem}")
    errors = errors_of(problems)
    n_warnings = len(problems) - len(errors)
    if errors or character is None:
        print(f"FAILED: {args.dir}: {len(errors)} error(s), {n_warnings} warning(s)")
        return 1
    print(f"OK: {character.name}: {_counts(character.train)}; test: {_counts(character.test)}; {n_warnings} warning(s)")
    return 0
