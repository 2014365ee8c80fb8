"""Load and fault test of the HTTP server (`python -m runtime.serve`) against the CLI on the same images.

    python -m benchmarks.serve --artifacts DIR [DIR ...] [--methods decomcam,gradcam] [--requests 64]
        [--concurrency 1,4,16,64] [--batching on,off] [--images DATA_DIR] [--n-images 32] [--fault] [--json FILE]

For each export: the CLI (`python -m runtime.explain`, its own loop seconds: images/s without start-up)
over the images; then two servers side by side, separate processes on 127.0.0.1, one per batching mode
(on: --max-batch 16, --batch-wait-ms 5; off: --max-batch 1); for each method and number of concurrent
clients a fixed number of requests (format=json) goes to one and then the other (the order alternating),
from a bounded local client (threads + urllib; each request has a timeout, the run stops by itself):
throughput (answers 200 per second of wall time), latency p50/p90/p99, the statuses, and the replica
processes' RSS (sampled every 0.25 s; VmHWM at the end).

--fault, on the first export: (1) two replicas under load, one of them killed with SIGKILL: what the
requests in flight got, how long the replica took to come back, whether the later requests succeeded;
(2) SIGTERM to the server under load: what the requests got, the exit status and how long it took.

Images: the first --n-images files of --images (sorted), or generated 320 x 240 JPEGs (common.photo_like).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.common import (
    command_line, cpu_flags, cpu_model, fmt, format_table, image_folder, load_average, stats_ms, versions,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
# the CLI's summary: explained OK of N inputs ... in T s (T/OK s/image); T has one decimal, T/OK four
# significant digits, so the loop time is OK x the per-image time (a fast run's T reads 0.0)
_CLI_LINE = re.compile(r"explained (\d+) of (\d+) inputs .* in ([0-9.]+) s(?: \(([0-9.e+-]+) s/image\))?")


# ----------------------------------------------------------------------------------------------------
# The client

def post(url: str, body: bytes, timeout: float) -> tuple[int | str, float]:
    """(status or the client-side failure's kind, seconds)."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    except urllib.error.URLError as e:
        status = type(e.reason).__name__ if isinstance(e.reason, BaseException) else "URLError"
    except (ConnectionError, TimeoutError, OSError, Exception) as e:  # noqa: BLE001  (counted by kind)
        status = type(e).__name__
    return status, time.perf_counter() - t0


def load(url: str, bodies: list[bytes], requests: int, clients: int, timeout: float = 900.0,
         on_done=None) -> dict:
    """`requests` POSTs from `clients` threads (each sends its next request when the last one is answered).
    on_done(n): called after each answer with the number answered so far (the fault test's trigger)."""
    counter = itertools.count()
    lock = threading.Lock()
    results: list[tuple[float, float, int | str]] = []   # (start, seconds, status)

    def worker():
        while True:
            i = next(counter)
            if i >= requests:
                return
            start = time.perf_counter()
            status, dt = post(url, bodies[i % len(bodies)], timeout)
            with lock:
                results.append((start, dt, status))
                n = len(results)
            if on_done:
                on_done(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    wall = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)
    ok = [dt for _, dt, s in results if s == 200]
    statuses: dict[str, int] = {}
    for _, _, s in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"requests": requests, "clients": clients, "answered": len(results), "ok": len(ok), "statuses": statuses,
            "wall_s": wall, "throughput": len(ok) / wall if wall > 0 else None, "latency_ms": stats_ms(ok),
            "hung_clients": hung, "t0": t0, "results": results}


# ----------------------------------------------------------------------------------------------------
# The server process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m runtime.serve` in its own session (a signal to it reaches it alone, not Ray's processes)."""

    def __init__(self, artifacts: str, extra: list[str], log: Path):
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "runtime.serve", "--artifacts", artifacts, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), *extra]
        self.cmd = cmd
        self.t0 = time.perf_counter()
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ready_s = self._wait_ready()

    def _wait_ready(self, limit: float = 600.0) -> float:
        while time.perf_counter() - self.t0 < limit:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server was not ready in {limit:.0f} s: {self.log.read_text()[-2000:]}")

    def replicas(self) -> list[int]:
        """This server's Explain replica processes (two servers may run side by side)."""
        from runtime.serve_app import replica_pids

        mine = descendants(self.proc.pid)
        return [p for p in replica_pids() if p in mine]

    def stop(self, sig: int = signal.SIGTERM, limit: float = 180.0) -> tuple[int | None, float]:
        """Signal the server and wait for it: (exit status, seconds); killed (its session too) past `limit`."""
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(limit)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode, time.perf_counter() - t0


