"""Issue 20, item 9: flags and KEY=VALUE overrides in any order, for every sub-command that takes overrides."""

from __future__ import annotations

import pytest

from cmrp.cli import _parse, build_parser


@pytest.mark.parametrize("argv", [
    ["fit", "quickstart", "--resume", "trainer.max_steps=3", "seed=2"],
    ["fit", "quickstart", "trainer.max_steps=3", "--resume", "seed=2"],
    ["fit", "--resume", "quickstart", "trainer.max_steps=3", "seed=2"],
])
def test_fit_takes_overrides_around_resume(argv):
    args = _parse(build_parser(), argv)
    assert args.recipe == "quickstart" and args.resume
    assert args.overrides == ["trainer.max_steps=3", "seed=2"]


def test_validate_and_sandbox_pretrain_take_overrides_after_flags():
    args = _parse(build_parser(), ["sandbox", "pretrain", "sandbox/pretrain", "--threads", "1", "trainer.max_steps=2"])
    assert args.overrides == ["trainer.max_steps=2"] and args.threads == 1
    args = _parse(build_parser(), ["validate", "quickstart", "seed=1"])
    assert args.overrides == ["seed=1"]


@pytest.mark.parametrize("stray", [["--bogus"], ["notanoverride"], ["seed=1", "--bogus"]])
def test_anything_else_is_still_refused(capsys, stray):
    with pytest.raises(SystemExit) as exit_info:
        _parse(build_parser(), ["fit", "quickstart", "--resume", *stray])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_command_without_overrides_refuses_them(capsys):
    with pytest.raises(SystemExit):
        _parse(build_parser(), ["tracking", "sync", "runs/x", "seed=1"])
    assert "unrecognized arguments: seed=1" in capsys.readouterr().err
