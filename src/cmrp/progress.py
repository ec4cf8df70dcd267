"""Progress on the terminal: a tqdm bar when stderr is a terminal, plain periodic lines otherwise.

Lines (CI logs, `2> log.txt`) read `eval model: 3/5 (60%) · 0.52 it/s · ETA 0:04 · task=t2i`, one at the
start, then at most one every `every_s` seconds, and one at the end — never a carriage-return animation.
Progress goes to stderr so that stdout keeps only results.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "format_eta", "interactive", "progress_line", "track"]

T = TypeVar("T")


def interactive() -> bool:
    """True when progress can be drawn as a bar (stderr is a terminal that understands redraws)."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it",
                  postfix: dict[str, Any] | None = None) -> str:
    """One plain progress line: count, share, rate, time left and the given values."""
    parts = [f"{desc}: {done}/{total} ({100 * done / total:.0f}%)" if total else f"{desc}: {done}"]
    if done and elapsed > 0:
        rate = done / elapsed
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}")
        if total:
            parts.append(f"ETA {format_eta((total - done) / rate)}")
    parts += [f"{key}={_value(value)}" for key, value in (postfix or {}).items()]
    return " · ".join(parts)


class Progress:
    """A counter shown as a tqdm bar on a terminal, or as plain lines: `update(n, key=value ...)`."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", every_s: float = 15.0,
                 bar: bool | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_line = None
        self._bar = None
        if interactive() if bar is None else bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)
        else:
            self._line()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        print(progress_line(self.desc, self.done, self.total, self._last_line - self._start, self.unit,
                            self.postfix), file=sys.stderr, flush=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self._last_line is None or time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def write(self, line: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last_line is not None:
            self._line()
            self._last_line = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`for x in track(xs, "world"): ...` with a bar or lines (see `Progress`)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit) as progress:
        for item in items:
            yield item
            progress.update(1)
