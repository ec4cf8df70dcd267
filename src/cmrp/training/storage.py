"""Disk for a run: free space, and a write that fails for a reason the user fixes (a full disk, a quota, a
read-only mount, permissions) turned into one clear error instead of a traceback. Used before a run starts
(`cmrp.training.preflight`) and while it writes (checkpoints, the final save)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from cmrp.errors import CmrpError

__all__ = ["check_free_space", "existing_ancestor", "human_bytes", "write_error", "writing"]

# errno values a user fixes on their side: space, quota, permissions, read-only mounts, size limits
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENAMETOOLONG}
_OS_ERROR = re.compile(r"os error (\d+)")
_NEARLY_FULL = 64 << 20  # bytes: below this, a write that failed without an errno failed for lack of space

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"

def existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe

def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return None

def write_error(err: BaseException, path: str | Path) -> CmrpError | None:
    """A one-line CmrpError for a write to `path` that failed for a reason the user fixes (a full disk, a
    quota, a read-only mount, permissions), or None when `err` is something else. safetensors and
    torch.save report a full disk in their own exception types and words; both are recognised."""
    path = Path(path)
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code is None:
        found = _OS_ERROR.search(str(err))
        code = int(found.group(1)) if found else None
    if code is None and not isinstance(err, OSError):
        free = _free_bytes(path)
        if free is not None and free < _NEARLY_FULL:  # torch.save says only "unexpected pos ..."
            code = errno.ENOSPC
    if code not in _WRITE_ERRNOS:
        return None
    target = Path(err.filename) if isinstance(err, OSError) and err.filename else path
    detail = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        detail += f" ({human_bytes(free)} free)" if free is not None else ""
    return CmrpError(f"cannot write {target}: {detail}")

@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write under `path` (see `write_error`) into one clear CmrpError; others pass through."""
    try:
        yield
    except CmrpError:
        raise
    except Exception as err:  # noqa: BLE001 - mapped when it is a write failure, re-raised otherwise
        mapped = write_error(err, path)
        if mapped is None:
            raise
        raise mapped from None

def check_free_space(out: Path, need: int, what: str) -> None:
    free = _free_bytes(out)
    if free is not None and free < need:
        raise CmrpError(f"output_dir {out}: {human_bytes(free)} free, but this run writes about {human_bytes(need)} "
                        f"({what}); free space, lower checkpoint.keep or checkpoint.every_n_steps, or choose another "
                        "output_dir")
