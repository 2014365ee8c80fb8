"""runtime.serve on a local Ray Serve (one instance for the module; tiny CLIP RN-tiny export): the endpoints,
batching across requests (each answer equals the image explained alone by the Python API), every error
status, a bounded queue (503 with Retry-After), the per-request timeout (504) and a killed replica.

Batching parameters and the timeout are changed between tests through the deployments' user_config (no
replica restarts). Waits that hold requests in a batch are upper bounds (a batch leaves as soon as it is
full), never timings that a test depends on."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the `ray` extra)")

from runtime.explainer import Explainer  # noqa: E402
from runtime.serve_app import (  # noqa: E402
    BodyError, Item, ServeOptions, build_app, explain_batch, multipart_file, replica_pids,
)
from runtime.settings import Settings  # noqa: E402
from tests.conftest import make_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)
P = 3   # Decom-CAM components in these tests


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


# ----------------------------------------------------------------------------------------------------
# Without Serve: the batch, the bodies, the options

@pytest.mark.parametrize("which", ["tiny_artifacts", "resnet_tiny_artifacts"])
def test_a_mixed_batch_answers_each_image_as_if_alone(which, request):
    """One batch of four images with different methods, p and targets (a name, an index, the top-1):
    explain_batch groups them by (method, p) and each image's result equals that image explained alone."""
    art = request.getfixturevalue(which)
    root = getattr(art, "out_dir", art)
    ex = Explainer.from_artifacts(root, Settings(top_p=P))
    labels = ex.classes.labels
    rgbs = make_images(5, seed=3)
    items = [Item(rgbs[0], "decomcam", 3, len(labels) - 1), Item(rgbs[1], "gradcam", None, None),
             Item(rgbs[2], "decomcam", 2, 4), Item(rgbs[3], "decomcam", 3, None), Item(rgbs[4], "gradcam", None, 1)]
    calls = []
    explain_arrays = ex.explain_arrays
    ex.explain_arrays = lambda rgbs, **kw: calls.append((kw["method"], kw["top_p"], len(rgbs))) or explain_arrays(rgbs, **kw)
    out = explain_batch(ex, items)
    assert sorted(calls) == [("decomcam", 2, 1), ("decomcam", 3, 2), ("gradcam", None, 2)]
    ex.explain_arrays = explain_arrays
    for it, (exp, group) in zip(items, out):
        alone = ex.explain(it.rgb, target=it.target, method=it.method, top_p=it.top_p)
        assert exp.target == alone.target and exp.method == alone.method
        if it.target is not None:
            assert exp.target == it.target
        np.testing.assert_allclose(exp.saliency, alone.saliency, atol=2e-4)
        np.testing.assert_allclose(exp.saliency_original, alone.saliency_original, atol=2e-4)
        if it.method == "decomcam":
            assert len(exp.weights) == it.top_p and group == (2 if it.top_p == 3 else 1)


def test_a_failing_group_fails_only_its_requests(tiny_artifacts):
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, Settings(top_p=P))
    rgbs = make_images(3, seed=1)
    original = ex.explain_arrays

    def failing(rgbs, **kw):
        if kw["method"] == "gradcam":
            raise RuntimeError("graph failed")
        return original(rgbs, **kw)

    ex.explain_arrays = failing
    out = explain_batch(ex, [Item(rgbs[0], "gradcam", None, None), Item(rgbs[1], "decomcam", P, None),
                             Item(rgbs[2], "gradcam", None, None)])
    assert isinstance(out[0], RuntimeError) and isinstance(out[2], RuntimeError)
    assert out[1][0].method == "decomcam"


def test_multipart_bodies_are_parsed_in_memory_byte_exact():
    data = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n\r\n" + b"\x00\r\n"
    boundary = "XyZ123"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cat.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    got, name = multipart_file(body, f'multipart/form-data; boundary="{boundary}"')
    assert got == data and name == "cat.png"
    with pytest.raises(BodyError, match="without a file part"):
        multipart_file(body.replace(b'name="image"; filename="cat.png"', b'name="other"'),
                       f"multipart/form-data; boundary={boundary}")
    with pytest.raises(BodyError, match="without a boundary"):
        multipart_file(body, "multipart/form-data")