def descendants(root: int) -> set[int]:
    """The pids of every process below `root` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def replica_rss(pids: list[int]) -> tuple[float, float]:
    """(sum of VmRSS, sum of VmHWM) of these processes, MiB (those that ended count 0)."""
    rss = hwm = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += float(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        hwm += float(line.split()[1]) / 1024
        except OSError:
            pass
    return rss, hwm


class RssPeak:
    """Samples a server's Explain replicas' summed VmRSS every 0.25 s while it is open."""

    def __init__(self, server: ServerProcess):
        self.pids = server.replicas
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while True:
            self.peak = max(self.peak, replica_rss(self.pids())[0])
            if self._stop.wait(0.25):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------------
# The CLI

def run_cli(artifacts: str, paths: list[Path], method: str, top_p: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="serve-bench-cli-") as out:
        cmd = [sys.executable, "-m", "runtime.explain", *map(str, paths), "--artifacts", artifacts, "--method", method,
               "--top-p", str(top_p), "--out", out, "--quiet", "--overwrite"]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    m = _CLI_LINE.search(r.stdout)
    if r.returncode != 0 or not m:
        raise SystemExit(f"runtime.explain failed ({r.returncode}): {r.stderr[-2000:]}")
    n = int(m.group(1))
    loop_s = n * float(m.group(4)) if m.group(4) else float(m.group(3))
    return {"method": method, "images": n, "loop_s": loop_s, "wall_s": wall, "images_per_s": n / loop_s}


# ----------------------------------------------------------------------------------------------------
# The runs

def server_args(args, max_batch: int, extra: list[str] = ()) -> list[str]:
    out = ["--methods", args.methods, "--method", args.methods.split(",")[0], "--top-p", str(args.top_p),
           "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--max-queued", "256",
           "--timeout-s", "900", *extra]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def run_load(args, artifacts: str, bodies: list[bytes], logs: Path) -> list[dict]:
    """Both batching modes' servers side by side; each (method, clients) point is run on one and then the
    other, the order alternating, so that the machine's load drifts over both alike."""
    rows = []
    name = Path(artifacts).name
    modes = args.batching.split(",")
    servers = {}
    try:
        for mode in modes:
            max_batch = args.max_batch if mode == "on" else 1
            servers[mode] = ServerProcess(artifacts, server_args(args, max_batch), logs / f"server-{name}-{mode}.log")
            print(f"  server (batching {mode}: max batch {max_batch}) ready in {servers[mode].ready_s:.1f} s",
                  file=sys.stderr, flush=True)
        k = 0
        for method in args.methods.split(","):
            for mode in modes:
                load(f"{servers[mode].url}/explain?method={method}&format=json", bodies, min(8, args.requests), 4)
            for clients in [int(c) for c in args.concurrency.split(",")]:
                for mode in (modes if k % 2 == 0 else modes[::-1]):
                    server = servers[mode]
                    la0 = load_average()
                    with RssPeak(server) as rss:
                        r = load(f"{server.url}/explain?method={method}&format=json", bodies, args.requests, clients)
                    r.pop("results")
                    r.update(model=name, method=method, batching=mode, max_batch=args.max_batch if mode == "on" else 1,
                             rss_peak_mb=rss.peak, load_average=[la0, load_average()])
                    rows.append(r)
                    lat = r["latency_ms"]
                    print(f"  {name} {method} batching {mode} x{clients}: {r['ok']}/{r['requests']} ok, "
                          f"{fmt(r['throughput'], 2)} img/s, p50 {fmt(lat['p50'], 0)} ms, p99 {fmt(lat['p99'], 0)} ms, "
                          f"RSS {rss.peak:.0f} MiB, load {la0[0] if la0 else '-'}", file=sys.stderr, flush=True)
                k += 1
        for mode, server in servers.items():
            hwm = replica_rss(server.replicas())[1]
            for r in rows:
                if r["batching"] == mode:
                    r["replica_hwm_mb"] = hwm
    finally:
        for mode, server in servers.items():
            code, secs = server.stop()
            print(f"  server (batching {mode}) stopped: exit {code} in {secs:.1f} s", file=sys.stderr, flush=True)
    return rows


