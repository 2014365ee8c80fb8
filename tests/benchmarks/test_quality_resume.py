"""`benchmarks.quality real`: a run killed between photos resumes to the same JSON as an uninterrupted run;
other arguments are refused; chunks of the photos, and runs of other methods, merge into the run they add
up to (`real --from-json`, `pairs --from-json A+B`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality.__main__ import main as quality_main
from benchmarks.quality.checkpoint import Checkpoint, CheckpointError, checkpoint_path
from benchmarks.quality.pairs import paired_metrics
from tests.benchmarks.test_quality_real import N_IMAGES, dataset  # noqa: F401  (the module's fixture)

ROOT = Path(__file__).resolve().parents[2]

# Runs `python -m benchmarks.quality ARGS` and kills itself with SIGKILL right after the checkpoint received
# its KILL_AFTER-th record: a kill between two photos, at a known place.
KILLER = """
import os, signal, sys
from benchmarks.quality import checkpoint
n, done, append = int(os.environ["KILL_AFTER"]), [0], checkpoint.Checkpoint.append
def killing_append(self, *a, **k):
    append(self, *a, **k)
    done[0] += 1
    if done[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpoint.append = killing_append
from benchmarks.quality.__main__ import main
sys.exit(main(sys.argv[1:]))
"""

# Fields that hold times, the command line or the machine: everything else must be equal.
VOLATILE = ("command", "machine", "seconds", "resumed")


def comparable(res: dict, drop=()) -> dict:
    out = {k: v for k, v in res.items() if k not in (*VOLATILE, *drop)}
    out["images"] = [{k: v for k, v in r.items() if k != "seconds"} for r in res["images"]]
    return out


def args_for(data, artifacts, out, *extra) -> list[str]:
    return ["real", "--data", str(data), "--artifacts", str(artifacts), "--json", str(out),
            "--methods", "gradcam,decomcam-ig", "--steps", "4", "--bootstrap", "50", "--road-fractions", "0.5",
            "--no-progress", *extra]


def run(argv, capsys):
    code = quality_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_killed_run_resumes_to_the_same_json(tiny_artifacts, dataset, tmp_path, capsys):  # noqa: F811
    whole = tmp_path / "whole.json"
    code, _, err = run(args_for(dataset, tiny_artifacts.out_dir, whole), capsys)
    assert code == 0, err

    out = tmp_path / "killed.json"
    argv = args_for(dataset, tiny_artifacts.out_dir, out)
    env = {**os.environ, "KILL_AFTER": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == -9, proc.stderr            # killed by the signal, not finished
    ckpt = checkpoint_path(out)
    lines = ckpt.read_text().splitlines()
    assert len(lines) == 3 and not out.exists()          # the header and two photos; no JSON yet
    assert [json.loads(x)["row"] for x in lines[1:]] == [0, 1]

    # other settings: refused in one line, the checkpoint untouched
    code, _, err = run(args_for(dataset, tiny_artifacts.out_dir, out, "--tolerances", "0"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "other settings (protocol.tolerances differ)" in err and str(ckpt) in err
    assert ckpt.read_text().splitlines() == lines

    # a line torn by a crash of the machine is dropped; the same command goes on from photo 2
    with open(ckpt, "a") as f:
        f.write('{"row": 2, "record": {"fi')
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert f"resuming from {ckpt}: 2 photo(s) done, {N_IMAGES - 2} to go" in err
    assert not ckpt.exists()
    resumed = json.loads(out.read_text())
    assert resumed["resumed"] == 2
    assert comparable(resumed) == comparable(json.loads(whole.read_text()))


def test_checkpoint_refuses_another_kind_a_second_writer_and_a_bad_line(tmp_path):
    path = tmp_path / "r.checkpoint.jsonl"
    first = Checkpoint(path, "real", {"a": 1})
    assert first.open() == {}
    first.append(0, record={"x": 1})
    with pytest.raises(CheckpointError, match="another run is writing this checkpoint"):
        Checkpoint(path, "real", {"a": 1}).open()
    first.close()
    with pytest.raises(CheckpointError, match="not a checkpoint of 'benchmarks.quality sanity'"):
        Checkpoint(path, "sanity", {"a": 1}).open()
    with pytest.raises(CheckpointError, match=r"other settings \(a, b differ\)"):
        Checkpoint(path, "real", {"a": 2, "b": 0}).open()
    again = Checkpoint(path, "real", {"a": 1})
    assert again.open() == {0: {"row": 0, "record": {"x": 1}}}
    again.close()
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "garbage", text[1]]) + "\n")
    with pytest.raises(CheckpointError, match=":2: not a record line"):
        Checkpoint(path, "real", {"a": 1}).open()
    assert checkpoint_path(tmp_path / "x.json").name == "x.checkpoint.jsonl"
    assert checkpoint_path(tmp_path / "x.out").name == "x.out.checkpoint.jsonl"


def test_chunks_and_method_sets_merge_into_one_run(tiny_artifacts, dataset, tmp_path, capsys):  # noqa: F811
    art = tiny_artifacts.out_dir
    whole = tmp_path / "whole.json"
    assert run(args_for(dataset, art, whole), capsys)[0] == 0
    chunks = [tmp_path / "a.json", tmp_path / "b.json"]
    assert run(args_for(dataset, art, chunks[0], "--limit", "2"), capsys)[0] == 0
    assert run(args_for(dataset, art, chunks[1], "--start", "2"), capsys)[0] == 0
    merged = tmp_path / "merged.json"
    code, stdout, err = run(["real", "--from-json", f"{chunks[1]},{chunks[0]}", "--json", str(merged),
                             "--bootstrap", "50"], capsys)
    assert code == 0, err
    assert "Table 1b" in stdout and "Table 3 - ROAD" in stdout
    drop = ("targets", "merged_from", "rows", "run_key", "data", "engine", "benchmark")
    got, want = json.loads(merged.read_text()), json.loads(whole.read_text())
    assert got["merged_from"] == [str(chunks[1]), str(chunks[0])]
    assert comparable(got, drop) == comparable(want, drop)

    # another method set on the same photos: pairs across the runs, as if one run had held both
    ig, gc = tmp_path / "ig.json", tmp_path / "gc.json"
    assert run(args_for(dataset, art, ig, "--methods", "decomcam-ig"), capsys)[0] == 0
    assert run(args_for(dataset, art, gc, "--methods", "gradcam"), capsys)[0] == 0
    code, _, err = run(["real", "--from-json", f"{ig},{gc}", "--json", str(merged), "--bootstrap", "50",
                        "--pairs", "decomcam-ig:gradcam"], capsys)
    assert code == 0, err
    both = json.loads(merged.read_text())
    assert both["pairs"] == paired_metrics(want, [("decomcam-ig", "gradcam")], resamples=50)
    assert {"pointing@0", "energy_cm@0", "ins_del", "road"} <= set(both["pairs"][0]["metrics"])
    assert code == 0 and quality_main(["pairs", "--from-json", f"{ig}+{gc}", "--pairs", "decomcam-ig:gradcam",
                                       "--bootstrap", "50"]) == 0
    assert "| decomcam-ig - gradcam | pointing @0 px |" in capsys.readouterr().out
    # pooled with ',' no run holds both: one line naming each file and what it has
    assert quality_main(["pairs", "--from-json", f"{ig},{gc}", "--pairs", "decomcam-ig:gradcam++"]) == 2
    err = capsys.readouterr().err
    assert "no run holds both 'decomcam-ig' and 'gradcam++' ('gradcam++' is missing)" in err
    assert f"{ig} has decomcam-ig; {gc} has gradcam" in err and "merge with '+'" in err
    # another protocol does not merge
    other = tmp_path / "other.json"
    assert run(args_for(dataset, art, other, "--limit", "2", "--steps", "3"), capsys)[0] == 0
    code, _, err = run(["real", "--from-json", f"{chunks[1]},{other}", "--json", str(merged)], capsys)
    assert code == 2 and "protocol settings steps differ" in err


def test_a_checkpoint_without_records_is_not_left_behind(tmp_path):
    """A run that stops before its first photo (a usage error found after the checkpoint opened) leaves no
    checkpoint to refuse the corrected command; one with records, or one an earlier run wrote, stays."""
    from benchmarks.quality.checkpoint import Checkpoint

    path = tmp_path / "x.checkpoint.jsonl"
    c = Checkpoint(path, "real", {"a": 1})
    c.open()
    assert path.exists()
    c.close()
    assert not path.exists()
    c = Checkpoint(path, "real", {"a": 1})
    c.open()
    c.append(0, record={"v": 1})
    c.close()
    assert path.exists()
    again = Checkpoint(path, "real", {"a": 1})
    assert set(again.open()) == {0}
    again.close()   # opened an earlier run's file: kept, though this run appended nothing
    assert path.exists()
