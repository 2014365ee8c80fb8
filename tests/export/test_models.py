"""Checkpoints (export/models.py) that are not checkpoints: one-line model errors, no code of a pickle or a
TorchScript archive ever runs."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from export.__main__ import main as export_main
from export.models import ModelError, load_checkpoint, load_model


@pytest.fixture
def art(tiny_artifacts, tmp_path) -> Path:
    a = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, a)
    return a


def edit_manifest(a: Path, fn) -> None:
    m = json.loads((a / "manifest.json").read_text())
    m = fn(m)
    (a / "manifest.json").write_text(json.dumps(m))


# -- 10. checkpoints that are not checkpoints -------------------------------------------------------

def test_broken_checkpoints_are_one_line_model_errors(tiny, tmp_path):
    from safetensors.torch import save_file

    model = load_model("RN-tiny", "none").model
    cases = {}
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty.pt"] = r"empty file \(0 bytes\)"
    (tmp_path / "zero.pt").write_bytes(b"\0" * 10)
    cases["zero.pt"] = "not a loadable checkpoint"
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(good))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases["cut.safetensors"] = r"not a loadable \.safetensors file \(SafetensorError"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    cases["junk.safetensors"] = r"not a loadable \.safetensors file"
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
        z.writestr("archive/constants.pkl", b"garbage")
        z.writestr("archive/data.pkl", b"garbage")
    cases["script.pt"] = "a TorchScript archive, refused: loading one can run code stored in it"
    (tmp_path / "tensor.pt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "tensor.pt")
    cases["tensor.pt"] = "expected a state dict of named tensors, found list"
    for name, match in cases.items():
        with pytest.raises(ModelError, match=rf"{name}: {match}") as e:
            load_checkpoint(model, tmp_path / name)
        assert "\n" not in str(e.value)
    load_checkpoint(model, good)  # the intact file loads


def test_export_cli_checkpoint_error_is_one_line(tmp_path, capsys):
    """One line, exit 1, and no empty --out folder left behind (a failed export left one)."""
    (tmp_path / "empty.pt").write_bytes(b"")
    code = export_main(["--model", "RN-tiny", "--pretrained", str(tmp_path / "empty.pt"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "empty file" in err
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()                                   # a folder that was there before stays
    assert export_main(["--model", "RN-tiny", "--pretrained", str(tmp_path / "empty.pt"), "--out",
                        str(tmp_path / "b")]) == 1
    assert (tmp_path / "b").is_dir()


def test_a_pickle_checkpoint_is_one_line(tmp_path, capfd):
    """torch.load's 2-line UserWarning came before the one-line error."""
    torch.save({"layer": object()}, tmp_path / "pickled.pt")
    code = export_main(["--model", "resnet-tiny", "--pretrained", str(tmp_path / "pickled.pt"), "--out",
                        str(tmp_path / "a")])
    err = capfd.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pickled.pt: not a loadable checkpoint" in err, err


def test_torchscript_code_never_runs(tmp_path, capfd):
    """A TorchScript checkpoint whose __setstate__ prints: it ran before the "does not fit" refusal. Now the
    archive is refused from its zip listing, before anything is loaded."""
    from typing import Tuple

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.zeros(1)

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, bool]:
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
            print("CHECKPOINT CODE RAN")
            self.w = state[0]
            self.training = state[1]

    torch.jit.save(torch.jit.script(Evil()), str(tmp_path / "evil.pt"))
    torch.jit.load(str(tmp_path / "evil.pt"))                  # the archive's code does run when loaded
    assert "CHECKPOINT CODE RAN" in capfd.readouterr().out
    for model in ("resnet-tiny", "RN-tiny"):
        code = export_main(["--model", model, "--pretrained", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "a")])
        out, err = capfd.readouterr()
        assert code == 1 and "CHECKPOINT CODE RAN" not in out + err
        assert err.count("\n") == 1 and "evil.pt: a TorchScript archive, refused" in err


