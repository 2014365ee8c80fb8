"""runtime.pipeline (the CLI's load -> compute -> emit pipeline): order, threads, the memory bound, errors and
interrupts, with and without threads; and the CLI with and without the pipeline writing the same outputs.

No test depends on timing: the bound is checked with a gate (the emitter holds the first group until the
loader has filled every queue), never with sleeps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.pipeline import run_pipeline
from tests.runtime.test_cli import OUTPUTS, _bad_inputs, leftovers, run_cli, write_good

MODES = [pytest.param(True, id="threaded"), pytest.param(False, id="serial")]


class Recorder:
    """Stages that record what ran, where; `fail_at` = {stage: (group, exception)}."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at or {}
        self.log = {"load": [], "compute": [], "emit": []}
        self.threads = {"load": set(), "compute": set(), "emit": set()}
        self.lock = threading.Lock()

    def _step(self, stage, g):
        with self.lock:
            self.log[stage].append(g)
            self.threads[stage].add(threading.current_thread().name)
        if stage in self.fail_at and self.fail_at[stage][0] == g:
            raise self.fail_at[stage][1]

    def load(self, g):
        self._step("load", g)
        return ("loaded", g)

    def compute(self, item):
        assert item[0] == "loaded"
        self._step("compute", item[1])
        return ("computed", item[1])

    def emit(self, item):
        assert item[0] == "computed"
        self._step("emit", item[1])


@pytest.mark.parametrize("threaded", MODES)
def test_every_group_goes_through_every_stage_in_order(threaded):
    r = Recorder()
    run_pipeline(range(23), r.load, r.compute, r.emit, depth=2, threaded=threaded)
    assert r.log == {"load": list(range(23)), "compute": list(range(23)), "emit": list(range(23))}
    main = threading.current_thread().name
    assert r.threads["compute"] == {main}
    if threaded:
        assert r.threads["load"] == {"pipeline-load"} and r.threads["emit"] == {"pipeline-emit"}
    else:
        assert r.threads["load"] == r.threads["emit"] == {main}
    assert not [t for t in threading.enumerate() if t.name == "pipeline-emit"]


