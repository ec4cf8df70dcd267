"""`cmrp sandbox make` and `cmrp data validate` through the real CLI: output and exit status."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmrp.data import commands as data_commands
from cmrp.sandbox import commands as sandbox_commands

CMRP = str(Path(sys.executable).parent / "cmrp")


def own_parser() -> argparse.ArgumentParser:
    """Just the data and sandbox commands, independent of the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="cmrp")
    subparsers = parser.add_subparsers(dest="command", required=True)
    data_commands.register(subparsers)
    sandbox_commands.register(subparsers)
    return parser


def run_own(argv: list[str]) -> int:
    args = own_parser().parse_args(argv)
    return args.handler(args)


def run_cli(argv: list[str]) -> int:
    from cmrp.cli import main

    return main(argv)


RUNNERS = {"cli": run_cli, "own_parser": run_own}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "char"
    assert run_cli(["sandbox", "make", "--seed", "3", "--images", "4", "--scenes", "12", "--image-size", "16", str(out)]) == 0
    return out


def test_sandbox_make_prints_name_and_path(made, capsys, tmp_path):
    name = json.loads((made / "character.json").read_text())["name"]
    out = tmp_path / "again"
    assert run_cli(["sandbox", "make", "--seed", "3", "--images", "4", "--scenes", "12", "--image-size", "16", str(out)]) == 0
    printed = capsys.readouterr().out
    assert name in printed and str(out.resolve()) in printed
    assert (out / "train/data.json").read_bytes() == (made / "train/data.json").read_bytes()
    assert len(list((out / "train/images").glob("*.png"))) == 4


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_validate_clean_character(made, capsys, runner):
    assert RUNNERS[runner](["data", "validate", str(made)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    name = json.loads((made / "character.json").read_text())["name"]
    assert out[-1].startswith(f"OK: {name}: 4 images, 12 scenes, ")
    assert "error" not in "\n".join(out)


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_validate_reports_errors_with_exit_1(made, tmp_path, capsys, runner):
    bad = Path(shutil.copytree(made, tmp_path / "bad"))
    data = json.loads((bad / "train/data.json").read_text())
    data["knowledge_qa"]["mcq"][0]["answer"] = "B"
    data["images"][1]["file"] = "../../etc/passwd"
    data["scene"] = []
    (bad / "train/data.json").write_text(json.dumps(data))
    assert RUNNERS[runner](["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error: train/data.json: knowledge_qa.mcq[0].answer: should be an integer" in out
    assert "error: train/data.json: images[1].file: '../../etc/passwd' uses '..'" in out
    assert "warning: train/data.json: scene: unknown key" in out
    assert "FAILED:" in out and "2 error(s), 2 warning(s)" in out  # the second warning: the unlisted image file


def test_validate_warnings_only_exit_0(made, tmp_path, capsys):
    odd = Path(shutil.copytree(made, tmp_path / "odd"))
    (odd / "test/data.json").unlink()
    assert run_cli(["data", "validate", str(odd)]) == 0
    out = capsys.readouterr().out
    assert "warning: test/data.json: (file): does not exist" in out and "OK: " in out and "1 warning(s)" in out


def test_validate_unrecognised_directory_is_a_usage_error(tmp_path, capsys):
    assert run_cli(["data", "validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a character directory" in err and "native" in err
    assert run_cli(["data", "validate", "--format", "mmrole", str(tmp_path)]) == 2


def test_sandbox_make_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert run_cli(["sandbox", "make", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_console_script(made):
    proc = subprocess.run([CMRP, "data", "validate", str(made)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: ")
