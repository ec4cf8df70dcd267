"""Shared by the fault-injection tests: the CLI in-process and as a subprocess, the one-line-error check, byte
flips, and running a command in a private mount namespace (a read-only or tiny file system of our own)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmrp import cli

ROOT = Path(__file__).resolve().parents[2]
CMRP = str(Path(sys.executable).parent / "cmrp")
# the smallest `cmrp fit` of the pretrained sandbox base (full fine-tuning): seconds on a CPU
TINY = ["recipes/sandbox/sft.yaml", "data.batch_size=2", "data.max_text_tokens=32", "eval.max_items=4",
        "eval.grid_prompts=1", "eval.images_per_prompt=1", "eval.sample_steps=2"]


def main(capsys, *args: str) -> tuple[int, str, str]:
    """`cmrp ARGS` in this process: (exit status, stdout, stderr)."""
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli(*args: str, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([CMRP, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_one_line_error(rc: int, err: str, command: str, *needles: str) -> str:
    """Exit status 2, exactly one line on stderr (`cmrp COMMAND: error: ...`), no traceback; returns the line."""
    assert "Traceback" not in err, err[-3000:]
    assert rc == 2, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"cmrp {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def flip_bytes(path: Path, n: int = 64) -> None:
    """Invert `n` bytes in the middle of a file: same size, different content (a damaged sector, a bad copy)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - n // 2)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _namespaces_work() -> bool:
    """Whether `unshare` can give a command its own mount namespace here (root, or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        probe = subprocess.run(["unshare", *flags, "--propagation", "private", "sh", "-c",
                                'd=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$d" && umount "$d" && rmdir "$d"'],
                               capture_output=True)
        if probe.returncode == 0:
            _FLAGS[:] = flags
            return True
    return False


_FLAGS: list[str] = []
needs_mounts = pytest.mark.skipif(not _namespaces_work(), reason="cannot make a private mount namespace (unshare)")


def in_namespace(script: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a shell `script` in a private mount namespace (its mounts vanish when it ends), from the repo root."""
    return subprocess.run(["unshare", *_FLAGS, "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
