"""Compare cmrp's outputs with numbers the official code produced, and record each error for docs/parity.md.

Every golden check goes through `assert_matches`, so the tolerance is defined once: the error of a tensor is
max|ours - official| over the tensor, reported absolute and relative to max|official| (a norm-relative error:
robust where single elements of the reference are near zero). The default tolerance is relative 1e-4 in fp32.

When `CMRP_PARITY_RECORD` names a file, each check appends one JSON line (model, check, abs, rel, shape) to it;
`python tests/parity/table.py` runs the parity suite that way and prints the parity table of docs/parity.md.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = ["assert_matches", "errors"]


def errors(actual: Any, expected: Any) -> tuple[float, float]:
    """(max abs error, that error relative to max |expected|) of two equal-shape tensors."""
    ours = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    ref = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != official {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0, 0.0
    abs_err = float((ours - ref).abs().max())
    scale = float(ref.abs().max())
    return abs_err, abs_err / scale if scale > 0 else abs_err


def _record(model: str, check: str, abs_err: float, rel_err: float, shape: tuple[int, ...]) -> None:
    path = os.environ.get("CMRP_PARITY_RECORD")
    if not path:
        return
    row = {"model": model, "check": check, "abs": abs_err, "rel": rel_err, "shape": list(shape)}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def assert_matches(model: str, check: str, actual: Any, expected: Any, *, rtol: float = 1e-4) -> None:
    """Fail unless `actual` equals the official `expected` within `rtol` (norm-relative); record the error.

    Integer tensors (token ids, committed counts) must match exactly: pass them as they are and `rtol` is ignored.
    """
    ours, ref = torch.as_tensor(actual), torch.as_tensor(expected)
    exact = not (ours.is_floating_point() or ref.is_floating_point())
    abs_err, rel_err = errors(ours, ref)
    _record(model, check, abs_err, rel_err, tuple(ref.shape))
    if exact:
        if abs_err != 0:
            mismatched = int((ours.cpu() != ref.cpu()).sum())
            raise AssertionError(f"{model} {check}: {mismatched} of {ref.numel()} values differ from the official ones")
        return
    if not rel_err <= rtol:
        raise AssertionError(f"{model} {check}: max abs error {abs_err:.3g}, relative {rel_err:.3g} > {rtol:g}")
