"""`cmrp chat RUN_OR_CHARACTER_DIR`: role-play with a customized character in the terminal.

`cmrp save-character RUN OUT_DIR`: write a run's character as a shareable artefact (adapter + card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cmrp.chat.session import ChatSession, parse_user_line
from cmrp.errors import ConfigError
from cmrp.registry import DECODING

__all__ = ["register"]

HELP_TEXT = ("commands: /image MESSAGE (reply with an image), /reset (forget the conversation), "
             "/save [FILE] (transcript as JSON), /quit; Ctrl-D also ends")


def add_session_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a chat session, shared by `cmrp chat` and `cmrp demo`."""
    p.add_argument("--decoding", choices=DECODING, metavar="NAME", default=None,  # the registry: plugins too
                   help="chain: image conditioned on the reply; joint: on the history only; think: reply, then the "
                        "character's thinking, then the image; or a plugin's strategy (default: the character's)")
    p.add_argument("--steps", type=int, default=20, help="image sampling steps (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48, help="length limit of a reply (default 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy replies")
    p.add_argument("--base", type=Path, default=None,
                   help="character artefacts: the base backbone folder (default: the one its card names)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="role-play with a customized character in the terminal (text replies, images on request)",
        description="Chat with the character of a `cmrp fit` run (output_dir or its checkpoint/) or of a "
        "character artefact (written by `cmrp save-character`). " + HELP_TEXT + ". Images are saved as PNG "
        "under --out and their paths printed.",
    )
    p.add_argument("source", metavar="RUN_OR_CHARACTER_DIR", help="a `cmrp fit` output_dir, or a character artefact")
    p.add_argument("--once", metavar="MESSAGE", default=None, help="answer one message and exit (for scripts)")
    p.add_argument("--image", action="store_true", help="with --once: also draw an image")
    p.add_argument("--out", type=Path, default=Path("chat"), help="folder for images and transcripts (default ./chat)")
    add_session_arguments(p)
    p.set_defaults(handler=_chat)

    s = subparsers.add_parser(
        "save-character",
        help="write a run's character as a shareable artefact (PEFT adapter + character card)",
        description="Write the character of a `cmrp fit` run to OUT_DIR: the LoRA adapter in PEFT format (a "
        "full fine-tuning run: the whole backbone) and character_card.json (name, profile, decoding default, "
        "reference thumbnails, base model path and sha256). `cmrp chat OUT_DIR` talks to it.",
    )
    s.add_argument("run", metavar="RUN_DIR", help="a `cmrp fit` output_dir (or its checkpoint/)")
    s.add_argument("out", metavar="OUT_DIR", type=Path, help="a new folder")
    s.set_defaults(handler=_save_character)


def _save_character(args: argparse.Namespace) -> int:
    from cmrp.chat.artefact import read_card, save_character

    out = save_character(args.run, args.out)
    card = read_card(out)
    print(f"character {card['name']!r} ({card['kind']}) saved to {out}")
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.max_new_tokens < 1:
        raise ConfigError("--steps and --max-new-tokens must be at least 1")
    if args.image and args.once is None:
        raise ConfigError("--image goes with --once; in the interactive chat type /image MESSAGE")
    if not Path(args.source).expanduser().exists():
        raise ConfigError(f"{args.source} does not exist; pass a `cmrp fit` output_dir or a character artefact")


def _chat(args: argparse.Namespace) -> int:
    _check(args)
    from cmrp.chat.artefact import load_chat_source

    backbone, info = load_chat_source(args.source, args.base)
    session = ChatSession(backbone, info, decoding=args.decoding or info.decoding, image_steps=args.steps,
                          seed=args.seed, out_dir=args.out, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature)
    if args.once is not None:
        _answer(session, args.once, args.image)
        return 0
    return _repl(session, args.out)


def _answer(session: Any, message: str, image: bool) -> None:
    reply = session.reply(message, image=image)
    print(f"{session.character.name}: {reply.text}", flush=True)
    if reply.image_path is not None:
        print(f"[image] {reply.image_path}", flush=True)


def _repl(session: Any, out: Path) -> int:
    print(f"chatting with {session.character.name} ({session.strategy.name} decoding). {HELP_TEXT}", flush=True)
    saves = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(flush=True)
            return 0
        stripped = line.strip()
        if not stripped:
            continue
        if stripped in ("/quit", "/exit"):
            return 0
        if stripped == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if stripped == "/save" or stripped.startswith("/save "):
            target = stripped[len("/save"):].strip()
            if not target:
                saves += 1
                target = str(out / f"transcript-{saves}.json")
            try:
                print(f"[saved] {session.save(target)}", flush=True)
            except OSError as err:
                print(f"cannot save to {target}: {err}", file=sys.stderr, flush=True)
            continue
        message, image = parse_user_line(stripped)
        if stripped.startswith("/") and not image:
            print(f"unknown command {stripped.split()[0]}; {HELP_TEXT}", flush=True)
            continue
        _answer(session, message, image)
