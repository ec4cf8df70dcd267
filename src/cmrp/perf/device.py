"""The device side of a benchmark: its name, a synchronising timer, and its peak FLOP/s measured in the same
run as the benchmark (a dense matmul at the benchmark's dtype), so utilisation = achieved / measured peak —
on a GPU, model-FLOP utilisation (MFU) against what this card, driver and clock actually deliver, not a
datasheet figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["device_label", "measure_matmul_peak", "synchronize", "timed", "utilisation"]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def timed(fn: Callable[[], object], *, device: torch.device | str, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed ones (synchronised on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype, *, size: int | None = None,
                        min_seconds: float = 0.5) -> dict[str, float | int | str]:
    """FLOP/s of a square `size` x `size` matmul at `dtype` (default size: 8192 on GPU, 1024 on CPU),
    repeated for at least `min_seconds`; the best of three such rounds."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    flop = 2.0 * n**3
    torch.matmul(a, b, out=out)  # warm-up (kernel selection)
    synchronize(device)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(min_seconds / once))
    best = 0.0
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        synchronize(device)
        best = max(best, reps * flop / (time.perf_counter() - start))
    return {"flops_per_s": best, "matmul_size": n, "dtype": str(dtype).replace("torch.", "")}


def utilisation(flops: float, seconds: float, peak: dict | float) -> dict[str, float]:
    """Achieved FLOP/s of `flops` done in `seconds`, and its fraction of the measured peak."""
    peak_value = float(peak["flops_per_s"] if isinstance(peak, dict) else peak)
    achieved = flops / seconds if seconds > 0 else 0.0
    return {"flops": flops, "achieved_flops_per_s": achieved, "utilisation": achieved / peak_value if peak_value else 0.0}