def test_options_are_checked(tiny_artifacts):
    with pytest.raises(ValueError, match="max_batch must be in"):
        ServeOptions(artifacts="x", max_batch=0)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ServeOptions(artifacts="x", methods=("nope",))
    from runtime.serve import app_builder

    with pytest.raises(ValueError, match="--max-batch: must be in"):
        app_builder({"artifacts": tiny_artifacts.out_dir, "max_batch": 0})
    with pytest.raises(ValueError, match="unknown target class 'dgo'.*did you mean: dog"):
        app_builder({"artifacts": tiny_artifacts.out_dir, "target": "dgo"})
    with pytest.raises(ValueError, match="--method gradcam is not in --methods"):
        app_builder({"artifacts": tiny_artifacts.out_dir, "method": "gradcam", "methods": "decomcam"})


def test_the_command_refuses_bad_options_before_starting_ray(tiny_artifacts, tmp_path, capsys):
    import ray

    from runtime.serve import main

    def run(*args):
        code = main(list(args))
        err = capsys.readouterr().err
        assert not ray.is_initialized()
        return code, err

    code, err = run("--artifacts", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = run("--artifacts", str(tiny_artifacts.out_dir), "--port", str(busy.getsockname()[1]))
    assert code == 2 and "--port: 127.0.0.1:" in err and "cannot listen" in err, err
    code, err = run("--artifacts", str(tiny_artifacts.out_dir), "--replicas", "64")
    assert code == 2 and "needs 64 CPUs" in err, err
    with pytest.raises(SystemExit) as e:
        main(["--artifacts", str(tiny_artifacts.out_dir), "--max-batch", "0"])
    assert e.value.code == 2 and "--max-batch: must be in [1, 4,096]" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# On Serve

class Server:
    def __init__(self, url: str, opts: ServeOptions):
        self.url, self.opts, self.base = url, opts, opts

    def call(self, path: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
             timeout: float = 120) -> Answer:
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
        except urllib.error.HTTPError as e:
            return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())

    def explain(self, image: bytes, query: str = "", **kw) -> Answer:
        return self.call("/explain" + (f"?{query}" if query else ""), image, **kw)

    def deploy(self, **changes) -> None:
        """The module's options with these changes (batching, the timeout), applied in place when they differ
        from the running ones (user_config: the replicas are not restarted)."""
        from ray import serve

        from runtime.serve_app import APP_NAME

        opts = dataclasses.replace(self.base, **changes)
        if opts != self.opts:
            serve.run(build_app(opts), name=APP_NAME, route_prefix="/")
            self.opts = opts


@pytest.fixture(scope="module")
def server(tiny_artifacts):
    """One local Ray Serve for the module, started the way `python -m runtime.serve` starts it."""
    import ray

    from runtime.serve import app_builder, start_serving, stop_serving

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    port = free_port()
    args = {"artifacts": tiny_artifacts.out_dir, "top_p": P, "max_batch": 4, "batch_wait_ms": 20, "max_ongoing": 4,
            "max_queued": 8, "max_pixels": 200_000, "max_bytes": 1_000_000, "timeout_s": 60, "retry_after_s": 2,
            "replica_cpus": 0.5}
    app_builder(args)   # the `serve run` path builds the same application
    from runtime.serve import args_from_dict, options_from_args

    opts = options_from_args(args_from_dict(args))
    start_serving(opts, port=port, metrics_port=None, num_cpus=2)
    try:
        yield Server(f"http://127.0.0.1:{port}", opts)
    finally:
        stop_serving()
        assert not ray.is_initialized()
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)


@pytest.fixture(scope="module")
def explainer(tiny_artifacts):
    return Explainer.from_artifacts(tiny_artifacts.out_dir, Settings(top_p=P))


