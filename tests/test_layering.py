"""The house's rules, read from the code's imports (every import statement, at any depth of a module, lazy
ones included): runtime/ never imports export/, benchmarks/, torch, open_clip, torchvision or onnx (it runs
with onnxruntime, numpy and OpenCV only); export/ never imports benchmarks/; the library parts of runtime/
never import the command-line modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = {"runtime.explain", "runtime.cli_args"}         # command lines; runtime.dataset's main is its own
CLI_USERS = {"runtime.explain", "runtime.cli_args", "runtime.dataset", "runtime.serve"}


def imports(path: Path, package: str) -> set[str]:
    """Every module a file imports, relative imports resolved against `package` (its dotted package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)   # `from . import decomcam` is a module too
    return found


def modules(pkg: str):
    for path in sorted((ROOT / pkg).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else ".".join(rel.parts[:-1])
        yield name, imports(path, package)


def top(mod: str) -> str:
    return mod.split(".")[0]


def test_runtime_imports_no_torch_no_onnx_no_export_no_benchmarks():
    banned = {"torch", "torchvision", "open_clip", "onnx", "onnxscript", "export", "benchmarks"}
    hits = {name: sorted(m for m in mods if top(m) in banned) for name, mods in modules("runtime")}
    assert {k: v for k, v in hits.items() if v} == {}


def test_export_never_imports_benchmarks():
    hits = {name: sorted(m for m in mods if top(m) == "benchmarks") for name, mods in modules("export")}
    assert {k: v for k, v in hits.items() if v} == {}


def test_the_library_never_imports_the_command_line():
    hits = {name: sorted(m for m in mods if m in CLI_MODULES)
            for name, mods in modules("runtime") if name not in CLI_USERS}
    assert {k: v for k, v in hits.items() if v} == {}


def test_the_rules_see_lazy_and_relative_imports(tmp_path):
    """The parser itself: an import inside a function and a relative import are found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import torch.nn\n    from ..decomcam import minmax\n    from . import x\n"
                 "    from export.models import load_model\n")
    found = imports(f, "runtime.methods")
    assert {"torch.nn", "runtime.decomcam", "runtime.decomcam.minmax", "runtime.methods.x", "export.models"} <= found
