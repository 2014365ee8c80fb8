"""A bounded, ordered three-stage pipeline: load in a worker thread, compute in the caller's thread, emit in
a second worker thread.

The CLI explains images in groups. While the graphs run on group k (the caller's thread, where ONNX Runtime
releases the GIL), the next groups are decoded and preprocessed, and the previous groups' pictures are
encoded and written (PNG encoding, JSON, NPZ), so that neither the decoder nor the writer waits for the
engine. Two bounded queues (`depth` groups each) keep memory flat whatever the number of groups.

Guarantees (tested in tests/runtime/test_pipeline.py, with and without threads):
- order: every group is loaded, computed and emitted in input order, each stage one group at a time;
- bounded: at most 2 * depth + 3 groups are alive at once (queued, or held by a stage);
- errors: an exception raised by load, compute or emit stops the pipeline and is re-raised in the caller's
  thread; the groups computed before it are still emitted (nothing finished is lost), nothing after it is;
- interrupts: KeyboardInterrupt (or any BaseException) in the caller's thread stops loading, lets the emitter
  finish the groups already computed, joins it, and re-raises, so no write is cut in the middle. SIGINT and
  SIGTERM (their Python handlers: KeyboardInterrupt, the CLI's) are deferred to points between the
  pipeline's steps (_DeferredSignals), so that a handler never raises inside queue or lock code: a signal
  that comes while the caller waits is acted on within _POLL_S (the caller's thread never sleeps without a
  timeout), one that comes during compute when that group is computed and queued (it is written). A second
  signal abandons the writer at once; the writer thread then ends by itself once the queue is empty.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

_POLL_S = 0.1  # how often a blocked put/get looks at the stop flag and at deferred signals


class _End:
    """The last item of a queue: no more groups (exc None), or a stage failed (exc)."""

    def __init__(self, exc: BaseException | None = None):
        self.exc = exc


def _nothing() -> None:
    pass


def _put(q: queue.Queue, item, stop: threading.Event, check: Callable[[], None] = _nothing) -> bool:
    """Put, unless `stop` is set while the queue is full; True when the item was put. `check` runs between
    tries (the caller's deferred signals)."""
    while True:
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            if stop.is_set():
                return False
            check()


def _get(q: queue.Queue, check: Callable[[], None]):
    """A blocking get that wakes every _POLL_S to run `check` (the caller's deferred signals)."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            check()


class _DeferredSignals:
    """SIGINT and SIGTERM, while the pipeline runs in the main thread, raise only between the pipeline's own
    steps, never inside a queue, lock or event operation.

    A Python signal handler runs between any two bytecodes of the main thread. One that raises inside
    threading's code can leave a Condition's lock held (a later put/get then blocks forever), release a lock
    another thread holds, or (Thread.join, CPython bpo-45274) report a running thread as stopped. So the
    handlers in place (the CLI's SIGTERM handler, Python's KeyboardInterrupt) are wrapped: the first signal
    is recorded, and `check()`, called where the caller's thread is in the pipeline's own code, runs the
    original handler there. A second signal runs the original handler at once (it abandons the writer)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.saved: dict[int, Callable] = {}
        self.received: list[int] = []
        self.exc: BaseException | None = None  # what the first signal's handler raised

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                for s in self.SIGNALS:
                    h = signal.getsignal(s)
                    if callable(h):  # SIG_DFL / SIG_IGN / a handler set outside Python are left as they are
                        self.saved[s] = h
                        signal.signal(s, self._record)
            except BaseException:  # a handler raised between the two: put back what was replaced
                self._restore()
                raise
        return self

    def _record(self, signum, frame):
        self.received.append(signum)
        if len(self.received) > 1:  # the second signal: the original handler now, wherever the thread is
            self.saved[signum](signum, frame)

    def check(self) -> None:
        """Run the original handler of the first signal, once, if it came; it raises, as it would have."""
        if len(self.received) == 1 and self.exc is None:
            s = self.received[0]
            try:
                self.saved[s](s, None)
            except BaseException as e:
                self.exc = e
                raise
            del self.received[0]  # it returned: the next signal is a first one again

    def _restore(self) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)

    def __exit__(self, *exc):
        self._restore()
        self.check()  # a signal recorded after the last check: acted on now (before an error on its way out)
        return False