def one_line_error(a: Answer, status: int, match: str) -> str:
    assert a.status == status, (a.status, a.body)
    assert a.headers["content-type"].startswith("application/json")
    assert a.body.count(b"\n") == 1 and a.body.endswith(b"\n"), a.body
    msg = a.json()["error"]
    assert list(a.json()) == ["error"] and match in msg, msg
    return msg


def test_health_classes_and_the_three_formats(server, explainer):
    server.deploy()
    h = server.call("/healthz")
    assert h.status == 200 and h.json()["status"] == "ready"
    assert {"classify", "explain"} <= set(h.json()["sessions"]) and h.json()["model"] == "RN-tiny"
    assert server.call("/classes").json()["classes"] == explainer.classes.labels

    rgb = make_images(1, seed=11)[0]
    j = server.explain(png(rgb), "target=dog")
    assert j.status == 200 and j.headers["content-type"] == "application/json"
    s = j.json()
    alone = explainer.explain(rgb, target="dog")
    assert s["target"] == {"index": alone.target, "name": "dog"} and s["method"] == "decomcam"
    assert [t["class"] for t in s["top5"]] == [n for n, _ in alone.top5]
    np.testing.assert_allclose(s["weights"], alone.weights, atol=2e-3)
    np.testing.assert_allclose(s["explained_variance"], alone.explained_variance, atol=1e-4)
    assert s["original_size"] == list(rgb.shape[:2]) and s["batch"]["images"] >= 1
    assert {"explain", "decode", "wait", "replica"} <= set(s["timings_ms"])

    p = server.explain(png(rgb), "target=dog&format=png")
    assert p.status == 200 and p.headers["content-type"] == "image/png"
    img = cv2.imdecode(np.frombuffer(p.body, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[:2] == rgb.shape[:2]

    # multipart/form-data, JPEG, gradcam, format=npz: the maps equal the Python API's
    boundary = "b0undary"
    data = jpeg(rgb)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    n = server.explain(body, "method=gradcam&format=npz&target=3",
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert n.status == 200 and n.headers["x-target-index"] == "3"
    from runtime.images import decode_image

    alone = explainer.explain(decode_image(data), target=3, method="gradcam")
    with np.load(io.BytesIO(n.body)) as z:
        np.testing.assert_allclose(z["saliency"], alone.saliency, atol=2e-4)
        np.testing.assert_allclose(z["saliency_original"], alone.saliency_original, atol=2e-4)


def test_bad_requests_are_one_line_4xx_and_the_replica_lives_on(server):
    server.deploy()
    pid = replica_pids()
    good = make_images(1, seed=2)[0]
    jpg = jpeg(good)
    wide = np.zeros((4, 300, 3), np.uint8)
    cases = [
        (server.explain(b"hello, not an image"), 400, "not an image"),
        (server.explain(jpg[: len(jpg) // 2]), 400, "truncated"),
        (server.explain(png(np.zeros((500, 500, 3), np.uint8))), 400, "over the pixel limit"),
        (server.explain(png(wide)), 400, "aspect-ratio limit"),
        (server.explain(b""), 400, "empty"),
        (server.explain(b"\0" * 1_100_000), 413, "over the request size limit"),
        (server.explain(b"\xff\xd8" + b"\0" * 1_010_000), 413, "over the file size limit"),
        (server.explain(jpg, "method=nope"), 400, "unknown method nope"),
        (server.explain(jpg, "method=scorecam"), 400, "not served here"),
        (server.explain(jpg, "target=dgo"), 400, "did you mean: dog"),
        (server.explain(jpg, "target=999"), 400, "out of range"),
        (server.explain(jpg, "top_p=0"), 400, "top_p must be an integer"),
        (server.explain(jpg, "top_p=x"), 400, "top_p must be an integer"),
        (server.explain(jpg, "format=gif"), 400, "unknown format"),
        (server.explain(jpg, "tagret=dog"), 400, "unknown query parameter tagret"),
        (server.explain(jpg, "target=dog&target=cat"), 400, "more than once"),
        (server.explain(jpg, headers={"Content-Type": "multipart/form-data; boundary=zz"}), 400, "without parts"),
        (server.call("/explain"), 405, "takes POST"),
        (server.call("/nothing"), 404, "no endpoint /nothing"),
    ]
    for answer, status, match in cases:
        one_line_error(answer, status, match)
    assert server.explain(jpg).status == 200
    assert replica_pids() == pid   # the same replica answered all of it


def test_requests_batched_together_each_get_their_own_answer(server, explainer):
    """Four requests with different images, targets, methods and p in one batch (the batch leaves when it
    holds four): each answer equals its image explained alone."""
    server.deploy(max_batch=4, batch_wait_s=30.0)
    rgbs = make_images(4, seed=21)
    asks = [("target=dog&format=npz", dict(target="dog")),
            ("target=2&top_p=2&format=npz", dict(target=2, top_p=2)),
            ("method=gradcam&format=npz", dict(method="gradcam")),
            ("format=npz&target=cat", dict(target="cat"))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda k: server.explain(png(rgbs[k]), asks[k][0]), range(4)))
    for k, a in enumerate(answers):
        assert a.status == 200, a.body
        assert a.headers["x-batch-images"] == "4" and a.headers["x-batch-group"] == ("2" if k in (0, 3) else "1")
        alone = explainer.explain(rgbs[k], **asks[k][1])
        assert int(a.headers["x-target-index"]) == alone.target
        with np.load(io.BytesIO(a.body)) as z:
            np.testing.assert_allclose(z["saliency"], alone.saliency, atol=2e-4)
            np.testing.assert_allclose(z["saliency_original"], alone.saliency_original, atol=2e-4)
            if k != 2:
                assert len(z["weights"]) == (2 if k == 1 else P)
                np.testing.assert_allclose(z["weights"], alone.weights, atol=2e-3)


@pytest.mark.slow   # timing-dependent: the 18 requests must all arrive while the batch waits; on a loaded 2-core
# machine they sometimes do not (every request answered 200), so it is out of the default run until the replica can
# be held by a gate instead of a wait
def test_a_full_queue_answers_503_with_retry_after(server):
    """18 requests at once: 4 held in the replica (a batch of 8 waits up to 3 s for more), at most 8 waiting
    for it; the others are refused at once with 503 and Retry-After, and the held ones are answered."""
    server.deploy(max_batch=8, batch_wait_s=3.0)
    rgb = png(make_images(1, seed=9)[0])
    with concurrent.futures.ThreadPoolExecutor(18) as pool:
        answers = list(pool.map(lambda _: server.explain(rgb, "method=gradcam"), range(18)))
    statuses = sorted(a.status for a in answers)
    seen = [(a.status, a.body[:120]) for a in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and statuses.count(503) >= 1, seen
    refused = [one_line_error(a, 503, "") for a in answers if a.status == 503]
    assert all(a.headers["retry-after"] == "2" for a in answers if a.status == 503), seen
    assert any("overloaded" in m for m in refused), seen


def test_a_request_past_the_timeout_is_504(server):
    server.deploy(max_batch=8, batch_wait_s=5.0, timeout_s=1.0)
    one_line_error(server.explain(png(make_images(1, seed=4)[0])), 504, "per-request timeout of 1 s")


def test_a_killed_replica_is_replaced_and_its_request_retried(server):
    """SIGKILL the replica while it holds a request (waiting 3 s for its batch): the gateway retries it once
    on the restarted replica (200) or says 503 with Retry-After; never a hang; then all is well again."""
    server.deploy(max_batch=8, batch_wait_s=3.0)
    (old,) = replica_pids()
    rgb = png(make_images(1, seed=6)[0])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.explain, rgb, "method=gradcam")
        time.sleep(1.0)
        os.kill(old, signal.SIGKILL)
        a = pending.result(timeout=150)
    assert a.status in (200, 503), a.body
    if a.status == 503:
        assert a.headers["retry-after"] == "2"
    deadline = time.monotonic() + 150
    while server.call("/healthz", timeout=30).status != 200:
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(1.0)
    (new,) = replica_pids()
    assert new != old
    server.deploy()
    assert server.explain(rgb, "method=gradcam").status == 200
