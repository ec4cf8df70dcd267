"""`cmrp` command line: fit | tracking | validate | cat | cp | ls | data | sandbox | eval | chat | save-character | demo |
plan | sweep.

Each area owns its sub-commands in a small `commands` module exposing `register(subparsers)`;
this file only assembles them and turns a `CmrpError` into one clear message and exit status 2.
Sub-command modules import heavy libraries inside their handlers, so `cmrp --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cmrp import __version__
from cmrp.config.params import Redactor
from cmrp.errors import CmrpError

__all__ = ["build_parser", "main"]

_COMMAND_MODULES = (
    "cmrp.training.commands",  # fit, tracking sync
    "cmrp.config.commands",  # validate, cat, cp, ls
    "cmrp.data.commands",  # data validate
    "cmrp.sandbox.commands",  # sandbox make
    "cmrp.evaluation.commands",  # eval
    "cmrp.chat.commands",  # chat, save-character
    "cmrp.chat.demo",  # demo
    "cmrp.perf.commands",  # plan
    "cmrp.sweeps.commands",  # sweep
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmrp",
        description="Customized Multimodal Role-Play: customize a unified multimodal model into a character.",
    )
    parser.add_argument("--version", action="version", version=f"cmrp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but KEY=VALUE overrides may come after flags too (`fit R --resume a=1`): argparse
    stops filling a positional list at the first flag and would call the rest unrecognised."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        stray = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
        if not stray:
            args.overrides = [*args.overrides, *extra]
            return args
        extra = stray
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        return int(args.handler(args) or 0)
    except CmrpError as err:
        # URI passwords, secret env values and secret-named config values never reach the terminal
        print(f"cmrp {args.command}: error: {Redactor.from_environ().text(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cmrp {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cmrp ls | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush does not fail
        return 0


if __name__ == "__main__":
    sys.exit(main())