def run_pipeline(groups: Iterable[Any], load: Callable[[Any], Any], compute: Callable[[Any], Any],
                 emit: Callable[[Any], None], *, depth: int = 2, threaded: bool = True) -> None:
    """For each group, in order: emit(compute(load(group))).

    threaded=False runs the three stages one after the other in the caller's thread (the reference the
    threaded form is checked against, and the `--no-pipeline` path of the CLI)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not threaded:
        for g in groups:
            emit(compute(load(g)))
        return
    with _DeferredSignals() as signals:
        _run_threaded(groups, load, compute, emit, depth, signals)


def _run_threaded(groups, load, compute, emit, depth: int, signals: _DeferredSignals) -> None:
    stop = threading.Event()         # the caller stopped: loader and emitter quit without more work
    loaded: queue.Queue = queue.Queue(maxsize=depth)
    computed: queue.Queue = queue.Queue(maxsize=depth)
    emit_error: list[BaseException] = []

    def loader():
        end = _End()
        try:
            for g in groups:
                if stop.is_set():
                    break
                if not _put(loaded, load(g), stop):
                    return  # stopped with a full queue: the caller gets an item, sees `stop` and ends
        except BaseException as e:  # handed to the caller, which re-raises it after the earlier groups
            end = _End(e)
        _put(loaded, end, stop)

    emitted_all = threading.Event()  # the emitter's last act

    def next_computed():
        while True:
            try:
                return computed.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():  # the caller stopped: what it computed was queued before; then no more
                    try:
                        return computed.get_nowait()
                    except queue.Empty:
                        return _End()

    def emitter():
        try:
            while True:
                item = next_computed()
                if isinstance(item, _End):
                    return
                try:
                    emit(item)
                except BaseException as e:
                    emit_error.append(e)
                    stop.set()
                    return
        finally:
            emitted_all.set()

    # the loader does no writing, so it is a daemon: an interrupted run does not wait for a slow decode
    load_thread = threading.Thread(target=loader, name="pipeline-load", daemon=True)
    emit_thread = threading.Thread(target=emitter, name="pipeline-emit", daemon=True)
    load_thread.start()
    emit_thread.start()
    check = signals.check
    failure: BaseException | None = None
    try:
        while True:
            item = _get(loaded, check)
            check()
            if isinstance(item, _End):
                failure = item.exc
                break
            if stop.is_set():
                break  # the emitter failed
            result = compute(item)
            # queued before a signal that came during compute is acted on, so that the group is written
            if not _put(computed, result, stop):
                break  # the emitter failed
            check()
    except BaseException as e:
        failure = e
    stop.set()
    if len(signals.received) > 1 and failure is not None and failure is not signals.exc:
        raise failure  # a second signal: the writer is abandoned (a cut write leaves only a temporary)
    # the emitter finishes what was computed (at most depth groups), then ends. The first signal, if it comes
    # during this wait, is held until the emitter is done; a second one abandons it.
    end_sent = False
    while not emitted_all.is_set():
        try:
            if not end_sent:
                _put(computed, _End(), emitted_all, check)  # gives up if the emitter ended (it failed)
                end_sent = True
            else:
                emitted_all.wait(timeout=_POLL_S)
            check()
        except BaseException:
            if len(signals.received) > 1:
                raise  # the second signal
            # the first signal's exception (signals.exc): wait on, raise it below
    emit_thread.join()  # at once: setting the event was the emitter's last act
    if signals.exc is not None:
        raise signals.exc  # interrupted: that decides how the run ends
    if emit_error:
        raise emit_error[0]
    if failure is not None:
        raise failure
