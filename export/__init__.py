"""The torch side: model registry, graph export and validation, imports of any ONNX or PyTorch classifier.

`export_module` (export/module_import.py) is re-exported here and imported on first use, so that `import export`
and `python -m export onnx` stay free of torch.
"""

__all__ = ["export_module"]


def __getattr__(name):
    if name == "export_module":
        from .module_import import export_module

        return export_module
    raise AttributeError(f"module 'export' has no attribute {name!r}")
