"""Where the tests find the data that is not in the repository: the RoleScape-20 sample beside the checkout.

RoleScape-20 carries no licence we could redistribute it under, so it stays outside the repository; CI always
has it (`../shared/data`), a user without it sees one line naming what was not tested (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

ROLESCAPE_SAMPLE = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rolescape20-sample")
ROLESCAPE_RELEASE = "github.com/Tangc03/UniCharacter, folder data/personalized_data/ (train/<Name>, test/<Name>)"


def rolescape_present() -> bool:
    return (ROLESCAPE_SAMPLE / "train" / "Bo").is_dir() and (ROLESCAPE_SAMPLE / "train" / "Mam").is_dir()
