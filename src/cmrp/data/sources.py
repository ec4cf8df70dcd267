"""Where a recipe's character comes from: a directory in any supported format, or `sandbox://SEED`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cmrp.data.validate import load_character
from cmrp.errors import ConfigError
from cmrp.sandbox import write_sandbox_character

__all__ = ["SANDBOX_SCHEME", "load_recipe_character"]

SANDBOX_SCHEME = "sandbox://"


def load_recipe_character(data_cfg: Any, output_dir: Path, *, may_write: bool = True):
    """Load a recipe's `data:` character; `sandbox://SEED` generates one into `output_dir/character`.

    Under data parallelism only one process may write (`may_write`); the others wait for its result.
    The sandbox character is written beside its place and renamed, so nobody sees half of it.
    """
    path = str(data_cfg.path)
    if path.startswith(SANDBOX_SCHEME):
        try:
            seed = int(path[len(SANDBOX_SCHEME):])
        except ValueError:
            raise ConfigError(f"data.path {path!r}: expected sandbox://<integer seed>") from None
        target = Path(output_dir) / "character"
        if not (target / "character.json").is_file():
            if may_write:
                staging = Path(output_dir) / f".character-{os.getpid()}"
                write_sandbox_character(seed, staging)
                os.replace(staging, target)
            else:
                _wait_for(target / "character.json")
        path = str(target)
    return load_character(Path(path).expanduser(), format=data_cfg.format, character=data_cfg.character)


def _wait_for(path: Path, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise ConfigError(f"{path} did not appear within {timeout_s:.0f} s (rank 0 writes it); is rank 0 running?")
        time.sleep(0.5)
