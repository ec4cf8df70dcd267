"""`import cmrp` must not pull in heavy libraries (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("lightning", "pytorch_lightning", "transformers", "mlflow", "peft", "diffusers")


def test_import_cmrp_is_light():
    code = (
        "import sys, cmrp, cmrp.data.character, cmrp.config.schema, cmrp.registry, cmrp.errors\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import cmrp imported: {out.stdout.strip()}"


def test_cli_help_is_light():
    code = (
        "import sys\n"
        "from cmrp.cli import build_parser\n"
        "build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"building the CLI imported: {out.stdout.strip()}"
