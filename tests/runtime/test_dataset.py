"""runtime.dataset on a local Ray instance (2 workers, tiny export, generated images with broken ones):
the CLI's outputs, per-image errors, resume, and a worker killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.settings import Settings

from runtime.explain import main as explain_main
from tests.conftest import make_images

ray = pytest.importorskip("ray", reason="the `ray` extra (ray[data]) is not installed")
pq = pytest.importorskip("pyarrow.parquet")

from runtime.dataset import DatasetError, explain_dataset  # noqa: E402

N_GOOD, BROKEN = 46, ("cut.png", "zero.jpg", "text.png", "notimage.bmp")
SUFFIXES = (".overlay.png", ".components.png", ".json", ".npz")


@pytest.fixture(scope="module")
def local_ray():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()
    for s, h in handlers.items():  # ray.init's SIGTERM handler (sys.exit) would outlive it in this process
        signal.signal(s, h)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for i, im in enumerate(make_images(N_GOOD, seed=11, sizes=((70, 90), (64, 64), (80, 60)))):
        cv2.imwrite(str(d / f"p{i:02d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    good = (d / "p00.png").read_bytes()
    (d / "cut.png").write_bytes(good[: len(good) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_bytes(b"hello, not a picture")
    (d / "notimage.bmp").write_bytes(b"BM" + os.urandom(40))
    return d


def _numbers(j: dict) -> dict:
    j = dict(j)
    j.pop("timings_ms")
    return j


def test_outputs_equal_the_cli_and_errors_are_rows(local_ray, photos, tiny_artifacts, tmp_path, capsys):
    cli_out, ray_out = tmp_path / "cli", tmp_path / "ray"
    code = explain_main([str(photos), "--artifacts", str(tiny_artifacts.out_dir), "--out", str(cli_out),
                         "--top-p", "4", "--quiet"])
    capsys.readouterr()
    assert code == 1  # the broken files
    s = explain_dataset([str(photos)], tiny_artifacts.out_dir, ray_out, workers=2, top_p=4, images_per_batch=4)
    assert (s["ok"], s["failed"], s["skipped"], s["rows"]) == (N_GOOD, len(BROKEN), 0, N_GOOD + len(BROKEN))
    cli_files = sorted(p.name for p in cli_out.iterdir())
    ray_files = sorted(p.name for p in ray_out.iterdir() if p.name != "explanations.parquet")
    assert cli_files == ray_files and len(ray_files) == 4 * N_GOOD
    for name in (n for n in cli_files if n.endswith(".json")):
        a, b = json.loads((cli_out / name).read_text()), json.loads((ray_out / name).read_text())
        assert _numbers(a) == _numbers(b), name
    for name in (n for n in cli_files if n.endswith(".npz")):
        with np.load(cli_out / name) as a, np.load(ray_out / name) as b:
            assert set(a.files) == set(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k])
    t = pq.read_table(ray_out / "explanations.parquet").to_pylist()
    assert len(t) == N_GOOD + len(BROKEN) and len({r["source"] for r in t}) == len(t)
    bad = {Path(r["source"]).name: r for r in t if r["status"] == "failed"}
    assert set(bad) == set(BROKEN)
    assert all(r["error"].startswith(r["source"]) and "\n" not in r["error"] for r in bad.values())
    ok = next(r for r in t if r["stem"] == "p03")
    j = json.loads((ray_out / "p03.json").read_text())
    with np.load(ray_out / "p03.npz") as z:
        np.testing.assert_array_equal(np.asarray(ok["saliency"], np.float32).reshape(ok["saliency_side"], -1),
                                      z["saliency"])
    assert ok["target"] == j["target"]["index"] and ok["weights"] == pytest.approx(j["weights"])


def test_rerun_skips_finished_images_and_keeps_the_table_whole(local_ray, photos, tiny_artifacts, tmp_path):
    out = tmp_path / "o"
    explain_dataset([str(photos / "p0*.png")], tiny_artifacts.out_dir, out, workers=2, top_p=4)
    first = pq.read_table(out / "explanations.parquet").to_pylist()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix != ".parquet"}
    s = explain_dataset([str(photos / "p0*.png")], tiny_artifacts.out_dir, out, workers=2, top_p=4)
    assert s["ok"] == 0 and s["skipped"] == 10 and s["recovered"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix != ".parquet"} == mtimes
    again = pq.read_table(out / "explanations.parquet").to_pylist()
    key = lambda r: r["stem"]  # noqa: E731
    for a, b in zip(sorted(first, key=key), sorted(again, key=key)):
        assert b["status"] == "skipped" and a["status"] == "ok"
        assert a["saliency"] == b["saliency"] and a["weights"] == pytest.approx(b["weights"])


def test_usage_errors(tiny_artifacts, tmp_path):
    with pytest.raises(DatasetError, match="workers must be >= 1"):
        explain_dataset(["x"], tiny_artifacts.out_dir, tmp_path, workers=0)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        explain_dataset(["x"], tiny_artifacts.out_dir, tmp_path, method="nope")
    with pytest.raises(DatasetError, match="needs gpus_per_worker"):
        explain_dataset(["x"], tiny_artifacts.out_dir, tmp_path, engine="cuda")
    from runtime.explainer import TargetError

    with pytest.raises(TargetError, match="unknown target class"):
        explain_dataset(["x"], tiny_artifacts.out_dir, tmp_path, target="zebra-ish")


def _dying_actor(marker: Path) -> type:
    """An ExplainActor whose process kills itself with SIGKILL once, in the whole job: in the first batch
    that holds a good photo, after that photo's outputs are written and before the rest of the batch is.
    The marker file, created exclusively, makes exactly one actor die, however fast or slow the run."""
    from runtime.dataset import ExplainActor

    class DyingActor(ExplainActor):
        def __call__(self, batch):
            stems = [str(s) for s in batch["stem"]]
            good = next((i for i, s in enumerate(stems) if s.startswith("p")), None)
            if good is None:
                return super().__call__(batch)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().__call__(batch)
            super().__call__(batch.slice(0, good + 1))   # up to the first good photo: its outputs written
            os.kill(os.getpid(), signal.SIGKILL)         # as `kill -9` of the worker process

    return DyingActor


def test_a_killed_worker_loses_and_duplicates_nothing(local_ray, photos, tiny_artifacts, tmp_path):
    out, marker = tmp_path / "k", tmp_path / "killed"
    s = explain_dataset([str(photos)], tiny_artifacts.out_dir, out, workers=2, top_p=4, images_per_batch=2,
                        actor=_dying_actor(marker))
    assert marker.exists()                            # a worker was killed mid-batch
    t = pq.read_table(out / "explanations.parquet").to_pylist()
    assert len(t) == s["rows"] == N_GOOD + len(BROKEN) and len({r["source"] for r in t}) == len(t)
    # the retried batch finds the image the killed worker finished: explained once, and reported "ok" (it
    # was not finished before this run), counted as recovered
    assert s["recovered"] >= 1 and s["skipped"] == 0 and s["ok"] == N_GOOD
    assert sum(r["status"] == "ok" for r in t) == N_GOOD
    assert {Path(r["source"]).name for r in t if r["status"] == "failed"} == set(BROKEN)
    for i in range(N_GOOD):
        for suffix in SUFFIXES:
            assert (out / f"p{i:02d}{suffix}").stat().st_size > 0
        json.loads((out / f"p{i:02d}.json").read_text())
        with np.load(out / f"p{i:02d}.npz") as z:
            assert np.isfinite(z["saliency"]).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_actor_must_be_an_explain_actor(tiny_artifacts, tmp_path):
    with pytest.raises(DatasetError, match="subclass of ExplainActor"):
        explain_dataset(["x"], tiny_artifacts.out_dir, tmp_path, actor=dict)


def test_ray_session_puts_the_signal_handlers_back_when_init_fails(monkeypatch):
    """ray.init installs a SIGTERM handler (sys.exit) before it connects; when it then fails, ray_session
    still puts the caller's handlers back, and the error goes through."""
    from runtime.dataset import ray_session

    def failing_init(**kwargs):
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))
        raise ConnectionError("no Ray cluster at ray://nowhere:10001")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(ConnectionError, match="nowhere"):
        with ray_session("ray://nowhere:10001"):
            pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_actor_reports_a_rendering_oserror_as_that_images_row(photos, tiny_artifacts, tmp_path, monkeypatch):
    """The actor encodes a batch's pictures in the image pool; an OSError while encoding one image fails
    that image's row only (no files for it), the others are written. Called directly, without Ray."""
    import runtime.render as render
    from runtime.dataset import ExplainActor, Job

    actor = ExplainActor(Job(artifacts=str(tiny_artifacts.out_dir), out_dir=str(tmp_path / "o"),
                             settings=Settings(top_p=2, threads=2)))
    names = ["p01", "p02", "p03"]
    real = render.npz_bytes
    calls = []

    def second_fails(exp):
        calls.append(exp.source)
        if exp.source.endswith("p02.png"):
            raise OSError("No space left on device")
        return real(exp)

    monkeypatch.setattr(render, "npz_bytes", second_fails)
    out = actor({"source": [str(photos / f"{n}.png") for n in names], "stem": names})
    status, error = [str(v) for v in out["status"]], [str(v) for v in out["error"]]
    assert status == ["ok", "failed", "ok"] and len(calls) == 3
    assert "p02.png: could not write outputs (No space left on device)" in error[1]
    assert not list((tmp_path / "o").glob("p02.*"))
    assert all((tmp_path / "o" / f"{n}{s}").is_file() for n in ("p01", "p03") for s in SUFFIXES)


