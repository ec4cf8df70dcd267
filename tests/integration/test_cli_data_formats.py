"""`cmrp data validate` detects the format: native, RoleScape-20 (release layout) and MMRole-Data."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmrp.cli import main
from tests.shared_data import ROLESCAPE_SAMPLE as SAMPLE

ROOT = Path(__file__).resolve().parents[2]
MMROLE = ROOT / "tests" / "fixtures" / "mmrole"


@pytest.mark.rolescape
def test_validate_rolescape_root_and_folder(capsys):
    assert main(["data", "validate", str(SAMPLE), "--character", "Bo"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("OK: Bo: 12 images, 204 scenes, 100 knowledge QA, 299 VQA, 12 T2I; test: 3 images, 23 scenes, "
                       "10 knowledge QA, 0 VQA, 3 T2I, 36 judge questions; 4 warning(s)")
    assert sum(line.startswith("warning: train/Bo/") for line in out) == 4
    assert main(["data", "validate", str(SAMPLE / "train" / "Mam")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK: Mam: 12 images, 204 scenes, 100 knowledge QA, 298 VQA")
    assert main(["data", "validate", str(SAMPLE)]) == 2
    assert "2 characters (Bo, Mam)" in capsys.readouterr().err


def test_validate_mmrole(capsys):
    assert main(["data", "validate", str(MMROLE), "--character", "Iron Man"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "OK: Iron Man: 2 images, 7 scenes, 0 knowledge QA, 0 VQA, 0 T2I; test: 0 images, 2 scenes, 0 knowledge QA, "
        "0 VQA, 0 T2I; 7 warning(s)")
    assert main(["data", "validate", "--format", "rolescape20", str(MMROLE)]) == 2
    assert "not a RoleScape-20 release (expected train/<Name>/ folders" in capsys.readouterr().err
