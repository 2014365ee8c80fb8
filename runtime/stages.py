"""Stage timing as a context: `with stages("decompose"): ...` owns the clock and the device synchronisation.

One `Stages` per explanation call. A stage's time is its own: a stage opened inside another (the masks
Score-CAM builds inside its weights) is counted once, in the inner stage, so the stages of a call add up
to its wall time. On a GPU back end the device is synchronised when a stage ends, so the asynchronous
work launched in it is counted there.
"""

from __future__ import annotations

import contextlib
import time


class Stages:
    def __init__(self, backend=None):
        self.backend = backend
        self.times: dict[str, float] = {}   # stage -> seconds
        self._inner: list[float] = []       # per open stage: seconds spent in the stages opened inside it

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            if self.backend is not None:
                self.backend.synchronize()
            elapsed = time.perf_counter() - t0
            inner = self._inner.pop()
            self.times[name] = self.times.get(name, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed
