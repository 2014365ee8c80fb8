"""`import runtime` refuses two ONNX Runtimes (CPU and GPU overwrite the same module) and none, in one line."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest

import runtime
import runtime.install as install


def fake_distributions(monkeypatch, present: set[str]):
    real = metadata.distribution

    def distribution(name):
        if name in (install.CPU, install.GPU):
            if name not in present:
                raise metadata.PackageNotFoundError(name)
            return object()
        return real(name)

    monkeypatch.setattr(install.metadata, "distribution", distribution)


@pytest.mark.parametrize("present, match", [
    ({"onnxruntime", "onnxruntime-gpu"},
     r"^both onnxruntime and onnxruntime-gpu are installed and overwrite the same module: pip uninstall -y "
     r"onnxruntime onnxruntime-gpu, then pip install 'decomcam\[cuda\]'"),
    (set(), r"^no ONNX Runtime is installed: pip install 'decomcam\[cpu\]', or on a GPU 'decomcam\[cuda\]' \(CUDA "
            r"13\) or 'decomcam\[cuda12\]'"),
])
def test_import_refuses_both_or_neither(monkeypatch, present, match):
    with monkeypatch.context() as m:
        fake_distributions(m, present)
        with pytest.raises(ImportError, match=match) as e:
            importlib.reload(runtime)
        assert "\n" not in str(e.value)
    importlib.reload(runtime)  # the real installation again


@pytest.mark.parametrize("present, name", [({"onnxruntime"}, "onnxruntime"), ({"onnxruntime-gpu"}, "onnxruntime-gpu")])
def test_one_onnxruntime_is_accepted(monkeypatch, present, name):
    fake_distributions(monkeypatch, present)
    assert install.check_onnxruntime() == name


def test_this_environment_has_exactly_one():
    """Counted from the installed distributions themselves, not from what `import runtime` recorded."""
    from importlib import metadata

    present = []
    for dist in (install.CPU, install.GPU):
        try:
            metadata.distribution(dist)
            present.append(dist)
        except metadata.PackageNotFoundError:
            pass
    assert present == [runtime.ONNXRUNTIME_DISTRIBUTION]
