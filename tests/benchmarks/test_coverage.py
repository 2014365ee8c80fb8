"""benchmarks/coverage.py without running a model: the model lists, the per-model process limits, the tables."""

from __future__ import annotations

import json

import pytest

from benchmarks import coverage


def test_every_timm_module_is_classified_as_cnn_or_not():
    """A timm release that adds a family must be sorted into one list or the other before it is counted."""
    pytest.importorskip("timm")
    import timm
    from timm.models._registry import _model_to_module

    modules = {_model_to_module[n] for n in timm.list_models()}
    assert not set(coverage.TIMM_CNN_MODULES) & set(coverage.TIMM_NON_CNN_MODULES)
    unknown = modules - set(coverage.TIMM_CNN_MODULES) - set(coverage.TIMM_NON_CNN_MODULES)
    assert not unknown, f"timm modules in neither list: {sorted(unknown)}"
    models = coverage.timm_models()
    assert len({m for _, m in models[:len(coverage.TIMM_CNN_MODULES)]}) == len(
        {m for _, m in models})   # round-robin: the first models cover every module
    assert not [n for n, _ in models if "hybrid" in n or n.startswith(("vit_", "swin", "deit"))]


def test_torchvision_list_is_its_cnns_smallest_first():
    names = [n for n, _ in coverage.torchvision_models()]
    assert "resnet50" in names and "googlenet" in names and "inception_v3" in names
    assert not [n for n in names if n.startswith(("vit_", "swin_", "maxvit_"))]
    assert names.index("squeezenet1_1") < names.index("resnet50") < names.index("vgg19_bn")


def test_a_model_past_its_time_limit_is_killed_and_recorded():
    rec = coverage.run_isolated({"library": "torchvision", "model": "resnet18", "family": "resnet"}, 96, 2e8,
                                timeout=0.5, memory_mb=1e9)
    assert rec["category"] == "timeout/memory" and rec["reason"] == "killed: over the 0 s limit"
    rec = coverage.run_isolated({"library": "torchvision", "model": "resnet18", "family": "resnet"}, 96, 2e8,
                                timeout=600, memory_mb=1.0)
    assert rec["category"] == "timeout/memory" and "resident" in rec["reason"]


def _rec(lib, model, cat, **kw):
    return {"library": lib, "model": model, "family": "f", "category": cat, "reason": kw.pop("reason", ""), **kw}


def test_summary_counts_and_tables():
    records = {f"{r['library']}/{r['model']}": r for r in [
        _rec("timm", "a", "validated", size=96), _rec("timm", "b", "no-vjp", op="Resize", reason="node x (Resize)"),
        _rec("timm", "c", "export", reason="torch.onnx failed"), _rec("timm", "d", "too-large", reason="big"),
        _rec("timm", "e", "validation", size=96, reason="gradients | off"),
        _rec("torchvision", "r", "validated", size=96)]}
    planned = [{"library": "timm", "model": m} for m in "abcdefg"] + [{"library": "torchvision", "model": "r"}]
    s = coverage.summarise(records, planned)
    t = s["timm"]
    assert (t["listed"], t["run"], t["not_run"], t["skipped_too_large"], t["tried"]) == (7, 5, 2, 1, 4)
    assert (t["exported"], t["imported"], t["validated"]) == (3, 2, 1)
    assert t["share_validated_of_tried"] == 0.25 and t["no_vjp_ops"] == {"Resize": 1}
    text = coverage.tables({"summary": s, "records": records})
    assert "no-vjp (Resize)" in text and "gradients / off" in text   # a pipe would split the Markdown cell
    assert "| torchvision |" in text


def test_an_existing_record_needs_resume(tmp_path, monkeypatch):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"records": {}}))
    with pytest.raises(SystemExit, match="exists: --resume"):
        coverage.main(["--json", str(f), "--libraries", "none"])
