"""The Ray Serve application behind `python -m runtime.serve`: an HTTP gateway and the explaining replicas.

    Gateway  the ingress (light, no model): routes, query checks, the request-size cap, multipart bodies
             parsed in memory, the per-request timeout, one retry when a replica dies, and every error as
             one line of JSON {"error": ...}
    Explain  N replicas, one Explainer (ONNX Runtime sessions) each: the CLI's decoder and limits, the
             target, batching across requests (@serve.batch: a batch is grouped by (method, p) and each
             group is one Explainer.explain_arrays call with per-image targets), and the answer: the
             summary of the CLI's NAME.json, the overlay PNG or the maps as NPZ

A request never reaches the file system: its body is read into memory (at most the cap), decoded there and
dropped. `build_app(ServeOptions(...))` returns the Serve application; runtime/serve.py builds the options
from the command line (or from a Serve config file's `args`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import Response

from .names import one_line, show
from .settings import INT_RANGES, Settings

logger = logging.getLogger("ray.serve")

FORMATS = {"json": "application/json", "png": "image/png", "npz": "application/octet-stream"}
QUERY_KEYS = ("method", "target", "top_p", "format")
MULTIPART_SLACK = 64 * 1024   # bytes a multipart envelope may add to the image's own max_bytes
ENDPOINTS = {"/explain": "POST", "/healthz": "GET", "/classes": "GET"}
APP_NAME = "decomcam"
DEPLOYMENTS = ("Gateway", "Explain")


@dataclass(frozen=True)
class ServeOptions:
    artifacts: str
    settings: Settings = field(default_factory=Settings)  # default method, p, target; engine; limits
    methods: tuple[str, ...] = ()     # methods a request may ask for (empty: every registered method)
    replicas: int = 1                 # Explain replicas
    max_batch: int = 16               # images per batch across requests (1: no cross-request batching)
    batch_wait_s: float = 0.005       # how long a batch waits for more requests after its first one
    max_ongoing: int | None = None    # requests one Explain replica holds at once (None: 2 * max_batch)
    max_queued: int = 64              # requests waiting for a replica; past it the answer is 503
    timeout_s: float = 60.0           # per request, from the gateway to the answer; past it 504
    retry_after_s: float = 1.0        # the Retry-After of a 503
    replica_cpus: float = 1.0         # Ray's CPU resource per Explain replica (placement)
    replica_gpus: float = 0.0         # Ray's GPU resource per Explain replica (cuda, trt)

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(what)

        need(isinstance(self.replicas, int) and 1 <= self.replicas <= 1024,
             f"replicas must be in [1, 1024], got {self.replicas!r}")
        need(isinstance(self.max_batch, int) and 1 <= self.max_batch <= 4096,
             f"max_batch must be in [1, 4096], got {self.max_batch!r}")
        need(0 <= self.batch_wait_s <= 60, f"batch_wait_s must be in [0, 60] seconds, got {self.batch_wait_s!r}")
        need(self.max_ongoing is None or 1 <= self.max_ongoing <= 65536,
             f"max_ongoing must be in [1, 65536], got {self.max_ongoing!r}")
        need(isinstance(self.max_queued, int) and 0 <= self.max_queued <= 1 << 20,
             f"max_queued must be in [0, 1048576], got {self.max_queued!r}")
        need(0 < self.timeout_s <= 86400, f"timeout_s must be in (0, 86400] seconds, got {self.timeout_s!r}")
        need(0 <= self.retry_after_s <= 3600, f"retry_after_s must be in [0, 3600] seconds, got {self.retry_after_s!r}")
        need(self.replica_cpus >= 0 and self.replica_gpus >= 0, "replica_cpus and replica_gpus must be >= 0")
        from .methods import list_methods

        unknown = [m for m in self.methods if m not in list_methods()]
        need(not unknown, f"unknown method {', '.join(map(repr, unknown))}; valid methods: {', '.join(list_methods())}")

    @property
    def ongoing(self) -> int:
        return self.max_ongoing or 2 * self.max_batch

    @property
    def served_methods(self) -> tuple[str, ...]:
        from .methods import list_methods

        return tuple(self.methods) or tuple(list_methods())

    @property
    def max_request_bytes(self) -> int:
        return self.settings.max_bytes + MULTIPART_SLACK

    def explain_config(self) -> dict:
        """The Explain deployment's user_config: changed without restarting a replica."""
        return {"max_batch": self.max_batch, "batch_wait_s": self.batch_wait_s}

    def gateway_config(self) -> dict:
        """The Gateway's user_config: changed without restarting it."""
        return {"timeout_s": self.timeout_s, "retry_after_s": self.retry_after_s}


