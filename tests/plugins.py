"""A plugin distribution for a test: a module plus the `.dist-info` that declares its entry point, in a folder
that goes on PYTHONPATH — what `pip install` of a third-party package leaves, without installing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_plugin(folder: Path, module: str, source: str, group: str, entry: str) -> Path:
    """Write `module.py` (its `source`) and a dist-info declaring `entry` (`name = module:attr`) in `group`."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    return folder


def run_with_plugins(folder: Path, code: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter that sees the plugins in `folder` (entry points are read once per
    process, so a plugin test runs in its own)."""
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
