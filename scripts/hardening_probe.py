"""The hardening probe's cases, run against a checkout: one row per case with what happened.

    python scripts/hardening_probe.py ROOT ARTIFACTS WORK [--json FILE]

ROOT is a checkout of this repository (its runtime/ and export/ are imported with PYTHONPATH=ROOT),
ARTIFACTS an export of `resnet-tiny` made by that checkout, WORK an empty scratch folder. Every case runs
the checkout's command line (or API) in a subprocess and records what a user would see; comparing two
checkouts' tables is the before/after of the hardening issue. It runs for a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path


def png(width: int, height: int, value: int = 128) -> bytes:
    raw = b"".join(b"\x00" + bytes([value]) * (width * 3) for _ in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Probe:
    def __init__(self, root: Path, art: Path, work: Path):
        self.root, self.art, self.work = root, art, work
        self.env = {**os.environ, "PYTHONPATH": str(root)}
        self.rows: list[dict] = []

    def run(self, args, timeout=600, cwd=None, wrap=None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *args] if wrap is None else [*wrap, sys.executable, *args]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, env=self.env, cwd=cwd or self.work)

    def explain(self, *args, **kw):
        return self.run(["-m", "runtime.explain", *map(str, args), "--artifacts", str(self.art), "--quiet"], **kw)

    def image(self, path: Path, seed: int, size=(90, 120)) -> Path:
        import cv2
        import numpy as np

        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        return path

    def row(self, case: str, what: str, result):
        self.rows.append({"case": case, "what": what, "result": result})
        print(f"{case:>4} {what}: {result}", file=sys.stderr, flush=True)


def errors(r) -> list[str]:
    return [ln for ln in r.stderr.decode("utf-8", "replace").splitlines() if ln.startswith("error:")]


def tail(r) -> str:
    lines = r.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:140] if lines else ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_json = None
    if "--json" in argv:
        i = argv.index("--json")
        out_json = argv[i + 1]
        del argv[i:i + 2]
    root, art, work = (Path(a).resolve() for a in argv)
    work.mkdir(parents=True, exist_ok=True)
    p = Probe(root, art, work)
    good = p.image(work / "in" / "good.png", 1)

    # 1. the user's files in --out
    o = work / "o1"
    (o / ".thesis.part99999").mkdir(parents=True)
    (o / ".thesis.part99999" / "ch1.tex").write_text("work")
    (o / ".notes.tmp4000000").write_text("n")
    r = p.explain(good, "--out", o)
    kept = (o / ".thesis.part99999" / "ch1.tex").exists() and (o / ".notes.tmp4000000").exists()
    p.row("1", "the user's folder and file in --out after a run", "kept" if kept else f"DELETED (exit {r.returncode})")

    # 2. a live writer in another PID namespace
    o = work / "o2"
    o.mkdir()
    code = ("import sys, time\nfrom runtime.fsutil import atomic_open\nwith atomic_open(sys.argv[1]) as f:\n"
            "    f.write(b'x'); f.flush(); print('w', flush=True); time.sleep(120)\n")
    w = subprocess.Popen([sys.executable, "-c", code, str(o / "x.npz")], stdout=subprocess.PIPE, env=p.env)
    w.stdout.readline()
    before = sorted(os.listdir(o))
    try:
        r = p.explain(good, "--out", o, wrap=["unshare", "--pid", "--fork", "--mount-proc"])
        after = [n for n in before if (o / n).exists()]
        p.row("2", "a live run's temporary, cleaned from another PID namespace",
              "kept" if after == before else "DELETED" if r.returncode in (0, 1) else f"unshare failed ({tail(r)})")
    finally:
        w.kill()
        w.wait()

    # 3. a resumed run and another input with the same name
    a, b = p.image(work / "dA" / "cat.png", 2), p.image(work / "dB" / "cat.png", 3)
    o = work / "o3"
    p.explain(a, "--out", o)
    r = p.explain(b, "--out", o, "--report")
    src = json.loads((o / "cat.json").read_text())["source"]
    own = sorted(n for n in os.listdir(o) if n.startswith("cat-") and n.endswith(".json"))
    out = r.stdout.decode()
    p.row("3", "dB/cat.png into dA/cat.png's --out", f"exit {r.returncode}; "
          f"{'1 skipped' if '1 skipped' in out else 'explained'}; cat.json names {Path(src).parent.name}/cat.png; "
          f"dB's own outputs: {own[0] if own else 'none'}")
    r = p.explain(a, "--out", o, "--method", "gradcam")
    p.row("3", "dA/cat.png again with --method gradcam", f"exit {r.returncode}; "
          f"{'silently skipped' if '1 skipped' in r.stdout.decode() else (errors(r) or ['?'])[0][:110]}")

    # 4. one very wide image in a group
    wide = work / "in4" / "w.png"
    wide.parent.mkdir()
    wide.write_bytes(png(40_000_000, 1))
    prog = p.image(work / "in4" / "prog.jpg", 4)
    r = p.explain(good, wide, prog, "--out", work / "o4")
    p.row("4", "good.png w.png (40,000,000 x 1) prog.jpg", f"exit {r.returncode}; {len(errors(r))} failed: "
          f"{'; '.join(e[7:90] for e in errors(r))}")

    # 5. memory of a 100,000 x 1 PNG
    thin = work / "in5" / "thin.png"
    thin.parent.mkdir()
    thin.write_bytes(png(100_000, 1))
    rss = ("import resource, sys\nfrom runtime.explain import main\nrc = main(sys.argv[1:])\n"
           "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, rc)\n")
    res = {}
    for name, path in (("120 x 90", good), ("100,000 x 1", thin)):
        r = p.run(["-c", rss, str(path), "--artifacts", str(art), "--quiet", "--out", str(work / "o5"),
                   "--threads", "1"])
        line = [ln for ln in r.stdout.decode().splitlines() if ln.startswith("RSS")][-1].split()
        res[name] = f"{line[1]} MB (exit {line[2]})"
    p.row("5", "peak RSS", "; ".join(f"{k}: {v}" for k, v in res.items()))

    # 6. error lines under load: 40 junk files among 40 real-size JPEGs
    d6 = work / "in6"
    for i in range(40):
        p.image(d6 / f"big{i:02d}.jpg", 100 + i, size=(1200, 1600))
        (d6 / f"junk{i:02d}.tif").write_bytes(b"II*\x00" + os.urandom(200))
    r = p.explain(d6, "--out", work / "o6", "--group", "4")
    failed = [ln for ln in r.stdout.decode().splitlines() if "failed" in ln]
    p.row("6", "40 junk TIFFs among 40 JPEGs: error lines / failures",
          f"{len(errors(r))} lines; {failed[0].split(':', 1)[1].split(',')[0].strip() if failed else '?'}")

    # 7. a file name that forges a line
    d7 = work / "in7"
    d7.mkdir()
    (d7 / "evil\nerror: fake.jpg").write_bytes(b"junk")
    (d7 / "x\x1b[2J.png").write_bytes(b"junk")
    r = p.explain(d7, "--out", work / "o7")
    raw = r.stderr.decode("utf-8", "replace")
    p.row("7", "names with a line break and an escape", f"{len(errors(r))} error lines for 2 files; "
          f"raw ESC on stderr: {'yes' if chr(27) in raw else 'no'}")

    # 8. --report with a name that is not UTF-8
    d8 = work / "in8"
    d8.mkdir()
    shutil.copy(good, os.fsencode(d8) + b"/ok\xff.png")
    r = p.explain(d8, "--out", work / "o8", "--report")
    p.row("8", "--report with ok\\xff.png", f"exit {r.returncode}; index.html "
          f"{'written' if (work / 'o8' / 'index.html').exists() else 'missing'}; "
          f"{'traceback' if 'Traceback' in r.stderr.decode('utf-8', 'replace') else 'no traceback'}")

    # 9. a TorchScript checkpoint's code
    mk = ("import torch, sys\nfrom typing import Tuple\nclass E(torch.nn.Module):\n"
          "    def __init__(self):\n        super().__init__(); self.w = torch.zeros(1)\n"
          "    @torch.jit.export\n    def __getstate__(self) -> Tuple[torch.Tensor, bool]:\n"
          "        return (self.w, self.training)\n"
          "    @torch.jit.export\n    def __setstate__(self, s: Tuple[torch.Tensor, bool]) -> None:\n"
          "        print('CHECKPOINT CODE RAN'); self.w = s[0]; self.training = s[1]\n"
          "torch.jit.save(torch.jit.script(E()), sys.argv[1])\n")
    (work / "make_evil.py").write_text(mk)      # TorchScript needs the class's source file
    p.run([str(work / "make_evil.py"), str(work / "evil.pt")])
    r = p.run(["-m", "export", "--model", "resnet-tiny", "--pretrained", str(work / "evil.pt"), "--out",
               str(work / "o9")])
    p.row("9", "export from a TorchScript checkpoint with a __setstate__",
          f"exit {r.returncode}; code {'RAN' if b'CHECKPOINT CODE RAN' in r.stdout + r.stderr else 'did not run'}; "
          f"{tail(r)[:100]}")

    # 10, 11. malformed and contradictory manifests
    def manifest_case(tag: str, raw: str | None = None, edit=None):
        dst = work / f"art-{tag}"
        shutil.copytree(art, dst)
        if raw is not None:
            (dst / "manifest.json").write_text(raw)
        else:
            m = json.loads((dst / "manifest.json").read_text())
            edit(m, dst)
            (dst / "manifest.json").write_text(json.dumps(m))
        r = p.run(["-m", "runtime.explain", str(good), "--artifacts", str(dst), "--quiet", "--out",
                   str(work / f"o-{tag}")])
        tb = "Traceback" in r.stderr.decode("utf-8", "replace")
        names = "manifest.json" in tail(r) or ".onnx" in tail(r)
        return f"exit {r.returncode}{', traceback' if tb else ''}{'' if names else ', names no file'}"

    p.row("10", "100,000 nested arrays", manifest_case("deep", raw="[" * 100_000 + "]" * 100_000))
    p.row("10", "a 400-digit input_size", manifest_case("int400", edit=lambda m, d: m.update(input_size=10 ** 400)))
    p.row("10", "a 5,000-digit integer", manifest_case("int5000", raw='{"input_size": 1' + "0" * 5000 + "}"))

    def swap(m, d):
        import hashlib

        shutil.copy(d / "classify.onnx", d / "explain.onnx")
        m["graphs"]["explain"]["sha256"] = hashlib.sha256((d / "explain.onnx").read_bytes()).hexdigest()

    def halve(m, d):
        m["input_size"] //= 2
        m["dims"].update(H=m["input_size"], W=m["input_size"])

    p.row("11", "input_size halved", manifest_case("half", edit=halve))
    p.row("11", "explain.onnx swapped for classify.onnx, sha256 updated", manifest_case("swap", edit=swap))
    p.row("11", "dims.C halved", manifest_case("dimsC", edit=lambda m, d: m["dims"].update(C=m["dims"]["C"] // 2)))

    # 12. the Ray job with --out inside the input folder
    d12 = work / "in12"
    p.image(d12 / "a.png", 5)
    for _ in range(2):
        r = p.run(["-m", "runtime.dataset", str(d12), "--artifacts", str(art), "--out", str(d12 / "out"),
                   "--workers", "1"], timeout=900)
    nested = sorted(n for n in os.listdir(d12 / "out") if ".overlay.overlay" in n) if (d12 / "out").exists() else []
    lines = [ln for ln in r.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    p.row("12", "Ray twice with --out inside the input folder", f"{len(nested)} outputs of outputs; "
          f"{len(lines)} stderr lines on the second run")

    # 13. int8 by default
    q = work / "art-q"
    shutil.copytree(art, q)
    r = p.run(["-m", "export", "quantize", "--artifacts", str(q), "--graphs", "classify", "--n-calibration", "4",
               "--n-check", "4"], timeout=900)
    p.row("13", "export quantize without --images", f"exit {r.returncode}; int8 graphs "
          f"{'written' if (q / 'classify.int8.onnx').exists() else 'not written'}; {tail(r)[:90]}")

    # 14. minor
    mk = "import torch, sys\ntorch.save({'layer': object()}, sys.argv[1])\n"
    p.run(["-c", mk, str(work / "pickled.pt")])
    r = p.run(["-m", "export", "--model", "resnet-tiny", "--pretrained", str(work / "pickled.pt"), "--out",
               str(work / "o14")])
    p.row("14", "a pickle checkpoint: stderr lines; --out left", f"{len(r.stderr.splitlines())} lines; "
          f"{'empty --out left' if (work / 'o14').exists() else 'no --out left'}")
    api = ("import numpy as np, sys\nfrom runtime.explainer import Explainer\nex = Explainer.from_artifacts(sys.argv[1])\n"
           "for name, call in (('zeros(0, 0, 3)', lambda: ex.explain(np.zeros((0, 0, 3), np.uint8))),\n"
           "                   ('target=True', lambda: ex.explain(np.zeros((32, 32, 3), np.uint8), target=True))):\n"
           "    try:\n        e = call(); print(name, 'accepted: class', e.target)\n"
           "    except Exception as err:\n        print(name, type(err).__name__)\n")
    r = p.run(["-c", api, str(art)])
    p.row("14", "Explainer.explain(zeros(0, 0, 3)); target=True", "; ".join(r.stdout.decode().strip().splitlines()))
    r = p.explain(good, "--out", work / "o14b", "--target", "\u00b2")
    p.row("14", "--target \u00b2", tail(r)[:110])
    if out_json:
        Path(out_json).write_text(json.dumps(p.rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