def test_actor_carries_the_method_options(photos, tiny_artifacts, tmp_path):
    """The Job's settings reach the actor's Explainer (without Ray): its outputs equal the CLI's Explainer
    with the same settings."""
    from runtime.config import DecomCamConfig
    from runtime.dataset import ExplainActor, Job
    from runtime.explainer import Explainer
    from runtime.settings import Settings

    settings = Settings(top_p=3, method="decomcam-ig", ig_steps=3)
    actor = ExplainActor(Job(artifacts=str(tiny_artifacts.out_dir), out_dir=str(tmp_path / "o"), settings=settings))
    assert actor.ex.config == DecomCamConfig(top_p=3, ig_steps=3)
    out = actor({"source": [str(photos / "p01.png")], "stem": ["p01"]})
    assert [str(s) for s in out["status"]] == ["ok"]
    ref = Explainer.from_artifacts(tiny_artifacts.out_dir, settings).explain(str(photos / "p01.png"))
    side = int(out["saliency_side"][0])
    np.testing.assert_allclose(np.asarray(out["saliency"][0], np.float32).reshape(side, side), ref.saliency, atol=1e-6)


def test_out_inside_the_input_folder_is_never_an_input(local_ray, tiny_artifacts, tmp_path):
    """A second run wrote a.overlay.overlay.png when --out was inside the input folder; the CLI already
    skipped --out. The output folder is never listed."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, im in enumerate(make_images(2, seed=4)):
        cv2.imwrite(str(folder / f"a{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    out = folder / "out"
    first = explain_dataset([str(folder)], tiny_artifacts.out_dir, out, workers=1, top_p=2)
    again = explain_dataset([str(folder)], tiny_artifacts.out_dir, out, workers=1, top_p=2)
    assert (first["inputs"], first["ok"]) == (2, 2) and (again["inputs"], again["skipped"]) == (2, 2)
    assert not list(out.glob("*.overlay.overlay.png")) and len(list(out.glob("*.json"))) == 2


def test_rows_quote_names_and_never_mix_inputs(photos, tiny_artifacts, tmp_path):
    """Called without Ray: a name with a line break is one escaped line in its row; dB/cat.png after dA/cat.png
    gets its own outputs (the runner's resume rule), not dA's row."""
    from runtime.dataset import ExplainActor, Job

    src = tmp_path / "src"
    (src / "dA").mkdir(parents=True)
    (src / "dB").mkdir()
    (src / "dA" / "cat.png").write_bytes((photos / "p01.png").read_bytes())
    (src / "dB" / "cat.png").write_bytes((photos / "p02.png").read_bytes())
    (src / "evil\nerror: x.png").write_bytes(b"junk")
    actor = ExplainActor(Job(artifacts=str(tiny_artifacts.out_dir), out_dir=str(tmp_path / "o"),
                             settings=Settings(top_p=2)))
    rows = actor({"source": [str(src / "dA" / "cat.png"), str(src / "evil\nerror: x.png")], "stem": ["cat", "evil"]})
    assert [str(s) for s in rows["status"]] == ["ok", "failed"]
    err = str(rows["error"][1])
    assert "\n" not in err and err.startswith(f"'{src}/evil\\nerror: x.png': not an image")
    rows = actor({"source": [str(src / "dB" / "cat.png")], "stem": ["cat"]})
    assert [str(s) for s in rows["status"]] == ["ok"] and str(rows["stem"][0]).startswith("cat-")
    assert json.loads((tmp_path / "o" / "cat.json").read_text())["source"] == str(src / "dA" / "cat.png")


def test_the_command_prints_only_its_own_lines(tiny_artifacts, tmp_path):
    """Ray printed an authentication_token warning and a logging.cc line on stderr."""
    import subprocess

    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(make_images(1, seed=2)[0], cv2.COLOR_RGB2BGR))
    (folder / "b.png").write_bytes(b"junk")
    r = subprocess.run([sys.executable, "-m", "runtime.dataset", str(folder), "--artifacts", str(tiny_artifacts.out_dir),
                        "--out", str(tmp_path / "o"), "--workers", "1", "--top-p", "2"],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: {folder / 'b.png'}: not an image (unrecognised format or unreadable "
                                     f"header; PNG, JPEG, GIF, BMP, WebP and TIFF are supported)"], r.stderr
    assert r.stdout.startswith("explained 1 of 2 inputs on Ray")
