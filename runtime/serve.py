"""`python -m runtime.serve`: explanations over HTTP on Ray Serve, batched across requests.

    python -m runtime.serve --artifacts DIR [--method decomcam] [--engine cpu|cuda] [--replicas N]
        [--max-batch 16] [--batch-wait-ms 5] [--host 127.0.0.1] [--port 8000] [limits, queue, timeout]

    POST /explain?method=&target=&top_p=&format=json|png|npz   the image as the body (raw or multipart)
    GET  /healthz                                              200 once the replicas' sessions exist
    GET  /classes                                              the class names

The same application for `serve run` and Serve config files: `runtime.serve:app_builder`, whose `args` are
this command's options without the dashes (`serve run runtime.serve:app_builder artifacts=DIR replicas=2`).
Exit status: 0 after Ctrl-C or SIGTERM once the replicas have drained, 1 when Ray or Serve fails to start,
2 for a usage error (an option out of range, missing or damaged artifacts, an unknown method or target,
a port in use, ray[serve] not installed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

from .cli_args import OneLineParser, add_engine_args, add_limit_args, add_method_args, float_range, int_range
from .names import one_line, show

SERVER_MAX_PIXELS = 16_000_000   # a server holds up to max_ongoing decoded images per replica: lower than the CLI's
SERVER_MAX_BYTES = 32 << 20      # 32 MiB (the CLI's is 1 GiB)
# one classifier forward per channel of the target layer (2048 for RN50): served only when --methods names them
PER_CHANNEL_METHODS = ("scorecam", "scorecam++", "ablationcam")


def add_serving_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving")
    g.add_argument("--methods", default=None,
                   help="comma-separated methods a request may ask for (default: every method this export can run "
                        "but Score-CAM, Score-CAM++ and Ablation-CAM, which cost one forward per channel)")
    g.add_argument("--replicas", type=int_range(1, 1024), default=1, help="Explain replicas, 1..1024 (default 1)")
    g.add_argument("--max-batch", type=int_range(1, 4096), default=16,
                   help="images explained together across requests, 1..4096 (default 16; 1 turns batching off)")
    g.add_argument("--batch-wait-ms", type=float_range(0.0, 60000.0, closed=True), default=5.0,
                   help="how long a batch waits for more requests after its first, in ms (default 5)")
    g.add_argument("--max-ongoing", type=int_range(1, 65536), default=None,
                   help="requests one replica holds at once (default 2 x --max-batch)")
    g.add_argument("--max-queued", type=int_range(0, 1 << 20), default=64,
                   help="requests waiting for a replica; past it the answer is 503 with Retry-After (default 64)")
    g.add_argument("--timeout-s", type=float_range(0.0, 86400.0), default=60.0,
                   help="per-request timeout in seconds, queue included; past it the answer is 504 (default 60)")
    g.add_argument("--retry-after-s", type=float_range(0.0, 3600.0, closed=True), default=1.0,
                   help="the Retry-After header of a 503, seconds (default 1)")
    g.add_argument("--replica-cpus", type=float_range(0.0, 1024.0, closed=True), default=1.0,
                   help="Ray CPUs reserved per replica (placement only; ORT's threads are --threads; default 1)")
    g.add_argument("--replica-gpus", type=float_range(0.0, 64.0, closed=True), default=None,
                   help="Ray GPUs per replica (default 1 for --engine cuda/trt, 0 for cpu; 0.5 puts two on a GPU)")


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (python -m runtime.serve only; Serve config files set these in http_options)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int_range(1, 65535), default=8000, help="HTTP port (default 8000)")
    g.add_argument("--metrics-port", type=int_range(1, 65535), default=8080,
                   help="Prometheus metrics of Ray and Serve at http://127.0.0.1:PORT/metrics (default 8080)")
    g.add_argument("--address", default=None,
                   help="join a running Ray cluster ('auto' or an address) instead of starting a local Ray")


def build_parser(launch: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    add_method_args(p)
    add_limit_args(p, max_pixels=SERVER_MAX_PIXELS, max_bytes=SERVER_MAX_BYTES)
    add_serving_args(p)
    if launch:
        add_launch_args(p)
    return p


class _RaisingParser(OneLineParser):
    """The parser of app_builder: a usage error is a ValueError (Serve reports it), never an exit."""

    def error(self, message: str):
        raise ValueError(one_line(message))


def options_from_args(args):
    """(ServeOptions, served methods) from parsed arguments, after checking the artifacts, every graph of
    every served method, the default target and the method list; ValueError (one line) otherwise."""
    from .artifacts import ArtifactsError
    from .cli_args import settings_from_args
    from .explainer import Explainer
    from .methods import list_methods
    from .serve_app import ServeOptions

    settings = settings_from_args(args)
    ex = Explainer.from_artifacts(args.artifacts, settings)   # manifest, class set, engine (no session yet)
    try:
        ex.resolve_target(settings.target)
    except ValueError as e:
        raise ValueError(f"--target {show(args.target)}: {e}") from None
    asked = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else []
    unknown = [m for m in asked if m not in list_methods()]
    if unknown:
        raise ValueError(f"--methods: unknown method {', '.join(map(repr, unknown))}; valid: {', '.join(list_methods())}")
    served = []
    for m in asked or [m for m in list_methods() if m not in PER_CHANNEL_METHODS]:
        try:
            for g in ex.graphs_for(m):
                ex.artifacts.check_graph(g, ex.artifacts.precision_for(g, ex.precision))
        except ArtifactsError as e:
            if asked or m == settings.method:
                raise ValueError(f"method {m}: {e}") from None
            continue   # not asked for by name: this export cannot run it, so it is not served
        served.append(m)
    if settings.method not in served:
        raise ValueError(f"--method {settings.method} is not in --methods ({', '.join(served)})")
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if settings.engine in ("cuda", "trt") else 0.0)
    opts = ServeOptions(artifacts=str(ex.artifacts.root), settings=settings, methods=tuple(served),
                        replicas=args.replicas, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1e3,
                        max_ongoing=args.max_ongoing, max_queued=args.max_queued, timeout_s=args.timeout_s,
                        retry_after_s=args.retry_after_s, replica_cpus=args.replica_cpus, replica_gpus=gpus)
    return opts


def app_builder(args: dict):
    """The Serve application from a dict of this command's options (`serve run runtime.serve:app_builder
    artifacts=DIR max_batch=16`, or a config file's `args`). A usage error is a ValueError (one line)."""
    from .serve_app import build_app

    return build_app(options_from_args(args_from_dict(args)))


def args_from_dict(args: dict) -> argparse.Namespace:
    """Parsed options from {option: value}: keys with '_' or '-', values as text, the fp16 flag as
    true/false; the launcher's options (host, port, ...) are not among them (a Serve config sets those in
    its http_options). A usage error is a ValueError."""
    argv = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if flag == "--fp16":
            if value is True or str(value).lower() == "true":
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    parser = build_parser(launch=False)
    parser.__class__ = _RaisingParser
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The command

def _port_problem(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None (checked before Ray starts, in one line)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"{host}: cannot resolve ({e.strerror})"
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as e:
        return f"{host}:{port}: cannot listen ({e.strerror or type(e).__name__})"
    finally:
        s.close()
    return None


def error(msg) -> None:
    print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        error(f"Ray Serve is not installed ({e}); install the ray extra: pip install '.[ray]'")
        return 2
    try:
        opts = options_from_args(args)
    except ValueError as e:
        error(e)
        return 2
    if args.address is None:
        cpus = os.cpu_count() or 1
        if opts.replicas * opts.replica_cpus > cpus:
            error(f"--replicas {opts.replicas} x --replica-cpus {opts.replica_cpus:g} needs "
                  f"{opts.replicas * opts.replica_cpus:g} CPUs; this machine has {cpus} (lower --replica-cpus, e.g. "
                  f"{cpus / opts.replicas:g})")
            return 2
        for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
            problem = _port_problem(args.host if flag == "--port" else "127.0.0.1", port)
            if problem:
                error(f"{flag}: {problem}")
                return 2
    stop = threading.Event()
    t0 = time.perf_counter()
    try:
        start_serving(opts, args.host, args.port, args.metrics_port, args.address)
    except Exception as e:  # noqa: BLE001  (Ray's and Serve's start-up errors are many; each is one line here)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        error(f"Ray Serve failed to start: {type(e).__name__}: {first}")
        stop_serving(args.address)
        return 1
    for s in (signal.SIGINT, signal.SIGTERM):   # after ray.init, which installs its own SIGTERM handler
        signal.signal(s, lambda *_: stop.set())
    metrics = f"http://127.0.0.1:{args.metrics_port}/metrics" if args.address is None else "the cluster's metrics agents"
    print(f"serving {show(opts.artifacts)} ({', '.join(opts.served_methods)}; default {opts.settings.method}) on "
          f"http://{args.host}:{args.port} with {opts.replicas} replica(s), batches of up to {opts.max_batch} "
          f"(wait {opts.batch_wait_s * 1e3:g} ms); ready in {time.perf_counter() - t0:.1f} s; metrics at {metrics}; "
          f"Ctrl-C stops", flush=True)
    while not stop.wait(0.5):
        pass
    for s in (signal.SIGINT, signal.SIGTERM):   # a second signal stops at once
        signal.signal(s, signal.SIG_DFL)
    t1 = time.perf_counter()
    print("stopping: new requests are refused (503), those accepted are answered", flush=True)
    left = stop_serving(args.address, opts.timeout_s)
    cut = f"; {left} accepted requests were not answered within --timeout-s" if left else ""
    print(f"stopped in {time.perf_counter() - t1:.1f} s{cut}", flush=True)
    return 0


def start_serving(opts, host: str = "127.0.0.1", port: int = 8000, metrics_port: int | None = 8080,
                  address: str | None = None, num_cpus: int | None = None) -> None:
    """Ray (local, or the cluster at `address`), Serve's HTTP proxy on host:port and the application; returns
    once every replica is ready (its sessions exist)."""
    import ray
    from ray import serve

    from .serve_app import APP_NAME, build_app

    if address is None:
        # local: object spilling off, so that no request's bytes can reach the disk through Ray
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING", num_cpus=num_cpus,
                 _metrics_export_port=metrics_port, _system_config={"automatic_object_spilling_enabled": False})
    else:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.timeout_s + 30.0})
    serve.run(build_app(opts), name=APP_NAME, route_prefix="/")


def stop_serving(address: str | None = None, timeout_s: float = 60.0) -> int | None:
    """Stop what start_serving started: the whole local Serve and Ray, or only this application on a
    cluster. First the gateway drains: new requests are answered 503 with Retry-After while those already
    accepted are answered (at most timeout_s); returns how many were still unanswered (None: no gateway)."""
    import ray
    from ray import serve

    from .serve_app import APP_NAME

    left = None
    try:
        left = serve.get_deployment_handle("Gateway", APP_NAME).drain.remote(timeout_s).result(timeout_s=timeout_s + 30)
        time.sleep(0.5)   # the last answers leave the HTTP proxy
    except Exception:  # noqa: BLE001  (nothing to drain: Serve or the application did not start)
        pass
    try:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as e:  # noqa: BLE001  (stopping what did not start)
        error(f"while stopping Serve: {type(e).__name__}: {one_line(e)}")
    ray.shutdown()
    return left


if __name__ == "__main__":
    sys.exit(main())
