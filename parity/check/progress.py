"""Progress of a check: one tqdm bar per phase on stderr, and each phase's wall time."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator

__all__ = ["Phases"]


class Phases:
    """Times the phases of one check (load, forward, backward, kv cache, generation) and shows a
    bar for each: `with phases("forward", total=n) as bar: ... bar.update()`.

    `progress` None shows the bars only when stderr is a terminal; False never; True always.
    `seconds` holds each phase's wall time in the order the phases first ran.
    """

    def __init__(self, progress: bool | None = None):
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, total: int | None = None, unit: str = "step") -> Iterator[Any]:
        from tqdm.auto import tqdm  # imported here: a library caller without bars never pays for it

        disable = (not sys.stderr.isatty()) if self.progress is None else not self.progress
        bar = tqdm(total=total, desc=name, unit=unit, file=sys.stderr, disable=disable, leave=False)
        start = time.perf_counter()
        try:
            yield bar
        finally:
            bar.close()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def timings(self) -> dict[str, float]:
        """`{phase: seconds, ..., "total": seconds since this object was made}`."""
        return {**self.seconds, "total": time.perf_counter() - self._start}