def run_fault(args, artifacts: str, bodies: list[bytes], logs: Path) -> dict:
    """Kill one of two replicas under load, then stop the server under load."""
    method = args.methods.split(",")[0]
    extra = ["--replicas", "2", "--replica-cpus", "1"] + ([] if args.threads else ["--threads", "1"])
    server = ServerProcess(artifacts, server_args(args, args.max_batch, extra), logs / "server-fault.log")
    url = f"{server.url}/explain?method={method}&format=json"
    out: dict = {"model": Path(artifacts).name, "method": method, "requests": args.fault_requests,
                 "clients": args.fault_clients}
    try:
        load(url, bodies, 8, 4)
        before = server.replicas()
        assert len(before) == 2, before
        killed: dict = {}

        watcher = threading.Thread(target=lambda: watch_back(), daemon=True)

        def kill_at(n):
            if n == args.fault_requests // 3 and not killed:
                killed["pid"], killed["t"] = before[0], time.perf_counter()
                os.kill(before[0], signal.SIGKILL)
                watcher.start()

        def watch_back():
            while time.perf_counter() - killed["t"] < 600:
                now = server.replicas()
                if len(now) == 2 and before[0] not in now:
                    killed["back_s"] = time.perf_counter() - killed["t"]
                    return
                time.sleep(0.2)

        r = load(url, bodies, args.fault_requests, args.fault_clients, timeout=300, on_done=kill_at)
        if watcher.ident is not None:   # started: wait until the replica is back
            watcher.join(600)
        t_kill = killed.get("t")
        back = killed.get("back_s")
        res = r.pop("results")
        later = load(url, bodies, args.fault_requests // 2, args.fault_clients, timeout=300)  # both replicas again
        later.pop("results")

        def tally(sel):
            d: dict[str, int] = {}
            for _, _, s in sel:
                d[str(s)] = d.get(str(s), 0) + 1
            return d

        in_flight = [x for x in res if x[0] < t_kill < x[0] + x[1]]
        out["kill"] = {**{k: r[k] for k in ("answered", "ok", "statuses", "wall_s", "throughput", "hung_clients")},
                       "in_flight_at_kill": len(in_flight), "in_flight_statuses": tally(in_flight),
                       "replica_back_s": back, "latency_ms": r["latency_ms"],
                       "after_back": {k: later[k] for k in ("requests", "ok", "statuses", "hung_clients")}}
        print(f"  kill: {out['kill']}", file=sys.stderr, flush=True)

        # (2) SIGTERM under load
        stop: dict = {}

        def stop_at(n):
            if n == args.fault_requests // 3 and not stop:
                stop["t"] = time.perf_counter()
                server.proc.send_signal(signal.SIGTERM)

        def wait_exit():
            code = server.proc.wait()
            stop.update(code=code, end=time.perf_counter())

        waiter = threading.Thread(target=wait_exit, daemon=True)
        waiter.start()
        r = load(url, bodies, args.fault_requests, args.fault_clients, timeout=300, on_done=stop_at)
        waiter.join(300)
        res = r.pop("results")
        t_stop = stop.get("t")
        in_flight = [x for x in res if t_stop is not None and x[0] < t_stop < x[0] + x[1]]
        later = [x for x in res if t_stop is not None and x[0] >= t_stop]
        out["stop"] = {**{k: r[k] for k in ("answered", "ok", "statuses", "wall_s", "hung_clients")},
                       "in_flight_at_signal": len(in_flight), "in_flight_statuses": tally(in_flight),
                       "sent_after_signal": len(later), "after_signal_statuses": tally(later),
                       "exit_status": stop.get("code"),
                       "exit_s": stop["end"] - t_stop if t_stop and "end" in stop else None}
        print(f"  stop: {out['stop']}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return out


# ----------------------------------------------------------------------------------------------------
# Report

def tables(report: dict) -> str:
    parts = []
    cli = {(c["model"], c["method"]): c for c in report["cli"]}
    rows = []
    for c in report["cli"]:
        rows.append([c["model"], c["method"], c["images"], fmt(c["loop_s"]), fmt(c["images_per_s"], 2)])
    parts.append(format_table(["model", "method", "images", "CLI loop s", "CLI img/s"], rows, "llrrr"))
    rows = []
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in report["load"]))}
    for r in sorted(report["load"], key=lambda r: (r["model"], order[r["method"]], r["batching"] != "on", r["clients"])):
        lat = r["latency_ms"]
        base = cli.get((r["model"], r["method"]))
        vs = f"{r['throughput'] / base['images_per_s']:.2f}x" if base and r["throughput"] else "-"
        other = {k: v for k, v in r["statuses"].items() if k != "200"}
        rows.append([r["model"], r["method"], r["batching"], r["clients"], f"{r['ok']}/{r['requests']}",
                     fmt(r["throughput"], 2), vs, fmt(lat["p50"], 0), fmt(lat["p90"], 0), fmt(lat["p99"], 0),
                     fmt(r["rss_peak_mb"], 0), fmt(r.get("replica_hwm_mb"), 0),
                     ", ".join(f"{k}: {v}" for k, v in other.items()) or "-",
                     f"{r['load_average'][0][0]}-{r['load_average'][1][0]}" if r["load_average"][0] else "-"])
    parts.append(format_table(["model", "method", "batching", "clients", "ok", "img/s", "vs CLI", "p50 ms", "p90 ms",
                               "p99 ms", "RSS peak MiB", "VmHWM MiB", "other answers", "load"], rows, "lllrrrrrrrrrlr"))
    f = report.get("fault")
    if f:
        k, s = f["kill"], f["stop"]
        parts.append(format_table(
            ["event", "requests", "200", "other answers", "in flight at the event", "their answers", "after", "hung"],
            [["SIGKILL one of 2 replicas", k["answered"], k["ok"],
              ", ".join(f"{a}: {b}" for a, b in k["statuses"].items() if a != "200") or "-",
              k["in_flight_at_kill"], json.dumps(k["in_flight_statuses"]),
              f"replica back in {fmt(k['replica_back_s'])} s; then {k['after_back']['requests']} requests: "
              f"{json.dumps(k['after_back']['statuses'])}", k["hung_clients"] + k["after_back"]["hung_clients"]],
             ["SIGTERM to the server", s["answered"], s["ok"],
              ", ".join(f"{a}: {b}" for a, b in s["statuses"].items() if a != "200") or "-",
              s["in_flight_at_signal"], json.dumps(s["in_flight_statuses"]),
              f"exit {s['exit_status']} after {fmt(s['exit_s'])} s; sent later: {json.dumps(s['after_signal_statuses'])}",
              s["hung_clients"]]], "lrrlrllr"))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", nargs="+", required=True, help="export folders (one run each)")
    p.add_argument("--methods", default="decomcam,gradcam", help="methods measured (comma-separated)")
    p.add_argument("--requests", type=int, default=64, help="requests per point (default 64)")
    p.add_argument("--concurrency", default="1,4,16,64", help="concurrent clients per point (default 1,4,16,64)")
    p.add_argument("--batching", default="on,off", help="on (--max-batch), off (--max-batch 1), or both")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--top-p", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="ORT threads of each replica and of the CLI")
    p.add_argument("--images", default=None, help="a folder of images (DATA_DIR/images); default: generated JPEGs")
    p.add_argument("--n-images", type=int, default=32, help="distinct images (requests cycle through them)")
    p.add_argument("--no-cli", action="store_true", help="skip the CLI baseline")
    p.add_argument("--fault", action="store_true", help="also the fault test (on the first export)")
    p.add_argument("--fault-requests", type=int, default=120)
    p.add_argument("--fault-clients", type=int, default=16)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)

    report = {"command": command_line("benchmarks.serve", argv), "machine": {
        "cpu": cpu_model(), "isa": cpu_flags(), "cores": os.cpu_count(), "versions": versions(),
        "load_average": {"start": load_average()}}, "cli": [], "load": []}
    try:
        import ray

        report["machine"]["versions"]["ray"] = ray.__version__
    except ImportError:
        raise SystemExit("ray[serve] is not installed: pip install '.[ray]'") from None
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp = Path(tmp)
        if args.images:
            from runtime.inputs import expand_inputs

            paths = sorted(expand_inputs([args.images])[0])[: args.n_images]
        else:
            paths = image_folder(tmp / "images", args.n_images)
        bodies = [Path(q).read_bytes() for q in paths]
        report["images"] = {"folder": "DATA_DIR" if args.images else "generated 320 x 240 JPEGs", "n": len(paths)}
        logs = tmp / "logs"
        logs.mkdir()
        for art in args.artifacts:
            print(f"{Path(art).name}:", file=sys.stderr, flush=True)
            if not args.no_cli:
                for method in args.methods.split(","):
                    c = run_cli(art, paths, method, args.top_p, args.threads)
                    c["model"] = Path(art).name
                    report["cli"].append(c)
                    print(f"  CLI {method}: {c['images_per_s']:.2f} img/s ({c['images']} images in {c['loop_s']:.1f} s)",
                          file=sys.stderr, flush=True)
            report["load"] += run_load(args, art, bodies, logs)
        if args.fault:
            report["fault"] = run_fault(args, args.artifacts[0], bodies, logs)
    report["machine"]["load_average"]["end"] = load_average()
    text = tables(report)
    la = report["machine"]["load_average"]
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores; load average {la['start']} at start, "
          f"{la['end']} at end\n\n{text}")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
