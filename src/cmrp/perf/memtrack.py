"""Peak bytes of live tensors during a piece of code, on any device (CPU included).

`torch.cuda.max_memory_allocated` exists only on GPUs, and a CPU process's RSS mixes tensors with the
allocator's caches and Python objects. `LiveTensorBytes` counts tensor storages exactly: every
storage an operator creates is added when it appears and removed when it is freed (a weak reference
to the storage), so the peak is the largest sum of live storages at any operator boundary. Storages
that exist before (weights) are added with `track`. Used to check `cmrp plan`'s memory estimate.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """`with LiveTensorBytes() as m: ...` then `m.peak` (bytes) and `m.current`."""

    def __init__(self, tensors: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0
        self.track(tensors)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count storages that already exist (model weights, optimiser states)."""
        for t in tensors:
            self._add(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, t: object) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.is_sparse:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            if self._live.pop(key, None) is not None:
                self.current -= nbytes

        self._live[key] = (weakref.ref(storage, freed), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._add(t)
        return out
