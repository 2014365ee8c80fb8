"""The batch runner: inputs -> load -> explain -> render and write, into an output folder.

One runner serves the CLI (its three stages run in runtime/pipeline.py's threads) and the Ray job (one
Ray Data batch at a time, `BatchRunner.run`). Per input it writes NAME.json, NAME.overlay.png,
NAME.components.png and NAME.npz (runtime/render.py), each atomically, the JSON first, and reports one
`Outcome`: ok, skipped (its outputs exist) or failed (one line naming the input).

Resume. NAME.json records the provenance of its explanation: the input's identity (resolved path or URI)
and the sha256 of its bytes, the export (model, explain graph's sha256, class set's sha256) and the
settings its numbers depend on (method, target, class set, resize, precision and the method's own options,
Method.uses). An input is skipped only when NAME.json records exactly this input, content, export and
settings and its three companion files exist. Otherwise:
    * outputs of another input under the same name (dA/cat.png's, when dB/cat.png is explained) are left
      alone, and this input gets a distinct name, NAME-<hash of its path> (Item.tagged_stem);
    * outputs of this input made with other settings, another export or an older copy of the file, and
      outputs without a provenance (files this runner did not write, or wrote before provenance existed),
      fail that input with one line saying what differs; --overwrite (overwrite=True) replaces them;
    * this input's own outputs with a file missing (a run killed while writing) are written again.
Failures are per input: a file that cannot be read or decoded, an image refused by a limit, a failed
preprocessing, an explanation that fails (a group that fails is explained again image by image, so that
the failure is the failing image's alone), a write that fails. An EngineError ends the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engines import EngineError
from .images import ImageError, decode_image
from .inputs import Item, read_source
from .names import one_line, show
from .render import OUTPUT_SUFFIXES, render_many, write_payloads

PROVENANCE_VERSION = 1


@dataclass
class Outcome:
    item: Item
    stem: str                          # the output name used (Item.stem, or its tagged form)
    status: str                        # "ok" | "skipped" | "failed"
    error: str = ""                    # one line naming the input (failed)
    summary: dict | None = None        # NAME.json's content (ok: as written; skipped: as found)
    saliency: np.ndarray | None = None  # [S, S] model-resolution saliency (ok)


@dataclass
class _Ready:
    """An input decoded and preprocessed, waiting for the graphs."""
    item: Item
    stem: str
    provenance: dict
    rgb: np.ndarray
    x: np.ndarray | None               # [3, S, S] float32; None: preprocessed on the device with the graphs
    geometry: object
    load_s: float
    preprocess_s: float


@dataclass
class Group:
    """What the loader hands on: per input, either a final Outcome or a _Ready."""
    slots: list = field(default_factory=list)
    explained: dict = field(default_factory=dict)   # index in slots -> Explanation (filled by compute)
    errors: dict = field(default_factory=dict)      # index in slots -> one-line problem (filled by compute)


class BatchRunner:
    """Explain inputs with `explainer` (runtime.explainer.Explainer) into `out_dir`."""

    def __init__(self, explainer, out_dir: str | Path, overwrite: bool = False, extra: dict | None = None,
                 workers: int | None = None):
        self.ex = explainer
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.overwrite = bool(overwrite)
        self.workers = workers if workers is not None else explainer.settings.threads
        s = explainer.settings
        meth = explainer_method(explainer)
        art = explainer.artifacts
        cls = (art.manifest.get("class_sets") or {}).get(explainer.classes.name) or {}
        self.settings_key = {
            "method": s.method,
            "target": explainer.resolve_target(s.target),
            "class_set": explainer.classes.name,
            "resize": explainer.resize_mode,
            "precision": s.precision,
            **{k: getattr(s, k) for k in meth.uses},
        }
        self.artifacts_key = {
            "model": art.model,
            "explain_sha256": (art.manifest.get("graphs", {}).get("explain") or {}).get("sha256"),
            "class_set_sha256": cls.get("sha256") or cls.get("labels_sha256"),
        }
        self.extra = {"engine": s.engine, "artifacts": str(art.root), **(extra or {})}

    # -- deciding -----------------------------------------------------------------------------------------
    def _existing(self, stem: str) -> tuple[dict | None, bool, list[str]]:
        """(NAME.json parsed or None, NAME.json present, the other output files present)."""
        j = self.out_dir / f"{stem}.json"
        others = [f"{stem}{s}" for s in OUTPUT_SUFFIXES if s != ".json" and (self.out_dir / f"{stem}{s}").exists()]
        if not j.exists():
            return None, False, others
        try:
            data = json.loads(j.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None, True, others
        return (data if isinstance(data, dict) else None), True, others

    def provenance(self, item: Item, digest: str) -> dict:
        return {"version": PROVENANCE_VERSION, "source": item.identity, "source_sha256": digest,
                "artifacts": self.artifacts_key, "settings": self.settings_key}

    def _differences(self, old: dict, new: dict) -> list[str]:
        out = []
        if old.get("source_sha256") != new["source_sha256"]:
            out.append("the file's content changed")
        a, b = old.get("artifacts") or {}, new["artifacts"]
        if a != b:
            out.append("another export" + (f" ({_short(a.get('model'))}, now {_short(b.get('model'))})"
                                           if a.get("model") != b.get("model") else ""))
        a, b = old.get("settings") or {}, new["settings"]
        keys = ["method"] if a.get("method") != b.get("method") else sorted(set(a) | set(b))
        out += [f"{k} {_short(a.get(k))} (now {_short(b.get(k))})" for k in keys if a.get(k) != b.get(k)]
        return out

    def decide(self, item: Item, digest: str) -> tuple[str, str | None, Outcome | None]:
        """(stem, problem or None, skip Outcome or None) for an input whose bytes hash to `digest`."""
        prov = self.provenance(item, digest)
        stem = item.stem
        data, has_json, others = self._existing(stem)
        old = (data or {}).get("provenance") if data else None
        if isinstance(old, dict) and old.get("source") != prov["source"]:
            stem = item.tagged_stem()               # another input's outputs: never touched
            data, has_json, others = self._existing(stem)
            old = (data or {}).get("provenance") if data else None
            if isinstance(old, dict) and old.get("source") != prov["source"]:
                return stem, (f"{show(self.out_dir / (stem + '.json'))} holds the explanation of another input "
                              f"({show(old.get('source'))}); use another --out"), None
        if self.overwrite:
            return stem, None, None
        where = show(self.out_dir / f"{stem}.json")
        if has_json:
            if not isinstance(old, dict):
                return stem, (f"{where} exists but records no provenance (not written for this input by this "
                              f"version); --overwrite replaces it, or use another --out"), None
            diff = self._differences(old, prov)
            if diff:
                return stem, (f"{where} holds an explanation of this input that differs: {'; '.join(diff)}; "
                              f"--overwrite replaces it, or use another --out"), None
            if len(others) == len(OUTPUT_SUFFIXES) - 1:
                return stem, None, Outcome(item, stem, "skipped", summary=data)
            return stem, None, None                 # this input's own outputs, a file missing: written again
        if others:
            return stem, (f"{', '.join(show(self.out_dir / o) for o in others)} exist without {show(stem + '.json')}: "
                          f"not provably this input's outputs; --overwrite replaces them, or use another --out"), None
        return stem, None, None

    # -- the three stages ---------------------------------------------------------------------------------
    def load(self, items: list[Item]) -> Group:
        """Read, decide (skip / fail / explain), decode and preprocess each input; nothing here fails the group."""
        s = self.ex.settings
        group = Group()
        pending = []
        for item in items:
            t = time.perf_counter()
            try:
                data = read_source(item.source, s.max_bytes)
            except ImageError as e:
                group.slots.append(Outcome(item, item.stem, "failed", str(e)))
                continue
            digest = hashlib.sha256(data).hexdigest()
            stem, problem, skip = self.decide(item, digest)
            if problem:
                group.slots.append(Outcome(item, stem, "failed", f"{show(item.source)}: {problem}"))
                continue
            if skip:
                group.slots.append(skip)
                continue
            try:
                rgb = decode_image(data, item.source, s.max_pixels, s.max_aspect)
            except ImageError as e:
                group.slots.append(Outcome(item, stem, "failed", str(e)))
                continue
            group.slots.append(None)
            pending.append((len(group.slots) - 1, item, stem, self.provenance(item, digest), rgb,
                            time.perf_counter() - t))

        from .artifacts import image_pool

        def prep(job):
            t = time.perf_counter()
            try:
                x, geom = self.ex.artifacts.preprocess_image(job[4], self.ex.resize_mode, s.max_aspect)
            except Exception as e:  # noqa: BLE001 (this image's failure alone)
                return e, time.perf_counter() - t
            return (x, geom), time.perf_counter() - t

        if self.ex.device_images:   # preprocessed on the device with the graphs (Explainer.explain_arrays)
            for i, item, stem, prov, rgb, load_s in pending:
                group.slots[i] = _Ready(item, stem, prov, rgb, None, None, load_s, 0.0)
            return group
        pool = image_pool(self.workers) if len(pending) > 1 else None
        done = pool.map(prep, pending) if pool is not None else [prep(j) for j in pending]
        for (i, item, stem, prov, rgb, load_s), (res, prep_s) in zip(pending, done):
            if isinstance(res, Exception):
                group.slots[i] = Outcome(item, stem, "failed",
                                         f"{show(item.source)}: preprocessing failed ({_problem(res)})")
            else:
                group.slots[i] = _Ready(item, stem, prov, rgb, res[0], res[1], load_s, prep_s)
        return group

    def compute(self, group: Group) -> Group:
        """Explain the group's ready inputs in one call; a failing call is retried image by image, so that a
        failure is the failing image's alone. An EngineError (the engine itself) ends the run."""
        ready = [(i, r) for i, r in enumerate(group.slots) if isinstance(r, _Ready)]
        if not ready:
            return group
        try:
            exps = self._explain([r for _, r in ready])
            group.explained.update({i: e for (i, _), e in zip(ready, exps)})
            return group
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001
            if len(ready) == 1:
                group.errors[ready[0][0]] = f"explanation failed ({_problem(e)})"
                return group
        for i, r in ready:
            try:
                group.explained[i] = self._explain([r])[0]
            except EngineError:
                raise
            except Exception as e:  # noqa: BLE001
                group.errors[i] = f"explanation failed ({_problem(e)})"
        return group

    def _explain(self, ready: list[_Ready]):
        prepared = None if ready[0].x is None else (np.stack([r.x for r in ready]), [r.geometry for r in ready])
        return self.ex.explain_arrays([r.rgb for r in ready], [r.item.source for r in ready], prepared=prepared)

    def emit(self, group: Group) -> list[Outcome]:
        """Render and write the explained inputs (pictures encoded in the image pool), in input order; the
        group's Outcomes, one per input."""
        jobs = []
        for i, slot in enumerate(group.slots):
            if isinstance(slot, _Ready) and i in group.explained:
                e = group.explained[i]
                e.timings.update(load=slot.load_s, preprocess=slot.preprocess_s)  # the loader's share
                jobs.append((i, slot, e))
        extra = {**self.extra, "precision": dict(self.ex.graph_precisions)}  # the graphs run so far
        outcomes: dict[int, Outcome] = {}
        with contextlib.closing(render_many([(slot.rgb, e) for _, slot, e in jobs],
                                            [{**extra, "provenance": slot.provenance} for _, slot, _ in jobs],
                                            self.workers)) as rendered:
            for (i, slot, e), payloads in zip(jobs, rendered):
                try:
                    if isinstance(payloads, OSError):
                        raise payloads
                    write_payloads(self.out_dir, slot.stem, payloads)
                    summary = json.loads(payloads[OUTPUT_SUFFIXES.index(".json")])
                    outcomes[i] = Outcome(slot.item, slot.stem, "ok", summary=summary, saliency=e.saliency)
                except OSError as err:
                    outcomes[i] = Outcome(slot.item, slot.stem, "failed",
                                          f"{show(slot.item.source)}: could not write outputs ({one_line(err)})")
        out = []
        for i, slot in enumerate(group.slots):
            if isinstance(slot, Outcome):
                out.append(slot)
            elif i in outcomes:
                out.append(outcomes[i])
            else:
                out.append(Outcome(slot.item, slot.stem, "failed",
                                   f"{show(slot.item.source)}: {group.errors.get(i, 'not explained')}"))
        return out

    def run(self, items: list[Item]) -> list[Outcome]:
        """load -> compute -> emit in this thread (the Ray actor's way)."""
        return self.emit(self.compute(self.load(items)))

    def saliency_of(self, stem: str) -> np.ndarray | None:
        """The model-resolution saliency of existing outputs (NAME.npz), or None when unreadable."""
        try:
            with np.load(self.out_dir / f"{stem}.npz", allow_pickle=False) as z:
                return np.asarray(z["saliency"], np.float32)
        except (OSError, ValueError, KeyError):
            return None


def explainer_method(explainer):
    from .methods import get_method

    return get_method(explainer.settings.method)


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return one_line(text if len(text) <= 40 else text[:16] + "..." + text[-8:])


def _problem(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0][:200]
    return one_line(f"{type(e).__name__}: {first}" if first else type(e).__name__)
