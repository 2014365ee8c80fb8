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
  finish the groups already computed, joins it, and re-raises, so no write is cut in the middle; this holds
  also for an interrupt that arrives while the caller waits for the last writes. The caller's thread never
  sleeps without a timeout, so a signal received by a worker thread is handled within _POLL_S.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_POLL_S = 0.1  # how often a blocked put/get looks at the stop flag (only when a queue is full or empty)


class _End:
    """The last item of a queue: no more groups (exc None), or a stage failed (exc)."""

    def __init__(self, exc: BaseException | None = None):
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put, unless `stop` is set while the queue is full; True when the item was put."""
    while True:
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            if stop.is_set():
                return False


def _get(q: queue.Queue):
    """A blocking get that wakes every _POLL_S: the caller's thread then runs the Python signal handlers of a
    signal that another thread received (SIGTERM sent by a worker thread), instead of sleeping through it."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue


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

    emitted_all = threading.Event()  # the emitter's last act (Thread.join is not used: see below)

    def emitter():
        try:
            while True:
                item = computed.get()
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
    failure: BaseException | None = None
    try:
        while True:
            item = _get(loaded)
            if isinstance(item, _End):
                failure = item.exc
                break
            if stop.is_set():
                break  # the emitter failed
            result = compute(item)
            if not _put(computed, result, stop):
                break  # the emitter failed
    except BaseException as e:
        failure = e
    stop.set()
    # the emitter finishes what was computed (at most depth groups), then ends. An interrupt that arrives
    # during this wait (a signal sent while the last groups are written) is held until the emitter is done;
    # a second one abandons the emitter (a cut write leaves only a temporary, removed by the next run).
    end_sent = False
    held: BaseException | None = None
    # (Thread.join is not interrupt-safe: a signal handler raising inside join(timeout) can mark a running
    # thread as stopped, CPython bpo-45274; an Event can be waited on again after an interrupt.)
    while True:
        try:
            if emitted_all.is_set():
                break
            if not end_sent:
                computed.put(_End(), timeout=_POLL_S)
                end_sent = True
            else:
                emitted_all.wait(timeout=_POLL_S)
        except queue.Full:
            continue
        except BaseException as e:
            if held is not None or (failure is not None and not isinstance(failure, Exception)):
                raise  # the second interrupt
            held = e
    emit_thread.join()  # at once: setting the event was the emitter's last act
    if failure is None:
        failure = held
    if emit_error:
        raise emit_error[0]
    if failure is not None:
        raise failure