# ----------------------------------------------------------------------------------------------------
# Replies

def error_reply(status: int, message, headers: dict | None = None) -> tuple:
    """(status, media type, body, headers): one line of JSON {"error": message}."""
    body = json.dumps({"error": one_line(message)}, ensure_ascii=False).encode() + b"\n"
    return status, "application/json", body, dict(headers or {})


def to_response(reply: tuple) -> Response:
    status, media, body, headers = reply
    return Response(body, status_code=status, media_type=media, headers=headers)


# ----------------------------------------------------------------------------------------------------
# Bodies

class BodyError(ValueError):
    """A request body that cannot be used (the message is one line)."""


def multipart_file(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """The image of a multipart/form-data body: the part named "image" or "file", else the first part with a
    filename; (its bytes, its filename). Parsed here, in memory (no spooling to disk)."""
    params = {}
    for piece in content_type.split(";")[1:]:
        k, _, v = piece.strip().partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise BodyError("multipart/form-data without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3:
        raise BodyError("multipart/form-data body without parts (or with another boundary)")
    found = []
    for chunk in chunks[1:-1]:   # before the first delimiter: preamble; after the last ("--"): epilogue
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise BodyError("multipart part without a header block")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        disp = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for piece in value.split(";")[1:]:
                    k, _, v = piece.strip().partition("=")
                    disp[k.strip().lower()] = v.strip().strip('"')
        found.append((disp.get("name"), disp.get("filename"), data))
    for name, filename, data in found:
        if name in ("image", "file"):
            return data, filename
    for name, filename, data in found:
        if filename is not None:
            return data, filename
    raise BodyError("multipart/form-data body without a file part: send the image as a part named 'image'")


# ----------------------------------------------------------------------------------------------------
# Batches

@dataclass
class Item:
    """One request's image in a batch."""
    rgb: np.ndarray            # [H, W, 3] uint8
    method: str
    top_p: int | None          # None where the method does not use p (its requests batch together)
    target: int | None         # class index; None = the image's top-1 class


def explain_batch(explainer, items: list[Item]) -> list:
    """Explain the images of a batch: one `explain_arrays` call per (method, p), targets per image. Returns,
    in the items' order, (Explanation, size of its group) or the exception its group raised (one request's
    failure is that request's answer, never the batch's)."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.method, it.top_p), []).append(i)
    out: list = [None] * len(items)
    for (method, top_p), idx in groups.items():
        try:
            res = explainer.explain_arrays([items[i].rgb for i in idx], target=[items[i].target for i in idx],
                                           method=method, top_p=top_p)
        except Exception as e:  # noqa: BLE001  (answered to each request of the group as a 500 with its line)
            res = [e] * len(idx)
        else:
            res = [(r, len(idx)) for r in res]
        for i, r in zip(idx, res):
            out[i] = r
    return out


# ----------------------------------------------------------------------------------------------------
# The explaining replica

class ExplainReplica:
    """One Explainer; its sessions exist once the constructor returns (Serve routes nothing here before)."""

    def __init__(self, artifacts: str, settings: Settings, methods: tuple[str, ...]):
        from .explainer import Explainer

        self.settings = settings
        # ORT's idle threads do not spin: decoding and PNG encoding share the cores with the graphs
        self.explainer = Explainer.from_artifacts(artifacts, settings,
                                                  engine_options=settings.engine_options(allow_spinning=False))
        self.explainer.check_graphs(settings.method)   # the default method's sessions, created now
        self.methods = tuple(methods)
        self._opened = {settings.method}
        self._open_lock = threading.Lock()

    def reconfigure(self, config: dict) -> None:
        self._batched.set_max_batch_size(int(config["max_batch"]))
        self._batched.set_batch_wait_timeout_s(float(config["batch_wait_s"]))

    def _open(self, method: str) -> None:
        """The method's sessions (created on its first request, once)."""
        if method not in self._opened:
            with self._open_lock:
                if method not in self._opened:
                    self.explainer.check_graphs(method)
                    self._opened.add(method)

    async def health(self) -> dict:
        ex = self.explainer
        return {"status": "ready", "model": ex.artifacts.model, "engine": ex.engine, "precision": ex.precision,
                "default_method": self.settings.method, "methods": list(self.methods),
                "sessions": sorted(ex._sessions), "classes": len(ex.classes.labels),
                "random_weights": bool(ex.artifacts.random_weights)}

    async def classes(self) -> dict:
        c = self.explainer.classes
        return {"class_set": c.name, "classes": list(c.labels)}

    async def explain(self, data: bytes, query: dict) -> tuple:
        """One request: (status, media type, body, headers)."""
        from .explainer import TargetError
        from .images import ImageError, decode_image
        from .settings import parse_target

        t0 = time.perf_counter()
        s = self.settings
        name = query.get("name") or "request body"
        if len(data) > s.max_bytes:
            return error_reply(413, f"{show(name)}: {len(data):,} bytes is over the file size limit max_bytes={s.max_bytes:,}")
        try:
            rgb = await asyncio.to_thread(decode_image, data, name, s.max_pixels, s.max_aspect)
        except ImageError as e:
            return error_reply(400, e)
        del data
        method = query["method"]
        try:
            target = self.explainer.resolve_target(parse_target(query["target"]) if query.get("target") is not None
                                                   else s.target)
        except TargetError as e:
            return error_reply(400, f"target: {e}")
        try:
            await asyncio.to_thread(self._open, method)
        except ValueError as e:   # ArtifactsError: a graph of this method is missing or damaged
            return error_reply(400, f"method {method}: {e}")
        from .methods import get_method

        top_p = query.get("top_p") or s.top_p
        item = Item(rgb, method, top_p if "top_p" in get_method(method).uses else None, None if target < 0 else target)
        t1 = time.perf_counter()
        result, batch_images, started = await self._batched(item)
        if isinstance(result, BaseException):
            return error_reply(500, f"explaining failed: {type(result).__name__}: {result}")
        exp, group = result
        fmt = query.get("format") or "json"
        reply = await asyncio.to_thread(self._render, rgb, exp, fmt, query.get("name"), {
            "decode": (t1 - t0) * 1e3, "wait": (started - t1) * 1e3}, batch_images, group, t0)
        return reply

    def _render(self, rgb, exp, fmt, source, extra_ms, batch_images, group, t0) -> tuple:
        from .render import npz_bytes, overlay_png

        headers = {"x-target-index": str(exp.target), "x-batch-images": str(batch_images), "x-batch-group": str(group)}
        if fmt == "png":
            return 200, FORMATS["png"], overlay_png(rgb, exp), headers
        if fmt == "npz":
            return 200, FORMATS["npz"], npz_bytes(exp), headers
        j = exp.summary()
        j["source"] = source
        j["timings_ms"].update(extra_ms)
        j["batch"] = {"images": batch_images, "group": group}
        j["timings_ms"]["replica"] = (time.perf_counter() - t0) * 1e3
        return 200, FORMATS["json"], json.dumps(j).encode() + b"\n", headers

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[Item]) -> list[tuple]:
        started = time.perf_counter()
        results = await asyncio.to_thread(explain_batch, self.explainer, items)
        return [(r, len(items), started) for r in results]


# ----------------------------------------------------------------------------------------------------
# The gateway

class GatewayIngress:
    """HTTP in, one Explain call (retried once on a replica that died), HTTP out."""

    def __init__(self, model, methods: tuple[str, ...], default_method: str, max_request_bytes: int):
        self.model = model
        self.methods = tuple(methods)
        self.default_method = default_method
        self.max_request_bytes = int(max_request_bytes)
        self.timeout_s, self.retry_after_s = 60.0, 1.0
        self.in_flight = 0          # /explain requests accepted and not yet answered
        self.draining = False       # set by drain(): new requests are refused with 503

    def reconfigure(self, config: dict) -> None:
        self.timeout_s = float(config["timeout_s"])
        self.retry_after_s = float(config["retry_after_s"])

    def _retry_after(self) -> dict:
        return {"retry-after": str(max(0, int(-(-self.retry_after_s // 1))))}

    async def __call__(self, request: Request) -> Response:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/") or "/"
        verb = ENDPOINTS.get(path)
        if verb is None:
            listed = ", ".join(f"{v} {p}" for p, v in ENDPOINTS.items())
            return to_response(error_reply(404, f"no endpoint {show(path)}; endpoints: {listed}"))
        if request.method != verb and not (verb == "GET" and request.method == "HEAD"):
            return to_response(error_reply(405, f"{path} takes {verb}, not {request.method}", {"allow": verb}))
        if self.draining and path != "/classes":
            return to_response(error_reply(503, "the server is stopping; retry later", self._retry_after()))
        if path == "/healthz":
            return await self._call_small("health", 503, "no Explain replica is ready")
        if path == "/classes":
            return await self._call_small("classes", 503, "no Explain replica is ready")
        self.in_flight += 1
        try:
            return to_response(await self._explain(request))
        finally:
            self.in_flight -= 1

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503 with Retry-After; /healthz says 503 too) and wait until those accepted have
        been answered, at most timeout_s: the number still unanswered (runtime.serve calls it before it stops
        Serve, so that a stop cuts no accepted request)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    async def _call_small(self, name: str, status: int, problem: str) -> Response:
        try:
            out = await asyncio.wait_for(_result(getattr(self.model, name).remote()), min(self.timeout_s, 10.0))
        except (asyncio.TimeoutError, RayActorError, WorkerCrashedError, BackPressureError,
                DeploymentUnavailableError) as e:
            return to_response(error_reply(status, f"{problem} ({type(e).__name__})", self._retry_after()))
        return Response(json.dumps(out).encode() + b"\n", media_type="application/json")

    def _query(self, request: Request) -> dict:
        q = request.query_params
        for key in q.keys():
            if key not in QUERY_KEYS:
                raise BodyError(f"unknown query parameter {show(key)}; valid: {', '.join(QUERY_KEYS)}")
            if len(q.getlist(key)) > 1:
                raise BodyError(f"query parameter {key} given more than once")
        method = q.get("method") or self.default_method
        if method not in self.methods:
            from .methods import list_methods

            if method in list_methods():
                raise BodyError(f"method {show(method)} is not served here; served methods: {', '.join(self.methods)}")
            raise BodyError(f"unknown method {show(method)}; served methods: {', '.join(self.methods)}")
        out = {"method": method, "format": q.get("format") or "json", "target": q.get("target"), "top_p": None}
        if out["format"] not in FORMATS:
            raise BodyError(f"unknown format {show(out['format'])}; valid: {', '.join(FORMATS)}")
        if out["target"] is not None and not out["target"].strip():
            raise BodyError("target is empty: give a class name or index, or leave it out for the top-1 class")
        if q.get("top_p") is not None:
            lo, hi = INT_RANGES["top_p"]
            text = q.get("top_p")
            if not (text.isascii() and text.isdigit() and lo <= int(text) <= hi):
                raise BodyError(f"top_p must be an integer in [{lo}, {hi}], got {show(text)}")
            out["top_p"] = int(text)
        return out

    async def _read_body(self, request: Request) -> bytes:
        cap = self.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise _TooLarge(f"request body of {int(length):,} bytes is over the request size limit {cap:,}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise _TooLarge(f"request body is over the request size limit {cap:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _explain(self, request: Request) -> tuple:
        try:
            query = self._query(request)
            body = await self._read_body(request)
            ctype = request.headers.get("content-type", "")
            if ctype.lower().startswith("multipart/form-data"):
                body, filename = multipart_file(body, ctype)
                query["name"] = filename
        except _TooLarge as e:
            return error_reply(413, e)
        except BodyError as e:
            return error_reply(400, e)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        for attempt in (1, 2):
            response = self.model.explain.remote(body, query)
            try:
                return await asyncio.wait_for(_result(response), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                response.cancel()
                return error_reply(504, f"no answer within the per-request timeout of {self.timeout_s:g} s")
            except asyncio.CancelledError:   # the client went away: the replica need not finish it
                response.cancel()
                raise
            except BackPressureError:
                return error_reply(503, "overloaded: every Explain replica is busy and the queue is full; "
                                        "retry later", self._retry_after())
            except (RayActorError, WorkerCrashedError) as e:
                if attempt == 1 and deadline - loop.time() > 0:
                    logger.warning(f"an Explain replica died during a request ({type(e).__name__}); retrying it once")
                    continue
                return error_reply(503, "the Explain replica died while answering (it is being restarted); "
                                        "retry later", self._retry_after())
            except DeploymentUnavailableError as e:
                return error_reply(503, f"no Explain replica is available ({type(e).__name__}); retry later",
                                   self._retry_after())


class _TooLarge(BodyError):
    pass


async def _result(response):
    return await response


def replica_pids(deployment: str = "Explain", app: str = APP_NAME) -> list[int]:
    """The pids of this machine's replica processes of a deployment, of this user (Linux: Ray titles each
    replica's process `ray::[ACTOR:]ServeReplica:APP:DEPLOYMENT[.METHOD]`); to watch their memory, and for
    the fault test."""
    title = re.compile(rb"ray::(\S*:)?ServeReplica:" + re.escape(f"{app}:{deployment}".encode()) + rb"(\.\S*)?")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if title.fullmatch(cmd.split(b"\0")[0].strip()):
            pids.append(int(entry))
    return sorted(pids)


# ----------------------------------------------------------------------------------------------------
# The application

def build_app(opts: ServeOptions):
    """The Serve application: Gateway (ingress) bound to Explain (opts.replicas replicas)."""
    from ray.serve.config import BackpressureConfig

    backpressure = BackpressureConfig(status_code=503, retry_after_s=opts.retry_after_s)
    actor = {"num_cpus": opts.replica_cpus}
    if opts.replica_gpus:
        actor["num_gpus"] = opts.replica_gpus
    explain = serve.deployment(ExplainReplica, name="Explain").options(
        num_replicas=opts.replicas, max_ongoing_requests=opts.ongoing, max_queued_requests=opts.max_queued,
        backpressure_config=backpressure, ray_actor_options=actor, user_config=opts.explain_config(),
        graceful_shutdown_timeout_s=opts.timeout_s, health_check_period_s=5.0)
    gateway_ongoing = opts.replicas * opts.ongoing + opts.max_queued + 16  # never the bottleneck
    gateway = serve.deployment(GatewayIngress, name="Gateway").options(
        num_replicas=1, max_ongoing_requests=gateway_ongoing, max_queued_requests=max(16, opts.max_queued),
        backpressure_config=backpressure, ray_actor_options={"num_cpus": 0}, user_config=opts.gateway_config(),
        graceful_shutdown_timeout_s=opts.timeout_s + 5)
    return gateway.bind(explain.bind(opts.artifacts, opts.settings, opts.served_methods),
                        opts.served_methods, opts.settings.method, opts.max_request_bytes)
