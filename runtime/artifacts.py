"""Reading an artifacts folder written by `python -m export`: manifest, graph integrity, class sets."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .spec import GRAPHS, MANIFEST_NAME, MANIFEST_VERSION


class ArtifactsError(ValueError):
    """A missing, incomplete or tampered artifacts folder (one-line message naming the file)."""


def sha256_path(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass
class ClassSetData:
    name: str
    labels: list[str]
    embeddings: np.ndarray  # [L, D] float32, unit rows


@dataclass
class Artifacts:
    root: Path
    manifest: dict
    verify: bool = True                          # check each graph's sha256 before it is used
    checked: set = field(default_factory=set)    # graphs already checked

    def graph_entries(self, precision: str = "fp32") -> dict:
        """The manifest's graph entries of a precision: "fp32" (`graphs`) or "fp16" (`precisions.fp16.graphs`,
        written by export/precision.py)."""
        if precision == "fp32":
            return self.manifest["graphs"]
        entry = self.manifest.get("precisions", {}).get(precision)
        if entry is None:
            raise ArtifactsError(f"{self.root / MANIFEST_NAME}: no {precision} graphs; export with "
                                 f"--precision {precision} (or python -m export.precision --artifacts {self.root})")
        return entry["graphs"]

    def check_graph(self, name: str, precision: str = "fp32") -> Path:
        """The graph's path, after checking it is listed, present, of this runtime's contract and (when
        `verify`) that its sha256 matches the manifest. Each graph is checked once."""
        mpath = self.root / MANIFEST_NAME
        entry = self.graph_entries(precision).get(name)
        if entry is None:
            raise ArtifactsError(f"{mpath}: no '{name}' graph listed; re-export with this version")
        path = self.root / entry["file"]
        if (name, precision) in self.checked:
            return path
        if not path.is_file():
            raise ArtifactsError(f"{path}: graph file missing")
        if entry.get("inputs") != GRAPHS[name].to_json()["inputs"]:
            raise ArtifactsError(f"{path}: graph inputs differ from this runtime's contract; re-export")
        if self.verify:
            digest = sha256_path(path)
            if digest != entry["sha256"]:
                raise ArtifactsError(
                    f"{path}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...; "
                    f"the graph was modified or belongs to another export"
                )
        self.checked.add((name, precision))
        return path

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def input_size(self) -> int:
        return int(self.manifest["input_size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["std"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.manifest["dims"])

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("random_weights", False))

    def graph_path(self, name: str) -> Path:
        return self.root / self.manifest["graphs"][name]["file"]

    def class_set_names(self) -> list[str]:
        return list(self.manifest.get("class_sets", {}))

    def load_class_set(self, name: str | None = None) -> ClassSetData:
        sets = self.manifest.get("class_sets", {})
        name = name or self.manifest.get("default_class_set")
        if not name or name not in sets:
            raise ArtifactsError(
                f"{self.root / MANIFEST_NAME}: no class set '{name}'; available: {', '.join(sets) or 'none'}"
            )
        entry = sets[name]
        lab_path, emb_path = self.root / entry["labels"], self.root / entry["embeddings"]
        for p in (lab_path, emb_path):
            if not p.is_file():
                raise ArtifactsError(f"{p}: class set file missing")
        labels = [ln for ln in lab_path.read_text(encoding="utf-8").splitlines() if ln]
        emb = np.load(emb_path).astype(np.float32)
        d = self.dims["D"]
        if emb.shape != (len(labels), d):
            raise ArtifactsError(f"{emb_path}: embeddings have shape {emb.shape}, expected ({len(labels)}, {d})")
        return ClassSetData(name, labels, np.ascontiguousarray(emb))


def load_artifacts(root: str | os.PathLike, verify: bool = True, graphs=("explain", "classify")) -> Artifacts:
    """Read and check an artifacts folder; `verify` checks each needed graph's sha256 against the manifest."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactsError(f"{root}: artifacts folder not found (create it with `python -m export ... --out {root}`)")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactsError(f"{mpath}: manifest missing; not an artifacts folder written by `python -m export`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactsError(f"{mpath}: not valid JSON ({e})") from e
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ArtifactsError(f"{mpath}: manifest format {manifest.get('format_version')} is not {MANIFEST_VERSION}")
    for key in ("model", "input_size", "mean", "std", "logit_scale", "dims", "graphs"):
        if key not in manifest:
            raise ArtifactsError(f"{mpath}: manifest lacks '{key}'")
    art = Artifacts(root, manifest, verify=verify)
    for name in graphs:
        art.check_graph(name)
    return art