def test_no_groups_and_bad_depth():
    r = Recorder()
    run_pipeline([], r.load, r.compute, r.emit)
    assert r.log == {"load": [], "compute": [], "emit": []}
    with pytest.raises(ValueError, match="depth must be >= 1"):
        run_pipeline([1], r.load, r.compute, r.emit, depth=0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_groups_alive_at_once_are_bounded(depth):
    """The emitter holds group 0 until the loader has loaded group 2*depth+2 (every queue full, each stage
    holding one group); the loader must not start group 2*depth+3 before group 0 is emitted."""
    bound = 2 * depth + 3
    full = threading.Event()
    emitted_first = threading.Event()
    alive, peak, too_early = set(), [0], []
    lock = threading.Lock()

    def load(g):
        with lock:
            if g >= bound and not emitted_first.is_set():
                too_early.append(g)
            alive.add(g)
            peak[0] = max(peak[0], len(alive))
        if g == bound - 1:
            full.set()
        return g

    def emit(g):
        if g == 0:
            assert full.wait(60), "the queues never filled"
        with lock:
            alive.discard(g)
        emitted_first.set()

    run_pipeline(range(40), load, lambda g: g, emit, depth=depth)
    assert not too_early, f"groups {too_early} loaded while group 0 was still held"
    assert peak[0] == bound  # reached (the gate) and never passed


@pytest.mark.parametrize("threaded", MODES)
def test_a_load_failure_is_raised_after_the_earlier_groups_are_emitted(threaded):
    r = Recorder({"load": (5, OSError("disk gone"))})
    with pytest.raises(OSError, match="disk gone"):
        run_pipeline(range(20), r.load, r.compute, r.emit, depth=2, threaded=threaded)
    assert r.log["compute"] == r.log["emit"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("threaded", MODES)
@pytest.mark.parametrize("exc", [RuntimeError("engine died"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_compute_failure_or_interrupt_keeps_what_was_computed(threaded, exc):
    r = Recorder({"compute": (7, exc)})
    with pytest.raises(type(exc)):
        run_pipeline(range(30), r.load, r.compute, r.emit, depth=2, threaded=threaded)
    assert r.log["compute"] == list(range(8))
    assert r.log["emit"] == list(range(7))  # everything computed before the failure, nothing after
    assert not [t for t in threading.enumerate() if t.name == "pipeline-emit"]


@pytest.mark.parametrize("threaded", MODES)
def test_an_emit_failure_stops_the_run(threaded):
    r = Recorder({"emit": (3, OSError("read-only file system"))})
    with pytest.raises(OSError, match="read-only"):
        run_pipeline(range(200), r.load, r.compute, r.emit, depth=2, threaded=threaded)
    assert r.log["emit"] == [0, 1, 2, 3]
    # the caller stops within the queue bound after the emitter fails, far before the 200 groups
    assert r.log["compute"] == list(range(len(r.log["compute"]))) and len(r.log["compute"]) <= 3 + 2 + 2


class _Term(BaseException):
    pass


@pytest.fixture
def term():
    """SIGTERM raises _Term for the length of a test; `calls` names the threads that ran the handler (Python
    runs it in the main thread), `handled` is set by the first call; `send()` sends SIGTERM to this process
    (delivered to the thread that sends it)."""
    import os
    import signal

    class Term:
        calls: list[str] = []
        handled = threading.Event()

        @staticmethod
        def handler(signum, frame):
            Term.calls.append(threading.current_thread().name)
            Term.handled.set()
            raise _Term()

        @staticmethod
        def send():
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, Term.handler)
    yield Term
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("at", [3, 9], ids=["middle", "last-group"])
def test_a_signal_received_by_the_writer_thread_is_raised_after_the_finished_writes(at, term):
    """SIGTERM sent by the writer thread (so delivered there, not to the caller's thread): the caller still
    runs its handler, once, before run_pipeline returns, and only after every computed group is emitted.
    With `at` the last group, the caller is waiting for the last writes when the signal comes."""
    r = Recorder()

    def emit(item):
        if item[1] == at:
            term.send()
        r.emit(item)

    with pytest.raises(_Term):
        run_pipeline(range(10), r.load, r.compute, emit, depth=2)
    assert term.calls == ["MainThread"]
    done = r.log["emit"]
    assert done == list(range(len(done))) and len(done) > at  # the group being written when the signal came
    # every computed group is emitted (the handler may have cut the compute of one more group)
    assert r.log["compute"][: len(done)] == done and len(r.log["compute"]) - len(done) <= 1
    assert not [t for t in threading.enumerate() if t.name == "pipeline-emit"]


def test_the_caller_waits_for_the_last_write_even_when_its_wait_is_interrupted(term):
    """The signal handler raises while the caller waits for the writer, which is still writing the last
    group: run_pipeline must not return before that write is done (Thread.join interrupted by a handler
    can report a running thread as stopped, CPython bpo-45274). The writer holds its last write until the
    handler has run and then up to 1 s more, or until run_pipeline returned (which it must not have)."""
    returned = threading.Event()
    written = []

    def emit(item):
        if item[1] == 4:
            term.send()
            assert term.handled.wait(60)
            returned.wait(1.0)  # times out unless run_pipeline returned early
        written.append(item[1])

    try:
        with pytest.raises(_Term):
            run_pipeline(range(5), lambda g: g, lambda g: ("computed", g), emit, depth=2)
        done_at_return = list(written)
    finally:
        returned.set()
    assert done_at_return == [0, 1, 2, 3, 4]


def test_deferred_signals_raise_only_at_a_check_and_a_second_one_at_once(term):
    """_DeferredSignals (main thread): the first SIGTERM runs the original handler only at check(), once; a
    second one runs it at once; the original handlers are back afterwards."""
    import signal

    from runtime.pipeline import _DeferredSignals

    with _DeferredSignals() as signals:
        assert signal.getsignal(signal.SIGTERM) is not term.handler
        term.send()  # this thread: its Python handler runs before the next line
        for _ in range(1000):  # Python code that a raising handler would have cut
            pass
        assert term.calls == [] and signals.received == [signal.SIGTERM]
        with pytest.raises(_Term):
            signals.check()
        signals.check()  # once only
        assert term.calls == ["MainThread"]
        with pytest.raises(_Term):
            term.send()
            for _ in range(1000):
                pass
        assert term.calls == ["MainThread"] * 2
    assert signal.getsignal(signal.SIGTERM) is term.handler


def test_a_second_signal_abandons_a_stuck_writer(term):
    """First SIGTERM while group 0 is written: held until the writer is done. The writer is stuck; a second
    SIGTERM ends run_pipeline at once, with the writer still inside its write."""
    release = threading.Event()
    finished = []

    def emit(item):
        if item[1] == 0:
            term.send()
            assert term.handled.wait(60)  # the caller ran the handler: the first signal is held
            term.send()
            release.wait(60)              # a write that does not end
        finished.append(item[1])

    try:
        with pytest.raises(_Term):
            run_pipeline(range(3), lambda g: g, lambda g: ("computed", g), emit, depth=2)
        assert finished == [] and len(term.calls) == 2
    finally:
        release.set()
    # released, the abandoned writer finishes what was queued and ends by itself
    for t in threading.enumerate():
        if t.name == "pipeline-emit":
            t.join(60)
    assert not [t for t in threading.enumerate() if t.name == "pipeline-emit"]


def test_a_handler_that_returns_does_not_count_as_a_first_signal():
    """A SIGTERM handler that only notes the signal (returns): the run goes on as if nothing came; a later
    compute error still lets the writer finish first (it is not taken for a second signal)."""
    import os
    import signal

    noted, returned = threading.Event(), threading.Event()
    written = []

    def emit(item):
        if item[1] == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            assert noted.wait(60)
            returned.wait(1.0)  # times out unless run_pipeline returned early
        written.append(item[1])

    def load(g):
        if g == 1:  # the caller, waiting for this group, acts on the signal (runs the handler) meanwhile
            assert noted.wait(60)
        return g

    def compute(g):
        if g == 1:
            raise RuntimeError("engine died")
        return ("computed", g)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: noted.set())
    try:
        with pytest.raises(RuntimeError, match="engine died"):
            run_pipeline(range(5), load, compute, emit, depth=2)
        done_at_return = list(written)
    finally:
        returned.set()
        signal.signal(signal.SIGTERM, previous)
    assert done_at_return == [0]


# ----------------------------------------------------------------------------------------------------
# The CLI with and without the pipeline

def _numbers(out: Path) -> dict:
    res = {}
    for f in sorted(out.glob("*.json")):
        j = json.loads(f.read_text())
        j.pop("timings_ms")
        res[f.name] = j
    for f in sorted(out.glob("*.npz")):
        with np.load(f) as z:
            res[f.name] = {k: z[k] for k in z.files}
    return res


def test_cli_outputs_and_errors_are_the_same_with_and_without_the_pipeline(tiny_artifacts, tmp_path, capsys):
    folder = tmp_path / "in"
    _bad_inputs(folder)
    write_good(folder, 7)  # with the 5 bad files: 12 inputs in groups of 2 (odd groups mix good and bad)
    runs = {}
    for mode in ("pipeline", "serial"):
        out = tmp_path / mode
        extra = ["--no-pipeline"] if mode == "serial" else []
        code, stdout, err = run_cli([folder, "--artifacts", tiny_artifacts.out_dir, "--out", out, "--top-p", "4",
                                     "--batch-size", "10", "--quiet", *extra], capsys)
        assert code == 1 and "explained 7 of 12 inputs" in stdout and "5 failed" in stdout, (stdout, err)
        assert not leftovers(out)
        runs[mode] = (err.splitlines(), sorted(p.name for p in out.iterdir()), _numbers(out))
    assert runs["pipeline"][0] == runs["serial"][0]  # the same error lines, in the same order
    assert runs["pipeline"][1] == runs["serial"][1] and len(runs["serial"][1]) == 7 * len(OUTPUTS)
    a, b = runs["pipeline"][2], runs["serial"][2]
    assert a.keys() == b.keys()
    assert a["good0.json"]["precision"] == {"explain": "fp32", "classify": "fp32"}
    for name in a:
        if name.endswith(".json"):
            assert a[name] == b[name], name
        else:
            for k in a[name]:
                np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")
    for name in runs["serial"][1]:
        if name.endswith(".png"):
            assert (tmp_path / "pipeline" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name


def test_cli_interrupted_mid_run_keeps_finished_outputs_and_no_temporaries(tiny_artifacts, tmp_path, capsys,
                                                                         monkeypatch):
    """Ctrl-C while the graphs run group 3: groups 0-2 (already explained) are written completely, no
    temporary is left, exit 130; the rerun does the rest."""
    import runtime.explainer as explainer

    imgs = write_good(tmp_path / "in", 10)
    real = explainer.Explainer.explain_arrays
    calls = {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(explainer.Explainer, "explain_arrays", interrupted)
    out = tmp_path / "out"
    args = [tmp_path / "in", "--artifacts", tiny_artifacts.out_dir, "--out", out, "--top-p", "3",
            "--batch-size", "8", "--quiet"]
    code, _, err = run_cli(args, capsys)
    lines = [ln for ln in err.splitlines() if not ln.startswith("note:")]
    assert code == 130 and len(lines) == 1 and "interrupted" in lines[0], err
    done = sorted(p.name for p in out.iterdir())
    assert done == sorted(f"{p.stem}{s}" for p in imgs[:6] for s in OUTPUTS)  # groups of 2: 0-2 complete
    assert not leftovers(out)
    monkeypatch.setattr(explainer.Explainer, "explain_arrays", real)
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "explained 4 of 10" in stdout and "6 skipped" in stdout


@pytest.mark.parametrize("pipeline", [True, False], ids=["threaded", "serial"])
def test_cli_preprocessing_failure_fails_its_image_only(tiny_artifacts, tmp_path, capsys, monkeypatch, pipeline):
    """Preprocessing runs in the loader thread, image by image: if it raises for one image, that image fails
    with one line and the others, in its group too, are written."""
    import runtime.artifacts as artifacts

    imgs = write_good(tmp_path / "in", 6)
    real = artifacts.Artifacts.preprocess_image
    calls = {"n": 0}

    def flaky(self, rgb, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("resize failed")
        return real(self, rgb, *a, **k)

    monkeypatch.setattr(artifacts.Artifacts, "preprocess_image", flaky)
    out = tmp_path / "out"
    code, stdout, err = run_cli([tmp_path / "in", "--artifacts", tiny_artifacts.out_dir, "--out", out, "--top-p", "3",
                                 "--batch-size", "8", "--threads", "1", "--quiet",
                                 *([] if pipeline else ["--no-pipeline"])], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and "explained 5 of 6" in stdout
    assert lines == [f"error: {imgs[2]}: preprocessing failed (RuntimeError: resize failed)"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}{s}" for p in imgs[:2] + imgs[3:] for s in OUTPUTS)
